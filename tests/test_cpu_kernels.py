"""Native FP4/FP8 linear kernels vs fp32 dequantize-then-matmul, on every path this machine can run (each compiled
path forced explicitly, plus the torch fallback), and the library's reporting/fallback behaviour."""

import json

import pytest
import torch
from typer.testing import CliRunner

from homerun.errors import CheckpointError, KernelError, UsageError
from homerun.formats.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8
from homerun.kernels import cpu_experts as ce

PATHS = ce.available_paths()
FP32_RTOL = 1e-5  # activations stay fp32 on every path


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def fp4_weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return quant_fp4(torch.randn(n, k, generator=g) * 0.05)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (33, 96), (130, 1024)])
@pytest.mark.parametrize("t", [1, 2, 3, 8, 9, 64])
def test_fp4_linear_matches_dequant_matmul(path, n, k, t):
    codes, scale = fp4_weights(n, k, seed=n * 1000 + k)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(t))
    ref = x @ dequant_fp4(codes, scale).T
    y = ce.fp4_linear(x, codes, scale, path=path)
    assert y.shape == (t, n) and y.dtype == torch.float32
    assert rel_err(y, ref) <= FP32_RTOL


def extreme_scale_fp4(n: int = 24, k: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """FP4 weights whose e8m0 scales include bytes 0 (2^-127), 1, 2 and 253, and the generator to draw inputs from."""
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(-128, 128, (n, k // 2), dtype=torch.int8, generator=g)
    scale = torch.randint(115, 125, (n, k // 32), dtype=torch.uint8, generator=g)
    scale[3, 2], scale[10, 0], scale[11, 7], scale[17, 5], scale[18, 7] = 1, 0, 2, 253, 2
    codes[17, 80:96] = 0  # block 5 of row 17 (scale 2^126) holds one 0.5 and zeros, so the row stays finite
    codes[17, 80] = 0x01
    return codes, scale, g


@pytest.mark.parametrize("path", PATHS)
def test_fp4_extreme_scales_take_the_exact_route(path):
    # Scale bytes 0/1 and 253 cannot be folded into the decode table; those rows must still be exact.
    codes, scale, g = extreme_scale_fp4()
    k = codes.shape[1] * 2
    x = torch.randn(3, k, generator=g)
    ref = x @ dequant_fp4(codes, scale).T
    assert torch.isfinite(ref).all()
    y = ce.fp4_linear(x, codes, scale, path=path)
    assert rel_err(y, ref) <= FP32_RTOL
    y1 = ce.fp4_linear(x[:1], codes, scale, path=path)
    assert rel_err(y1, ref[:1]) <= FP32_RTOL


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,k", [(1, 1), (5, 17), (128, 128), (130, 300), (257, 129), (64, 4095), (131, 320),
                                 (9, 8192)])
@pytest.mark.parametrize("t", [1, 2, 9, 17])
def test_fp8_linear_matches_dequant_matmul(path, n, k, t):
    g = torch.Generator().manual_seed(n * 31 + k)
    w, scale = quant_fp8(torch.randn(n, k, generator=g))
    x = torch.randn(t, k, generator=g)
    ref = x @ dequant_fp8(w, scale).T
    y = ce.fp8_linear(x, w, scale, path=path)
    assert y.shape == (t, n)
    assert rel_err(y, ref) <= FP32_RTOL


@pytest.mark.parametrize("path", PATHS)
def test_fp8_subnormal_codes_decode_exactly(path):
    # Every e4m3 byte except the two NaN codes, including the subnormals (exponent field 0).
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    w = codes.view(torch.float8_e4m3fn).reshape(1, -1)
    scale = torch.full((1, 2), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    eye = torch.eye(w.shape[1])
    y = ce.fp8_linear(eye, w, scale, path=path)  # row j of y = weight j
    assert torch.equal(y[:, 0], dequant_fp8(w, scale)[0])


@pytest.mark.parametrize("path", PATHS)
def test_fp8_one_token_decodes_every_code(path):
    """One token (the decode kernels, which on AVX-512 read 64 weight bytes at a time in a permuted activation
    order): a one-hot activation returns each weight exactly, subnormals and both signs included."""
    codes = torch.tensor([b if b & 0x7F != 0x7F else 0 for b in range(256)], dtype=torch.uint8)
    w = codes.view(torch.float8_e4m3fn).reshape(2, 128)
    scale = torch.tensor([[120]], dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 2^-7: no rounding anywhere
    ref = dequant_fp8(w, scale)
    for j in range(128):
        x = torch.zeros(1, 128)
        x[0, j] = 1.0
        assert torch.equal(ce.fp8_linear(x, w, scale, path=path)[0], ref[:, j])


def test_paths_agree_bit_for_bit_across_thread_counts():
    if ce.resolve_path(None) == "torch":
        pytest.skip("native library not built")
    codes, scale = fp4_weights(256, 512, seed=3)
    x = torch.randn(5, 512)
    ce.set_threads(1)
    try:
        y1 = ce.fp4_linear(x, codes, scale)
    finally:
        ce.set_threads(None)
    y2 = ce.fp4_linear(x, codes, scale)
    assert torch.equal(y1, y2)  # rows are split across threads, never a single dot product


def test_input_dtype_and_leading_dims_are_kept():
    codes, scale = fp4_weights(16, 64, seed=4)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    y = ce.fp4_linear(x, codes, scale)
    assert y.shape == (2, 3, 16) and y.dtype == torch.bfloat16
    ref = x.float().reshape(6, 64) @ dequant_fp4(codes, scale).T
    assert rel_err(y.float().reshape(6, 16), ref) < 1e-2  # bf16 output rounding only


def test_bad_shapes_and_paths_raise_typed_errors():
    codes, scale = fp4_weights(8, 64, seed=5)
    with pytest.raises(CheckpointError):
        ce.fp4_linear(torch.randn(1, 64), codes, scale[:, :1])
    with pytest.raises(KernelError):
        ce.fp4_linear(torch.randn(1, 32), codes, scale)
    with pytest.raises(KernelError):
        ce.fp4_linear(torch.randn(1, 64), codes, scale, path="nonsense")
    with pytest.raises(CheckpointError):
        ce.fp4_linear(torch.randn(1, 64), codes.float(), scale)
    w8, s8 = quant_fp8(torch.randn(130, 200))
    with pytest.raises(CheckpointError):
        ce.fp8_linear(torch.randn(1, 200), w8, s8[:1])


def test_backend_info_reports_the_path():
    info = ce.backend_info()
    assert set(info) == {"path", "built", "reason", "threads", "acts", "default_act", "int8_kernel"}
    assert info["path"] in ce.PATHS and info["path"] == PATHS[0]
    assert isinstance(info["built"], bool) and info["reason"] and info["threads"] >= 1
    assert PATHS[-1] == "torch"
    if info["built"]:
        assert info["path"] != "torch" and "built" in info["reason"]


def test_missing_library_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(ce, "_lib", None)
    monkeypatch.setattr(ce, "_lib_reason", "native kernel library not built (simulated)")
    info = ce.backend_info()
    assert info["path"] == "torch" and info["built"] is False and "simulated" in info["reason"]
    assert ce.available_paths() == ["torch"]
    with pytest.raises(KernelError):
        ce.resolve_path("avx2")
    codes, scale = fp4_weights(8, 64, seed=6)
    x = torch.randn(2, 64)
    assert torch.equal(ce.fp4_linear(x, codes, scale), x @ dequant_fp4(codes, scale).T)


def test_bench_kernels_cli_json_has_the_documented_keys():
    from homerun.cli.app import app

    res = CliRunner().invoke(app, ["bench", "--kernels", "--json", "--experts", "2", "--reps", "1"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    for key in ("dram_read_gbps", "fp4_gemv_gbps", "fp4_gemv_ratio", "fp8_gemv_gbps", "fp8_gemv_ratio",
                "fused_expert_ms", "fp4_gemm_tok_s_b64", "kernel_path", "cpu_info", "threads"):
        assert key in data
    assert data["kernel_path"] == PATHS[0]
    assert data["dram_read_gbps"] > 0 and data["fused_expert_ms"] > 0
    assert data["fp4_gemv_ratio"] == pytest.approx(data["fp4_gemv_gbps"] / data["dram_read_gbps"], rel=1e-2)


def test_bench_without_model_or_kernels_is_a_usage_error():
    from homerun.cli.app import app

    res = CliRunner().invoke(app, ["bench"])
    # CliRunner bypasses the app's error handler, so the typed error surfaces; the CLI maps it to exit code 2.
    assert isinstance(res.exception, UsageError) and "needs a MODEL" in res.exception.message
    assert res.exception.exit_code == 2


BF16 = "bf16" in ce.available_acts()
needs_bf16 = pytest.mark.skipif(not BF16, reason="this CPU has no AVX512-BF16 (or the library is not built)")
BF16_RTOL = 1e-2  # activations rounded to bf16


@needs_bf16
@pytest.mark.parametrize("n,k", [(7, 64), (130, 1024)])
@pytest.mark.parametrize("t", [1, 2, 5, 64])
def test_fp4_linear_bf16_activations(n, k, t):
    codes, scale = fp4_weights(n, k, seed=n + k)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(t))
    ref = x @ dequant_fp4(codes, scale).T
    y = ce.fp4_linear(x, codes, scale, path="avx512", act="bf16")
    err = rel_err(y, ref)
    assert err <= (FP32_RTOL if t == 1 else BF16_RTOL)  # single tokens stay fp32 in bf16 mode
    # bf16 rounding of the activations is the only error source: equal to fp32 on pre-rounded inputs
    xr = x.to(torch.bfloat16).float()
    assert rel_err(y, xr @ dequant_fp4(codes, scale).T) <= (1e-2 if t == 1 else FP32_RTOL)


@needs_bf16
def test_fp4_bf16_unfoldable_scales_fall_back_exactly():
    n, k = 9, 128
    g = torch.Generator().manual_seed(8)
    codes = torch.randint(-128, 128, (n, k // 2), dtype=torch.int8, generator=g)
    scale = torch.randint(115, 125, (n, k // 32), dtype=torch.uint8, generator=g)
    scale[1, 1], scale[6, 3] = 1, 0
    x = torch.randn(4, k, generator=g).to(torch.bfloat16).float()
    ref = x @ dequant_fp4(codes, scale).T
    assert rel_err(ce.fp4_linear(x, codes, scale, act="bf16"), ref) <= FP32_RTOL


def test_bf16_activation_mode_is_refused_where_unavailable():
    with pytest.raises(KernelError):
        ce.fp4_linear(torch.randn(2, 64), *fp4_weights(8, 64, seed=1), path="torch", act="bf16")
    with pytest.raises(KernelError):
        ce.fp4_linear(torch.randn(2, 64), *fp4_weights(8, 64, seed=1), act="int3")
    if "avx2" in PATHS:
        with pytest.raises(KernelError):
            ce.fp4_linear(torch.randn(2, 64), *fp4_weights(8, 64, seed=1), path="avx2", act="bf16")


@pytest.mark.parametrize("groups,per,tokens", [(8, 128, 1), (8, 256, 3), (3, 384, 9), (2, 128, 70)])
def test_fp8_grouped_gemm_equals_per_group_matmuls(groups, per, tokens, cpu_dense):
    """One native call for a block-diagonal FP8 projection (V4's grouped wo_a): rows of group g read x[:, g] only."""
    g = torch.Generator().manual_seed(groups * per + tokens)
    k = 320  # not a multiple of 128: the last scale block is partial
    q, s = quant_fp8(torch.randn(groups * per, k, generator=g))
    x = torch.randn(tokens, groups, k, generator=g)
    w = dequant_fp8(q, s, torch.float64)
    ref = torch.stack([x[:, i].double() @ w[i * per : (i + 1) * per].T for i in range(groups)], dim=1)
    y = cpu_dense.bind_linear(q, s).grouped(x)
    assert y.shape == (tokens, groups, per)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6


def test_fp8_grouped_gemm_rejects_groups_that_split_scale_blocks(cpu_dense):
    q, s = quant_fp8(torch.randn(384, 256))
    assert cpu_dense.bind_linear(q, s).grouped(torch.randn(2, 3, 256)).shape == (2, 3, 128)
    with pytest.raises(KernelError, match="6 groups"):  # 64 rows per group straddle the 128-row scale blocks
        cpu_dense.bind_linear(q, s).grouped(torch.randn(2, 6, 256))


@pytest.mark.parametrize("tokens", [1, 3, 9])
def test_multi_gemm_equals_one_call_per_matrix(tokens, cpu_dense):
    """Several FP8 and bf16 matrices of one input in one native call: each output equals that matrix's own call
    (the same row kernels, so bit for bit), including odd row counts and a partial last scale block."""
    g = torch.Generator().manual_seed(tokens)
    k = 320
    mats = [quant_fp8(torch.randn(300, k, generator=g)), (torch.randn(77, k, generator=g).bfloat16(), None),
            quant_fp8(torch.randn(128, k, generator=g)), (torch.randn(5, k, generator=g).bfloat16(), None)]
    bound = [cpu_dense.bind_linear(w, s) for w, s in mats]
    x = torch.randn(tokens, k, generator=g)
    outs = cpu_dense.bind_multi(bound)(x)
    assert [tuple(o.shape) for o in outs] == [(tokens, b.n) for b in bound]
    for o, b in zip(outs, bound):
        assert torch.equal(o, b(x))
    with pytest.raises(KernelError, match="one input width"):
        cpu_dense.bind_multi(bound + [cpu_dense.bind_linear(torch.randn(4, 64).bfloat16(), None)])
