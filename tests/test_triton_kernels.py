"""Triton kernels (homerun.kernels.triton) against plain fp32 references built from homerun's quant functions.

CPU (default): TRITON_INTERPRET=1 is set before triton is imported, and the kernels run in the interpreter on CPU
tensors; skipped when triton is not installed. On a GPU (the device check does):
HR_TRITON_DEVICE=cuda pytest -m gpu tests/test_triton_kernels.py. Errors are per-row relative L2 errors: fp32 activations <= 1e-5, bf16 <= 1e-2.
"""

from __future__ import annotations

import os

DEVICE = os.environ.get("HR_TRITON_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - a compiled triton needs CUDA
    pytest.skip("TRITON_INTERPRET was set to something else before this module", allow_module_level=True)

from homerun.formats.quant import dequant_fp4, dequant_fp8, e8m0_to_float, quant_fp4, quant_fp8  # noqa: E402
from homerun.kernels.triton import common as C  # noqa: E402
from homerun.kernels.triton.fp8 import fp8_linear  # noqa: E402
from homerun.kernels.triton.moe import fp4_grouped_gemm, fp4_moe_decode  # noqa: E402


class K:  # the kernels under the names the cases use
    fp8_linear = staticmethod(fp8_linear)
    fp4_moe_decode = staticmethod(fp4_moe_decode)
    fp4_grouped_gemm = staticmethod(fp4_grouped_gemm)


# silu(g) = g / (1 + exp(-g)) overflows exp for g << 0 (-> -0, as intended); numpy warns in the interpreter.
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in exp")]
if DEVICE == "cuda":
    pytestmark.append(pytest.mark.gpu)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
E4M3_NAN = (0x7F, 0xFF)


def row_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows of ||y - ref|| / ||ref||; a zero reference row must be matched exactly."""
    y, ref = y.float().cpu(), ref.float().cpu()
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert torch.isfinite(y).all(), "non-finite output"
    y, ref = y.reshape(-1, y.shape[-1]), ref.reshape(-1, ref.shape[-1])
    num = (y - ref).norm(dim=-1)
    den = ref.norm(dim=-1)
    zero = den == 0
    assert (num[zero] == 0).all(), "row with a zero reference is not zero"
    return (num[~zero] / den[~zero]).max().item() if (~zero).any() else 0.0


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


# ------------------------------------------------------------------------------------------------ FP8 linear


def block_gain(n: int, k: int, br: int, bc: int, g: torch.Generator) -> torch.Tensor:
    """Random power-of-two gain per (br x bc) block, so neighbouring blocks get different ue8m0 scales."""
    e = torch.randint(-6, 7, (-(-n // br), -(-k // bc)), generator=g).float()
    return torch.exp2(e).repeat_interleave(br, 0)[:n].repeat_interleave(bc, 1)[:, :k]


def rand_fp8(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return quant_fp8(torch.randn(n, k, generator=g) * block_gain(n, k, 128, 128, g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8, 40])
def test_fp8_linear_basic(m, dtype):
    # N, K not multiples of 128 (ragged scale blocks) nor of the block sizes.
    wq, ws = rand_fp8(200, 448, seed=1)
    x = torch.randn(m, 448, generator=gen(2)).to(dtype)
    ref = x.float() @ dequant_fp8(wq, ws).T
    y = K.fp8_linear(dev(x), dev(wq), dev(ws))
    assert y.dtype == dtype and y.shape == (m, 200)
    assert row_rel_err(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("split_k", [1, 3])
def test_fp8_linear_split_k_out_dtype(split_k):
    wq, ws = rand_fp8(130, 448, seed=3)
    x = torch.randn(2, 448, generator=gen(4))
    y = K.fp8_linear(dev(x), dev(wq), dev(ws), torch.bfloat16, split_k=split_k)
    assert y.dtype == torch.bfloat16
    assert row_rel_err(y, x @ dequant_fp8(wq, ws).T) <= TOL[torch.bfloat16]
    y32 = K.fp8_linear(dev(x), dev(wq), dev(ws), torch.float32, split_k=split_k)
    assert row_rel_err(y32, x @ dequant_fp8(wq, ws).T) <= 1e-5


def test_fp8_linear_fma_path_odd_m():
    wq, ws = rand_fp8(96, 256, seed=15)
    x = torch.randn(3, 256, generator=gen(16))
    y = K.fp8_linear(dev(x), dev(wq), dev(ws), use_dot=False)  # BLOCK_M = 4, one masked row
    assert row_rel_err(y, x @ dequant_fp8(wq, ws).T) <= 1e-5


@pytest.mark.parametrize("m", [2, 24])
def test_fp8_linear_strided_views(m):
    """Row slices of a grouped projection (aligned and unaligned to 128), column-major w, strided x."""
    wq, ws = rand_fp8(520, 320, seed=5)
    full = dequant_fp8(wq, ws)
    xb = torch.randn(m, 2 * 320, generator=gen(6))
    x = xb[:, ::2]  # non-contiguous activations
    # unaligned row slice: full scale tensor + w_row0
    y = K.fp8_linear(dev(x), dev(wq)[130:330], dev(ws), w_row0=130)
    assert row_rel_err(y, x @ full[130:330].T) <= 1e-5
    # aligned row slice with a sliced scale
    y = K.fp8_linear(dev(x), dev(wq)[256:520], dev(ws)[2:])
    assert row_rel_err(y, x @ full[256:520].T) <= 1e-5
    # column-major weight storage (strides (1, N))
    wt = dev(wq).t().contiguous().t()
    assert wt.stride() == (1, 520)
    y = K.fp8_linear(dev(x), wt, dev(ws))
    assert row_rel_err(y, x @ full.T) <= 1e-5


def edge_fp8(n: int, k: int, scale_bytes: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every non-NaN e4m3 code (incl. +-0 and all subnormals) in random places, scales drawn from scale_bytes."""
    g = gen(seed)
    codes = torch.tensor([c for c in range(256) if c not in E4M3_NAN], dtype=torch.uint8)
    idx = torch.randint(0, len(codes), (n, k), generator=g)
    idx.view(-1)[: len(codes)] = torch.arange(len(codes))  # each code at least once
    w = codes[idx].view(torch.float8_e4m3fn)
    sb = torch.tensor(scale_bytes, dtype=torch.uint8)
    s = sb[torch.randint(0, len(sb), (-(-n // 128), -(-k // 128)), generator=g)]
    return w, s.view(torch.float8_e8m0fnu)


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("m", [1, 20])
def test_fp8_linear_edge_codes_and_scales(m, native):
    # scale byte 0 (2^-127), small, unit, large (2^33, 2^70) exponents; all codes; subnormal-only columns too.
    w, s = edge_fp8(256, 384, [0, 1, 100, 127, 160, 197], seed=7)
    w.view(torch.uint8)[:, :64] &= 0x87  # a band of subnormals / signed zeros only
    x = torch.randn(m, 384, generator=gen(8))
    ref = x @ dequant_fp8(w, s).T
    y = K.fp8_linear(dev(x), dev(w), dev(s), native_fp8=native)
    assert row_rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_tiny_scale_only(m, dtype):
    """Every block at 2^-127: the dequantized weights are fp32 subnormals / tiny normals."""
    w, s = edge_fp8(128, 256, [0], seed=9)
    x = torch.randn(m, 256, generator=gen(10)).to(dtype)
    ref = x.float() @ dequant_fp8(w, s).T
    y = K.fp8_linear(dev(x), dev(w), dev(s), torch.float32)
    assert row_rel_err(y, ref) <= TOL[dtype]


@triton.jit
def _decode_probe(src, fp8_out, fp4_lo, fp4_hi, e8_out, N: tl.constexpr, NATIVE: tl.constexpr):
    r = tl.arange(0, N)
    b = tl.load(src + r)
    tl.store(fp8_out + r, C.e4m3_to_f32(b, NATIVE))
    c = b.to(tl.uint32)
    tl.store(fp4_lo + r, C.e2m1_to_f32(c & 15))
    tl.store(fp4_hi + r, C.e2m1_to_f32(c >> 4))
    tl.store(e8_out + r, C.e8m0_to_f32(b))


@pytest.mark.parametrize("native", [False, True])
def test_decoders_exhaustive(native):
    """All 256 bytes through the e4m3 / e2m1 / e8m0 decoders, bit-exact (signed zeros included) vs homerun."""
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    outs = [torch.empty(256, dtype=torch.float32, device=DEVICE) for _ in range(4)]
    _decode_probe[(1,)](dev(b), *outs, N=256, NATIVE=native)
    f8, lo, hi, e8 = (o.cpu() for o in outs)
    ok = torch.tensor([c not in E4M3_NAN for c in range(256)])
    ref8 = b.view(torch.float8_e4m3fn).float()
    assert torch.equal(f8.view(torch.int32)[ok], ref8.view(torch.int32)[ok])  # bitwise: -0 stays -0
    pair = dequant_fp4(b.view(torch.int8).view(256, 1).repeat(1, 16), torch.full((256, 1), 127, dtype=torch.uint8))
    assert torch.equal(lo.view(torch.int32), pair[:, 0].contiguous().view(torch.int32))
    assert torch.equal(hi.view(torch.int32), pair[:, 1].contiguous().view(torch.int32))
    assert torch.equal(e8.view(torch.int32), e8m0_to_float(b).view(torch.int32))
    assert e8[0].item() == 2.0**-127 and e8[128].item() == 2.0


# ------------------------------------------------------------------------------------------- FP4 experts


def rand_fp4(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_fp4(torch.randn(n, k, generator=g) * block_gain(n, k, 1, 32, g) / 8)


def edge_fp4(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw random bytes (every nibble pair incl. -0 = code 8), scales over {0, 100, 120, 127, 131, 140}."""
    codes = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    sb = torch.tensor([0, 100, 120, 127, 131, 140], dtype=torch.uint8)
    s = sb[torch.randint(0, len(sb), (n, k // 32), generator=g)]
    return codes.view(torch.int8), s.view(torch.float8_e8m0fnu)


def make_experts(n_exp: int, hidden: int, inter: int, seed: int, edge: bool = False):
    g = gen(seed)
    mk = edge_fp4 if edge else rand_fp4
    return [(mk(inter, hidden, g), mk(inter, hidden, g), mk(hidden, inter, g)) for _ in range(n_exp)]


def dq(e):
    return tuple(dequant_fp4(c, s) for c, s in e)


def build_cache(experts, slot_of: dict[int, int], n_slots: int, padded: bool):
    """Slot cache tensors; padded=True makes them views with non-default strides (a padded last dim)."""
    inter, hb = experts[0][0][0].shape
    hidden = experts[0][2][0].shape[0]
    pad = 16 if padded else 0

    def alloc(shape, dtype):
        return torch.zeros(*shape[:-1], shape[-1] + pad, dtype=dtype)[..., : shape[-1]]

    w13c = alloc((n_slots, 2 * inter, hb), torch.int8)
    w13s = alloc((n_slots, 2 * inter, hb * 2 // 32), torch.uint8)
    w2c = alloc((n_slots, hidden, inter // 2), torch.int8)
    w2s = alloc((n_slots, hidden, inter // 32), torch.uint8)
    for e, sl in slot_of.items():
        (c1, s1), (c3, s3), (c2, s2) = experts[e]
        w13c[sl] = torch.cat([c1, c3])
        w13s[sl] = torch.cat([s1, s3]).view(torch.uint8)
        w2c[sl] = c2
        w2s[sl] = s2.view(torch.uint8)
    f8 = torch.float8_e8m0fnu
    return w13c, w13s.view(f8), w2c, w2s.view(f8)


def swiglu_ref(x, w1, w3, w2, lim):
    g = (x @ w1.T).clamp(max=lim)
    u = (x @ w3.T).clamp(-lim, lim)
    return (F.silu(g) * u) @ w2.T


def moe_ref(x, ids, wts, experts_dq, resident: set[int], lim):
    """homerun's ReferenceExpertBackend math, restricted to resident experts: sum_k w_k * expert_k(x), fp32."""
    xf = x.float()
    out = torch.zeros_like(xf)
    for e in torch.unique(ids).tolist():
        if e not in resident:
            continue
        rows, slot = torch.nonzero(ids == e, as_tuple=True)
        w1, w3, w2 = experts_dq[e]
        out.index_add_(0, rows, swiglu_ref(xf[rows], w1, w3, w2, lim) * wts[rows, slot].unsqueeze(-1))
    return out


HID, INTER, NEXP, TOPK = 256, 128, 8, 2


@pytest.fixture(scope="module")
def experts():
    ex = make_experts(NEXP, HID, INTER, seed=11)
    return ex, [dq(e) for e in ex]


@pytest.fixture(scope="module")
def edge_experts():
    ex = make_experts(NEXP, HID, INTER, seed=12, edge=True)
    return ex, [dq(e) for e in ex]


def moe_case(experts_pair, t, dtype, lim, deterministic, padded, id_dtype=torch.int64, seed=13, scale_x=1.0):
    ex, exd = experts_pair
    g = gen(seed + t)
    # experts 2 and 5 are not resident (slot -1); the others sit in shuffled slots of a 7-slot cache
    slot_of = {0: 3, 1: 0, 3: 6, 4: 1, 6: 2, 7: 4}
    table = torch.full((NEXP,), -1, dtype=torch.int32)
    for e, sl in slot_of.items():
        table[e] = sl
    w13c, w13s, w2c, w2s = build_cache(ex, slot_of, 7, padded)
    x = (torch.randn(t, HID, generator=g) * scale_x).to(dtype)
    ids = torch.stack([torch.randperm(NEXP, generator=g)[:TOPK] for _ in range(t)]).to(id_dtype)
    if t >= 2:
        ids[1] = torch.tensor([2, 5])  # a token with no resident expert -> exact zero row
    if t >= 3:
        ids[2, 0] = 4  # mix of resident and not
        ids[2, 1] = 5
    wts = torch.rand(t, TOPK, generator=g) * 2.5
    ref = moe_ref(x, ids, wts, exd, set(slot_of), lim)
    y, h = K.fp4_moe_decode(dev(x), dev(ids), dev(wts), dev(table), dev(w13c), dev(w13s), dev(w2c), dev(w2s),
                            lim, deterministic=deterministic, return_h=True)
    assert y.dtype == dtype and y.shape == (t, HID)
    # the intermediate h of resident pairs against the reference SwiGLU
    for ti in range(t):
        for j in range(TOPK):
            e = int(ids[ti, j])
            if e in slot_of:
                w1, w3, _ = exd[e]
                xf = x[ti : ti + 1].float()
                href = F.silu((xf @ w1.T).clamp(max=lim)) * (xf @ w3.T).clamp(-lim, lim)
                assert row_rel_err(h[ti, j : j + 1], href) <= 1e-5
    return y, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 3])
def test_moe_decode(experts, t, dtype):
    y, ref = moe_case(experts, t, dtype, 10.0, deterministic=True, padded=False)
    assert row_rel_err(y, ref) <= TOL[dtype]


def test_moe_decode_atomic_strided_int32_ids_small_limit(experts):
    # Limit 3 with x scaled up: most gate / up values clamp; cache views with padded strides; int32 expert ids.
    y, ref = moe_case(experts, 3, torch.float32, 3.0, deterministic=False, padded=True, id_dtype=torch.int32,
                      scale_x=2.0)
    assert row_rel_err(y, ref) <= 1e-5


def test_moe_decode_edge_codes(edge_experts):
    # every nibble pair incl. -0, scale bytes 0 .. 140; limit large enough that the edges show through
    y, ref = moe_case(edge_experts, 2, torch.float32, 10.0, deterministic=True, padded=False, scale_x=1e-3)
    assert row_rel_err(y, ref) <= 1e-5


def test_moe_decode_nothing_resident(experts):
    ex, _ = experts
    w13c, w13s, w2c, w2s = build_cache(ex, {0: 0}, 1, False)
    table = torch.full((NEXP,), -1, dtype=torch.int32)
    x = torch.randn(2, HID)
    ids = torch.tensor([[1, 2], [3, 4]])
    y = K.fp4_moe_decode(dev(x), dev(ids), dev(torch.ones(2, 2)), dev(table), dev(w13c), dev(w13s), dev(w2c),
                         dev(w2s), 10.0)
    assert torch.equal(y.cpu(), torch.zeros(2, HID))


# ------------------------------------------------------------------------------------------ grouped GEMM


def grouped_case(experts_pair, dtype, sizes, group_ids, seed):
    ex, exd = experts_pair
    g = gen(seed)
    offs = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32)
    m = int(offs[-1])
    xb = torch.randn(m, 2 * HID, generator=g).to(dtype)
    return ex, exd, offs, xb[:, ::2], m  # strided activations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_plain(experts, dtype):
    # groups: small, empty, > BLOCK_M, exact multiple, empty at the end; group -> expert permutation
    sizes, gids = [5, 0, 37, 32, 0], [6, 2, 0, 3, 7]
    ex, exd, offs, x, m = grouped_case(experts, dtype, sizes, gids, seed=21)
    codes = torch.stack([e[2][0] for e in ex])  # w2: [E, HID, INTER/2]; use it as a K=INTER GEMM
    scales = torch.stack([e[2][1] for e in ex])
    xk = x[:, :INTER]
    y = K.fp4_grouped_gemm(dev(xk), dev(offs), dev(codes), dev(scales), group_ids=dev(torch.tensor(gids)),
                           block_m=16, block_n=32)
    ref = torch.cat([xk[offs[i]: offs[i + 1]].float() @ exd[gids[i]][2].T for i in range(len(sizes))])
    assert y.dtype == dtype
    assert row_rel_err(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_moe_prefill_end_to_end(experts, dtype):
    """Prefill MoE from the grouped GEMM: sort (token, k) pairs by expert, fused gate/up + SwiGLU, down with routing
    weights per row, index_add back to tokens; against the reference MoE (all experts resident)."""
    ex, exd = experts
    t, lim = 19, 10.0
    g = gen(31)
    x = torch.randn(t, HID, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(NEXP, generator=g)[:TOPK] for _ in range(t)])
    wts = torch.rand(t, TOPK, generator=g)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    tok = order // TOPK
    counts = torch.bincount(flat, minlength=NEXP)
    offs = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    w13c = torch.stack([torch.cat([e[0][0], e[1][0]]) for e in ex])
    w13s = torch.stack([torch.cat([e[0][1].view(torch.uint8), e[1][1].view(torch.uint8)]) for e in ex])
    w2c = torch.stack([e[2][0] for e in ex])
    w2s = torch.stack([e[2][1] for e in ex])
    xs = x[tok]
    h = K.fp4_grouped_gemm(dev(xs), dev(offs), dev(w13c), dev(w13s), swiglu_limit=lim, out_dtype=torch.float32,
                           block_m=16, block_n=64, block_k=128)
    yk = K.fp4_grouped_gemm(h, dev(offs), dev(w2c), dev(w2s), row_weights=dev(wts.flatten()[order]),
                            block_m=16, block_n=128, block_k=128)
    y = torch.zeros(t, HID, dtype=torch.float32, device=DEVICE).index_add_(0, dev(tok), yk.float())
    ref = moe_ref(x, ids, wts, exd, set(range(NEXP)), lim)
    assert row_rel_err(y, ref) <= TOL[dtype]


def test_grouped_gemm_edge_codes(edge_experts):
    ex, exd = edge_experts
    offs = torch.tensor([0, 3, 20], dtype=torch.int32)
    x = torch.randn(20, HID, generator=gen(41))
    codes = torch.stack([e[0][0] for e in ex])
    scales = torch.stack([e[0][1] for e in ex])
    y = K.fp4_grouped_gemm(dev(x), dev(offs), dev(codes), dev(scales), block_m=16, block_n=64)
    ref = torch.cat([x[0:3] @ exd[0][0].T, x[3:20] @ exd[1][0].T])
    assert row_rel_err(y, ref) <= 1e-5


# --- the lightened interpreter (common.lighten_interpreter) ----------------------------------------------------------


@triton.jit
def _twice(v):
    return v * 2


@triton.jit
def _nested_sum_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    v = tl.load(x_ptr + p * BLOCK + tl.arange(0, BLOCK))
    # a helper of this module, and tl.max: a @jit of triton.language.standard, which sees triton.language.core only
    tl.store(out_ptr + p, _twice(tl.max(v, axis=0)))


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter only")
def test_lightened_interpreter_runs_nested_calls_and_restores_the_language():
    """Nested @jit calls inside a launch skip re-patching triton.language; a helper that reaches only
    triton.language.core (tl.max) still runs, and once the launch ends the language is restored, as the
    plain interpreter leaves it. True: the pinned Triton has the internals it patches (one that changed them runs the
    plain interpreter, about twice as slow on the stand-in tests: this test says so)."""
    from triton.runtime import interpreter

    assert C.lighten_interpreter()
    assert interpreter.interpreter_builder.options.sanitize_overflow is False
    x = torch.arange(64, dtype=torch.float32)
    for _ in range(2):  # the second launch patches afresh
        out = torch.zeros(2)
        _nested_sum_kernel[(2,)](x, out, BLOCK=32)
        assert torch.equal(out, x.view(2, 32).amax(1) * 2)
    with pytest.raises(ValueError, match="_semantic"):  # outside a launch: triton.language as it was
        tl.arange(0, 4)
