"""The V4 forward (homerun.models.deepseek_v4 via homerun.load) against transformers' DeepseekV4ForCausalLM on the
tiny official-format checkpoints, plus the pieces that the end-to-end comparison cannot isolate."""

from __future__ import annotations

import pytest
import torch

import homerun
from homerun.errors import ConfigError, UnknownModelError, UsageError
from homerun.models import deepseek_v4 as v4
from homerun.kernels import dispatch
from homerun.models import layers
from homerun.formats.quant import dequant_fp8, quant_fp8
from offload.base import ExpertBackend, ReferenceExpertBackend

KINDS = ("mixed", "csa", "hca")
SEQ_LEN = 640


def _ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


def _load_hf(path):
    transformers = pytest.importorskip("transformers")
    # HF dequantizes FP8/FP4 to bf16 on CPU; loading straight to fp32 crashes, so load bf16 then upcast (doc §7).
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu")
    return hf.float().eval()


@pytest.fixture(scope="module")
def hf_models(tiny_checkpoints):
    return {k: _load_hf(tiny_checkpoints[k]) for k in KINDS}


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {k: homerun.load(tiny_checkpoints[k], expert_act="fp32") for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_full_pass_matches_transformers(kind, models, hf_models):
    model, hf = models[kind], hf_models[kind]
    ids = _ids(SEQ_LEN, model.args.vocab_size)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    mine = model.logits(ids)
    assert mine.dtype == torch.float32 and mine.shape == ref.shape
    # measured: 4.9e-7 .. 5.3e-7 of max |logit| on the three presets (fp32 summation order); ~10x headroom
    tol = 5e-6 * ref.abs().max().item()
    assert (mine - ref).abs().max().item() <= tol




@pytest.mark.parametrize("kind", KINDS)
def test_decode_steps_match_transformers_on_each_kernel_set(kind, kernel_set, models, hf_models):
    """Prefill, then single-token decode steps (the decode kernel set: native one-query attention, mHC, FP8 rows;
    or their torch definitions) against transformers' full pass at the same positions."""
    model, hf = models[kind], hf_models[kind]
    ids = _ids(SEQ_LEN, model.args.vocab_size, seed=11)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    n0 = SEQ_LEN - 5
    s = model.session()
    s.feed(ids[:n0].tolist())
    got = torch.stack([s.feed([t]) for t in ids[n0:].tolist()])
    want = ref[n0:]
    # measured 3.2e-7 .. 3.8e-7 of max |logit| on either kernel set
    assert (got - want).abs().max().item() <= 5e-6 * want.abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_compute_is_as_close_as_transformers_bf16(kind, tiny_checkpoints, hf_models):
    """bf16 compute (the torch kernel set: what CUDA runs) against the fp32 reference: no further from it than
    transformers' own bf16 model, prefill and decode; argmax agreement within 2 points of transformers'."""
    transformers = pytest.importorskip("transformers")
    path = tiny_checkpoints[kind]
    hf32 = hf_models[kind]
    hf16 = transformers.DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu").eval()
    ids = _ids(200, hf32.config.vocab_size, seed=0)
    with torch.no_grad():
        ref = hf32(ids[None]).logits[0].float()
        hfb = hf16(ids[None]).logits[0].float()
    # Experts on the reference backend (dequantize, multiply in bf16): what CUDA computes. The CPU's native int8
    # activation mode is a separate, lossier choice, tested against its own bound.
    model = homerun.load(path, dtype="bfloat16", experts="reference")
    assert model.net.compute_dtype == torch.bfloat16
    mine = model.logits(ids)
    n0 = 184
    s = model.session()
    s.feed(ids[:n0].tolist())
    dec = torch.stack([s.feed([t]) for t in ids[n0:].tolist()])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    def row_rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).norm(dim=-1) / b.norm(dim=-1)

    # Per row: the typical row as close to fp32 as transformers' bf16, and few more discrete flips: a router or CSA
    # indexer near-tie that bf16 rounding settles either way (row 198 of the mixed preset has a top-k gap of 9e-4
    # relative, under bf16's 7.8e-3, and flips with any change of summation order). Prefill and decode.
    def check(got: torch.Tensor, hf: torch.Tensor, want: torch.Tensor, extra_flips: int) -> None:
        mine_rows, hf_rows = row_rel(got, want), row_rel(hf, want)
        flips, hf_flips = int((mine_rows > 0.05).sum()), int((hf_rows > 0.05).sum())
        print(f"{kind}: median row {mine_rows.median().item():.2e} / {hf_rows.median().item():.2e}, "
              f"flips {flips} / {hf_flips}")
        assert mine_rows.median().item() <= 1.3 * hf_rows.median().item() + 1e-3
        assert flips <= hf_flips + extra_flips

    check(mine, hfb, ref, 2)
    check(dec, hfb[n0:], ref[n0:], 1)
    agree = (mine.argmax(-1) == ref.argmax(-1)).float().mean().item()
    agree_hf = (hfb.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= agree_hf - 0.02


def test_presets_cover_the_architecture(models):
    kinds = {k for m in models.values() for k in m.args.layer_kinds}
    assert kinds == {v4.LAYER_SLIDING, v4.LAYER_CSA, v4.LAYER_HCA}
    assert any(m.args.n_hash_layers > 0 for m in models.values())
    assert any(m.args.n_hash_layers < m.args.n_layers for m in models.values())
    assert max(m.args.n_routed_experts for m in models.values()) >= 8
    assert min(m.args.n_activated_experts for m in models.values()) >= 2
    for m in models.values():
        if v4.LAYER_CSA in m.args.layer_kinds:
            # the indexer must choose a strict subset of the closed CSA entries at SEQ_LEN
            assert m.args.index_topk < SEQ_LEN // m.args.csa_rate
        if v4.LAYER_HCA in m.args.layer_kinds:
            assert SEQ_LEN // m.args.hca_rate >= 3  # several HCA windows close


def test_csa_indexer_selects_a_subset(models):
    """Record the CSA gathers: a late query attends to index_topk entries out of many more closed ones."""
    model = models["mixed"]
    net = model.net
    seen = []
    orig = v4.DeepseekV4._attend

    def spy(self, layer, *args):
        if layer.kind == v4.LAYER_CSA:
            seen.append(args[6].n_entries)  # comp (after q, qr, iw, keys, start, n_past)
        return orig(self, layer, *args)

    net._attend = spy.__get__(net)
    try:
        model.logits(_ids(SEQ_LEN, model.args.vocab_size))
    finally:
        del net._attend
    assert seen and max(seen) == SEQ_LEN // model.args.csa_rate > model.args.index_topk


def test_rope_frequencies_match_transformers(models, hf_models):
    net, hf = models["mixed"].net, hf_models["mixed"]
    rot = hf.model.rotary_emb
    assert torch.allclose(net.freqs_main, rot.main_inv_freq.float(), rtol=1e-6, atol=0)
    assert torch.allclose(net.freqs_compress, rot.compress_inv_freq.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(net.freqs_compress, v4.inv_freq(net.args.rope_dim, net.args.compress_rope_theta, None))


def test_args_from_transformers_saved_config(tiny_checkpoints, models):
    """transformers re-saves config.json with layer_types / mlp_layer_types / rope_parameters; both forms agree."""
    transformers = pytest.importorskip("transformers")
    model = models["hca"]
    hf_cfg = transformers.DeepseekV4Config(**model.config).to_dict()
    assert "layer_types" in hf_cfg and "rope_parameters" in hf_cfg
    assert v4.ModelArgs.from_hf_config(hf_cfg) == model.args


def test_args_errors():
    with pytest.raises(ConfigError, match="missing field"):
        v4.ModelArgs.from_hf_config({"num_hidden_layers": 1, "head_dim": 64, "compress_ratios": [0]})
    base = {"num_hidden_layers": 2, "head_dim": 64, "compress_ratios": [0]}
    with pytest.raises(ConfigError, match="compress_ratios"):
        v4.ModelArgs.from_hf_config(base)


@pytest.mark.parametrize("weights_dtype", ["bf16", "fp32"])
def test_weights_dtype_predequantized_equals_packed(tiny_checkpoints, models, weights_dtype):
    packed = models["mixed"]
    dense = homerun.load(tiny_checkpoints["mixed"], weights_dtype=weights_dtype, expert_act="fp32")
    want = torch.bfloat16 if weights_dtype == "bf16" else torch.float32
    assert dense.net.layers[0].attn.wq_b.weight.dtype == want and dense.net.layers[0].attn.wq_b.scale is None
    ids = _ids(200, packed.args.vocab_size, seed=3)
    a, b = packed.logits(ids), dense.logits(ids)
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()


def test_fp8_weights_stay_packed(models):
    layer = models["mixed"].net.layers[0]
    assert layer.attn.wq_b.weight.dtype == torch.float8_e4m3fn
    assert layer.attn.wq_b.scale is not None
    assert layer.moe.shared_w1.weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (130, 128)])
def test_qlinear_paths_equal_full_dequant(shape, monkeypatch):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g)
    q, s = quant_fp8(w)
    x = torch.randn(5, shape[1], generator=g)
    ref = x @ dequant_fp8(q, s).T
    lin = layers.QLinear(q, s)
    assert torch.equal(lin.dequant(torch.float32), dequant_fp8(q, s))
    native = dispatch.kernels_for("cpu", torch.float32, x.shape[0]).linear(lin, x)  # native when built
    monkeypatch.setattr(dispatch, "USE_NATIVE", False)
    full = lin(x)
    monkeypatch.setattr(layers, "BLOCK_ELEMS", 128 * shape[1])  # force one 128-row block per dequant
    blocked = lin(x)
    for y in (native, full, blocked):
        assert torch.allclose(y, ref, rtol=0, atol=1e-6 * ref.abs().max().item())
    if shape[0] % 256 == 0:  # grouped projection: two groups of 128 rows, both paths
        xg = torch.randn(5, 2, shape[1], generator=g)
        refg = torch.stack([xg[:, i] @ dequant_fp8(q, s)[i * 128 : (i + 1) * 128].T for i in range(2)], dim=1)
        assert torch.allclose(lin.grouped(xg, 2), refg, rtol=0, atol=1e-6 * refg.abs().max().item())
        monkeypatch.setattr(dispatch, "USE_NATIVE", True)
        grouped = dispatch.kernels_for("cpu", torch.float32, xg.shape[0]).grouped(lin, xg, 2)
        assert torch.allclose(grouped, refg, rtol=0, atol=1e-6 * refg.abs().max().item())


@pytest.mark.parametrize("shape", [(300, 4096), (7, 37), (129, 130)])
def test_qlinear_bf16_native_is_exact_products(shape, monkeypatch):
    """A bf16-stored matrix in an fp32 model: the native kernel (when built) equals the fp32 upcast matmul up to
    summation order, for 1..64 rows; the torch path (kernel off) is the upcast itself."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(*shape, generator=g).bfloat16()
    lin = layers.QLinear(w)
    for rows in (1, 3, 64):
        x = torch.randn(rows, shape[1], generator=g)
        ref = (x.double() @ w.double().T)
        y = dispatch.kernels_for("cpu", torch.float32, rows).linear(lin, x)
        assert y.dtype == torch.float32 and y.shape == (rows, shape[0])
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6
        monkeypatch.setattr(dispatch, "USE_NATIVE", False)
        assert torch.allclose(lin(x).double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
        monkeypatch.setattr(dispatch, "USE_NATIVE", True)


def test_native_sinkhorn_equals_torch_loop(cpu_dense):
    g = torch.Generator().manual_seed(4)
    for t, n, iters in ((1, 4, 20), (37, 4, 20), (3, 5, 1), (2, 3, 7)):
        m = torch.softmax(torch.randn(t, n, n, generator=g) * 3, dim=-1) + 1e-6
        ref = m / (m.sum(dim=-2, keepdim=True) + 1e-6)
        for _ in range(iters - 1):
            ref = ref / (ref.sum(dim=-1, keepdim=True) + 1e-6)
            ref = ref / (ref.sum(dim=-2, keepdim=True) + 1e-6)
        got = cpu_dense.sinkhorn_(m.clone(), iters, 1e-6)
        assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7)
        assert torch.allclose(got.sum(dim=-2), torch.ones(t, n), atol=1e-4)  # columns sum to 1 after the last pass
    with pytest.raises(Exception, match="contiguous fp32"):
        cpu_dense.sinkhorn_(torch.zeros(2, 3, 4), 2, 1e-6)


def test_native_hc_mixes_equal_torch(cpu_dense):
    g = torch.Generator().manual_seed(6)
    for t, n, d in ((1, 4, 4096), (5, 4, 130), (2, 3, 7)):
        x, y = torch.randn(t, n, d, generator=g), torch.randn(t, d, generator=g)
        pre, post, comb = torch.rand(t, n, generator=g), torch.rand(t, n, generator=g), torch.rand(t, n, n, generator=g)
        ref_pre = (pre.unsqueeze(-1) * x).sum(dim=1)
        ref_post = post.unsqueeze(-1) * y.unsqueeze(1) + torch.matmul(comb.transpose(-1, -2), x)
        assert torch.allclose(cpu_dense.hc_pre(pre, x), ref_pre, rtol=1e-6, atol=1e-6)
        assert torch.allclose(cpu_dense.hc_post(post, y, comb, x), ref_post, rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception, match="does not match"):
        cpu_dense.hc_pre(torch.zeros(2, 3), torch.zeros(2, 4, 5))


@pytest.mark.parametrize("t,n,d", [(1, 4, 4096), (5, 4, 130), (2, 3, 7)])
def test_native_hc_weights_equal_torch(t, n, d, models, monkeypatch, cpu_dense):
    """pre/post/comb of an mHC site, and the head's pre, from one native call against the model's torch ops."""
    from homerun.models.deepseek_v4 import _HC

    from dataclasses import replace

    net = models["mixed"].net
    args = replace(net.args, hc_mult=n)
    monkeypatch.setattr(net, "args", args)
    g = torch.Generator().manual_seed(t * 100 + d)
    x = torch.randn(t, n, d, generator=g) * 3
    hc = _HC(torch.randn((2 + n) * n, n * d, generator=g) / d**0.5, torch.randn((2 + n) * n, generator=g),
             torch.rand(3, generator=g) + 0.5)
    monkeypatch.setattr(dispatch, "USE_NATIVE", False)
    ref = net._hc_weights(hc, x, dispatch.TORCH)
    got = cpu_dense.hc_weights(x, hc.fn, hc.scale, hc.base, args.norm_eps, args.hc_eps, args.hc_sinkhorn_iters)
    for a, b in zip(got, ref):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    head_fn, head_base, head_scale = hc.fn[:n], hc.base[:n], hc.scale[:1]
    pre, post, comb = cpu_dense.hc_weights(x, head_fn, head_scale, head_base, args.norm_eps, args.hc_eps, 1)
    flat = x.flatten(1) * torch.rsqrt(x.flatten(1).pow(2).mean(-1, keepdim=True) + args.norm_eps)
    ref_pre = torch.sigmoid(flat @ head_fn.T * head_scale + head_base) + args.hc_eps
    assert post is None and comb is None and torch.allclose(pre, ref_pre, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="do not match"):
        cpu_dense.hc_weights(x, hc.fn[:, :-1], hc.scale, hc.base, args.norm_eps, args.hc_eps, 2)


@pytest.mark.parametrize("shape,rope", [((1, 1024), 0), ((1, 64, 512), 64), ((3, 512), 64), ((2, 8, 128), 64)])
def test_native_norm_rope_equals_torch(shape, rope, cpu_dense):
    """RMSNorm (with and without a weight) and RoPE (forward, inverse, alone) against rms_norm / apply_rope."""
    from homerun.models.deepseek_v4 import apply_rope, rms_norm

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * 4
    w = torch.randn(shape[-1], generator=g)
    cos = sin = None
    if rope:
        ang = torch.rand(shape[0], rope // 2, generator=g) * 100
        cos, sin = ang.cos(), ang.sin()
    for weight in (None, w):
        ref = rms_norm(x, weight, 1e-6)
        if rope:
            ref = apply_rope(ref, cos, sin)
        got = cpu_dense.norm_rope(x, weight, 1e-6, cos, sin)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    if rope:
        for inverse in (False, True):
            got = cpu_dense.norm_rope(x, None, 0.0, cos, sin, norm=False, inverse=inverse)
            assert torch.equal(got, apply_rope(x, cos, sin, inverse=inverse))
        with pytest.raises(Exception, match="do not match"):
            cpu_dense.norm_rope(x, None, 0.0, cos[:, :-1], sin, norm=False)


@pytest.mark.parametrize("h,n,d", [(64, 100, 512), (4, 1, 64), (5, 37, 72), (3, 0, 16), (8, 700, 512)])
def test_native_attend_one_equals_torch(h, n, d, cpu_dense):
    """One query over shared rows with a per-head sink: native (heads on the pool) against the torch formula."""
    g = torch.Generator().manual_seed(h * n + d)
    q, kv, sink = torch.randn(h, d, generator=g), torch.randn(n, d, generator=g), torch.randn(h, generator=g)
    scale = d**-0.5
    probs = torch.softmax(torch.cat([q.double() @ kv.double().T * scale, sink.double().view(-1, 1)], 1), dim=-1)
    ref = probs[:, :n] @ kv.double()
    got = cpu_dense.attend_one(q, kv, sink, scale)
    assert got.shape == (h, d) and torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="do not match"):
        cpu_dense.attend_one(q, kv[:, :-1], sink, scale)


def test_model_logits_same_with_native_primitives_off(models, monkeypatch):
    """The native Sinkhorn / FP8 / bf16 paths against the all-torch path on the same model."""
    ids = torch.randint(0, 500, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    fast = models["mixed"].logits(ids)
    monkeypatch.setattr(dispatch, "USE_NATIVE", False)
    slow = models["mixed"].logits(ids)
    assert ((fast - slow).abs().max() / slow.abs().max()).item() <= 1e-5


def test_bf16_kernel_against_double_reference(cpu_dense):
    g = torch.Generator().manual_seed(3)
    for n, k, t in ((513, 4099, 5), (48, 4096, 1), (100, 16, 9), (5, 1, 2)):
        w = torch.randn(n, k, generator=g).bfloat16()
        x = torch.randn(t, k, generator=g)
        ref = x.double() @ w.double().T
        y = cpu_dense.bf16_linear(x, w)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6
    with pytest.raises(Exception, match="input width"):
        cpu_dense.bf16_linear(torch.randn(1, 5), torch.zeros(3, 4, dtype=torch.bfloat16))


class _RecordingBackend(ExpertBackend):
    """Wraps the reference backend and records what the MoE hands it."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def forward(self, layer, x, expert_ids, expert_weights):
        self.calls.append((layer, expert_ids.clone(), expert_weights.clone()))
        return self.inner.forward(layer, x, expert_ids, expert_weights)


def test_expert_backend_contract(tiny_checkpoints, models):
    ref = models["hca"]
    from homerun.formats.loader import open_checkpoint

    ckpt = open_checkpoint(tiny_checkpoints["hca"])
    rec = _RecordingBackend(ReferenceExpertBackend(ckpt.expert, swiglu_limit=ref.args.swiglu_limit))
    model = homerun.load(tiny_checkpoints["hca"], expert_backend=rec)
    ids = _ids(40, model.args.vocab_size, seed=5)
    out = model.logits(ids)
    want = ref.logits(ids)  # default backend: native kernels when built, exact to fp32 rounding
    assert float((out - want).abs().max()) <= 1e-5 * float(want.abs().max())
    a = model.args
    assert [c[0] for c in rec.calls] == list(range(a.n_layers))
    tid2eid = ckpt.get("layers.0.ffn.gate.tid2eid")
    for layer, eids, w in rec.calls:
        assert eids.shape == (40, a.n_activated_experts) and eids.dtype == torch.int64
        assert w.dtype == torch.float32
        assert torch.allclose(w.sum(-1), torch.full((40,), a.route_scale), atol=1e-5)
        if layer < a.n_hash_layers:  # hash layers route by token id alone
            assert torch.equal(eids, ckpt.get(f"layers.{layer}.ffn.gate.tid2eid")[ids].long())
        else:
            assert (eids.sort(-1).values.diff(dim=-1) > 0).all()  # top-k: distinct experts
    assert tid2eid.shape[1] == a.n_activated_experts


def test_router_bias_changes_selection_not_weights(models):
    model = models["mixed"]
    net = model.net
    layer = next(l for l in net.layers if l.moe.bias is not None)
    x = torch.randn(6, model.args.dim)
    idx0, w0 = net.route(layer, x, torch.zeros(6, dtype=torch.long))
    saved = layer.moe.bias
    try:
        forced = torch.zeros_like(saved)
        forced[:2] = 100.0  # pushes experts 0 and 1 into every top-k
        layer.moe.bias = forced
        idx1, w1 = net.route(layer, x, torch.zeros(6, dtype=torch.long))
    finally:
        layer.moe.bias = saved
    assert ((idx1 == 0).any(-1) & (idx1 == 1).any(-1)).all()
    # weights still come from the unbiased scores of the chosen experts
    scores = torch.nn.functional.softplus(layer.moe.gate(x).float()).sqrt()
    sel = scores.gather(1, idx1)
    assert torch.allclose(w1, sel / sel.sum(-1, keepdim=True) * model.args.route_scale, atol=1e-6)


def test_bad_inputs_raise_homerun_errors(models, tmp_path):
    model = models["mixed"]
    with pytest.raises(UsageError, match="out of range"):
        model.logits([0, model.args.vocab_size])
    with pytest.raises(UsageError):
        model.logits([])
    with pytest.raises(UnknownModelError):
        homerun.load(tmp_path / "nope", expert_act="fp32")
    with pytest.raises(UsageError, match="weights_dtype"):
        homerun.load(tmp_path, weights_dtype="int3", expert_act="fp32")


class _HookedBackend(_RecordingBackend):
    """A backend exposing the prefetch hooks of offload.cached_backend.CachedExpertBackend."""

    def __init__(self, inner, top_k: int = 0):
        super().__init__(inner)
        self.hash_calls, self.spec_calls = [], []
        self.top_k = top_k

    def prefetch_hash_layer(self, layer, tid2eid, token_ids):
        self.hash_calls.append((layer, token_ids.clone()))
        return torch.unique(tid2eid[token_ids]).tolist()

    wants_speculation = True

    def prefetch_speculative(self, layer, expert_ids):
        self.spec_calls.append((layer, len(self.calls)))
        assert expert_ids.dtype == torch.int64 and expert_ids.shape[1] == self.top_k
        return []


def test_prefetch_hooks_are_called(tiny_checkpoints, models):
    from homerun.formats.loader import open_checkpoint

    a = models["hca"].args  # layers: hash, hash, top-k
    ckpt = open_checkpoint(tiny_checkpoints["hca"])
    rec = _HookedBackend(ReferenceExpertBackend(ckpt.expert, swiglu_limit=a.swiglu_limit), a.n_activated_experts)
    model = homerun.load(tiny_checkpoints["hca"], expert_backend=rec)
    ids = _ids(9, a.vocab_size, seed=8)
    model.session().feed(ids)
    assert [c[0] for c in rec.hash_calls] == list(range(a.n_hash_layers))
    assert all(torch.equal(c[1], ids) for c in rec.hash_calls)
    # speculation for each routed (non-hash) layer, issued before the previous layer's experts run
    assert rec.spec_calls == [(layer, layer - 1) for layer in range(max(a.n_hash_layers, 1), a.n_layers)]
