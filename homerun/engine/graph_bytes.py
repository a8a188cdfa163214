"""What the decode graphs' static attention state holds on a device, for the ramp checks (issue 13, "VRAM as
planned"): the bytes a context needs (the plan's formula, homerun.models.decode_bytes) and the bytes a held state
already charges, per device, so a sequence's growth is checked against one device's free bytes with each byte once.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from homerun.engine.graph_sites import ShardedStaticKV
from homerun.models.decode_bytes import static_bytes
from homerun.models.deepseek_v4.static_decode import static_shape
from homerun.models.eager_bytes import eager_step_bytes


def _shards(kv) -> list:
    if kv is None:
        return []
    return list(kv.shards) if isinstance(kv, ShardedStaticKV) else [kv]


def static_state_bytes(dg, n_tokens: int, kv_dtype: str, layers: Sequence[int] | None = None, *,
                       page_tokens: int) -> int:
    """The device bytes of the static attention state that decode at a context of n_tokens takes beside the KV for
    `layers` (model positions; None: every layer), 0 where the decode graphs run no static cores: its buffers hold
    the KV (the state adopts the session's stores), so the bucket's padding, one store moving in and the small
    parts (decode_bytes.StaticBytes.total; the KV in pages of page_tokens, the runtime's: no default). Across
    devices each device holds its layers' share."""
    if dg is None or not dg.whole_step:
        return 0
    shape = static_shape(dg.net.args, layers)  # the shape each shard charges (static_decode.StaticDecodeKV.planned)
    if not shape.n_layers:
        return 0
    act_bytes = torch.empty(0, dtype=dg.net.compute_dtype).element_size()
    return static_bytes(shape, n_tokens, kv_dtype, act_bytes, dg.min_bucket_tokens, page_tokens=page_tokens).total


def eager_state_bytes(net, n_tokens: int, kv_dtype: str, layers: Sequence[int] | None = None, *,
                      page_tokens: int) -> int:
    """The device bytes an eager decode step at a context of n_tokens takes beside the KV for `layers` (where no
    static cores run: static_state_bytes is 0): its new small state and its largest read of the entries, as the plan
    charges it where decode runs eagerly (homerun.models.eager_bytes)."""
    shape = static_shape(net.args, layers)
    if not shape.n_layers:
        return 0
    act_bytes = torch.empty(0, dtype=net.compute_dtype).element_size()
    return eager_step_bytes(shape, n_tokens, kv_dtype, act_bytes, page_tokens, net.args.index_topk)


def held_bytes(dg, account: Any, states: Sequence[Any] = ()) -> int:
    """The bytes on `account` that a ramp step may count as its sequence's already: the held static state's whole
    charge there, which the next bucket's state replaces, unless live states other than `states` view its stores
    (those keep them: only its own tags count), and the bytes of `states` outside the static state's stores, each
    store once. The one credit of the ramp checks (homerun.engine.session, and the runtime's Think Max check)."""
    shards = _shards(dg.static if dg is not None else None)
    own = {id(st) for kv in shards for st in kv.stores()}
    seen: set[int] = set()
    n = 0
    for ls in states:  # LayerState.allocated_bytes, each store once and the static state's not at all
        n += ls.window.numel() * ls.window.element_size()
        for c in (ls.comp, ls.index_comp):
            if c is not None:
                n += c.allocated_bytes - c.store.nbytes
                if id(c.store) not in own | seen:
                    seen.add(id(c.store))
                    n += c.store.nbytes
    if not shards or account is None:
        return n
    mine = {id(ls) for ls in states}
    held = dg._mine[1] if dg._mine is not None else ()
    others = [ls for r in held if (ls := r()) is not None and id(ls) not in mine]
    for kv in shards:
        stores = {id(st) for st in kv.stores()}
        # another sequence's live states viewing this shard's stores keep them (across devices, this sequence's
        # states of the other devices' layers view other shards and do not count)
        viewed = any(c is not None and id(c.store) in stores for ls in others for c in (ls.comp, ls.index_comp))
        if viewed and kv._handed_out:
            n += account.bytes_of(kv._tags if kv.account is account else [])
        else:
            n += kv.charged_bytes(account)
    return n
