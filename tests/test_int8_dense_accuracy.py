"""benchmarks/int8_dense_accuracy.py (issue 19's int8-dense study) at a tiny size, so the study cannot rot: its
quantizers are the ones they claim to be, and its errors order as the arithmetic says they must."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import int8_dense_accuracy as study  # noqa: E402

from homerun.kernels.cpu_experts import quantize_act_int8  # noqa: E402
from homerun.models.layers import QLinear  # noqa: E402


@pytest.mark.parametrize("kb", [32, 128])
@pytest.mark.parametrize("pow2", [False, True])
def test_weight_q8_is_int8_per_row_block(kb, pow2):
    """Every block is an int8 multiple of one scale (power of two when asked), within half a step of the weight,
    with the block's largest magnitude near 127 steps (a scale too large or too small fails one of these)."""
    w = study.weight_family("student_t3", 8, 256, torch.Generator().manual_seed(0))
    q = study.weight_q8(w, kb, pow2).reshape(8, 256 // kb, kb)
    b = w.reshape(8, 256 // kb, kb)
    amax = b.abs().amax(-1, keepdim=True)
    step = amax / 127
    if pow2:
        step = torch.exp2(torch.ceil(torch.log2(step)))
    ints = q / step
    assert (ints - ints.round()).abs().max() < 1e-4 and ints.abs().max() < 127.001  # one fp32 rounding off
    assert ((q - b).abs() <= step * 0.5001).all()
    assert (amax / step > (63 if pow2 else 126.9)).all()


def test_act_q8_is_the_expert_paths_quantization():
    x = study.act_family("normed_outliers", 4, 256, torch.Generator().manual_seed(1))
    q, d = quantize_act_int8(x)
    want = (q.float().reshape(4, 8, 32) * d.unsqueeze(-1)).reshape(4, 256)
    assert torch.equal(study.act_q8(x), want)
    assert (study.act_q8x2(x) - x).abs().max() < (x - want).abs().max() / 50  # the residual plane refines it


def test_outlier_families_have_outliers():
    g = torch.Generator().manual_seed(2)
    x = study.act_family("normed_outliers", 16, 1024, g)
    per_channel = x.abs().mean(0)
    assert (per_channel > 15 * per_channel.median()).sum() == 1024 // 512
    w = study.weight_family("outlier_cols", 16, 1024, g)
    assert (w.abs().mean(0) > 5 * w.abs().mean(0).median()).sum() == 1024 // 512


def test_study_runs_and_orders_its_errors(tiny_checkpoint):
    rec = study.main(["--rows", "32", "--n", "128", "--k", "256", "--tokens", "48", "--tiny", str(tiny_checkpoint)])
    rows = list(rec["synthetic"].values()) + list(rec["checkpoint"].values())
    assert len(rec["checkpoint"]) >= 10  # every FP8 linear of the tiny model
    for e in rows:
        assert all(v > 0 for v in e.values())
        for v in study.SINGLE_PLANE:  # one plane each side loses more than bf16, and more than either side alone
            assert e[v] > e["bf16"] and e[v] > 0.9 * max(e["x8"], e["w8/kb32f"]) > 0
        assert e["w16x16/kb128f"] < e["bf16"] / 5  # two planes each side: effectively exact
    logits = rec["tiny_logits"]
    assert logits["w16x16/kb128f"]["rel"] < 1e-3 < logits["bf16"]["rel"] < logits["w8x8/kb32f"]["rel"]
    assert QLinear.torch_forward is QLinear.__call__ and QLinear.grouped is QLinear.torch_grouped
    assert QLinear.torch_forward.__name__ == "torch_forward"  # the patch was undone


def test_bad_sizes_exit_2():
    with pytest.raises(SystemExit) as e:
        study.main(["--k", "100"])
    assert e.value.code == 2


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


@pytest.mark.skipif(shutil.which("gcc") is None or not {"avx512bw", "avx512vbmi"} <= _cpu_flags(),
                    reason="needs gcc and an AVX512-VBMI CPU")
def test_requant_bench_matches_its_scalar_reference(tmp_path):
    """benchmarks/fp8_int8_requant.c: the vector re-quantization equals the scalar one (it exits 1 otherwise)."""
    src = Path(__file__).resolve().parents[1] / "benchmarks" / "fp8_int8_requant.c"
    exe = tmp_path / "requant"
    subprocess.run(["gcc", "-O3", "-march=native", str(src), "-o", str(exe), "-lm"], check=True)
    done = subprocess.run([str(exe), "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ns per weight") == 3
    assert subprocess.run([str(exe), "0"], capture_output=True).returncode == 2
