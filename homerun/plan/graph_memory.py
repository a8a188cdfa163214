"""The decode graphs' device bytes in the plan (issue 13, "VRAM as planned").

Where the runtime captures decode graphs (one CUDA device running every layer: homerun.engine.graphs), a V4 model's
decode step runs over a static attention state per capacity bucket (a power of two >= the context): the entries in
static buffers of the bucket, the small per-layer tensors and their copies, and the step's transients in the graph's
pool (homerun.models.decode_bytes, the formula the runtime charges too). At the first graphed step after a prefill,
the session's paged KV and the static state of its bucket are both on the device (the step copies the one into the
other), as at a bucket change both buckets' states are; so the plan charges the static state on top of the KV.
`GraphKvLayout` is the KV layout with that charge: `bytes_for(tokens)` is the KV's plus the static state's at that
context, and `tokens_for` inverts the sum, so the context the plan promises is one that still fits both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from homerun.models.decode_bytes import MIN_BUCKET_TOKENS, StaticBytes, StaticShape, static_bytes
from homerun.plan.specs import COMPRESS_RATE, KvLayout, ModelSpec

GRAPH_ACT_BYTES = 2  # the compute dtype's bytes per element: bf16, the runtime's default on CUDA


def static_shape_of(spec: ModelSpec) -> StaticShape | None:
    """The static decode state's shapes of a V4 spec (None for other architectures: no static state)."""
    if spec.arch != "deepseek_v4":
        return None
    kinds = spec.layer_types
    return StaticShape(spec.num_layers, kinds.count("csa"), kinds.count("hca"), spec.head_dim,
                       spec.qk_rope_head_dim, spec.index_head_dim, spec.sliding_window or 0,
                       COMPRESS_RATE["csa"], COMPRESS_RATE["hca"])


@dataclass(frozen=True)
class GraphKvLayout(KvLayout):
    """A KvLayout whose bytes include the decode graphs' static attention state at each context (module docstring)."""

    shape: StaticShape | None = None
    act_bytes: int = GRAPH_ACT_BYTES

    def graph(self, tokens: int) -> StaticBytes:
        return static_bytes(self.shape, tokens, self.dtype, self.act_bytes, MIN_BUCKET_TOKENS)

    def graph_bytes(self, tokens: int) -> int:
        return self.graph(tokens).total if tokens > 0 else 0

    def kv_bytes_for(self, tokens: int) -> int:
        """The KV alone (what KvLayout charges)."""
        return KvLayout.bytes_for(self, tokens)

    def bytes_for(self, tokens: int) -> int:
        return self.kv_bytes_for(tokens) + self.graph_bytes(tokens)

    def tokens_for(self, budget_bytes: float) -> int:
        """The longest context whose KV and static state fit in budget_bytes (both grow with the context)."""
        lo, hi = 0, KvLayout.tokens_for(self, budget_bytes)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.bytes_for(mid) <= budget_bytes:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def with_decode_graphs(kv: KvLayout, spec: ModelSpec) -> KvLayout:
    """kv with the static decode state charged (a V4 spec), else kv as it is."""
    shape = static_shape_of(spec)
    if shape is None or isinstance(kv, GraphKvLayout):
        return kv
    return GraphKvLayout(kv.dtype, kv.bytes_per_token, kv.constant_bytes, kv.note, shape)


def graph_state(kv: KvLayout, tokens: int) -> StaticBytes | None:
    """The static attention state a plan with layout kv charges at a context of `tokens` (None: no decode graphs)."""
    return kv.graph(tokens) if isinstance(kv, GraphKvLayout) and tokens > 0 else None


def graph_state_bytes(kv: KvLayout, tokens: int) -> int:
    g = graph_state(kv, tokens)
    return g.total if g is not None else 0


def graph_reason(g: StaticBytes, tokens: int) -> str:
    """The decision's reason: what the charge holds, part by part."""
    mib = 2**20
    return (f"one CUDA device runs every layer, so decode runs from captured graphs over a static attention state of "
            f"{g.bucket_tokens:,} tokens (the power of two >= {tokens:,}; homerun.models.decode_bytes): entry "
            f"buffers {g.entries / mib:.1f} MiB, small per-layer state {g.arena / mib:.1f} MiB and its two copies "
            f"{g.snapshots / mib:.1f} MiB, row numbers {g.positions / mib:.1f} MiB, the step's largest transient "
            f"{g.workspace / mib:.1f} MiB (reading a store over the capacity); charged on top of the KV, which the "
            "first graphed step after a prefill copies in while the paged KV is still held")
