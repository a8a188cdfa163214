"""Run the planner over the published measurements (benchmarks/published.json) and print how it compares (issue 17).

    python benchmarks/validate_plans.py            # table + summary
    python benchmarks/validate_plans.py --json     # machine-readable rows and summary
    python benchmarks/validate_plans.py --all      # also list the excluded rows and why

The comparison itself lives in homerun.plan.validate (importable; `homerun plan --validate` will reuse it).
"""

from __future__ import annotations

import argparse
import json
import sys

from homerun.plan.validate import (
    TABLE_PATH,
    Comparison,
    compare_table,
    excluded,
    load_table,
    summarize,
)


def _f(x: float | None, width: int, prec: int = 2) -> str:
    return f"{x:>{width}.{prec}f}" if x is not None else f"{'-':>{width}}"


def format_table(results: list[Comparison]) -> str:
    head = (f"{'row':<48} {'mode plan/stated':<21} {'placement':<13} {'meas':>7} {'bound':>8} {'est':>8} "
            f"{'est/meas':>8} "
            f"{'bound>=meas':>11} {'hit':>5}")
    lines = [head, "-" * len(head)]
    for c in results:
        meas = f"{c.measured:.2f}" if c.measured == c.measured_high else f"{c.measured:g}-{c.measured_high:g}"
        lines.append(f"{c.id:<48} {c.planned_mode + '/' + c.stated_mode:<21} {c.placement:<13} {meas:>7} "
                     f"{_f(c.upper_bound, 8)} "
                     f"{_f(c.estimate, 8)} {_f(c.ratio, 8)} {('yes' if c.bound_ok else 'NO'):>11} {_f(c.hit_rate, 5)}")
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    frac = s["hybrid_within_2x_fraction"]
    worst, worst_h = s["worst_ratio"], s["worst_hybrid_ratio"]
    return "\n".join([
        f"bound >= measured: {s['bound_holds']}/{s['rows']} rows"
        + (f" (violated: {', '.join(s['bound_violations'])})" if s["bound_violations"] else ""),
        f"hybrid rows within 0.5x-2x: {s['hybrid_within_2x']}/{s['hybrid_rows']}"
        + (f" = {frac:.0%}" if frac is not None else "") + " (goal >= 80 %, none beyond 3x)",
        f"hybrid rows beyond 3x: {', '.join(s['hybrid_beyond_3x']) or 'none'}",
        f"all rows within 0.5x-2x: {s['all_within_2x_fraction']:.0%}" if s["all_within_2x_fraction"] is not None else "",
        f"worst estimate/measured: {worst['ratio']:.2f}x ({worst['id']})" if worst else "",
        f"worst hybrid estimate/measured: {worst_h['ratio']:.2f}x ({worst_h['id']})" if worst_h else "",
        f"planned mode differs from stated: {', '.join(s['mode_disagreements']) or 'none'}",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", default=str(TABLE_PATH), help="published table (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print rows and summary as JSON")
    ap.add_argument("--all", action="store_true", help="also list excluded rows with their reasons")
    args = ap.parse_args(argv)
    rows = load_table(args.table)
    results = compare_table(rows)
    summary = summarize(results)
    left_out = excluded(rows)
    if args.json:
        json.dump({"rows": [c.to_dict() for c in results], "summary": summary, "excluded": left_out}, sys.stdout, indent=1)
        print()
        return 0
    print(format_table(results))
    print()
    print(format_summary(summary))
    if args.all:
        print("\nexcluded rows:")
        for e in left_out:
            print(f"  {e['id']} ({e['decode_tok_s']} tok/s): {e['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
