"""The device current while one device's part of a step runs (issue 13): Triton launches on the current CUDA device's
stream, and a CUDA graph captures and replays on it, so a layer placed on cuda:1 must run with cuda:1 current, or its
kernels launch on cuda:0 (an illegal address, or the wrong stream). Every per-device section of a step enters
`on_device`: the eager forward per layer, its embedding and head, the logits, the decode graphs per run of the step
on one device, and their static state's buffers.

On CUDA it is torch.cuda.device; elsewhere torch has no current device, and it changes nothing. Either way the
section's site (the placement's device name, "cuda:1" or "standin:1": CUDA stand-ins all compute on the CPU, so
only the name tells them apart) is the current one for the section (`current_site`), so the stand-in tests see which
device a section would run under on CUDA.
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()  # like CUDA's current device, the current site is the thread's


class on_device:  # noqa: N801 - used as a context manager, like torch.cuda.device
    """`with on_device(device, site):` the section runs with `device` current (CUDA) and `site` as the current site
    (default: the device's name)."""

    __slots__ = ("guard", "site")

    def __init__(self, device: torch.device, site: str | None = None) -> None:
        self.guard = torch.cuda.device(device) if device.type == "cuda" else None
        self.site = site if site is not None else str(device)

    def __enter__(self) -> "on_device":
        if self.guard is not None:
            self.guard.__enter__()
        stack = _local.__dict__.setdefault("sites", [])
        stack.append(self.site)
        return self

    def __exit__(self, *exc) -> None:
        _local.sites.pop()
        if self.guard is not None:
            self.guard.__exit__(*exc)

    def run(self, fn, *args):
        """fn(*args) inside the section."""
        with self:
            return fn(*args)


def current_site() -> str | None:
    """The site of the innermost section this thread runs in (None outside every section)."""
    stack = getattr(_local, "sites", None)
    return stack[-1] if stack else None
