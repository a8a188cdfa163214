"""CPU prefill at compute speed (issue 19): FP8 -> bf16 weight blocks (exact), bf16 prefill GEMMs within the fast
bound, the kernel set following the expert activation mode, the unit peaks, and the model's prefill logits in both
modes (fp32 exact against the torch set; the fast mode close)."""

from __future__ import annotations

import pytest
import torch

import homerun
from homerun.kernels import cpu_gemm, dispatch
from homerun.models.layers import QLinear

needs_native = pytest.mark.skipif(not cpu_gemm.available(), reason="native kernels not built")
# Tests of which set the dispatcher picks: HOMERUN_KERNELS=torch switches the native sets off by design.
needs_native_sets = pytest.mark.skipif(not dispatch.USE_NATIVE, reason="HOMERUN_KERNELS=torch: native sets off")


def _fp8(n: int, k: int, seed: int = 0) -> QLinear:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.7).to(torch.float8_e4m3fn)
    s = torch.randint(118, 130, (-(-n // 128), -(-k // 128)), generator=g, dtype=torch.uint8)
    return QLinear(w, s.view(torch.float8_e8m0fnu))


@needs_native
@pytest.mark.parametrize("shape,rows", [((256, 384), None), ((384, 256), (128, 384)), ((200, 136), (64, 200))])
def test_fp8_to_bf16_is_exact(shape, rows):
    lin = _fp8(*shape)
    r0, r1 = rows or (0, shape[0])
    got = cpu_gemm.fp8_to_bf16(lin.weight, lin.scale, rows)
    want = lin.dequant(torch.float32)[r0:r1]
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert torch.equal(got.float(), want)


@pytest.mark.parametrize("groups", [1, 2])
def test_prefill_linear_within_bound(groups):
    lin = _fp8(512, 256, seed=1)
    x = torch.randn(96, groups, 256) if groups > 1 else torch.randn(96, 256)
    if groups > 1:
        ref, got = lin.torch_grouped(x, groups), cpu_gemm.prefill_grouped(lin.weight, lin.scale, x, groups)
    else:
        ref, got = lin.torch_forward(x), cpu_gemm.prefill_linear(lin.weight, lin.scale, x)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert got.dtype == torch.float32 and 0 < rel <= 1e-2


def test_prefill_linear_row_blocks(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "BLOCK_ELEMS", 128 * 256)  # several row blocks
    lin = _fp8(512, 256, seed=2)
    x = torch.randn(70, 256)
    rel = ((cpu_gemm.prefill_linear(lin.weight, lin.scale, x) - lin.torch_forward(x)).norm()
           / lin.torch_forward(x).norm()).item()
    assert rel <= 1e-2


def _with_bf16_units(monkeypatch, present: bool) -> None:
    """Pretend this CPU has (or lacks) bf16 units, with the fast set's cache cleared, so the fast set's math is tested
    on every CPU."""
    monkeypatch.setattr(cpu_gemm, "bf16_units", lambda: present)
    monkeypatch.setattr(dispatch, "_FAST_SET", [])


def test_bf16_units_probe_answers():
    assert isinstance(cpu_gemm.bf16_units(), bool)


@needs_native
def test_fast_set_needs_bf16_units(monkeypatch):
    """Without bf16 units torch's bf16 GEMM is emulated (7x slower than fp32 on an AVX2 CPU): the exact set runs."""
    if dispatch.native_dense() is None or not dispatch.USE_NATIVE:
        pytest.skip("native dense kernels not built or switched off")
    k = dispatch.kernels_for("cpu", torch.float32, 512)
    _with_bf16_units(monkeypatch, False)
    assert dispatch.for_act(k, "int8") is k
    _with_bf16_units(monkeypatch, True)
    assert dispatch.for_act(k, "int8").name == "cpu-bf16"


@needs_native
@needs_native_sets
def test_kernel_set_follows_the_act_mode(monkeypatch):
    if dispatch.native_dense() is None:
        pytest.skip("native dense kernels not built")
    _with_bf16_units(monkeypatch, True)
    k = dispatch.kernels_for("cpu", torch.float32, 512)
    assert type(k) is dispatch.CpuPrefillKernels
    assert dispatch.for_act(k, "fp32") is k and dispatch.for_act(k, None) is k
    fast = dispatch.for_act(k, "int8")
    assert fast.name == "cpu-bf16" and dispatch.for_act(k, "bf16") is fast
    dec = dispatch.kernels_for("cpu", torch.float32, 1)
    assert dispatch.for_act(dec, "int8") is dec  # decode keeps the exact native set
    # narrow outputs (the router) and fp32-kept weights stay exact in the fast set: fp32 products and sums, the
    # torch path's bits when oneDNN is off
    router = QLinear(torch.randn(dispatch.EXACT_MAX_OUT, 256))
    x = torch.randn(80, 256)
    _assert_fp32_exact(fast.linear(router, x), x, router.weight)
    with torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(fast.linear(router, x), router.torch_forward(x))
    narrow_bf16 = QLinear(torch.randn(64, 256).bfloat16())
    _assert_fp32_exact(fast.linear(narrow_bf16, x), x, narrow_bf16.weight.float())
    wide = _fp8(1024, 256, seed=3)
    assert not torch.equal(fast.linear(wide, x), wide.torch_forward(x))


@needs_native
def test_unit_peaks_are_positive_or_absent():
    for kind in ("int8", "bf16", "fp32"):
        p = cpu_gemm.unit_peak(kind, iters=20_000)
        assert p is None or p > 0
    assert cpu_gemm.unit_peak("fp64") is None


@needs_native
def test_avx2_hosts_measure_int8_and_fp32_peaks():
    """Without AVX-512 the int8 and fp32 peaks come from the AVX2 units the kernels run on (not None), and the prefill
    record carries them next to what the GEMMs reach (ratios consistent with the GOP/s figures)."""
    from homerun.kernels import cpu_experts as ce
    from homerun.kernels.prefill_bench import run_prefill_bench

    if "avx2" not in ce.available_paths():
        pytest.skip("no AVX2 on this CPU")
    assert cpu_gemm.unit_peak("int8", iters=20_000) > 0 and cpu_gemm.unit_peak("fp32", iters=20_000) > 0
    rec = run_prefill_bench(reps=1, n_experts=2)
    peaks = rec["peak_gops"]
    assert peaks["int8"] > 0 and peaks["fp32"] > 0 and rec["peak_gops_per_core"]["int8"] > 0
    for by_rows in rec["dense"].values():
        for rows, r in by_rows.items():
            assert r["dispatch"] in r
            assert r["native"]["peak_ratio"] == pytest.approx(r["native"]["gflops"] / peaks["fp32"], abs=2e-3)
            core = rec["core_peak_gops_per_cpu_s"]["fp32"]
            assert r["native"]["cpu_peak_ratio"] == pytest.approx(r["native"]["gops_per_cpu_s"] / core, abs=2e-3)
    for per in ("8", "64"):
        e, g = rec["experts"][per], rec["expert_gemm"][per]
        assert e["gops"] > 0 and g["gops"] > 0 and g["gops_per_cpu_s"] > 0
        if e["act"] == "int8":
            assert e["int8_peak_ratio"] == pytest.approx(e["gops"] / peaks["int8"], abs=2e-3)


@pytest.fixture(scope="module")
def prefill_models(tiny_checkpoints):
    path = tiny_checkpoints["mixed"]
    return {act: homerun.load(path, expert_act=act) for act in ("fp32", "int8")}


@needs_native_sets
def test_model_prefill_both_modes(prefill_models, monkeypatch):
    """fp32 stays exact (the same logits as the torch kernel set); the fast mode stays close."""
    _with_bf16_units(monkeypatch, True)
    ids = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    exact = prefill_models["fp32"]
    got = exact.session().feed(ids)
    restore = dispatch.set_native(False)
    try:
        ref = exact.session().feed(ids)
    finally:
        restore()
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 5e-6 * scale
    calls = []
    real = cpu_gemm.prefill_linear
    cpu_gemm.prefill_linear = lambda *a: calls.append(1) or real(*a)
    try:
        fast = prefill_models["int8"].session().feed(ids)
    finally:
        cpu_gemm.prefill_linear = real
    assert calls  # the bf16 GEMMs ran
    err = (fast - ref).abs().max().item()
    assert 0 < err <= 5e-2 * scale


def _prefill_ops():
    from homerun.kernels import cpu_prefill

    if not cpu_prefill.available():
        pytest.skip("native kernels not built")
    return cpu_prefill


@pytest.mark.parametrize("shape,rows", [((256, 384), (0, 256)), ((384, 256), (128, 384)), ((200, 136), (64, 200))])
def test_fp8_to_f32_is_the_dequantization(shape, rows):
    cp = _prefill_ops()
    lin = _fp8(*shape, seed=4)
    got = cp.fp8_to_f32(lin.weight, lin.scale, rows)
    assert torch.equal(got, lin.dequant(torch.float32)[rows[0] : rows[1]])


def _assert_fp32_exact(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got is x @ w^T with fp32 products and sums: within fp32 summation noise of the float64 product (1e-5 of
    sum |x||w| per output; a bf16 rounding anywhere is ~4e-3)."""
    ref = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert ((got.double() - ref).abs() <= 1e-5 * mag).all()


@pytest.mark.parametrize("shape", [(70, 256), (3, 5, 256), (0, 256)])
def test_f32_linear_is_exact_and_the_blas_bits_without_onednn(shape):
    """cpu_gemm.f32_linear (oneDNN's fp32 GEMM where torch has it) is F.linear up to summation order, for 2-D, 3-D,
    strided and empty inputs, and F.linear itself with oneDNN off."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(11)
    w = torch.randn(96, 256, generator=g)
    x = torch.randn(*shape, generator=g)
    got = cpu_gemm.f32_linear(x, w)
    _assert_fp32_exact(got.reshape(-1, 96), x.reshape(-1, 256), w)
    xs = torch.randn(shape[0], 3, 256, generator=g)[:, 1]  # a strided view (wo_a's per-group input)
    _assert_fp32_exact(cpu_gemm.f32_linear(xs, w), xs, w)
    with torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(cpu_gemm.f32_linear(x, w), F.linear(x, w))
    assert cpu_gemm.f32_linear(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16  # other dtypes: F.linear


@pytest.mark.parametrize("row_block", [None, 128])
def test_exact_prefill_linear_is_the_torch_path_up_to_summation_order(row_block, monkeypatch):
    """The exact set's FP8 linear (native per-block dequantization, each block on the fp32 GEMM) is exact (fp32
    products and sums), and with oneDNN off bit for bit QLinear's torch path (the same blocks through F.linear); the
    grouped one too; and the CPU prefill set uses it, bf16-stored weights included."""
    cp = _prefill_ops()
    lin = _fp8(512, 256, seed=5)
    if row_block:
        monkeypatch.setattr("homerun.models.layers.BLOCK_ELEMS", row_block * 256)  # several row blocks
        assert lin.row_block() == row_block
    x = torch.randn(70, 256)
    w32 = lin.dequant(torch.float32)
    got = cp.fp8_linear(lin.weight, lin.scale, x, lin.row_block())
    _assert_fp32_exact(got, x, w32)
    xg = torch.randn(33, 4, 256)
    got_g = cp.fp8_grouped(lin.weight, lin.scale, xg, 4)
    for gi in range(4):
        _assert_fp32_exact(got_g[:, gi], xg[:, gi], w32[gi * 128 : (gi + 1) * 128])
    with torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(cp.fp8_linear(lin.weight, lin.scale, x, lin.row_block()), lin.torch_forward(x))
        assert torch.equal(cp.fp8_grouped(lin.weight, lin.scale, xg, 4), lin.torch_grouped(xg, 4))
    if dispatch.native_dense() is not None and dispatch.USE_NATIVE:
        k = dispatch.kernels_for("cpu", torch.float32, 512)
        calls = []
        real, real_f32 = cp.fp8_linear, cpu_gemm.f32_linear
        monkeypatch.setattr(cp, "fp8_linear", lambda *a: calls.append("fp8") or real(*a))
        monkeypatch.setattr(cpu_gemm, "f32_linear", lambda *a: calls.append("f32") or real_f32(*a))
        blocks = -(-512 // lin.row_block())
        assert torch.equal(k.linear(lin, x), got) and calls == ["fp8"] + ["f32"] * blocks
        dense = QLinear(torch.randn(128, 256).bfloat16())  # a bf16-stored matrix (the compressors')
        _assert_fp32_exact(k.linear(dense, x), x, dense.weight.float())
        assert calls == ["fp8"] + ["f32"] * (blocks + 1)
        big = QLinear(torch.randn(256, 256).bfloat16())
        if big.row_block() < 256:  # over one row block: the torch path's blocks, its bits
            assert torch.equal(k.linear(big, x), big.torch_forward(x)) and len(calls) == blocks + 2


@needs_native
@pytest.mark.parametrize("path", ["portable", "avx2", "avx512"])
def test_fp8_to_bf16_every_path_equals_the_table_on_every_byte(path):
    """Each native path (the AVX-512 one: four two-register permutes and two blends per 32 weights) gives the same
    bits as the scalar table for all 256 e4m3 codes (zeros, subnormals, NaNs included) under varied block scales,
    over full 32-wide chunks and a 40-column tail block, into a fresh block or a reused one."""
    from homerun.kernels.cpu_experts import available_paths

    if path not in available_paths():
        pytest.skip(f"{path} is not supported here")
    n, k = 256, 296
    g = torch.Generator().manual_seed(3)
    codes = (torch.randperm(n * k, generator=g) % 256).to(torch.uint8).view(n, k)
    s = torch.randint(100, 150, (2, 3), generator=g, dtype=torch.uint8)
    s[0, 0], s[1, 2] = 0, 254  # the smallest and largest finite scales
    w = codes.view(torch.float8_e4m3fn)
    want = cpu_gemm.fp8_to_bf16(w, s, path="portable")
    got = cpu_gemm.fp8_to_bf16(w, s, path=path)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    # within the exact range (no fp32 subnormal or overflow products) the table is the fp32 dequantization
    s_mid = s.clamp(100, 150)
    finite = ~torch.isnan(w.float())
    ref = QLinear(w, s_mid.view(torch.float8_e8m0fnu)).dequant(torch.float32)
    assert torch.equal(cpu_gemm.fp8_to_bf16(w, s_mid, path=path).float()[finite], ref[finite])
    out = torch.full((128, k), 7.0, dtype=torch.bfloat16)
    again = cpu_gemm.fp8_to_bf16(w, s, (64, 192), out=out, path=path)
    assert again.data_ptr() == out.data_ptr() and torch.equal(out.view(torch.int16), want[64:192].view(torch.int16))
    with pytest.raises(Exception, match="out is"):
        cpu_gemm.fp8_to_bf16(w, s, (0, 64), out=out, path=path)


@needs_native
def test_prefill_linear_reuses_one_scratch_block_and_stays_exact():
    """prefill_linear converts into this thread's reused block (no fresh pages per call), and a second weight's
    conversion into the same block does not disturb the first call's result."""
    a, b = _fp8(384, 256, seed=4), _fp8(384, 256, seed=5)
    x = torch.randn(40, 256)
    ya = cpu_gemm.prefill_linear(a.weight, a.scale, x)
    ptr = cpu_gemm._scratch.buf.data_ptr()
    yb = cpu_gemm.prefill_linear(b.weight, b.scale, x)
    assert cpu_gemm._scratch.buf.data_ptr() == ptr
    want_a = torch.nn.functional.linear(x.bfloat16(), a.dequant(torch.float32).bfloat16()).float()
    want_b = torch.nn.functional.linear(x.bfloat16(), b.dequant(torch.float32).bfloat16()).float()
    assert torch.equal(ya, want_a) and torch.equal(yb, want_b)


def _convert(to: str, wf: torch.Tensor, s: torch.Tensor, rows, path: str) -> torch.Tensor:
    """The bf16 or the fp32 conversion of rows (None: all) on `path`, as integers (bit patterns compare exactly)."""
    if to == "bf16":
        return cpu_gemm.fp8_to_bf16(wf, s, rows, path=path).view(torch.int16)
    return _prefill_ops().fp8_to_f32(wf, s, rows or (0, wf.shape[0]), path=path).view(torch.int32)


@needs_native
@pytest.mark.parametrize("to", ["bf16", "f32"])
@pytest.mark.parametrize("threads", [1, 2])
def test_fp8_to_bf16_avx512_rows_equal_the_table_for_every_code_and_scale(threads, to):
    """The AVX-512 arithmetic (whole rows, no table) against the portable table, for the bf16 and the fp32 (exact
    mode) conversions: every e4m3 code under every ue8m0 scale byte (0: a subnormal scale, 255: infinity, so NaN,
    infinite and subnormal products), with 40-column tail blocks, row ranges off the 8-row task and 128-row block
    grid, on one or two threads, and with flush-to-zero and denormals-are-zero set on the calling thread (a subnormal
    fp32 operand in the arithmetic would read as zero)."""
    from homerun.kernels import cpu_experts as ce

    if "avx512" not in ce.available_paths():
        pytest.skip("avx512 is not supported here")
    g = torch.Generator().manual_seed(11)
    w = torch.randint(0, 256, (128 * 16, 128 * 16 + 40), generator=g, dtype=torch.uint8)
    w[:, :256] = torch.arange(256, dtype=torch.uint8)  # every code in every row, under each row block's scales
    s = torch.arange(256, dtype=torch.uint8).view(16, 16)
    s = torch.cat([s, s.flip(0)[:, :1]], 1).contiguous()  # every scale byte on a full block, more on the tails
    wf = w.view(torch.float8_e4m3fn)
    ce.set_threads(threads)
    try:
        for rows in (None, (3, 1001), (130, 131), (1999, 2048)):
            want = _convert(to, wf, s, rows, "portable")
            got = _convert(to, wf, s, rows, "avx512")
            assert torch.equal(got, want), rows
        if threads == 1:  # one thread: every task runs on the caller, whose MXCSR this sets
            torch.set_flush_denormal(True)
            try:  # both under it: the table's multiply flushes subnormal products as the arithmetic's does
                got = _convert(to, wf, s, None, "avx512")
                want = _convert(to, wf, s, None, "portable")
            finally:
                torch.set_flush_denormal(False)
            assert torch.equal(got, want)
    finally:
        ce.set_threads(None)  # the default: every CPU


@needs_native
@pytest.mark.parametrize("rows", [1, 5])
def test_fast_set_few_rows_are_the_bf16_gemms_numbers(rows, monkeypatch):
    """A few rows (the last layer's kept rows) in the fast set run the FP8 weight's decode kernel on bf16-rounded
    activations with the output rounded to bf16: the bf16 GEMM's numbers up to summation order. Against the float64
    product of the bf16-rounded rows, rounded to bf16, at most 1 bf16 ulp apart and almost all equal (skipping the
    activations' rounding moves most outputs); within that of prefill_linear; the grouped projection too."""
    if dispatch.native_dense() is None or not dispatch.USE_NATIVE:
        pytest.skip("native dense kernels not built")
    _with_bf16_units(monkeypatch, True)
    fast = dispatch.for_act(dispatch.kernels_for("cpu", torch.float32, 512), "int8")
    lin = _fp8(1024, 512, seed=8)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(rows, 512, generator=g)
    w64 = lin.dequant(torch.float32).double()

    def check(got: torch.Tensor, xr: torch.Tensor, w: torch.Tensor) -> None:
        want = (xr.bfloat16().double() @ w.T).to(torch.bfloat16).float()
        ulp = 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)
        assert ((got - want).abs() <= ulp).all()
        assert (got != want).float().mean().item() < 0.02

    real = cpu_gemm.prefill_linear
    monkeypatch.setattr(cpu_gemm, "prefill_linear", lambda *a: pytest.fail("few rows took the GEMM path"))
    got = fast.linear(lin, x)
    check(got, x, w64)
    gemm = real(lin.weight, lin.scale, x)
    assert ((got - gemm).abs() <= 2.0 ** -7 * gemm.abs()).all()
    xg = torch.randn(rows, 4, 512, generator=g)
    got_g = fast.grouped(lin, xg, 4)
    assert got_g.shape == (rows, 4, 256)
    for gi in range(4):
        check(got_g[:, gi], xg[:, gi], w64[gi * 256 : (gi + 1) * 256])
    many = torch.randn(dispatch.NATIVE_MAX_ROWS + 1, 512, generator=g)
    monkeypatch.setattr(cpu_gemm, "prefill_linear", real)
    assert torch.equal(fast.linear(lin, many), real(lin.weight, lin.scale, many))  # more rows: the GEMM


@needs_native
def test_exact_set_few_rows_take_the_decode_kernel(monkeypatch):
    """A few rows in the exact prefill set (the last layer's kept rows) run the weight's native decode kernel (exact
    products, fp32 sums) instead of dequantizing the whole weight for them; more rows take the GEMM blocks."""
    if dispatch.native_dense() is None or not dispatch.USE_NATIVE:
        pytest.skip("native dense kernels not built")
    from homerun.kernels import cpu_prefill as cp

    k = dispatch.kernels_for("cpu", torch.float32, 512)
    assert type(k) is dispatch.CpuPrefillKernels
    lin, dense = _fp8(512, 256, seed=12), QLinear(torch.randn(64, 256).bfloat16())
    x = torch.randn(3, 256)
    real = cp.fp8_linear
    monkeypatch.setattr(cp, "fp8_linear", lambda *a: pytest.fail("a few rows took the GEMM path"))
    monkeypatch.setattr(cpu_gemm, "f32_linear", lambda *a: pytest.fail("a few rows took the GEMM path"))
    _assert_fp32_exact(k.linear(lin, x), x, lin.dequant(torch.float32))
    _assert_fp32_exact(k.linear(dense, x), x, dense.weight.float())
    calls = []
    monkeypatch.setattr(cp, "fp8_linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(cpu_gemm, "f32_linear", torch.nn.functional.linear)
    many = torch.randn(dispatch.NATIVE_MAX_ROWS + 1, 256)
    _assert_fp32_exact(k.linear(lin, many), many, lin.dequant(torch.float32))
    assert calls == [1]
