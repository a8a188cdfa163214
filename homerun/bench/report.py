"""How bench records read: llama-bench's CSV fields, a markdown table, the footer naming the build and the machine,
and the hit-rate / tok/s plot. Pure formatting of the JSON documents bench produces; the CLI owns the terminal.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from homerun.errors import UsageError

OUTPUT_FORMATS = ("json", "jsonl", "csv", "md")


CSV_FIELDS = (
    "build_commit", "homerun_version", "torch_version", "cpu_info", "gpu_info", "backends", "n_threads", "kernel_path",
    "model", "model_type", "model_size", "model_n_params", "n_layers", "backend", "profile", "gpu_experts",
    "expert_cache_slots", "test", "cache", "n_prompt", "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns",
    "avg_ts", "stddev_ts", "samples_ns", "samples_ts", "ms_per_token", "ms_per_layer", "samples_cpu_s", "cpu_s",
    "tokens_per_cpu_s", "cpu_ts", "cpu_cores_used", "hit_rate", "dram_gbps",
    "dram_limit_gbps", "vram_gbps",
    "vram_limit_gbps", "pcie_gbps", "pcie_limit_gbps", "predicted_ts", "prediction_ratio", "prediction_ratio_cpu", "extrapolated",
    "extrapolation", "correctness_ok", "correctness_max_rel_err", "correctness_tol", "gflops", "peak_gflops",
    "peak_ratio",
)


def flat(d: dict[str, Any]) -> dict[str, Any]:
    """One CSV row: llama-bench's space-separated sample lists, links and gate flattened."""
    row = {k: d.get(k) for k in CSV_FIELDS if k in d}
    row["samples_ns"] = " ".join(str(x) for x in d["samples_ns"])
    row["samples_ts"] = " ".join(f"{x:.6g}" for x in d["samples_ts"])
    row["samples_cpu_s"] = " ".join(f"{x:.6g}" for x in d.get("samples_cpu_s") or ())
    for link in ("dram", "vram", "pcie"):
        l = d["links"].get(link) or {}
        row[f"{link}_gbps"] = l.get("gbps")
        row[f"{link}_limit_gbps"] = l.get("limit_gbps")
    g = d["correctness"]
    row.update(correctness_ok=g.get("ok"), correctness_max_rel_err=g.get("max_rel_err"), correctness_tol=g.get("tol"))
    return row


def render_csv(docs: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for d in docs:
        w.writerow(flat(d))
    return buf.getvalue()


TABLE_COLUMNS = ("model", "size", "params", "backend", "profile", "gpu experts", "test", "cache", "t/s",
                 "CPU-time t/s (cores used)", "hit rate", "GB/s (of limit)", "GFLOP/s (of peak)", "plan t/s", "ratio",
                 "CPU-time ratio", "gate")


def table_row(d: dict[str, Any]) -> list[str]:
    def num(x: float | None, f: str = ".2f") -> str:
        return "-" if x is None else format(x, f)

    links = ", ".join(f"{k} {v['gbps']:.2f}" + (f" ({v['ratio']:.0%})" if v.get("ratio") is not None else "")
                      for k, v in d["links"].items()) or "-"
    g = d["correctness"]
    gate = "skipped" if g.get("ok") is None else ("ok" if g["ok"] else f"FAIL {g['max_rel_err']:.2g}")
    return [d["model"], human_bytes(d["model_size"]), human_count(d["model_n_params"]), d["backend"],
            d["profile"], str(d["gpu_experts"]), d["test"], d["cache"], f"{d['avg_ts']:.2f} ± {d['stddev_ts']:.2f}",
            _cpu_ts(d), num(d["hit_rate"]), links, _gflops(d), num(d["predicted_ts"]), num(d["prediction_ratio"], ".3f"),
            num(d.get("prediction_ratio_cpu"), ".3f"), gate]


def _cpu_ts(d: dict[str, Any]) -> str:
    """tokens per process CPU-second x n_threads (the t/s with every thread on a core of its own), and the cores
    the run got on average (CPU-s / wall-s)."""
    if d.get("cpu_ts") is None:
        return "-"
    cores = d.get("cpu_cores_used")
    return f"{d['cpu_ts']:.2f}" + (f" ({cores:.2f} of {d.get('n_threads')})" if cores is not None else "")


def _gflops(d: dict[str, Any]) -> str:
    """pp tests: the linears' GFLOP/s, with the share of the units' peak and the units (dense/experts)."""
    if d.get("gflops") is None:
        return "-"
    u = d.get("units") or {}
    of = f" ({d['peak_ratio']:.0%} of {d['peak_gflops']:.0f}, {u.get('dense')}/{u.get('experts')})" \
        if d.get("peak_ratio") is not None else ""
    return f"{d['gflops']:.1f}{of}"


def human_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def human_count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def render_md(docs: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join(" --- " for _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in table_row(d)) + " |" for d in docs]
    return "\n".join(lines) + "\n" + _footer(docs) + "\n"


def _footer(docs: list[dict[str, Any]]) -> str:
    if not docs:
        return ""
    d = docs[0]
    lim = d["limits"]
    text = (f"build {d['build_commit']} (homerun {d['homerun_version']}, torch {d['torch_version']}), {d['cpu_info']}, "
            f"GPU: {d['gpu_info']}, kernel path {d['kernel_path']}; DRAM read {lim['dram_read_gbps'] or 0:.1f} GB/s "
            f"measured")
    if any(x["extrapolated"] for x in docs):
        text += "; 'extrapolated' rows are estimates for the full model, not measurements"
    return text


def need_matplotlib() -> None:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed",
                         hint="pip install 'homerun[plot]' (or pip install matplotlib)") from None
    del matplotlib


def render_plot(docs: list[dict[str, Any]], path: str) -> None:
    """Hit rate vs cache size when several cache sizes ran, else tok/s vs depth per test kind (warm records)."""
    need_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warm = [d for d in docs if d["cache"] == "warm"]
    sizes = sorted({d["expert_cache_slots"] for d in warm if d["expert_cache_slots"] is not None})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(sizes) > 1:
        for kind in sorted({d["test"].split(" @")[0] for d in warm}):
            pts = sorted((d["expert_cache_slots"], d["hit_rate"] or 0.0) for d in warm
                         if d["test"].split(" @")[0] == kind and d["expert_cache_slots"] is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
        ax.set_xlabel("expert cache slots")
        ax.set_ylabel("hit rate")
        ax.set_xscale("log")
    else:
        for kind in sorted({("pp" if d["n_prompt"] else "tg") + str(d["n_prompt"] or d["n_gen"]) for d in warm}):
            pts = sorted((d["n_depth"], d["avg_ts"], d["stddev_ts"]) for d in warm
                         if ("pp" if d["n_prompt"] else "tg") + str(d["n_prompt"] or d["n_gen"]) == kind)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        label=kind)
        ax.set_xlabel("context depth (tokens)")
        ax.set_ylabel("tokens / s")
    ax.set_title(warm[0]["model"] if warm else "homerun bench")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
