"""What CUDA's allocator would hold during an eager decode step, charged to CUDA stand-ins' peaks (issue 13, "VRAM as
planned").

A stand-in charges only what is allocated through it (weights, KV pages, the expert cache, the static decode state);
the tensors an eager step makes (its new small state, its reads of the entries, one token's activations) and the
small state a session holds between steps (windows, open windows, overlaps) are plain CPU tensors, where on CUDA they
are device memory that the plan charges (homerun.models.eager_bytes; the KV layout's small state). `StepBytes` is a
dispatch mode around each eager one-token step (homerun.engine.runtime.Model._forward): every storage an op makes
while a stand-in's section runs (homerun.kernels.device_guard.current_site) is that device's until it dies, as are
the small tensors of the states the step starts from, and after every op each device's peak is raised to its
accounted bytes plus those (offload.devices.Device.note_live). Storages made through a device's own accounting
(offload.devices.allocating) are charged there already and skipped. Graphed steps are not watched: their
transients live in the graph's pool, which the static state reserves.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from homerun.kernels.device_guard import current_site
from offload.devices import allocating


class StepBytes(TorchDispatchMode):
    """Live bytes per CUDA stand-in of the storages eager steps make (module docstring); entered once per step."""

    def __init__(self, devices: dict[str, Any]) -> None:
        super().__init__()
        self.devices = {name: d for name, d in devices.items() if d.kind == "cuda-standin"}
        self.live: dict[int, tuple[StorageWeakRef, int, Any]] = {}  # storage address -> (ref, bytes, device)

    def hold(self, states: Sequence[Any], sites: Sequence[str]) -> None:
        """The small tensors of `states` (layer i's on device sites[i]) are live: the session holds them through the
        step (made by an earlier step, a prefill or a load)."""
        for st, site in zip(states, sites):
            dev = self.devices.get(site)
            if dev is None or st is None:
                continue
            tensors = [st.window] + [t for c in (st.comp, st.index_comp) if c is not None
                                     for t in (c.pending_kv, c.pending_gate, c.overlap_kv, c.overlap_gate)]
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    self._add(t.untyped_storage(), dev)
        self._note()

    def _add(self, st, dev) -> None:
        key = st.data_ptr()
        old = self.live.get(key)
        if st.nbytes() and (old is None or old[0].expired()):
            self.live[key] = (StorageWeakRef(st), st.nbytes(), dev)

    def _note(self) -> None:
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        per: dict[int, list] = {}
        for _, n, dev in self.live.values():
            per.setdefault(id(dev), [dev, 0])[1] += n
        for dev in self.devices.values():  # a device whose watched storages all died notes 0, not its last total
            dev.note_live(per.get(id(dev), (dev, 0))[1])

    def __exit__(self, *exc):
        for dev in self.devices.values():  # between steps nothing is noted: the live bytes go stale
            dev.note_live(0)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if allocating():  # a device's own allocation: charged there
            return out
        dev = self.devices.get(current_site())
        if dev is not None:
            seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    st = t.untyped_storage()
                    if st.data_ptr() not in seen:
                        self._add(st, dev)
        self._note()
        return out
