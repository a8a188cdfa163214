"""The decode-step fusions of the GPU kernel set (homerun.kernels.triton.decode / attention.attend_two / the fp8
kernel's grouped, SwiGLU-input and residual variants) against their definitions, the torch kernel set's methods, on
random inputs at small shapes: fp32 row-relative error <= 1e-5, bf16 <= 1e-2; each in one launch (plus one split-K
reduction launch where asked). CPU: Triton's interpreter; skipped without triton. On a GPU (the device check does):
HR_TRITON_DEVICE=cuda pytest tests/test_triton_decode_ops.py compiles the kernels and runs them on CUDA tensors (the
torch set's reference stays on the CPU)."""

from __future__ import annotations

import os

DEVICE = os.environ.get("HR_TRITON_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from homerun.kernels import triton as hr_triton  # noqa: E402
from homerun.kernels.torch_set import TorchKernels  # noqa: E402

if not hr_triton.available() or (DEVICE == "cpu") != hr_triton.interpreting():  # pragma: no cover
    pytest.skip(f"triton kernels unavailable here: {hr_triton.unavailable_reason()}", allow_module_level=True)
if DEVICE != "cpu" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("HR_TRITON_DEVICE=cuda without a CUDA device", allow_module_level=True)

from homerun.formats.quant import quant_fp8  # noqa: E402
from homerun.kernels.triton import attention, common, decode, fp8  # noqa: E402
from homerun.kernels.triton.kernel_set import TritonKernels  # noqa: E402
from homerun.models.layers import QLinear  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in exp")]
if DEVICE != "cpu":
    pytestmark.append(pytest.mark.gpu)
REF = TorchKernels()
GPU = TritonKernels(hr_triton.load())
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _d(*ts):
    """The kernels' inputs on DEVICE (None and non-tensors as they are); one value or a tuple."""
    out = tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in ts)
    return out[0] if len(out) == 1 else out


def _dlin(lin: QLinear) -> QLinear:
    return QLinear(*_d(lin.weight, lin.scale)) if lin.scale is not None else QLinear(_d(lin.weight))


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.cpu(), ref.cpu()
    a, ref = a.float().reshape(-1, a.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
    return ((a - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max().item()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _Launches:
    def __enter__(self):
        self.n0 = common.LaunchCounter.n
        return self

    def __exit__(self, *exc):
        self.n = common.LaunchCounter.n - self.n0


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("hashed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route(score_func, hashed, dtype):
    """The same experts as the torch set (as sets: torch's unsorted top-k lists them in its own order), each with
    its weight; the bias picks but does not weigh; logits far below 0 exercise softplus's small branch."""
    g = _gen(1)
    t, e, k = 5, 12, 3
    logits = (torch.randn(t, e, generator=g) * 4).to(dtype)
    logits[0, :4] = -30.0
    bias = torch.randn(e, generator=g)
    tid2eid = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(40)]) if hashed else None
    ids = torch.randint(0, 40, (t,), generator=g)
    with _Launches() as n:
        idx, w = GPU.route(*_d(logits, bias, tid2eid, ids), score_func, k, 2.5)
    idx, w = idx.cpu(), w.cpu()
    want_idx, want_w = REF.route(logits, bias, tid2eid, ids, score_func, k, 2.5)
    assert n.n == 1 and idx.dtype == torch.int64 and w.dtype == torch.float32
    order, want_order = idx.sort(dim=1), want_idx.sort(dim=1)
    assert torch.equal(order.values, want_order.values)
    assert _rel(w.gather(1, order.indices), want_w.gather(1, want_order.indices)) <= 1e-5
    assert torch.allclose(w.sum(1), torch.full((t,), 2.5), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [1, 37, 700])
def test_index_scores(dtype, p):
    """p 700 spans several programs (the interpreter's 512-row block) and a masked tail."""
    g = _gen(2)
    iq = torch.randn(2, 6, 32, generator=g).to(dtype)
    iw = torch.randn(2, 6, generator=g).to(dtype)
    ik = torch.randn(p, 64, generator=g).to(dtype)[:, ::2]  # strided keys
    with _Launches() as n:
        got = GPU.index_scores(*_d(iq, iw, ik), 6**-0.5, 32**-0.5)
    assert n.n == 1 and got.dtype == torch.float32
    assert _rel(got, REF.index_scores(iq, iw, ik, 6**-0.5, 32**-0.5)) <= 1e-5


def test_rope_cos_sin():
    freqs = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    pos = torch.tensor([0, 5, 1000, 65535])
    with _Launches() as n:
        c, s = GPU.rope_cos_sin(*_d(freqs, pos))
    c, s = c.cpu(), s.cpu()
    wc, ws = REF.rope_cos_sin(freqs, pos)
    assert n.n == 1
    assert torch.allclose(c, wc, atol=2e-6) and torch.allclose(s, ws, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n1, n2", [(1, 0), (5, 300), (130, 16)])
def test_attend_rows(dtype, n1, n2):
    """Window rows then compressed rows, one online softmax (n2 300 crosses the interpreter's 256-row block), the
    output written in the compute dtype."""
    g = _gen(3)
    h, d = 20, 64
    q = torch.randn(h, d, generator=g).to(dtype)
    kv = torch.randn(n1, d, generator=g).to(dtype)
    kv2 = torch.randn(n2, 2 * d, generator=g).to(dtype)[:, d:] if n2 else None  # a column slice
    sink = torch.randn(h, generator=g) * 3
    with _Launches() as n:
        got = GPU.attend_rows(*_d(q, kv, kv2, sink), d**-0.5, dtype)
    want = REF.attend_rows(q, kv, kv2, sink, d**-0.5, dtype)
    assert n.n == 1 and got.dtype == dtype
    assert _rel(got, want) <= TOL[dtype]
    assert _rel(attention.attend_two(*_d(q, kv, kv2, sink), d**-0.5), REF.attend_rows(q, kv, kv2, sink, d**-0.5,
                                                                                 torch.float32)) <= 1e-5


def _fp8_lin(n: int, k: int, seed: int) -> QLinear:
    g = _gen(seed)
    return QLinear(*quant_fp8(torch.randn(n, k, generator=g) * 0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_k", [1, 2])
def test_swiglu_down(dtype, split_k):
    """The shared expert's activation on load, its down projection and the residual in one launch (split-K: plus
    the reduction, which also casts and adds); inputs past the clamp limit on both sides."""
    g = _gen(4)
    lin = _fp8_lin(256, 384, 5)
    gt = (torch.randn(2, 384, generator=g) * 6).to(dtype)
    ut = (torch.randn(2, 384, generator=g) * 6).to(dtype)
    res = torch.randn(2, 256, generator=g).to(dtype)
    want = REF.swiglu_down(lin, gt, ut, 5.0, res)
    with _Launches() as n:
        got = GPU._fp8(*_d(gt, lin.weight, lin.scale), dtype, x2=_d(ut), swiglu_limit=5.0, residual=_d(res),
                       split_k=split_k)
    assert n.n == split_k and got.dtype == dtype
    assert _rel(got, want) <= TOL[dtype]
    assert _rel(GPU.swiglu_down(_dlin(lin), *_d(gt, ut), 5.0, _d(res)), want) <= TOL[dtype]
    # without the residual: the plain activation-input linear
    plain = GPU._fp8(*_d(gt, lin.weight, lin.scale), dtype, x2=_d(ut), swiglu_limit=5.0, split_k=split_k)
    assert _rel(plain, want - res) <= TOL[dtype] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 3, 20])
def test_grouped_one_launch(dtype, t):
    """Block-diagonal projection: every output tile reads its own group's input, one launch for every T."""
    lin = _fp8_lin(4 * 96, 128, 6)  # 96 rows per group: 32-row tiles
    x = torch.randn(t, 4, 256, generator=_gen(7)).to(dtype)[..., ::2]  # strided groups
    with _Launches() as n:
        got = GPU.grouped(_dlin(lin), _d(x), 4)
    assert n.n == 1 and got.shape == (t, 4, 96)
    assert _rel(got, REF.grouped(lin, x, 4)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["csa-first", "csa", "hca"])
def test_compress_close(dtype, case):
    """One window closes in one launch: the gated pooling (CSA: over the previous window's first halves and this
    one's second halves; at the start the previous slots are empty), RMSNorm, RoPE at the window's position, and the
    next overlap slots; HCA (no overlap) over 20 rows crosses the 16-slot block."""
    g = _gen(8)
    hd, r2 = 64, 8
    overlap = case != "hca"
    rate = 4 if overlap else 20
    width = 2 * hd if overlap else hd
    pend_kv = torch.randn(rate - 1, width, generator=g).to(dtype)
    kv = torch.randn(1, width, generator=g).to(dtype)
    pend_gate = (torch.randn(rate - 1, width, generator=g) * 2).to(dtype)
    gate = (torch.randn(1, width, generator=g) * 2).to(dtype)
    ape = torch.randn(rate, width, generator=g)
    okv = torch.randn(rate, hd, generator=g).to(dtype) if case == "csa" else None
    ogate = torch.randn(rate, hd, generator=g) if case == "csa" else None
    norm_w = torch.randn(hd, generator=g)
    freqs = 1.0 / (10000 ** (torch.arange(0, 2 * r2, 2, dtype=torch.float32) / (2 * r2)))
    args = (pend_kv, kv, pend_gate, gate, ape, okv, ogate, overlap, norm_w, 1e-6, freqs, 4 * 37, hd)
    with _Launches() as n:
        got = tuple(t.cpu() if t is not None else None for t in GPU.compress_close(*_d(*args)))
    want = REF.compress_close(*args)
    assert n.n == 1 and got[0].dtype == dtype and got[0].shape == (1, hd)
    assert _rel(got[0], want[0]) <= TOL[dtype]
    if overlap:
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    else:
        assert got[1] is None and got[2] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["csa", "hca"])
@pytest.mark.parametrize("closing", [True, False])
def test_compress_step(dtype, case, closing):
    """A captured step's whole compressor update in one launch: this step's row into the open window at its slot
    (the pooling reads it back), the entry as compress_close pools it, the overlap written in place only when the
    step closes the window. Bit for bit the unfused ops (the torch set's compress_step over this set's
    compress_close: the path the static step took before), and the torch set's within TOL."""
    g = _gen(13)
    hd, r2 = 64, 8
    overlap = case == "csa"
    rate = 4 if overlap else 20  # HCA: 20 rows cross the 16-slot block
    width = 2 * hd if overlap else hd
    pend_kv = torch.randn(rate, width, generator=g).to(dtype)
    pend_gate = (torch.randn(rate, width, generator=g) * 2).to(dtype)
    kv = torch.randn(1, width, generator=g).to(dtype)
    gate = (torch.randn(1, width, generator=g) * 2).to(dtype)
    ape = torch.randn(rate, width, generator=g)
    okv = torch.randn(rate, hd, generator=g).to(dtype) if overlap else None
    ogate = torch.randn(rate, hd, generator=g) if overlap else None
    norm_w = torch.randn(hd, generator=g)
    freqs = 1.0 / (10000 ** (torch.arange(0, 2 * r2, 2, dtype=torch.float32) / (2 * r2)))
    slot, pos = torch.tensor([rate - 1 if closing else 1]), torch.tensor([4 * 37])

    def args():  # fresh copies of the state the step updates in place, on DEVICE
        pk, pg, ok, og = (t.clone() if t is not None else None for t in (pend_kv, pend_gate, okv, ogate))
        return _d(pk, pg, kv, gate, slot, torch.tensor([closing]), ape, ok, og, overlap, norm_w, 1e-6, freqs, pos,
                  hd)

    fused, unfused, ref = args(), args(), tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in args())
    with _Launches() as n:
        got = GPU.compress_step(*fused).cpu()
    assert n.n == 1 and got.dtype == dtype and got.shape == (1, hd)
    with _Launches() as n_unfused:
        want = TorchKernels.compress_step(GPU, *unfused).cpu()
    assert n_unfused.n == 1  # (and the torch ops around the pooling launch)
    assert torch.equal(got, want)
    for k in (0, 1, 7, 8):  # the window, and the overlap (None for HCA): as the unfused ops leave them
        if fused[k] is not None:
            assert torch.equal(fused[k].cpu(), unfused[k].cpu()), k
    assert torch.equal(fused[0][slot[0]].cpu(), kv[0]) and torch.equal(fused[1][slot[0]].cpu(), gate[0])
    assert torch.equal(fused[0].cpu()[torch.arange(rate) != slot[0]], pend_kv[torch.arange(rate) != slot[0]])
    if overlap:  # replaced by this window's first halves on a close, else untouched
        assert torch.equal(fused[7].cpu(), okv) != closing and torch.equal(fused[8].cpu(), ogate) != closing
    assert _rel(got, REF.compress_step(*ref)) <= TOL[dtype]
    for k in (0, 1, 7, 8):
        if ref[k] is not None:
            assert torch.equal(fused[k].cpu(), ref[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, split_k", [(1, 1), (1, 3), (20, 1)])
def test_project_pairs_fp8_linears(dtype, m, split_k):
    """Consecutive FP8 linears of one input run two per launch (the second weight read through its own
    pointer offset, outputs side by side); a dense one between them runs alone (torch's matmul where x has its
    dtype, dense_linear's launch where not); every output as the torch set's."""
    lins = [_fp8_lin(200, 256, 9), _fp8_lin(72, 256, 10), QLinear(torch.randn(40, 256).bfloat16()),
            _fp8_lin(128, 256, 11)]
    x = torch.randn(m, 256, generator=_gen(12)).to(dtype)
    with _Launches() as n:
        got = GPU.project([_dlin(lin) for lin in lins], _d(x))
    assert n.n == (3 if dtype == torch.float32 and m <= 16 else 2)  # the pair, [the dense one,] the last FP8 one
    for a, b in zip(got, REF.project(lins, x)):
        assert a.shape == b.shape and _rel(a, b) <= TOL[dtype]
    w0, w1 = lins[0], lins[1]
    y = GPU._fp8(*_d(x, w0.weight, w0.scale), dtype, second=_d(w1.weight, w1.scale), split_k=split_k).cpu()
    assert y.shape == (m, 272)
    assert _rel(y[:, 200:], REF.linear(w1, x)) <= TOL[dtype] and _rel(y[:, :200], REF.linear(w0, x)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_dense_linears_read_as_stored(dtype, m):
    """Dense (bf16-stored) linears of a decode-sized x: two consecutive ones of one input in one launch (side by
    side, the second weight through its pointer offset), a lone one of another dtype than x's in one launch (widened
    in-kernel: no converted copy, no other op), of x's own dtype torch's one matmul; each as the torch set's within
    TOL. m 1 and 3: the register GEMV and the tl.dot path; 16 the most rows dense_linear takes."""
    from homerun.kernels.counting import count_device_work

    lins = [QLinear((torch.randn(n, 256, generator=_gen(20 + n)) * 0.1).bfloat16()) for n in (200, 72, 40)]
    x = torch.randn(m, 256, generator=_gen(22)).to(dtype)
    with count_device_work() as cw, _Launches() as n:
        got = GPU.project([_dlin(lin) for lin in lins], _d(x))
    assert (n.n, cw.c.ops) == ((2, 0) if dtype == torch.float32 else (1, 1)), (n.n, cw.c.op_names)
    for a, b in zip(got, REF.project(lins, x)):
        assert a.shape == b.shape and a.dtype == dtype and _rel(a, b) <= TOL[dtype]
    with count_device_work() as cw, _Launches() as n:
        one = GPU.linear(_dlin(lins[2]), _d(x))
    assert (n.n, cw.c.ops) == ((1, 0) if dtype == torch.float32 else (0, 1)), (n.n, cw.c.op_names)
    assert torch.equal(one.cpu(), got[2].cpu())
    if dtype == torch.float32:  # past 16 rows (prefill): torch's matmul over converted row blocks
        with _Launches() as n:
            GPU.linear(_dlin(lins[2]), _d(torch.randn(17, 256, generator=_gen(23))))
        assert n.n == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p, width", [(0, 256), (1, 256), (2, 256), (17, 64), (127, 128), (5, 600)])
def test_compress_append(dtype, p, width):
    """An eager step that leaves its compressor's window open: the open rows and this step's row, kv and gate (fp32
    gates under bf16 kv too) in one launch, the torch set's two cats bit for bit (0 open rows: copies of this step's
    rows; 17 and 127 cross the 16-row programs, width 600 the 256-column tiles); the inputs untouched (an earlier
    state may read them)."""
    g = _gen(30)
    pend_kv, kv = torch.randn(p, width, generator=g).to(dtype), torch.randn(1, width, generator=g).to(dtype)
    pend_gate, gate = torch.randn(p, width, generator=g), torch.randn(1, width, generator=g)
    ins = _d(pend_kv, pend_gate, kv, gate)
    with _Launches() as n:
        got = GPU.compress_append(*ins)
    assert n.n == 1
    for a, b in zip(got, REF.compress_append(pend_kv, pend_gate, kv, gate)):
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(ins, (pend_kv, pend_gate, kv, gate)))


def _exact_dense(wdtype: torch.dtype, n: int, k: int, m: int, seed: int) -> tuple[QLinear, torch.Tensor]:
    """A weight of wdtype off bf16's grid (integers + multiples of 2^-9, |w| < 4) and an integer bf16 x: every
    product and sum is exact in fp32 in any order, so results are bit-equal exactly when the weight is rounded the
    same way."""
    g = _gen(seed)
    w = torch.randint(-3, 4, (n, k), generator=g) + torch.randint(1, 8, (n, k), generator=g) * 2.0**-9
    x = torch.randint(-2, 3, (m, k), generator=g).bfloat16()
    return QLinear(w.to(wdtype)), x


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3])
def test_dense_linear_rounds_wider_weight(wdtype, m):
    """A weight wider than a bf16 x (weights_dtype fp32 / fp16 under bf16 compute): dense_linear rounds it to bf16
    in-kernel as the torch set's w.to(x.dtype) does, bit for bit (unrounded, the exact sums differ); in one launch."""
    lin, x = _exact_dense(wdtype, 64, 256, m, 40)
    want = REF.linear(lin, x)
    assert torch.equal(want, torch.nn.functional.linear(x, lin.weight.bfloat16()))
    with _Launches() as n:
        got = GPU.linear(_dlin(lin), _d(x)).cpu()
    assert n.n == 1 and got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert not torch.equal(torch.nn.functional.linear(x.float(), lin.weight.float()).bfloat16(), want)
    rnd = QLinear((torch.randn(64, 256, generator=_gen(41)) * 0.1).to(wdtype))
    xr = torch.randn(m, 256, generator=_gen(42)).bfloat16()
    assert _rel(GPU.linear(_dlin(rnd), _d(xr)), REF.linear(rnd, xr)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("wdtype, xdtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                            (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("m", [1, 3])
def test_dense_linear_split_k(wdtype, xdtype, m):
    """dense_linear's split-K (the GPU default for few output tiles: ~2 waves of programs, sized as fp8_linear's;
    here the CPU stand-in's 132 SMs against 3 or 5 tiles): the fp32 partials reduced in one more launch, each pair
    of projections too; as the torch set's within TOL (fp8_linear's split-K bound), bit for bit on exact sums."""
    lins = [QLinear((torch.randn(n, 512, generator=_gen(43 + n)) * 0.1).to(wdtype)) for n in (200, 72)]
    x = torch.randn(m, 512, generator=_gen(44)).to(xdtype)
    want = REF.project(lins, x)
    w0, w1 = (_d(lin.weight) for lin in lins)
    for split_k in (None, 3):  # the heuristic (min(k_tiles, 8, 2 waves) = 4 or 8 splits) and a forced one
        for y, ref in ((fp8.dense_linear(_d(x), w0, split_k=split_k), want[0]),
                       (fp8.dense_linear(_d(x), w0, second=w1, split_k=split_k), torch.cat(want, dim=1))):
            assert y.dtype == xdtype and _rel(y, ref) <= TOL[xdtype]
    with _Launches() as n:
        fp8.dense_linear(_d(x), w0, second=w1)
    assert n.n == 2  # the split-K launch and its reduction
    with _Launches() as n:
        fp8.dense_linear(_d(x), w0, fewest_programs=True)
    assert n.n == 1  # the interpreter's mode: no split-K
    lin, xe = _exact_dense(wdtype, 72, 512, m, 45)
    if xdtype == torch.bfloat16:
        assert torch.equal(fp8.dense_linear(_d(xe), _d(lin.weight), split_k=3).cpu(), REF.linear(lin, xe))


def test_compress_step_rejects_strided_overlap():
    """The fused step writes the overlap rows with unit column stride: another layout is a one-line ValueError
    naming the tensor, not a silent scatter."""
    g = _gen(46)
    hd, rate = 64, 4
    pend = torch.randn(rate, 2 * hd, generator=g)
    okv = torch.randn(hd, rate, generator=g).t()  # [rate, hd], column stride rate
    ogate = torch.randn(rate, hd, generator=g)
    freqs = torch.ones(8)
    args = (pend, pend.clone(), pend[:1].clone(), pend[:1].clone(), torch.tensor([1]), torch.tensor([True]),
            torch.randn(rate, 2 * hd, generator=g), okv, ogate, True, torch.ones(hd), 1e-6, freqs, torch.tensor([4]),
            hd)
    with pytest.raises(ValueError, match="overlap_kv needs unit column stride"):
        GPU.compress_step(*_d(*args))
    with pytest.raises(ValueError, match="overlap_gate needs unit column stride"):
        GPU.compress_step(*_d(*args[:7], okv.contiguous(), torch.randn(hd, rate).t(), *args[9:]))


def test_compress_close_strided_overlap_runs_the_torch_ops():
    """compress_close only reads the overlap: a strided one goes to the torch set's ops (the kernel's addressing
    assumes unit column stride), which give the contiguous overlap's result."""
    g = _gen(47)
    hd, rate = 64, 4
    args = [torch.randn(rate - 1, 2 * hd, generator=g), torch.randn(1, 2 * hd, generator=g),
            torch.randn(rate - 1, 2 * hd, generator=g), torch.randn(1, 2 * hd, generator=g),
            torch.randn(rate, 2 * hd, generator=g), torch.randn(hd, rate, generator=g).t(),
            torch.randn(hd, rate, generator=g).t(), True, torch.ones(hd), 1e-6, torch.ones(8), 4, hd]
    want = REF.compress_close(*args[:5], args[5].contiguous(), args[6].contiguous(), *args[7:])
    got = GPU.compress_close(*_d(*args))
    assert _rel(got[0], want[0]) <= TOL[torch.float32]
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[2].cpu(), want[2])
