"""DeepSeek-V4 primitives: RoPE frequencies with YaRN and their cos/sin; RMSNorm, RoPE and norm+RoPE are the kernel
family of homerun.kernels.dispatch (re-exported here)."""

from __future__ import annotations

import math

import torch

from homerun.models.deepseek_v4.config import YarnParams
from homerun.kernels.dispatch import TORCH, apply_rope, rms_norm  # noqa: F401 - the primitives, defined with the kernels
from homerun.kernels.torch_set import rope_cos_sin  # noqa: F401 - re-exported

# ------------------------------------------------------------------------------------------------- primitives


def inv_freq(rope_dim: int, theta: float, yarn: YarnParams | None) -> torch.Tensor:
    """Per-pair inverse frequencies [rope_dim/2] (fp32); YaRN ramp as transformers (truncate, no mscale)."""
    pos = theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    extra = 1.0 / pos
    if yarn is None:
        return extra
    inter = 1.0 / (yarn.factor * pos)

    def corr_dim(rot: float) -> float:
        return rope_dim * math.log(yarn.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(corr_dim(yarn.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # share of the unscaled (extrapolated) frequency
    return inter * (1 - keep) + extra * keep


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor | None = None,
              sin: torch.Tensor | None = None, *, norm: bool = True, inverse: bool = False) -> torch.Tensor:
    """rms_norm (when norm) then apply_rope (when cos is given), in torch (a forward calls its kernel set's)."""
    return TORCH.norm_rope(x, weight, eps, cos, sin, norm=norm, inverse=inverse)
