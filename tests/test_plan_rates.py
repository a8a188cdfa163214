"""The plan reads a V4 model's compression rates, attention kinds and hash layers where the runtime does (one
definition each: homerun.formats.v4_layout.compress_rates / attention_kinds / hash_layers), not from constants or
defaults of its own: on a config whose rates differ from 4 / 128 the plan's KV pages are still the runtime's, and
a checkpoint written for it loads and runs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from homerun.engine.runtime import load
from homerun.errors import ConfigError
from homerun.formats.v4_layout import compress_rates, hash_layers, layer_ratio, v4_tensors
from homerun.models.decode_bytes import default_ramp, kv_page_tokens
from homerun.models.deepseek_v4 import ModelArgs
from homerun.models.deepseek_v4.model import DeepseekV4
from homerun.plan.compute import attention_keys_per_token
from homerun.plan.inventory import resolve_model
from homerun.plan.priors import hit_rate_prior
from homerun.plan.specs import CARDS_DIR, kv_layout, kv_read_bytes_per_token, parse_config
from tiny import make_checkpoint

# transformers' form (DeepseekV4Config.compress_rates) and the scalar keys it folds in
RATES = {"compress_rates": {"compressed_sparse_attention": 8, "heavily_compressed_attention": 64}}
SCALARS = {"compress_rate_csa": 8, "compress_rate_hca": 64}


def _flash(**overrides) -> dict:
    return {**json.loads((CARDS_DIR / "deepseek-v4-flash.json").read_text()), **overrides}


def _runtime_pages(args: ModelArgs, kv_dtype: str, page_tokens: int, tokens: int) -> int:
    """The bytes of the runtime's entry stores (DeepseekV4.new_state, meta device) after `tokens` of context."""
    layers = [SimpleNamespace(index=i, kind=k, device=None, flavor="auto") for i, k in enumerate(args.layer_kinds)]
    net = SimpleNamespace(args=args, layers=layers, device=torch.device("meta"), compute_dtype=torch.bfloat16)
    states = DeepseekV4.new_state(net, kv_device="meta", page_tokens=page_tokens, kv_dtype=kv_dtype)
    for lay, st in enumerate(states):
        for c, rate in ((st.comp, args.rate(lay)), (st.index_comp, args.csa_rate)):
            if c is not None:
                c.store.reserve(tokens // rate)
    return sum(c.store.nbytes for st in states for c in (st.comp, st.index_comp) if c is not None)


@pytest.mark.parametrize("form", [RATES, SCALARS])
@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_the_plans_kv_uses_the_configs_rates(form, kv_dtype):
    cfg = _flash(**form)
    spec, args = parse_config(cfg, "flash-rates"), ModelArgs.from_hf_config(cfg)
    assert (args.csa_rate, args.hca_rate) == (spec.csa_rate, spec.hca_rate) == compress_rates(cfg) == (8, 64)
    kv = kv_layout(spec, kv_dtype)
    page = kv_page_tokens(max(args.csa_rate, args.hca_rate), default_ramp(cfg["max_position_embeddings"])[0])
    assert kv.page_tokens == page and {rate for _, rate, _ in kv.stores} == {8, 64}
    for tokens in (131_072, 300_001):
        assert kv.bytes_for(tokens) - kv.constant_bytes == _runtime_pages(args, kv_dtype, page, tokens)
    # the read and compute models see the same entries: 1/8 of the depth per CSA layer, 1/64 per HCA layer
    default = parse_config(_flash(), "flash")
    assert kv_read_bytes_per_token(spec, kv, 1 << 20) != kv_read_bytes_per_token(default, kv, 1 << 20)
    w = spec.sliding_window
    assert attention_keys_per_token(spec, "hca", 1 << 20) == pytest.approx(w + (1 << 20) / (2 * 64), rel=1e-3)


def test_transformers_layer_types_plan_as_the_official_codes():
    """A config transformers re-saved (layer_types, no compress_ratios) plans the same layers as the official one
    (the planner read compress_ratios alone: every layer a sliding one)."""
    cfg = _flash()
    hf = {k: v for k, v in cfg.items() if k != "compress_ratios"}
    names = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    hf["layer_types"] = [names[r] for r in cfg["compress_ratios"][: cfg["num_hidden_layers"]]]
    a, b = parse_config(cfg, "official"), parse_config(hf, "hf")
    assert a.layer_types == b.layer_types and b.layer_types.count("hca") == 20
    assert kv_layout(a, "fp8") == kv_layout(b, "fp8")
    assert ModelArgs.from_hf_config(hf).layer_kinds == ModelArgs.from_hf_config(cfg).layer_kinds
    with pytest.raises(ConfigError, match="compress_rates"):
        parse_config(_flash(compress_rates={"compressed_sparse_attention": 0}), "bad")


def test_a_checkpoint_with_other_rates_loads_and_holds_the_plans_pages(tmp_path):
    """The layout writes each compressor's ape with one row per token of an entry (the rate, not the kind code of
    compress_ratios), so the runtime loads it; a session's pages after 70 tokens are the plan's bytes."""
    path = make_checkpoint(tmp_path, "mixed", **SCALARS)
    cfg = json.loads((path / "config.json").read_text())
    ape = {t.name: t.shape for t in v4_tensors(cfg)}
    assert ape["layers.1.attn.compressor.ape"] == (8, 256) and ape["layers.2.attn.compressor.ape"] == (64, 128)
    assert ape["layers.1.attn.indexer.compressor.ape"][0] == 8
    spec, _ = resolve_model(str(path))
    model = load(path, experts="reference", kv_dtype="bf16")
    assert (model.args.csa_rate, model.args.hca_rate) == (spec.csa_rate, spec.hca_rate) == (8, 64)
    kv = kv_layout(spec, "bf16")
    assert model.page_tokens == kv.page_tokens
    s = model.session()
    s.feed(torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(3)).tolist())
    pages = sum(c.store.nbytes for st in s._states for c in (st.comp, st.index_comp) if c is not None)
    assert pages == kv.bytes_for(70) - kv.constant_bytes > 0
    assert torch.isfinite(model.logits(list(range(70)))).all()


def test_hash_layers_have_one_default():
    """A config that names no hash layers: the layout (what the loader and the planner's inventory expect), the
    runtime and the planner's hit-rate prior all count transformers' 3 (the layout and the prior counted 0)."""
    cfg = _flash()
    del cfg["num_hash_layers"]
    names = {t.name for t in v4_tensors(cfg)}
    assert ModelArgs.from_hf_config(cfg).n_hash_layers == hash_layers(cfg) == 3
    assert "layers.2.ffn.gate.tid2eid" in names and "layers.3.ffn.gate.bias" in names
    assert "layers.3.ffn.gate.tid2eid" not in names
    three = _flash(num_hash_layers=3)
    assert hit_rate_prior(parse_config(cfg, "x"), 4000) == hit_rate_prior(parse_config(three, "x"), 4000)
    hf = {**three, "mlp_layer_types": ["hash_moe"] * 2 + ["moe"] * 41}
    assert ModelArgs.from_hf_config(hf).n_hash_layers == hash_layers(hf) == 2


@pytest.mark.parametrize("bad", [{"num_hash_layers": "x"}, {"num_hash_layers": -2}, {"num_hash_layers": 1.5},
                                 {"mlp_layer_types": ["moe", "hash_moe", "moe", "moe"]},
                                 {"mlp_layer_types": ["hash_moe", 3, "moe", "moe"]},
                                 {"compress_rate_csa": 0}, {"compress_ratios": [4, "x", 128, 4, 0]}])
def test_bad_layout_fields_are_config_errors(bad):
    """A malformed rate, hash-layer or ratio field is a one-line ConfigError naming it (exit 2), not a traceback or a
    negative layer count; hash-routed layers must lead, as the runtime builds them."""
    cfg = {"num_hidden_layers": 4, "compress_ratios": [4, 128, 4, 128, 0], **bad}
    with pytest.raises(ConfigError) as err:
        compress_rates(cfg)
        hash_layers(cfg)
        layer_ratio(cfg, 1)
    assert next(iter(bad)) in str(err.value)


def test_leading_hash_layers_counted():
    assert hash_layers({"num_hidden_layers": 4, "mlp_layer_types": ["hash_moe", "hash_moe", "moe", "moe"]}) == 2
    assert hash_layers({"num_hidden_layers": 4, "num_hash_layers": 0}) == 0
    assert hash_layers({"num_hidden_layers": 2}) == 2  # the default 3, at most the layer count
