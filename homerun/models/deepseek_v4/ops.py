"""DeepSeek-V4 primitives: RMSNorm, RoPE with YaRN (inverse for the attention output), fused norm+RoPE."""

from __future__ import annotations

import math

import torch

from homerun.models.deepseek_v4.config import YarnParams
from homerun.models.layers import (
    NATIVE_HC_MAX_ROWS,
    native_hc,
)

# ------------------------------------------------------------------------------------------------- primitives


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 (weight multiplied in fp32, one cast at the end, as HF >= 5.12)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        xf = weight * xf
    return xf.to(x.dtype)


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


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, rope_dim/2] in fp32."""
    ang = positions.to(torch.float32)[:, None] * freqs.to(positions.device)[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Interleaved-pair RoPE on the trailing 2*cos.shape[-1] channels of x [T, ..., Dh]; cos/sin [T, R/2]."""
    r = cos.shape[-1] * 2
    extra = x.dim() - 2  # broadcast over head axes between T and Dh
    c = cos.view(cos.shape[0], *([1] * extra), -1)
    s = sin.view(sin.shape[0], *([1] * extra), -1)
    if inverse:
        s = -s
    rope = x[..., -r:].float()
    even, odd = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat((x[..., :-r], rotated), dim=-1)


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor | None = None,
              sin: torch.Tensor | None = None, *, norm: bool = True, inverse: bool = False) -> torch.Tensor:
    """rms_norm (when norm) then apply_rope (when cos is given); decode-sized fp32 CPU rows take one native call
    for the ~20 tiny torch ops."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] <= NATIVE_HC_MAX_ROWS:
        native = native_hc()
        if native is not None:
            return native.norm_rope(x, weight, eps, cos, sin, norm=norm, inverse=inverse)
    if norm:
        x = rms_norm(x, weight, eps)
    return x if cos is None else apply_rope(x, cos, sin, inverse=inverse)
