"""The device check's offload step (issue 13b): the host arena's pinning, pinned H2D peak and the fraction streaming
reaches, the fused decode hit path (launches, host syncs, event waits, time per layer) and streamed prefill through
the stage, at V4-Flash expert shapes (4096 x 2048 FP4, ~13.4 MB per expert) on CUDA, or toy shapes with `tiny` (CPU
stand-in, Triton interpreter). `homerun.bench.device_check` runs `step_offload` as its 13b step; returns one JSON
record. Library code: no printing.
"""

from __future__ import annotations

import time

import torch


def _shapes(tiny: bool) -> dict:
    if tiny:
        return {"hidden": 64, "inter": 32, "experts": 8, "layers": 2, "top_k": 2, "slots": 8, "prefill": 80}
    return {"hidden": 4096, "inter": 2048, "experts": 64, "layers": 2, "top_k": 6, "slots": 96, "prefill": 2048}


def step_offload(tiny: bool) -> dict:
    from homerun.kernels.counting import count_device_work
    from offload.cached_backend import CacheOptions, MissOptions, PrefillOptions, build_cached_backend
    from offload.devices import CudaDevice, CudaStandInDevice
    from offload.host_store import HostExpertStore, random_packed_expert
    from offload.transfer import make_transfer_engine, measure_h2d_gbps

    s = _shapes(tiny)
    H, I, E, L, K = s["hidden"], s["inter"], s["experts"], s["layers"], s["top_k"]
    g = torch.Generator().manual_seed(0)
    ex = {(l, e): random_packed_expert(H, I, g, quantize=tiny) for l in range(L) for e in range(E)}
    t0 = time.perf_counter()
    store = HostExpertStore(lambda l, e: ex[(l, e)], list(ex), pin=None if not tiny else False)
    out: dict = {"shapes": s, "store": store.stats().to_dict(), "store_build_s": time.perf_counter() - t0}
    dev = CudaStandInDevice("cuda-standin:0", 1 << 34) if tiny else CudaDevice(0)

    # 1. pinned H2D peak, and what back-to-back expert copies out of the arena reach (the streaming fraction)
    peak = measure_h2d_gbps(dev, nbytes=(16 << 20) if tiny else (256 << 20))
    engine = make_transfer_engine(dev, max_in_flight=8)
    n_slots = min(32, len(ex))
    dst = torch.empty((n_slots, store.expert_bytes), dtype=torch.uint8, device=dev.torch_device)
    keys = list(ex)
    t0 = time.perf_counter()
    for i, key in enumerate(keys * 2):
        engine.copy(dst[i % n_slots], store.buffer(key), tag=key)
    engine.drain()
    wall = time.perf_counter() - t0
    st = engine.stats()
    engine.close()
    out["h2d"] = {"pinned_peak_gbps": peak, "streaming_gbps": st.achieved_gbps,
                  "streaming_wall_gbps": st.bytes_moved / wall / 1e9,
                  "streaming_fraction_of_peak": st.bytes_moved / wall / 1e9 / peak if peak else None,
                  "copies": st.n_copies, "bytes": st.bytes_moved,
                  "goal_0.85": (st.bytes_moved / wall / 1e9 / peak >= 0.85) if peak else None}

    # 2. fused decode: warm cache (every expert resident), then counted and timed decode tokens
    be = build_cached_backend(store, range(L), E, swiglu_limit=10.0, host_store=store, device=dev,
                              cache=CacheOptions(L * E), misses=MissOptions("stream"),
                              prefill=PrefillOptions(min_rows=64))
    x = torch.randn(1, H, generator=g).to(dev.torch_device, torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(1)]).to(dev.torch_device)
    w = torch.rand(1, K, generator=g).to(dev.torch_device)
    for layer in range(L):
        for e in range(E):
            be.forward(layer, x, torch.full((1, K), e, device=dev.torch_device), w)
    waits_before = be.stats().to_dict().get("gpu", {}).get("decode", {}).get("event_waits", 0)
    with count_device_work() as counter:
        for layer in range(L):
            be.forward(layer, x, ids, w)
    c = counter.c
    waits = be.stats().to_dict().get("gpu", {}).get("decode", {}).get("event_waits", 0) - waits_before
    reps = 3 if tiny else 50
    if dev.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        for layer in range(L):
            be.forward(layer, x, ids, w)
    if dev.is_cuda:
        torch.cuda.synchronize()
    per_layer = (time.perf_counter() - t0) / reps / L
    bytes_per_layer = K * store.expert_bytes
    out["decode_hit_path"] = {
        "launches_per_layer": c.device_launches / L, "triton_launches_per_layer": c.launches / L,
        "host_syncs_per_layer": c.syncs / L, "sync_names": c.sync_names, "event_waits_per_layer": waits / L,
        "ms_per_layer": per_layer * 1e3, "expert_gbps": bytes_per_layer / per_layer / 1e9,
        "gpu": be.stats().to_dict().get("gpu", {})}

    # 3. streamed prefill: one chunk per layer through the stage (grouped GEMMs), the decode cache untouched
    T = s["prefill"]
    xp = torch.randn(T, H, generator=g).to(dev.torch_device, torch.bfloat16)
    idp = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dev.torch_device)
    wp = torch.rand(T, K, generator=g).to(dev.torch_device)
    table0 = be.cache.slot_table.clone()
    if be.prefill is not None:
        be.forward(0, xp, idp, wp)  # warm-up (autotune, first launch)
        if dev.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for layer in range(L):
            be.forward(layer, xp, idp, wp)
        if dev.is_cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        ps = be.prefill.stats()
        out["prefill"] = {"tokens": T, "layers": L, "s_per_layer": secs / L, "tok_s_per_layer": T * L / secs,
                          "stage_capacity": ps["capacity"], "stage_bytes": ps["stage_bytes"],
                          "staged_bytes": ps["staged_bytes"], "copy_s": ps["copy_s"], "stall_s": ps["stall_s"],
                          # the stage's uploads are the other streaming path: their rate against the pinned peak
                          "staged_gbps": ps["staged_bytes"] / ps["copy_s"] / 1e9 if ps["copy_s"] else None,
                          "staged_fraction_of_peak": (ps["staged_bytes"] / ps["copy_s"] / 1e9 / peak
                                                      if ps["copy_s"] and peak else None),
                          "decode_cache_unchanged": bool(torch.equal(table0, be.cache.slot_table))}
    else:
        out["prefill"] = {"status": "no prefill streamer (device too small or triton missing)"}
    be.close()
    store.close()
    return out
