"""`homerun profiles [NAME]`: list the shipped hardware profiles, or show one (name, .toml path, or `auto`)."""

from __future__ import annotations

from typing import Annotated, Any

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def profiles(
        name: Annotated[str | None, typer.Argument(help="Profile to show: a shipped name, a .toml path, or 'auto'. "
                                                       "Omit to list all.")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    ) -> None:
        """List the hardware profiles, or show one in full.

        Examples:
          homerun profiles
          homerun profiles rtx5090-192gb
          homerun profiles ./my-rig.toml --json
        """
        from homerun.cli.output import Output
        from profiles import list_profiles, load_profile

        out = Output(json_out)
        if name is None:
            rows = [_summary(load_profile(n)) for n in list_profiles()]
            out.result({"profiles": rows}, lambda console: _render_list(console, rows))
            return
        if name == "auto":
            from homerun.plan.hardware import cpu_kernel_info, detect, load_measured

            prof, det = detect(measured=load_measured())
            doc = {"profile": prof.to_dict(), "detection": det.to_dict(), "cpu_kernel": cpu_kernel_info()}
        else:
            prof = load_profile(name)
            doc = {"profile": prof.to_dict()}
        out.result(doc, lambda console: _render_one(console, doc))


def _summary(p: Any) -> dict[str, Any]:
    gpus = p.gpu_list
    return {
        "name": p.name,
        "description": p.description,
        "gpus": len(gpus),
        "vram_gib": sum(g.vram_gib for g in gpus),
        "ram_gib": p.cpu.ram_gib,
        "dram_gbps": p.cpu.mem_bw_gbps,
        "unified": p.memory.unified,
    }


def _render_list(console: Any, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="Hardware profiles: VRAM and RAM in GiB, DRAM in GB/s (`homerun profiles NAME` shows one)",
                  title_justify="left")
    table.add_column("name", no_wrap=True)
    for col in ("GPUs", "VRAM", "RAM", "DRAM"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("description", min_width=30)
    for r in rows:
        vram = "unified" if r["unified"] else f"{r['vram_gib']:.0f}"
        table.add_row(r["name"], str(r["gpus"]), vram, f"{r['ram_gib']:.0f}", f"{r['dram_gbps']:.0f}", r["description"])
    console.print(table)


def _render_one(console: Any, doc: dict[str, Any]) -> None:
    p = doc["profile"]
    console.print(f"[bold]{p['name']}[/bold]  {p['description']}  [dim]({p['source']})[/dim]")
    for table in ("cpu", "memory", "disk", "policy"):
        console.print(f"  [{table}]")
        for k, v in p[table].items():
            console.print(f"    {k} = {v}")
    for i, g in enumerate(p["gpus"]):
        console.print(f"  [[gpus]] #{i}")
        for k, v in g.items():
            console.print(f"    {k} = {v}")
    if "detection" in doc:
        d = doc["detection"]
        console.print(f"  measured: DRAM read {d['dram_read_gbps']} GB/s, H2D {d['h2d_gbps']} GB/s "
                      f"in {d['seconds']:.1f} s")
        for a in d["assumed"]:
            console.print(f"  [yellow]assumed:[/yellow] {a}")
        k = doc["cpu_kernel"]
        console.print(f"  CPU expert kernel: {k.get('path')} ({k.get('reason', '')})")
