"""The FP8 KV cache's one-launch row codec (homerun.kernels.triton.kv_fp8, a CUDA stand-in's `Fp8PagedRows.codec`)
against the store's torch ops (`_encode` / `_decode`, the CPU's path and the definition), bit for bit: every
non-NaN e4m3 code under every scale a store holds, rows that round to every code and to every tie between two, the
scale's edges (amax at 448 x 2^k and one step either side, zero blocks, infinities); one launch and no other device
op each. CPU: Triton's interpreter; skipped without triton."""

from __future__ import annotations

import standin_triton  # noqa: F401  (first: the interpreter, or skip)

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.kernels import triton as hr_triton  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402
from homerun.models.kv import Fp8PagedRows  # noqa: E402

KV = hr_triton.load().kv_fp8
LAYOUTS = [(512, 64, False), (128, 0, True)]  # V4's compressed entries (ue8m0 per 64 dims), indexer keys (fp32)
E4M3 = torch.arange(256, dtype=torch.uint8)
NON_NAN = E4M3[(E4M3 & 0x7F) != 0x7F]  # 254 codes


def _pair(width: int, rope: int, scale_fp32: bool, dtype: torch.dtype, rows: int) -> tuple[Fp8PagedRows, ...]:
    """The same store twice, torch ops and the codec, one page of `rows` rows each (scales zeroed, as allocated)."""
    ref = Fp8PagedRows(width, dtype, "cpu", rows, rope_dim=rope, scale_fp32=scale_fp32)
    fused = Fp8PagedRows(width, dtype, "cpu", rows, rope_dim=rope, scale_fp32=scale_fp32, codec=KV)
    for st in (ref, fused):
        st.reserve(rows)
    return ref, fused


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _page_of_codes(st: Fp8PagedRows, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Fills st's page: every non-NaN code in every block under every scale _encode writes (2^-126 .. 2^126, ue8m0
    bytes 1 .. 253; fp32 powers of two for the keys), 8 rows a scale, random bf16 rope columns."""
    exps = torch.arange(-126, 127).repeat_interleave(8)
    n = exps.numel()
    q, s, r = st.pages[0]
    q.view(torch.uint8)[:n] = NON_NAN[(torch.arange(n * st.nope) % NON_NAN.numel()).view(n, st.nope)]
    if st.scale_fp32:
        s[:n] = torch.exp2(exps.float()).unsqueeze(1)
    else:
        s[:n, : st.n_blocks] = (exps + 127).to(torch.uint8).unsqueeze(1)
    r[:n] = torch.randn(n, st.rope_dim, generator=gen).to(torch.bfloat16)
    return q, s, r


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the interpreter's numpy: the products past a range
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("width, rope, scale_fp32", LAYOUTS)
def test_the_fused_read_has_the_torch_decodes_bits(width, rope, scale_fp32, dtype):
    """Whole reads and gathers of every code under every scale, in every compute dtype: the products past the
    dtype's range (inf), below its normal range (subnormals, signed zeros) included."""
    n = 253 * 8
    ref, fused = _pair(width, rope, scale_fp32, dtype, n)
    page = _page_of_codes(ref, torch.Generator().manual_seed(0))
    fused.pages[0] = page
    want = ref._decode(*page)
    assert want.isinf().any() and (want[:, : ref.nope] == 0).any()
    if dtype != torch.float32:
        assert ((want != 0) & (want.abs() < torch.finfo(dtype).tiny)).any()
    assert _same(fused._get(page, n), want) and _same(ref._get(page, n), want)
    sel = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:300]
    assert _same(fused._take(page, sel), want[sel])


def test_the_nan_codes_read_as_nan():
    """A store's unwritten rows may hold any byte: the NaN codes decode to NaN as torch's do (not to +-480)."""
    ref, fused = _pair(128, 0, True, torch.bfloat16, 4)
    q, s, _ = ref.pages[0]
    q.view(torch.uint8)[:] = torch.tensor([0x7F, 0xFF, 0x7E, 0xFE], dtype=torch.uint8).repeat(4, 32)
    s[:] = 1.0
    got, want = fused._get(ref.pages[0], 4), ref._decode(*ref.pages[0])
    nan = want.isnan()
    assert nan.sum() == 4 * 64 and torch.equal(got.isnan(), nan) and _same(got[~nan], want[~nan])


def _rows_to_encode(width: int, rope: int, block: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Rows whose blocks span the scales the dtype reaches, three rows a scale 2^k: amax at 448 x 2^k, one dtype step
    above it (the next scale) or below it; the other dims every e4m3 value and every tie between two neighbours
    (round to even) times 2^k, with both signs, in every other row half of each block random; some blocks zero or
    holding an infinity."""
    vals = torch.tensor(NON_NAN.view(torch.float8_e4m3fn).float().unique().tolist())  # sorted, 0 once
    ties = (vals[1:] + vals[:-1]) / 2
    pool = torch.cat([vals, ties, -vals, -ties])  # exact in bf16 and fp16 before the 2^k factor
    lo, hi = (-24, 7) if dtype == torch.float16 else (-108, 119)  # amax >= 1e-30; 448 x 2^k finite in dtype
    n_blocks = (width - rope) // block
    ks = torch.arange(lo, hi + 1)
    n = ks.numel() * 3
    x = torch.empty(n, width)
    idx = torch.arange(n * (width - rope)) % pool.numel()
    x[:, : width - rope] = pool[idx].view(n, width - rope)
    k = ks.repeat_interleave(3).float()
    blocks = x[:, : width - rope].view(n, n_blocks, block)
    blocks *= torch.exp2(k).view(n, 1, 1)
    eps = torch.finfo(dtype).eps
    edge = torch.tensor([1.0, 1.0 + eps, 1.0 - eps / 2]).repeat(ks.numel())  # at, above, below 448 x 2^k
    blocks[:, :, 0] = (448.0 * torch.exp2(k) * edge).unsqueeze(1)
    mixed = torch.randn(n, n_blocks, block, generator=gen) * torch.exp2(k).view(n, 1, 1)
    blocks[::2, :, block // 2 :] = mixed[::2, :, block // 2 :]  # every other row: half of each block random
    blocks[0] = 0.0  # zero blocks: amax clamped to 1e-30
    blocks[1, :, 3] = float("inf")
    blocks[2, :, 5] = float("-inf")
    x[:, width - rope :] = torch.randn(n, rope, generator=gen) * 100
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("width, rope, scale_fp32", LAYOUTS)
def test_the_fused_encoder_writes_the_torch_encoders_bits(width, rope, scale_fp32, dtype):
    """Codes, scales (the padding columns left as allocated) and rope columns, written from a row (`write`) and
    at device-side row indices (`put_at`, the captured step's write) in a shuffled order."""
    block = width - rope if scale_fp32 else 64
    rows = _rows_to_encode(width, rope, block, dtype, torch.Generator().manual_seed(2))
    n = rows.shape[0]
    ref, fused = _pair(width, rope, scale_fp32, dtype, 2 * n)
    ref.write(0, rows)
    fused.write(0, rows)
    at = torch.randperm(n, generator=torch.Generator().manual_seed(3)) + n
    ref.put_at(ref.pages[0], at, rows)
    fused.put_at(fused.pages[0], at, rows)
    for a, b in zip(ref.pages[0], fused.pages[0]):
        assert _same(a, b)
    q, s, _ = ref.pages[0]
    codes = q.view(torch.uint8)[:n]
    assert torch.isin(NON_NAN, codes).all()  # every code was written
    if not scale_fp32:
        assert s[:n, ref.n_blocks :].eq(0).all() and s[:n, : ref.n_blocks].ne(0).all()


def test_the_scale_exponent_is_exact():
    """_encode's ceil(log2(amax / 448)) from the quotient's bits: amax one fp32 ulp past 448 x 2^k takes the scale
    2^(k + 1) (amax / 2^k would pass 448 and be clamped), where ceil(torch.log2(...)) on this CPU rounds onto k for
    most k (the exponent the codec's encoder and the torch ops share; kv_fp8's module docstring)."""
    ks = torch.arange(-108, 120)
    at = 448.0 * torch.exp2(ks.float())
    past = torch.nextafter(at, torch.tensor(float("inf")))
    st = Fp8PagedRows(64, torch.float32, "cpu", 1, scale_fp32=True)
    rows = torch.zeros(2 * ks.numel(), 64)
    rows[:, 0] = torch.stack([at, past], dim=1).reshape(-1)
    _, s, _ = st._encode(rows)
    assert torch.equal(s.view(-1, 2), torch.exp2(torch.stack([ks, ks + 1], dim=1).float()))
    assert (torch.ceil(torch.log2(past / 448.0)) == ks).sum() > ks.numel() // 2  # what a log2 would have written


@pytest.mark.parametrize("width, rope, scale_fp32", LAYOUTS)
def test_each_codec_call_is_one_launch_and_no_other_op(width, rope, scale_fp32):
    """What the captured step runs per store: the write at a device row, the whole read, the gather."""
    _, fused = _pair(width, rope, scale_fp32, torch.bfloat16, 16)
    page = fused.pages[0]
    entry = torch.randn(1, width).to(torch.bfloat16)
    at, sel = torch.tensor([5]), torch.tensor([5, 0, 3])
    for call in (lambda: fused.put_at(page, at, entry), lambda: fused._get(page, 16), lambda: fused._take(page, sel)):
        with torch.inference_mode(), count_device_work() as cw:
            call()
        assert (cw.c.launches, cw.c.ops) == (1, 0), cw.c.op_names


def test_the_model_gives_gpu_layers_stores_the_codec():
    """A CUDA stand-in's layers keep their fp8 KV through the codec; the CPU's, and stores whose pages sit off the
    compute device, through the torch ops."""
    from homerun.kernels.triton.kernel_set import TritonKernels
    from homerun.kernels.torch_set import TorchKernels

    assert TritonKernels(hr_triton.load()).fp8_rows is KV and TorchKernels.fp8_rows is None
    host = Fp8PagedRows(128, torch.bfloat16, "cpu", 4, "meta", scale_fp32=True, codec=KV)
    assert host.codec is None
    st = Fp8PagedRows(128, torch.bfloat16, "cpu", 4, scale_fp32=True, codec=KV)
    assert st.empty_like(8, torch.device("cpu")).codec is KV


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("width, rope, scale_fp32, rows", [(512, 64, False, 2048), (128, 0, True, 4096)])
def test_a_fused_read_keeps_only_its_output(width, rope, scale_fp32, rows, dtype):
    """The graphed step's largest transient: a fused whole read allocates the decoded rows and nothing else, within
    what decode_bytes charges (the torch ops' peak, tests/test_decode_graph_bytes.py)."""
    from live_bytes import LiveBytes
    from homerun.models.decode_bytes import read_transient_bytes
    from homerun.models.deepseek_v4.static_decode import static_store

    like = Fp8PagedRows(width, dtype, "cpu", 16, rope_dim=rope, scale_fp32=scale_fp32, codec=KV)
    store, _, _ = static_store(like, rows, torch.device("cpu"))
    with LiveBytes() as live:
        out = store._get(store.pages[0], store.page_rows)
    assert out.shape == (rows, width) and out.dtype == dtype
    charged = read_transient_bytes(rows, width, rope, scale_fp32, "fp8", dtype.itemsize)
    assert live.peak_bytes == rows * width * dtype.itemsize <= charged


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("width, rope, scale_fp32", LAYOUTS)
def test_pages_partial_and_spanned_in_small_programs(width, rope, scale_fp32, dtype, monkeypatch):
    """Stores of 5-row pages, the codec's programs cut to 2 rows (a launch of an odd row count ends in a part-filled
    program): writes that start mid-page and span page boundaries, part-filled first and last pages, whole reads of
    every row count (the last page partly) and gathers across pages: the same bits as the torch ops' store."""
    monkeypatch.setattr(KV, "_block_rows", lambda n, row_elems: 2)
    gen = torch.Generator().manual_seed(5)
    ref = Fp8PagedRows(width, dtype, "cpu", 5, rope_dim=rope, scale_fp32=scale_fp32)
    fused = Fp8PagedRows(width, dtype, "cpu", 5, rope_dim=rope, scale_fp32=scale_fp32, codec=KV)
    head, mid, tail = ((torch.randn(n, width, generator=gen) * sc).to(dtype) for n, sc in ((2, 3.0), (13, 1e-3),
                                                                                          (2, 50.0)))
    for st in (ref, fused):
        assert st.write(0, head) == 2  # a part-filled first page
        assert st.write(2, mid) == 15  # rows 2..14: from row 2 of page 0 through pages 1 and 2
        assert st.write(15, tail) == 17  # a part-filled fourth page
    assert len(ref.pages) == len(fused.pages) == 4
    for p, (a, b) in enumerate(zip(ref.pages, fused.pages)):  # the written rows (the rest: as allocated)
        assert all(_same(x[: 17 - 5 * p], y[: 17 - 5 * p]) for x, y in zip(a, b)), p
    for n in range(1, 18):
        assert _same(fused.view(n), ref.view(n)), n
    sel = torch.tensor([16, 0, 4, 5, 9, 10, 14, 15, 2, 16])
    assert _same(fused.gather(sel), ref.gather(sel))
    assert _same(fused.gather(sel.view(2, 5)), ref.gather(sel.view(2, 5)))
