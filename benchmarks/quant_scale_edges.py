"""Where the weight quantizer's scale exponent changed (h13s, benchmarks/decode_graphs.md): ceil(log2(amax / qmax))
through torch's fp32 log2 (the old `pow2_exponent`) against the exact one (homerun.formats.quant.pow2_exponent).

    PYTHONPATH=$PWD python benchmarks/quant_scale_edges.py                 # the sweep over every binade's edge
    PYTHONPATH=$PWD python benchmarks/quant_scale_edges.py CHECKPOINT_DIR  # a written synthetic checkpoint

The sweep: every fp32 within 64 ulp of qmax x 2^k (k = -99 to the largest finite, qmax 448 and 6), how many get
another exponent, per binade (how far past the edge), and the quantization error of blocks at such an edge. A
checkpoint (one `homerun bench --synthetic` wrote: its config, seed and marker): each quantized tensor's fp32
samples regenerated from the writer's per-name streams, the old exponents checked against the stored scale bytes,
and the blocks whose exponent the exact one changes counted. One JSON document on stdout.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import homerun  # noqa: F401 - before torch (its OpenMP settings: torch's spinning workers take the pool's cores)
import torch

from homerun.formats.checkpoint import _generator, _init_spec, _sample
from homerun.formats.quant import FP4_BLOCK, FP4_MAX, FP8_BLOCK, FP8_MAX, pow2_exponent
from homerun.formats.v4_layout import v4_tensors


def old_exponent(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    return torch.ceil(torch.log2(amax.clamp_min(1e-30) / qmax)).clamp(-127, 127)


def sweep() -> dict:
    out = {}
    for qmax in (FP8_MAX, FP4_MAX):
        per, total = {}, 0
        for e in range(-99, 128):
            base = torch.tensor(qmax * 2.0**e, dtype=torch.float32)
            if not torch.isfinite(base):
                continue
            ulps = torch.arange(-64, 65, dtype=torch.int32)
            amax = (base.view(torch.int32) + ulps).view(torch.float32)
            diff = old_exponent(amax, qmax) != pow2_exponent(amax, qmax)
            if diff.any():
                per[e] = [int(ulps[diff].min()), int(ulps[diff].max())]
            total += int(diff.sum())
        out[str(qmax)] = {"values": total, "binades": len(per), "ulp_past_edge_by_binade": per}
    return out


def edge_block_errors(n_fp8: int = 50, n_fp4: int = 1000) -> dict:
    """Median relative error (Frobenius) of dequant(quant(w)) over random normal blocks whose amax is one ulp past
    qmax x 2^k (k = -17 for FP8, -10 for FP4: edges the old exponent got wrong), with the old and the exact one."""
    from homerun.formats import quant

    g = torch.Generator().manual_seed(0)
    out = {}
    cases = (("fp8", n_fp8, (128, 128), FP8_MAX * 2.0**-17), ("fp4", n_fp4, (1, 32), FP4_MAX * 2.0**-10))
    for fmt, n, shape, edge in cases:
        amax = torch.tensor(edge, dtype=torch.float32).view(torch.int32).add(1).view(torch.float32)
        errs: dict = {"old": [], "exact": []}
        for _ in range(n):
            w = torch.randn(shape, generator=g)
            w = w / w.abs().max() * amax
            for name, fn in (("old", old_exponent), ("exact", pow2_exponent)):
                quant.pow2_exponent = fn  # quant_fp8 / quant_fp4 look it up at call time
                try:
                    q, s = quant.quant_fp8(w) if fmt == "fp8" else quant.quant_fp4(w)
                finally:
                    quant.pow2_exponent = pow2_exponent
                d = quant.dequant_fp8(q, s) if fmt == "fp8" else quant.dequant_fp4(q, s)
                errs[name].append(float((d - w).norm() / w.norm()))
        out[fmt] = {k: round(float(torch.tensor(v).median()), 5) for k, v in errs.items()} | {"blocks": n}
    return out


def checkpoint(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    seed = json.loads((path / "homerun-synthetic.json").read_text())["seed"]
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    from safetensors import safe_open

    files: dict = {}

    def stored(name: str) -> torch.Tensor:
        f = weight_map[name]
        if f not in files:
            files[f] = safe_open(str(path / f), "pt")
        return files[f].get_tensor(name)

    t0 = time.perf_counter()
    blocks, changed, examples = {"fp8": 0, "fp4": 0}, {"fp8": 0, "fp4": 0}, []
    for info in v4_tensors(cfg, include_mtp=False):
        if info.dtype not in ("F8_E4M3", "I8"):
            continue
        g = _generator(seed, info.name)
        if info.dtype == "I8":  # FP4: logical [out, in], 1x32 blocks
            fmt, shape, qmax = "fp4", (info.shape[0], info.shape[1] * 2), FP4_MAX
            w = _sample(g, shape, _init_spec(info.name, shape, cfg)).float()
            amax = w.view(shape[0], shape[1] // FP4_BLOCK, FP4_BLOCK).abs().amax(-1)
        else:  # FP8: 128x128 blocks, the edge ones zero-padded
            fmt, shape, qmax = "fp8", info.shape, FP8_MAX
            w = _sample(g, shape, _init_spec(info.name, shape, cfg)).float()
            ro, ri = -(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK)
            padded = torch.zeros(ro * FP8_BLOCK, ri * FP8_BLOCK)
            padded[: shape[0], : shape[1]] = w
            amax = padded.view(ro, FP8_BLOCK, ri, FP8_BLOCK).abs().amax(dim=(1, 3))
        have = stored(info.name.removesuffix(".weight") + ".scale").view(torch.uint8).to(torch.int32) - 127
        if not torch.equal(have, old_exponent(amax, qmax).to(torch.int32)):
            raise SystemExit(f"{info.name}: the stored scales are not the old quantizer's (another writer?)")
        diff = pow2_exponent(amax, qmax).to(torch.int32) != have
        blocks[fmt] += amax.numel()
        changed[fmt] += int(diff.sum())
        examples += [[info.name, idx, float(amax[tuple(idx)])] for idx in diff.nonzero()[:1].tolist()]
    return {"checkpoint": path.name, "blocks": blocks, "changed_blocks": changed, "examples": examples[:4],
            "wall_s": round(time.perf_counter() - t0, 1)}


if __name__ == "__main__":
    print(json.dumps(checkpoint(Path(sys.argv[1])) if len(sys.argv) > 1
                     else {"sweep": sweep(), "edge_block_errors": edge_block_errors()}))
