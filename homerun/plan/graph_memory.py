"""The decode graphs' device bytes in the plan (issue 13, "VRAM as planned").

Where the runtime captures decode graphs (one CUDA device running every layer: homerun.engine.graphs), a V4 model's
decode step runs over a static attention state per capacity bucket (a power of two >= the context): the entries in
static buffers of the bucket, the small per-layer tensors and their copies, and the step's transients in the graph's
pool (homerun.models.decode_bytes, the formula the runtime charges too). The static buffers are the session's KV (the
state adopts its entry stores, moving their rows in store by store), so beside the KV the plan charges only the
bucket's padding past the context, one store's old pages while they move, the small state, its copies and the
transients: `StaticBytes.total`. `GraphKvLayout` is the KV layout with that charge: `bytes_for(tokens)` is the KV's
plus that at the context, and `tokens_for` inverts the sum, so the context the plan promises is one that fits both.

Across GPUs the runtime captures one whole-step graph per device where every layer's experts are resident there
(all-in-VRAM plans; homerun.plan.records.graphs_across_devices_reason, the rule it shares with the runtime), and each
device holds the static state of its own layers (homerun.engine.graph_sites.ShardedStaticKV). So each GPU stage is
charged its layers' share (`stage_shapes`) beside its share of the KV, and the context is the longest one that fits
on every stage (`stages_tokens_for`: the tightest device decides).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from homerun.formats.v4_layout import DEFAULT_RATES
from homerun.models.decode_bytes import (MIN_BUCKET_TOKENS, StaticBytes, StaticShape, entry_stores, kv_page_tokens,
                                         paged_bytes, small_state_bytes, static_bytes)
from homerun.models.eager_bytes import eager_step_bytes
from homerun.plan.records import RAMP_TOKENS, PlacementRow, _Ctx, gib
from homerun.plan.specs import KvLayout, ModelSpec, most_tokens_within

GRAPH_ACT_BYTES = 2  # the compute dtype's bytes per element: bf16, the runtime's default on CUDA
# the runtime's KV page where none is asked for, for a model of the standard ramp and the default rates (a V4 layout
# carries its model's: plan.specs.kv_layout; a store moving into its buffer holds whole pages)
PLAN_PAGE_TOKENS = kv_page_tokens(DEFAULT_RATES["hca"], RAMP_TOKENS[0])


def static_shape_of(spec: ModelSpec, first: int = 0, stop: int | None = None) -> StaticShape | None:
    """The static decode state's shapes of a V4 spec's layers first..stop-1 (default: all; None for other
    architectures: no static state)."""
    if spec.arch != "deepseek_v4":
        return None
    kinds = spec.layer_types[first:spec.num_layers if stop is None else stop]
    return StaticShape(len(kinds), kinds.count("csa"), kinds.count("hca"), spec.head_dim,
                       spec.qk_rope_head_dim, spec.index_head_dim, spec.sliding_window or 0,
                       spec.csa_rate, spec.hca_rate)


def stage_shapes(spec: ModelSpec, counts: Sequence[int]) -> list[StaticShape] | None:
    """Each GPU stage's share of the static state (its layers' StaticShape, pipeline order) where a multi-GPU plan
    runs decode graphs (every expert resident: the caller's all-in-VRAM case); None on one GPU (with_decode_graphs
    charges the whole model there) and for architectures without a static state."""
    if len(counts) < 2 or spec.arch != "deepseek_v4":
        return None
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [static_shape_of(spec, s, s + k) for s, k in zip(starts, counts)]


def _stage_graph(shape: StaticShape, kv: KvLayout, tokens: int) -> StaticBytes | None:
    return static_bytes(shape, tokens, kv.dtype, GRAPH_ACT_BYTES, MIN_BUCKET_TOKENS,
                        page_tokens=kv.page_tokens or PLAN_PAGE_TOKENS) if tokens > 0 else None


def stage_kv_bytes(kv: KvLayout, frac: float, shape: StaticShape | None, tokens: int, graphs: bool = False) -> int:
    """One stage's KV at a context: its own layers' stores in whole pages and their small state where the layout is
    paged (V4; the stages' sum is the layout's bytes), else its share by layer count (frac). A stage of a sliding
    layer holds no pages, which a share by layer count would charge it. With decode graphs (`graphs`) the small
    state is the static state's arena and snapshots (charged there): the pages alone."""
    if kv.stores and shape is not None:
        small = 0 if graphs else small_state_bytes(shape, GRAPH_ACT_BYTES)
        return paged_bytes(entry_stores(shape, kv.dtype, GRAPH_ACT_BYTES), tokens, kv.page_tokens) + small
    return int(KvLayout.bytes_for(kv, tokens) * frac)


def stage_bytes(kv: KvLayout, frac: float, shape: StaticShape, tokens: int) -> int:
    """One stage's bytes at a context: its KV (as the placement rows charge it) and its static state."""
    g = _stage_graph(shape, kv, tokens)
    return stage_kv_bytes(kv, frac, shape, tokens, g is not None) + (g.total if g is not None else 0)


def stages_tokens_for(kv: KvLayout, fracs: Sequence[float], shapes: Sequence[StaticShape],
                      free_bytes: Sequence[float]) -> int:
    """The longest context whose KV share and static state fit in every stage's free bytes (the tightest decides)."""
    best: int | None = None
    for f, shape, free in zip(fracs, shapes, free_bytes):
        if f <= 0:
            continue
        lo, hi = 0, 1
        while hi < 1 << 40 and stage_bytes(kv, f, shape, hi) <= free:  # a stage's KV is not its share: bound it
            hi *= 2
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if stage_bytes(kv, f, shape, mid) <= free:
                lo = mid
            else:
                hi = mid - 1
        best = lo if best is None else min(best, lo)
    return best or 0


@dataclass(frozen=True)
class GraphKvLayout(KvLayout):
    """A KvLayout whose bytes include the decode graphs' static attention state at each context (module docstring)."""

    shape: StaticShape | None = None
    act_bytes: int = GRAPH_ACT_BYTES

    def graph(self, tokens: int) -> StaticBytes:
        return static_bytes(self.shape, tokens, self.dtype, self.act_bytes, MIN_BUCKET_TOKENS,
                            page_tokens=self.page_tokens or PLAN_PAGE_TOKENS)

    def graph_bytes(self, tokens: int) -> int:
        return self.graph(tokens).total if tokens > 0 else 0

    def kv_bytes_for(self, tokens: int) -> int:
        """The KV beside the static state: KvLayout's less its small state, which under decode graphs is the static
        state's arena and snapshots (the states a session holds are views of a snapshot), charged there."""
        return KvLayout.bytes_for(self, tokens) - (self.constant_bytes if self.stores else 0)

    def bytes_for(self, tokens: int) -> int:
        return self.kv_bytes_for(tokens) + self.graph_bytes(tokens)

    def tokens_for(self, budget_bytes: float) -> int:
        """The longest context whose KV and static state fit in budget_bytes (both grow with the context)."""
        return most_tokens_within(self.bytes_for, KvLayout.tokens_for(self, budget_bytes), budget_bytes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def with_decode_graphs(kv: KvLayout, spec: ModelSpec) -> KvLayout:
    """kv with the static decode state charged (a V4 spec), else kv as it is."""
    shape = static_shape_of(spec)
    if shape is None or isinstance(kv, GraphKvLayout):
        return kv
    return GraphKvLayout(kv.dtype, kv.bytes_per_token, kv.constant_bytes, kv.note, kv.stores, kv.page_tokens, shape)


def eager_stage_bytes(spec: ModelSpec, kv: KvLayout, counts: Sequence[int], tokens: int) -> list[int]:
    """Each GPU stage's bytes of an eager decode step beside its KV share at a context of `tokens` (where decode is
    not captured: across GPUs with host experts): the step's new small state of its layers and their largest read of
    the entries (homerun.models.eager_bytes, in the compute dtype). Zeros for architectures without one."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    shapes = [static_shape_of(spec, s, s + k) for s, k in zip(starts, counts)]
    return [eager_step_bytes(sh, tokens, kv.dtype, GRAPH_ACT_BYTES, kv.page_tokens or PLAN_PAGE_TOKENS,
                             spec.index_topk) if sh is not None and tokens > 0 else 0 for sh in shapes]


def graph_state(kv: KvLayout, tokens: int) -> StaticBytes | None:
    """The static attention state a plan with layout kv charges at a context of `tokens` (None: no decode graphs)."""
    return kv.graph(tokens) if isinstance(kv, GraphKvLayout) and tokens > 0 else None


def graph_state_bytes(kv: KvLayout, tokens: int) -> int:
    g = graph_state(kv, tokens)
    return g.total if g is not None else 0


def graph_reason(g: StaticBytes, tokens: int, where: str = "one CUDA device runs every layer, so decode runs from "
                 "captured graphs") -> str:
    """The decision's reason: what the charge holds, part by part."""
    mib = 2**20
    return (f"{where} over a static attention state of "
            f"{g.bucket_tokens:,} tokens (the power of two >= {tokens:,}; homerun.models.decode_bytes): entry "
            f"buffers {g.entries / mib:.1f} MiB, which hold the KV (the state adopts the session's stores), so "
            f"beside the KV only their padding {g.padding / mib:.1f} MiB and one store moving into its buffer "
            f"{g.moving / mib:.1f} MiB, small per-layer state {g.arena / mib:.1f} MiB and its two copies "
            f"{g.snapshots / mib:.1f} MiB, row numbers {g.positions / mib:.1f} MiB, the step's largest transient "
            f"{g.workspace / mib:.1f} MiB (reading a store over the capacity)")


def kv_rows(c: _Ctx, fracs: Sequence[float], kv_reserved: int, tokens: int,
            shapes: Sequence[StaticShape] | None = None) -> tuple[list[int], list[int]]:
    """Each GPU's KV rows and, with decode graphs, its static attention state's row: the whole model's on one GPU (a
    GraphKvLayout, whose kv_reserved includes it), its layers' share on each stage across GPUs (`shapes`, from
    stage_shapes). Returns each GPU's bytes of both, and of the static state alone."""
    one = graph_state(c.kv, tokens)
    graphs = ([_stage_graph(s, c.kv, tokens) for s in shapes] if shapes is not None else [one] * len(fracs))
    per, gbytes = [], []
    for i, (f, g) in enumerate(zip(fracs, graphs)):
        kv_b = (stage_kv_bytes(c.kv, f, shapes[i], tokens, g is not None) if shapes is not None
                else int(kv_reserved * f) - (one.total if one is not None else 0))
        gb = g.total if g is not None else 0
        per.append(kv_b + gb)
        gbytes.append(gb)
        c.placement.append(PlacementRow(f"KV cache ({tokens} tokens, {c.kv.dtype})", f"gpu{i}", kv_b,
                                        "attention state lives next to its layer"))
        if g is not None:
            c.placement.append(PlacementRow(f"decode graphs' static attention state ({g.bucket_tokens} tokens)",
                                            f"gpu{i}", g.total, "beside the KV its buffers hold: the capacity "
                                            "bucket's padding, the small state, its copies and the step's transients "
                                            "(decode graphs)"))
    if one is not None:
        c.decide("decode graphs", f"static attention state: {gib(one.total):.2f} GiB at {tokens:,} tokens",
                 graph_reason(one, tokens))
    elif shapes is not None:
        first = 0
        for i, (s, g) in enumerate(zip(shapes, graphs)):
            if g is not None:
                c.decide("decode graphs", f"gpu{i}: static attention state {gib(g.total):.2f} GiB at {tokens:,} "
                         "tokens", graph_reason(g, tokens, f"gpu{i} runs layers {first}-{first + s.n_layers - 1} "
                                                f"({s.n_csa} CSA, {s.n_hca} HCA) with every expert resident, so "
                                                "decode runs from one captured graph per device (its layers' share)"))
            first += s.n_layers
    return per, gbytes
