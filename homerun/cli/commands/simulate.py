"""`homerun simulate TRACE --cache-slots N`: replay a routing trace through every expert-cache policy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def simulate(
        trace: Annotated[Path, typer.Argument(help="Routing trace JSONL: a header line, then token/layer/experts.")],
        cache_slots: Annotated[int, typer.Option("--cache-slots", help="Slots of one global (layer, expert) cache.")],
        json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    ) -> None:
        """Replay TRACE through every cache policy and Belady's MIN (the optimum for that cache size).

        Examples:
          homerun simulate trace.jsonl --cache-slots 128
          homerun simulate trace.jsonl --cache-slots 1024 --json
        """
        from homerun.cli.output import Output
        from offload.simulate import simulate as run_simulation
        from offload.trace import read_trace

        out = Output(json_out)
        tr = read_trace(trace)
        res = run_simulation(tr, cache_slots)

        def render(console) -> None:
            from homerun.cli.tables import print_table

            rows = [[f"{name} (default)" if name == res.default_policy else name, f"{rate:.3f}",
                     f"{rate / res.belady:.2f}" if res.belady else "-"] for name, rate in res.policies.items()]
            rows.append(["belady (optimum)", f"{res.belady:.3f}", "1.00"])
            print_table(console, f"{tr.header.model}: {res.n_accesses} accesses, {res.n_distinct} distinct experts, "
                                 f"{res.cache_slots} slots",
                        [("policy", "left"), ("hit rate", "right"), ("of Belady", "right")], rows,
                        caption="each (token, layer): resident experts hit before misses load, as the runtime does")

        out.result(res, render)
