"""Peak bytes of the tensors a block of torch code allocates and keeps alive, on any device (CPU stand-ins have no
allocator statistics): a dispatch mode that notes each op's new storages and drops those that died."""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """`peak_bytes`: the most bytes of storages made inside the mode alive at once, checked after every op (an op's
    own outputs and whatever its inputs made that is still referenced). Views and in-place results, which share an
    input's storage, are not new."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key not in seen and key not in self.live and st.nbytes():
                    self.live[key] = (StorageWeakRef(st), st.nbytes())
        self.peak_bytes = max(self.peak_bytes, sum(n for _, n in self.live.values()))
        return out
