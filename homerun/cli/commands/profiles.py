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
    from homerun.cli.tables import print_table

    columns = [("name", "left"), ("GPUs", "right"), ("VRAM", "right"), ("RAM", "right"), ("DRAM", "right"),
               ("description", "left")]
    cells = [[r["name"], str(r["gpus"]), "unified" if r["unified"] else f"{r['vram_gib']:.0f}", f"{r['ram_gib']:.0f}",
              f"{r['dram_gbps']:.0f}", r["description"]] for r in rows]
    print_table(console, "Hardware profiles: VRAM and RAM in GiB, DRAM in GB/s (`homerun profiles NAME` shows one)",
                columns, cells, prose=("description",))


def _render_one(console: Any, doc: dict[str, Any]) -> None:
    """The profile as the TOML file that would define it; every value and name is printed as text, not markup."""
    from rich.text import Text

    from homerun.cli.tables import toml_value

    p = doc["profile"]
    head = Text(p["name"], style="bold")
    head.append(f"  {p['description']}  ")
    head.append(f"({p['source']})", style="dim")
    console.print(head)

    def table(header: str, values: dict[str, Any]) -> None:
        console.print(Text(f"  {header}"))
        for k, v in values.items():
            console.print(Text(f"    {k} = {toml_value(v)}"))

    for name in ("cpu", "memory", "disk", "policy"):
        table(f"[{name}]", p[name])
    for i, g in enumerate(p["gpus"]):
        table(f"[[gpus]]  # {i}", g)
    if "detection" in doc:
        d = doc["detection"]
        console.print(Text(f"  measured: DRAM read {d['dram_read_gbps']} GB/s, H2D {d['h2d_gbps']} GB/s "
                           f"in {d['seconds']:.1f} s"))
        for a in d["assumed"]:
            line = Text("  assumed: ", style="yellow")
            line.append(str(a), style="")
            console.print(line)
        k = doc["cpu_kernel"]
        console.print(Text(f"  CPU expert kernel: {k.get('path')} ({k.get('reason', '')})"))
