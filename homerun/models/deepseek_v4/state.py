"""DeepSeek-V4 inference state per layer: sliding-window rows, compressor entries and open windows, indexer keys.
Explicit and functional: a forward returns new states (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from homerun.models.kv import PagedRows

# ------------------------------------------------------------------------------------------------------ state


# Entry stores are paged (homerun.models.kv): growing never copies the stored rows.
RowStore = PagedRows


@dataclass(frozen=True)
class CompressorState:
    """One compressor's state: closed entries (in `store`, first `n_entries` rows), the open window's projected
    rows (kv and gate, before the position bias) and, for CSA, the last closed window's Ca slice (overlap)."""

    store: RowStore
    n_entries: int = 0
    pending_kv: torch.Tensor | None = None  # [r < rate, width]
    pending_gate: torch.Tensor | None = None
    overlap_kv: torch.Tensor | None = None  # [rate, head_dim] (CSA only)
    overlap_gate: torch.Tensor | None = None

    def entries(self) -> torch.Tensor:
        return self.store.view(self.n_entries)

    def _small_bytes(self) -> int:
        n = 0
        for t in (self.pending_kv, self.pending_gate, self.overlap_kv, self.overlap_gate):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    @property
    def nbytes(self) -> int:
        """Live bytes: committed entries plus the open window and overlap slices."""
        return self.n_entries * self.store.row_bytes + self._small_bytes()

    @property
    def allocated_bytes(self) -> int:
        """Like nbytes, but the entry store counts its whole pages."""
        return self.store.nbytes + self._small_bytes()


@dataclass(frozen=True)
class LayerState:
    """Per-layer inference state. `window`: the last window_size-1 kv rows (the current token is the W-th key)."""

    window: torch.Tensor  # [<= W-1, head_dim]
    comp: CompressorState | None = None
    index_comp: CompressorState | None = None

    @property
    def nbytes(self) -> int:
        n = self.window.numel() * self.window.element_size()
        for c in (self.comp, self.index_comp):
            if c is not None:
                n += c.nbytes
        return n

    @property
    def allocated_bytes(self) -> int:
        n = self.window.numel() * self.window.element_size()
        for c in (self.comp, self.index_comp):
            if c is not None:
                n += c.allocated_bytes
        return n
