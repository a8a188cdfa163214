"""Device-work counting for the GPU-path tests and the device check (`homerun.kernels.counting`, re-exported). The
all-VRAM plan's experts are the runtime's own `offload.resident_backend.ResidentExpertBackend`, which on a GPU-flavored
device computes them with the fused FP4 kernels."""

from __future__ import annotations

from homerun.kernels.counting import Counts, count_device_work  # noqa: F401 - re-exported
