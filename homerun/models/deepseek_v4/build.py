"""DeepSeek-V4 assembly: the model's parameters from stored tensors under their official names (the sanitize step,
kept apart from the math as mlx-lm keeps `sanitize`)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from homerun.errors import ConfigError
from homerun.models.deepseek_v4.config import LAYER_CSA, LAYER_HCA, ModelArgs
from homerun.models.deepseek_v4.model import DeepseekV4
from homerun.models.deepseek_v4.parts import _HC, _Attention, _Compressor, _Indexer, _Layer, _MoE
from homerun.models.layers import (
    QLinear,
    native_bf16,
)

# ------------------------------------------------------------------------------------------------------ build


def build_model(
    args: ModelArgs,
    get: Callable[[str], torch.Tensor],
    has: Callable[[str], bool],
    experts: Any,
    *,
    weights_dtype: str = "fp8",
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    on_layer: Callable[[int, int], None] | None = None,
    upcast_bf16: bool = True,
    layer_devices: Sequence[torch.device] | None = None,
    head_device: torch.device | str | None = None,
    put: Callable[[str, torch.Tensor, torch.device], torch.Tensor] | None = None,
    flavors: Sequence[str] | None = None,
    sites: Sequence[str] | None = None,
) -> DeepseekV4:
    """Assemble the model from stored tensors. `get(name)` returns the tensor as stored (FP8 weight, e8m0 scale,
    bf16, fp32, int64); `has(name)` tells whether it exists. weights_dtype "fp8" keeps FP8 weights packed;
    "bf16"/"fp32" dequantize FP8 (and convert bf16) weights once here. `upcast_bf16`: with an fp32 compute dtype, hold
    the BF16-stored matrices (head, compressors, routers, indexer weights_proj) in fp32, since converting them on
    every call costs more than the matmul (the head alone is 0.5G elements on V4). `on_layer(done, total)` reports
    progress.
    Pipeline split: `device` holds the embedding, `layer_devices[i]` layer i, `head_device` the final norm, HC head
    and lm head (defaults: `device`). `put(name, tensor, device)` materializes each final tensor (official name) where it
    lives (default `tensor.to(device)`); the placement executor passes one that charges a budgeted device.
    `flavors` gives each placement device's kernel flavor as (embed, layer 0..n-1, head) (homerun.kernels.dispatch
    FLAVORS; "gpu" for a CUDA stand-in). BF16 matrices are upcast only for the CPU kernels: on CUDA and on the GPU
    flavor they stay bf16 (VRAM as planned). `sites`: the placement's device names, in the same order (each part's
    current site while it runs, homerun.kernels.device_guard)."""
    device = torch.device(device)
    dense = {"fp8": None, "bf16": torch.bfloat16, "fp32": torch.float32}[weights_dtype]
    layer_devs = [torch.device(d) for d in layer_devices] if layer_devices is not None else [device] * args.n_layers
    head_dev = torch.device(head_device) if head_device is not None else device
    flavor_of = list(flavors) if flavors is not None else ["auto"] * (args.n_layers + 2)
    if len(layer_devs) != args.n_layers or len(flavor_of) != args.n_layers + 2:
        raise ConfigError(f"build_model: {len(layer_devs)} layer devices / {len(flavor_of)} flavors for "
                          f"{args.n_layers} layers", hint="one device per layer; flavors for embed, layers, head")

    def _to(name: str, t: torch.Tensor, dev: torch.device) -> torch.Tensor:
        return t.to(dev) if t.device != dev else t

    place = put or _to
    device_now = device  # where the tensors being built go (set per layer and for the head)
    flavor_now = flavor_of[0]

    def lin(name: str) -> QLinear:
        device = device_now
        w = get(f"{name}.weight")
        s = get(f"{name}.scale") if has(f"{name}.scale") else None
        q = QLinear(w, s)
        cpu_kernels = device.type == "cpu" and flavor_now != "gpu"
        if dense is not None:
            q = q.to_dense(dense)
        elif s is None and upcast_bf16 and cpu_kernels and compute_dtype == torch.float32 and \
                w.dtype != torch.float32 and not (w.dtype == torch.bfloat16 and native_bf16() is not None):
            # the native bf16 kernel is exact and reads half the bytes, so bf16 stays bf16 where it runs; the GPU
            # kernels keep bf16 as stored (an fp32 copy would be VRAM the plan does not count)
            q = q.to_dense(torch.float32)
        return QLinear(place(f"{name}.weight", q.weight, device),
                       None if q.scale is None else place(f"{name}.scale", q.scale, device))

    def f32(name: str) -> torch.Tensor:
        return place(name, get(name).to(torch.float32), device_now)

    def hc(prefix: str, site: str) -> _HC:
        return _HC(f32(f"{prefix}.hc_{site}_fn"), f32(f"{prefix}.hc_{site}_base"), f32(f"{prefix}.hc_{site}_scale"))

    def compressor(prefix: str, rate: int, head_dim: int, overlap: bool) -> _Compressor:
        return _Compressor(
            lin(f"{prefix}.wkv"), lin(f"{prefix}.wgate"), f32(f"{prefix}.ape"), f32(f"{prefix}.norm.weight"),
            rate, head_dim, overlap,
        )

    layers = []
    for i in range(args.n_layers):
        p = f"layers.{i}"
        kind = args.layer_kinds[i]
        device_now, flavor_now = layer_devs[i], flavor_of[1 + i]
        comp = indexer = None
        if kind == LAYER_CSA:
            comp = compressor(f"{p}.attn.compressor", args.csa_rate, args.head_dim, True)
            indexer = _Indexer(
                lin(f"{p}.attn.indexer.wq_b"),
                lin(f"{p}.attn.indexer.weights_proj"),
                compressor(f"{p}.attn.indexer.compressor", args.csa_rate, args.index_head_dim, True),
            )
        elif kind == LAYER_HCA:
            comp = compressor(f"{p}.attn.compressor", args.hca_rate, args.head_dim, False)
        attn = _Attention(
            lin(f"{p}.attn.wq_a"), f32(f"{p}.attn.q_norm.weight"), lin(f"{p}.attn.wq_b"), lin(f"{p}.attn.wkv"),
            f32(f"{p}.attn.kv_norm.weight"), lin(f"{p}.attn.wo_a"), lin(f"{p}.attn.wo_b"), f32(f"{p}.attn.attn_sink"),
            comp, indexer,
        )
        is_hash = i < args.n_hash_layers
        moe = _MoE(
            lin(f"{p}.ffn.gate"),
            None if is_hash else f32(f"{p}.ffn.gate.bias"),
            place(f"{p}.ffn.gate.tid2eid", get(f"{p}.ffn.gate.tid2eid").to(torch.int64), device_now) if is_hash
            else None,
            lin(f"{p}.ffn.shared_experts.w1"), lin(f"{p}.ffn.shared_experts.w3"), lin(f"{p}.ffn.shared_experts.w2"),
        )
        layers.append(_Layer(
            i, kind, f32(f"{p}.attn_norm.weight"), f32(f"{p}.ffn_norm.weight"), hc(p, "attn"), hc(p, "ffn"), attn, moe,
            device_now, flavor_now,
        ))
        if on_layer is not None:
            on_layer(i + 1, args.n_layers)
    embed = place("embed.weight", get("embed.weight"), device)  # kept as stored: a lookup reads one row per token
    device_now, flavor_now = head_dev, flavor_of[-1]
    return DeepseekV4(
        args=args,
        embed=embed,
        head=lin("head"),
        norm=f32("norm.weight"),
        hc_head_fn=f32("hc_head_fn"),
        hc_head_base=f32("hc_head_base"),
        hc_head_scale=f32("hc_head_scale"),
        layers=layers,
        experts=experts,
        compute_dtype=compute_dtype,
        device=device,
        head_device=head_dev,
        embed_flavor=flavor_of[0],
        head_flavor=flavor_of[-1],
        sites=tuple(sites) if sites is not None else None,
    )
