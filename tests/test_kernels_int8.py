"""int8-activation FP4 kernels (act="int8"): accuracy against the fp32 dequantize-then-matmul reference, agreement
with the torch emulation (the same quantized bytes and integer dots), on every compiled path forced explicitly
(portable everywhere; AVX2 / AVX-512 where the CPU has them) and on the torch fallback; GEMV, GEMM and the fused op."""

import pytest
import torch

from homerun.errors import KernelError
from homerun.formats.quant import dequant_fp4, quant_fp4
from homerun.kernels import cpu_experts as ce
from offload.base import ReferenceExpertBackend
from test_cpu_experts import make_experts, rel_err  # the same expert fixtures and error measure
from test_cpu_kernels import extreme_scale_fp4
from offload.cpu_backend import CpuExpertBackend

PATHS = ce.available_paths()  # native paths usable here, then "torch"
NATIVE = [p for p in PATHS if p != "torch"]
INT8_RTOL = 1e-2  # issue 4: activations quantized to int8 blocks
EMU_RTOL = 1e-5  # native vs torch emulation: same integers, fp32 vs float64 summation only
LIMIT = 10.0


def fp4_weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return quant_fp4(torch.randn(n, k, generator=g) * 0.05)


def emulate(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return ce.fp4_linear(x, codes, scale, path="torch", act="int8")


# K = 160 / 544 / 1056: 5, 17 and 33 blocks, so partial 4-block groups and 16-block chunks (edge blocks); N odd.
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,k", [(33, 160), (65, 544), (257, 1056)])
@pytest.mark.parametrize("t", [1, 2, 7, 17, 64])  # >= 4 tokens take the batch layout on AVX512-VNNI; 17 > one tile
def test_fp4_int8_linear_accuracy(path, n, k, t):
    codes, scale = fp4_weights(n, k, seed=n + k)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(t))
    ref = x @ dequant_fp4(codes, scale).T
    y = ce.fp4_linear(x, codes, scale, path=path, act="int8")
    assert y.shape == (t, n) and y.dtype == torch.float32
    err = rel_err(y, ref)
    assert 1e-4 < err <= INT8_RTOL  # > 0: the int8 path ran, not a silent fp32 fallback
    assert rel_err(y, emulate(x, codes, scale)) <= EMU_RTOL


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("n,k,t", [(1, 32, 1), (3, 96, 7), (5, 64, 9), (2, 4096, 3)])
def test_fp4_int8_tiny_shapes_match_emulation(path, n, k, t):
    # Too few outputs for a stable error ratio against fp32; the int8 arithmetic itself must still match.
    codes, scale = fp4_weights(n, k, seed=3 * n + k)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(k))
    assert rel_err(ce.fp4_linear(x, codes, scale, path=path, act="int8"), emulate(x, codes, scale)) <= EMU_RTOL


@pytest.mark.parametrize("path", PATHS)
def test_int8_quantization_bytes_match_torch_exactly(path):
    # Identity weights: y = dequantized activations, so any difference in quantized bytes would show. Block 0 has
    # amax 127 (scale 1) and exact .5 ties that round half to even; block 2 is all zero (scale 0).
    k = 128
    codes, scale = quant_fp4(torch.eye(k))
    assert torch.equal(dequant_fp4(codes, scale), torch.eye(k))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, k, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1e3, 1e-30]).unsqueeze(1)
    x[0, :32] = torch.tensor([127.0, 2.5, 3.5, -0.5, -1.5, 0.5, -2.5, 126.5] + [0.25 * j for j in range(24)])
    x[:, 64:96] = 0.0
    q, d = ce.quantize_act_int8(x)
    assert q[0, :8].tolist() == [127, 2, 4, 0, -2, 0, -2, 126]
    assert torch.all(q[:, 64:96] == 0) and torch.all(d[:, 2] == 0)
    assert int(q.abs().max()) == 127
    deq = (q.float().reshape(5, 4, 32) * d.unsqueeze(-1)).reshape(5, k)
    assert torch.equal(ce.fp4_linear(x, codes, scale, path=path, act="int8"), deq)


@pytest.mark.parametrize("path", NATIVE)
def test_fp4_int8_extreme_weight_scales(path):
    # e8m0 bytes 0 (2^-127), 1, 2 and 253 take the same math as the others (no folding shortcuts in int8 mode).
    codes, scale, g = extreme_scale_fp4()
    n, k = codes.shape[0], codes.shape[1] * 2
    x = torch.randn(3, k, generator=g)
    ref = x @ dequant_fp4(codes, scale).T
    y = ce.fp4_linear(x, codes, scale, path=path, act="int8")
    assert torch.isfinite(y).all()
    assert rel_err(y, emulate(x, codes, scale)) <= EMU_RTOL
    keep = torch.arange(n) != 17  # row 17 is one weight times one activation: its error is that value's rounding
    assert rel_err(y[:, keep], ref[:, keep]) <= INT8_RTOL


@pytest.mark.parametrize("path", NATIVE)
def test_int8_results_do_not_depend_on_thread_count(path):
    codes, scale = fp4_weights(130, 512, seed=9)
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(9))
    ce.set_threads(1)
    try:
        y1 = ce.fp4_linear(x, codes, scale, path=path, act="int8")
    finally:
        ce.set_threads(None)
    assert torch.equal(y1, ce.fp4_linear(x, codes, scale, path=path, act="int8"))


@pytest.mark.parametrize("path", NATIVE)
def test_int8_batch_results_do_not_depend_on_the_call_size(path):
    # The GEMM hands the batch kernels up to 64 tokens a call (VNNI; 16 on AVX2), and each output must be the same
    # whatever else shares its call: 100 tokens at once (64 + 36 on VNNI, 6 x 16 + 4 on AVX2) against 36 and 64
    # separately (every call >= 4 tokens, so every token stays on the batch kernels).
    codes, scale = fp4_weights(70, 1056, seed=19)
    x = torch.randn(100, 1056, generator=torch.Generator().manual_seed(19))
    y = ce.fp4_linear(x, codes, scale, path=path, act="int8")
    parts = [ce.fp4_linear(x[a:b], codes, scale, path=path, act="int8") for a, b in ((0, 36), (36, 100))]
    assert torch.equal(y, torch.cat(parts))


# --------------------------------------------------------------------------------------------- fused op


# D = 288 (9 blocks: a partial group), I = 160 (5 blocks); FP8 dims off the 128 grid.
EXPERTS = {"fp4": make_experts("fp4", 288, 160, n=12, seed=2), "fp8": make_experts("fp8", 200, 72, n=12, seed=3)}
_CASES: dict = {}


def routed_case(fmt: str, t: int, k: int):
    key = (fmt, t, k)
    if key not in _CASES:
        d = EXPERTS[fmt][0].w2.shape[0]
        g = torch.Generator().manual_seed(100 * t + k)
        x = torch.randn(t, d, generator=g) * 4  # large enough that the SwiGLU clamp engages
        ids = torch.stack([torch.randperm(12, generator=g)[:k] for _ in range(t)])
        ids[-1, 0] = ids[0, 0]  # an expert shared across tokens
        wts = torch.rand(t, k, generator=g)
        src = EXPERTS[fmt].__getitem__
        ref = ReferenceExpertBackend(lambda layer, e: src(e), swiglu_limit=LIMIT).forward(0, x, ids, wts)
        emu = CpuExpertBackend(lambda layer, e: src(e), swiglu_limit=LIMIT, path="torch", act="int8")
        _CASES[key] = (x, ids, wts, ref, emu.forward(0, x, ids, wts))
    return _CASES[key]


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("t,k", [(1, 6), (2, 6), (7, 4), (64, 6)])
def test_fused_experts_int8(path, t, k):
    x, ids, wts, ref, emu = routed_case("fp4", t, k)
    be = CpuExpertBackend(lambda layer, e: EXPERTS["fp4"][e], swiglu_limit=LIMIT, path=path, act="int8")
    y = be.forward(0, x, ids, wts)
    err = rel_err(y, ref)
    assert 1e-4 < err <= INT8_RTOL
    # the hidden activation is re-quantized; fp32 vs float64 SwiGLU can move a rare value across a rounding edge
    assert rel_err(y, emu) <= 1e-4


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("t", [2, 64])  # 64: the batch layout on AVX512-VNNI (its own quantizer of h); 2: not
def test_fused_experts_int8_far_negative_gates(path, t):
    # gate values <= -88 send the AVX-512 SwiGLU's expf lanes to libm's expf; past ~ -710 (exp overflows the
    # exponent field) its fast formula would give garbage, so the case has some
    x, ids, wts, _, _ = routed_case("fp4", t, 6)
    x = x * 400
    ew = EXPERTS["fp4"][int(ids[0, 0])]
    gate = x @ dequant_fp4(ew.w1, ew.w1_scale).T
    assert (gate < -800).any() and (gate > 10).any()
    src = EXPERTS["fp4"].__getitem__
    emu, y = (CpuExpertBackend(lambda layer, e: src(e), swiglu_limit=LIMIT, path=p, act="int8").forward(0, x, ids, wts)
              for p in ("torch", path))
    assert torch.isfinite(y).all()
    assert rel_err(y, emu) <= 1e-4


def test_fused_experts_int8_torch_emulation_accuracy():
    x, ids, wts, ref, emu = routed_case("fp4", 7, 4)
    assert 1e-4 < rel_err(emu, ref) <= INT8_RTOL


@pytest.mark.parametrize("path", PATHS)
def test_fused_fp8_experts_keep_fp32_activations_in_int8_mode(path):
    x, ids, wts, ref, _ = routed_case("fp8", 5, 3)
    be = CpuExpertBackend(lambda layer, e: EXPERTS["fp8"][e], swiglu_limit=LIMIT, path=path, act="int8")
    assert rel_err(be.forward(0, x, ids, wts), ref) <= 1e-5


# --------------------------------------------------------------------------------------------- reporting


def test_int8_is_available_and_reported_everywhere():
    for p in PATHS:
        assert "int8" in ce.available_acts(p)
    info = ce.backend_info()
    assert info["acts"] == ce.available_acts(info["path"])
    assert info["default_act"] == ce.default_act() and info["default_act"] in info["acts"]
    assert info["int8_kernel"] == ce.int8_kernel()
    simd = info["int8_kernel"] in ("avx512-vnni", "avx2")
    assert info["default_act"] == ("int8" if simd else "fp32")
    if "avx2" in PATHS:
        assert ce.int8_kernel("avx2") == "avx2"
    if NATIVE:
        assert ce.int8_kernel("portable") == "portable" and ce.default_act("portable") == "fp32"
    assert ce.int8_kernel("torch") == "torch" and ce.default_act("torch") == "fp32"


def test_auto_act_resolves_to_the_default():
    be = CpuExpertBackend(lambda layer, e: EXPERTS["fp4"][e], swiglu_limit=LIMIT, act="auto")
    assert be.act == ce.default_act()
    codes, scale = fp4_weights(16, 64, seed=1)
    x = torch.randn(2, 64)
    assert torch.equal(ce.fp4_linear(x, codes, scale, act="auto"), ce.fp4_linear(x, codes, scale, act=ce.default_act()))
    with pytest.raises(KernelError):
        CpuExpertBackend(lambda layer, e: EXPERTS["fp4"][e], swiglu_limit=LIMIT, act="int4")


def test_missing_library_still_emulates_int8(monkeypatch):
    monkeypatch.setattr(ce, "_lib", None)
    monkeypatch.setattr(ce, "_lib_reason", "native kernel library not built (simulated)")
    assert ce.available_acts() == ["fp32", "int8"] and ce.default_act() == "fp32"
    info = ce.backend_info()
    assert info["path"] == "torch" and info["int8_kernel"] == "torch"
    codes, scale = fp4_weights(40, 256, seed=4)
    x = torch.randn(3, 256)
    err = rel_err(ce.fp4_linear(x, codes, scale, act="int8"), x @ dequant_fp4(codes, scale).T)
    assert 1e-4 < err <= INT8_RTOL


def _signed_ramp(t: int, k: int) -> torch.Tensor:
    """t tokens of +-1 times 1..t (the large sums of both signs the span tests need), the last one random."""
    g = torch.Generator().manual_seed(t)
    x = torch.where(torch.rand(t, k, generator=g) < 0.5, -1.0, 1.0) * (1 + torch.arange(t).unsqueeze(1))
    x[-1] = torch.randn(k, generator=g)
    return x


def _max_output_rel(y: torch.Tensor, want: torch.Tensor) -> float:
    return float(((y - want).abs() / want.abs().clamp_min(1e-30)).max())


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("t", [4, 9])
def test_fp4_int8_exponent_spans_at_the_shift_limit(path, t):
    # The AVX2 batch tile folds each block's scale into vpmaddwd as 2^(e - e_min of the row) when a row's exponents
    # span <= 14, else runs the per-block float epilogue. Rows 0/1: span 14 with the largest int16 sums (all weights
    # +6, all activations at +-127) so int32 overflow would show; rows 2/3: span 15; row 4 alone: the odd last row.
    n, k = 5, 512
    codes = torch.full((n, k // 2), 0x77, dtype=torch.uint8).view(torch.int8)
    scale = torch.full((n, k // 32), 110, dtype=torch.uint8)
    scale[0, 3], scale[1, 15], scale[2, 0], scale[3, 9], scale[4, 4] = 124, 96, 125, 95, 124
    scale = scale.view(torch.float8_e8m0fnu)
    x = _signed_ramp(t, k)
    y = ce.fp4_linear(x, codes, scale, path=path, act="int8")
    emu = emulate(x, codes, scale)
    assert torch.isfinite(y).all()
    assert rel_err(y, emu) <= EMU_RTOL
    assert _max_output_rel(y, emu) <= 1e-5  # per output, not just overall


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("t", [4, 9])
def test_fp4_int8_vnni_shift_rows_at_the_span_limit(path, t):
    # The AVX512-VNNI batch rows shift each block's exact int32 dot left by e - e_min of its row when the row's
    # exponents span <= 15 (|dot| <= 48768 = 32 * 12 * 127, and 48768 << 15 < 2^31), else multiply by float scales;
    # a 4-row tile with any span-16 row runs all four on float scales. Every weight is +6 and token 0 is all +1, so
    # every block dot is the largest one: a shift of 16 overflows int32. Rows 0-3: span 15 (a shift tile); rows 4-7:
    # spans 16, 15, 15, 15 (a mixed tile); row 8 alone: span 16.
    n, k = 9, 1024
    codes = torch.full((n, k // 2), 0x77, dtype=torch.uint8).view(torch.int8)
    scale = torch.full((n, k // 32), 110, dtype=torch.uint8)
    for row, (lo, hi) in enumerate([(3, 17), (7, 0), (31, 12), (0, 31)] + [(5, 20)] + [(9, 2)] * 3 + [(30, 0)]):
        span = 16 if row in (4, 8) else 15
        scale[row, lo], scale[row, hi] = 110 - span // 2, 110 - span // 2 + span
    scale = scale.view(torch.float8_e8m0fnu)
    x = _signed_ramp(t, k)
    x[0] = 1.0
    y = ce.fp4_linear(x, codes, scale, path=path, act="int8")
    emu = emulate(x, codes, scale)
    assert torch.isfinite(y).all() and (y[0] > 0).all()
    assert _max_output_rel(y, emu) <= 1e-5
