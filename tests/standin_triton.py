"""Import first in a test module that runs the GPU path on a stand-in device: it turns the Triton interpreter on
before triton is imported (no CUDA here, the kernels interpret), and skips the importing module where the kernels
cannot interpret. A failed import is not cached, so every such module is skipped, not just the first."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from homerun.kernels import triton as hr_triton  # noqa: E402

if not hr_triton.available() or not hr_triton.interpreting():  # pragma: no cover
    pytest.skip(f"triton kernels unavailable here: {hr_triton.unavailable_reason()}", allow_module_level=True)


def count_block_launches(net, active: dict, add) -> None:
    """Wrap net._block (an instance attribute: `del net._block` undoes it): while active["c"] holds a
    count_device_work counter, each layer's ATen ops and Triton launches go to add(layer_index, n)."""
    common = hr_triton.load().common
    real = net._block

    def block(layer, *args):
        c = active.get("c")
        if c is None:
            return real(layer, *args)
        n0 = c.ops + common.LaunchCounter.n
        out = real(layer, *args)
        add(net.layers.index(layer), c.ops + common.LaunchCounter.n - n0)
        return out

    net._block = block
