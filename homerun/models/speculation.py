"""A speculated forward whose end is deferred (issue 13): the expert backend's `end_token` reads back whether any
layer's speculative call missed, a host wait of its own. A decode loop already makes one host wait per token, the
sampled id read back; made after it, the end-of-token check reads the masks that wait already brought to the host
(every mask copy was queued before the kernels the id depends on), so an all-hit token costs one wait in total.

The forward (net.forward_step / DecodeGraphs.forward with `defer_end`, through `end_or_defer`) returns its hidden
and states as if they stood, and a `DeferredEnd`; `settle` makes the end_token then, and on a miss reruns from the
first missed layer exactly as the non-deferred forward would have (same inputs, same states before the forward): it
returns the new (hidden, states), and the caller recomputes what it derived from the old ones (logits, the sampled
id).
"""

from __future__ import annotations

from typing import Any, Callable


class DeferredEnd:
    """The end of a speculated forward, not made yet. `redo(layer)` reruns from that layer -> (hidden, states)."""

    def __init__(self, experts: Any, redo: Callable[[int], tuple[Any, list]]) -> None:
        self.experts = experts
        self._redo = redo

    def settle(self, synced: bool) -> tuple[Any, list] | None:
        """The forward's end_token. `synced`: the host has waited for everything queued since (a value read back
        from the forward's output), so the backend reads its masks without a wait of its own. None: the forward
        stands; else the rerun's (hidden, states)."""
        if synced:
            self.experts.host_synced()
        redo = self.experts.end_token()
        return None if redo is None else self._redo(redo)


def end_or_defer(experts: Any, spec: bool, defer: bool, stand: Callable[[], tuple[Any, list]],
                 redo: Callable[[int], tuple[Any, list]], end: bool = True) -> tuple[Any, list, DeferredEnd | None]:
    """A forward's tail -> (hidden, states, DeferredEnd or None). A speculated (`spec`) forward with `defer` stands
    as it is and returns its end unmade; any other makes its end_token now (when `end`: the backend's token hooks
    ran) and reruns from a missed layer. `stand()`: the forward's (hidden, states) as computed."""
    if spec and defer:
        hidden, states = stand()
        return hidden, states, DeferredEnd(experts, redo)
    r = experts.end_token() if end else None
    hidden, states = stand() if r is None else redo(r)
    return hidden, states, None
