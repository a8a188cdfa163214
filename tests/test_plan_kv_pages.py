"""The plan's KV bytes are what the runtime allocates (issue 13, "VRAM as planned"): a V4 layout charges the entry
stores in whole pages of the page the runtime picks for that model (decode_bytes.kv_page_tokens of its default
ramp, homerun.engine.runtime), and the small state (windows, open windows, overlaps) in the compute dtype. Checked
against the runtime's own stores (DeepseekV4.new_state, pages reserved on the meta device) at 128K, 300K and 1M
tokens of V4-Flash, and against a tiny model's session."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from homerun.engine.runtime import Model, load
from homerun.models.decode_bytes import default_ramp, kv_page_tokens
from homerun.models.deepseek_v4 import ModelArgs
from homerun.models.deepseek_v4.model import DeepseekV4
from homerun.plan.inventory import resolve_model
from homerun.plan.specs import CARDS_DIR, kv_layout

FLASH = "deepseek-ai/DeepSeek-V4-Flash"


def _runtime_states(args: ModelArgs, kv_dtype: str, page_tokens: int) -> list:
    """The runtime's empty per-layer states for args' layers (DeepseekV4.new_state), pages on the meta device."""
    layers = [SimpleNamespace(index=i, kind=k, device=None, flavor="auto") for i, k in enumerate(args.layer_kinds)]
    net = SimpleNamespace(args=args, layers=layers, device=torch.device("meta"), compute_dtype=torch.bfloat16)
    return DeepseekV4.new_state(net, kv_device="meta", page_tokens=page_tokens, kv_dtype=kv_dtype)


def _flash_config() -> dict:
    import json

    return json.loads((CARDS_DIR / "deepseek-v4-flash.json").read_text())


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("tokens", [131_072, 300_000, 1 << 20])
def test_the_plans_kv_is_the_runtimes_pages_at_long_contexts(kv_dtype, tokens):
    spec, _ = resolve_model(FLASH)
    kv = kv_layout(spec, kv_dtype)
    args = ModelArgs.from_hf_config(_flash_config())
    # the runtime's page for this model (homerun.engine.runtime: its default ramp's first step)
    ramp = default_ramp(_flash_config()["max_position_embeddings"])
    page = kv_page_tokens(max(args.hca_rate, args.csa_rate), ramp[0])
    assert kv.page_tokens == page == 4096
    states = _runtime_states(args, kv_dtype, page)
    for lay, st in enumerate(states):
        for c, rate in ((st.comp, args.rate(lay)), (st.index_comp, args.csa_rate)):
            if c is not None:
                c.store.reserve(tokens // rate)  # what the stores allocate as the rows are written
    pages = sum(c.store.nbytes for st in states for c in (st.comp, st.index_comp) if c is not None)
    assert kv.bytes_for(tokens) - kv.constant_bytes == pages


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_the_plans_constant_is_the_runtimes_small_state_at_its_largest(kv_dtype):
    """The small state in the compute dtype (bf16), whatever the KV's: at a position that leaves every open window
    one row short of closing (the largest: HCA 127 rows), the runtime's live bytes (Model.kv_bytes_at) less the
    entries, plus the row its decode step's window holds past the W - 1 it counts (a view of the step's W keys). The
    plan's constant (the static arena's layout) counts one more row per open window."""
    spec, _ = resolve_model(FLASH)
    kv = kv_layout(spec, kv_dtype)
    args = ModelArgs.from_hf_config(_flash_config())
    n = 128 * 1024 - 1
    live = Model.kv_bytes_at(SimpleNamespace(args=args, dtype=torch.bfloat16, kv_dtype=kv_dtype), n)
    entries = sum(count * (n // rate) * row for count, rate, row in kv.stores)  # the closed rows, not whole pages
    small = live - entries + args.n_layers * args.head_dim * 2
    n_csa, n_hca = args.layer_kinds.count("csa"), args.layer_kinds.count("hca")
    one_row = n_csa * 2 * 2 * (2 * args.head_dim + 2 * args.index_head_dim) + n_hca * 2 * 2 * args.head_dim
    assert kv.constant_bytes == small + one_row, (kv.constant_bytes, small, one_row)


def test_a_sessions_pages_are_the_plans_bytes(tiny_checkpoint):
    """The runtime picks the page the plan assumes for the same model, and a session's stores hold the plan's
    entry bytes at its context (whole pages: one per store at 40 tokens)."""
    spec, _ = resolve_model(str(tiny_checkpoint))
    model = load(tiny_checkpoint, experts="reference", kv_dtype="bf16")
    kv = kv_layout(spec, "bf16")
    assert model.page_tokens == kv.page_tokens
    s = model.session()
    s.feed(torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(3)).tolist())
    pages = sum(c.store.nbytes for st in s._states for c in (st.comp, st.index_comp) if c is not None)
    assert pages == kv.bytes_for(40) - kv.constant_bytes > 0
