"""`homerun bench`: benchmarks, reported as physics (GB/s against the machine's DRAM bandwidth, tok/s).

Modes:
- `--kernels`: the CPU expert kernels alone (homerun/kernels/kernel_bench.py): DRAM read bandwidth, FP4/FP8 GEMV effective
  weight bandwidth on V4 expert shapes, the fused expert op, batch-64 GEMM throughput.
- a model benchmark (decode/prefill tok/s, llama-bench fields) lands in a later change (issue 8); until then
  calling `bench` without `--kernels` is a usage error.
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from homerun.cli.output import Output

_ROWS = (
    ("kernel path", "kernel_path", ""),
    ("activations", "activation", ""),
    ("threads", "threads", ""),
    ("CPU", "cpu_info", ""),
    ("DRAM read", "dram_read_gbps", "GB/s"),
    ("FP4 GEMV, V4-Flash experts", "fp4_gemv_gbps", "GB/s"),
    ("  ratio to DRAM read", "fp4_gemv_ratio", ""),
    ("FP4 GEMV, V4-Pro experts", "fp4_gemv_pro_gbps", "GB/s"),
    ("  ratio to DRAM read", "fp4_gemv_pro_ratio", ""),
    ("FP8 GEMV, 128x128 blocks", "fp8_gemv_gbps", "GB/s"),
    ("  ratio to DRAM read", "fp8_gemv_ratio", ""),
    ("fused experts, 1 token x 6 (Flash)", "fused_expert_ms", "ms/layer"),
    ("  effective weight bandwidth", "fused_expert_gbps", "GB/s"),
    ("FP4 GEMV per matrix", "fp4_gemv_tok_s", "tok/s"),
    ("FP4 GEMM batch 64 per matrix", "fp4_gemm_tok_s_b64", "tok/s"),
    ("  speed-up over GEMV per token", "fp4_gemm_speedup_b64", "x"),
    ("FP4 GEMM batch 64, bf16 activations", "fp4_gemm_bf16_tok_s_b64", "tok/s"),
    ("  speed-up over GEMV per token", "fp4_gemm_bf16_speedup_b64", "x"),
    ("wall time", "test_time_s", "s"),
)


def _render_kernels(data: dict):
    def render(console):
        table = Table(title="CPU expert kernels", show_header=True)
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_column("unit")
        for label, key, unit in _ROWS:
            value = data[key]
            table.add_row(label, "n/a" if value is None else str(value), unit)
        console.print(table)
        console.print(f"[dim]{data['note']}[/dim]")

    return render


def _bench_kernels(out: Output, path: str, threads: Optional[int], reps: int, experts: int) -> None:
    from homerun.kernels.kernel_bench import run_kernel_bench

    result = run_kernel_bench(path=path, threads=threads, reps=reps, n_experts=experts, progress=out.info)
    data = result.to_dict()
    out.result(data, _render_kernels(data))


def register(app: typer.Typer) -> None:
    # The command itself (model benchmarks, --synthetic, --kernels) lives in homerun.cli.commands.bench_command.
    from homerun.cli.commands.bench_command import bench

    app.command("bench")(bench)
