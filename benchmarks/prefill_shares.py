"""Where a CPU prefill's time goes: wall and process-CPU seconds per family of one prompt's prefill, by wrapping the
kernel set's methods and the model's steps (attention core, indexer top-k, compressors, mHC, norm+RoPE, dense
linears, routed experts). Inner calls are not double counted: a family's time excludes the wrapped calls it makes.

    python benchmarks/prefill_shares.py --checkpoint CKPT --prompt 512 [--repeat 2] [--json] [--per-method]

`--per-method` charges each kernel-set method to itself (hc_weights, hc_post, norm_rope, linear, grouped, ...)
instead of its family. The document also carries the process's peak RSS and its anonymous RSS after the prefill.
A session's prefill runs its last layer for the rows it reads alone (the prompt's last row: DeepseekV4.forward's
out_rows); `--all-rows` runs every row there, as a per-layer measurement needs (on a 1-layer checkpoint the last
layer is the only one: prefill_fit.py's documents are taken with it).

The checkpoint: an official-format V4 directory (e.g. the synthetic one `compare_transformers.py` writes). Each
repeat is a fresh session over the same prompt; the figures printed are the last repeat's (the first warms up).
`--chunk N` prefills in N-token chunks instead of the model's. The JSON also gives the last repeat's peak RSS
(`peak_rss_bytes`: VmHWM, reset before the prefill; the mmap'd weights it touches count) and the tokens each routed
expert got per (chunk, layer) call (`tokens_per_expert`: the fused expert op's per-expert batch).

    python benchmarks/prefill_shares.py --attention-layer csa --prompt 4096

instead times one real-shaped V4-Flash attention core (64 heads x 512, window 128; CSA: rate 4, top-512 picks;
HCA: rate 128) over a whole prompt, in the model's query blocks: the torch set's attend_prefill against the native one
(random inputs; no checkpoint needed). `--attention-layer indexer` times the CSA layer's lightning-indexer top-k the
same way (64 heads x 128, rate 4, top-512, pages of 256 keys): the torch set's index_topk against the native one.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

FAMILIES = {  # kernel set method -> family
    "attend_prefill": "attention core", "attend_one": "attention core",
    "hc_weights": "mHC", "hc_pre": "mHC", "hc_post": "mHC", "hc_pre_norm": "mHC", "sinkhorn": "mHC",
    "norm_rope": "norm+RoPE", "rope_out": "norm+RoPE",
    "linear": "dense linears", "grouped": "dense linears", "project": "dense linears",
    "swiglu_down": "shared expert SwiGLU + sum",  # its down projection is charged to the dense linears
}
MODEL_STEPS = {"_index_topk": "indexer top-k", "_compress": "compressors (pooling)", "route": "router",
               "_attend": "attention core",  # _attend: the block loop around attend_prefill (its glue counts there)
               "_embed": "embedding", "_final": "head (HC head, norm)", "logits": "head (logits)"}
# The prefill heap policy's trim after the step (homerun.kernels.cpu_heap): the free heap's pages go back to the
# system, so the next prompt's temporaries fault in again (that cost lands in the families that first touch them).
HEAP_TRIM = "heap trim"


class _Clock:
    """Exclusive wall/CPU time per family: a nested wrapped call's time is charged to it, not to its caller."""

    def __init__(self):
        self.wall = defaultdict(float)
        self.cpu = defaultdict(float)
        self.stack: list[list[float]] = []

    def wrap(self, fn, family):
        def timed(*args, **kwargs):
            frame = [time.perf_counter(), time.process_time(), 0.0, 0.0]  # start wall, cpu; children wall, cpu
            self.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
                w, c = time.perf_counter() - frame[0], time.process_time() - frame[1]
                self.wall[family] += w - frame[2]
                self.cpu[family] += c - frame[3]
                if self.stack:
                    self.stack[-1][2] += w
                    self.stack[-1][3] += c

        return timed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="official-format V4 checkpoint directory")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--repeat", type=int, default=2, help="prefills (the last one is reported)")
    ap.add_argument("--expert-act", default="auto", help="expert activations: auto, int8, bf16, fp32")
    ap.add_argument("--chunk", type=int, help="prefill chunk tokens (default: the model's, 512 on a CPU)")
    ap.add_argument("--json", action="store_true", help="print the JSON document only")
    ap.add_argument("--per-method", action="store_true", help="one row per kernel-set method, not per family")
    ap.add_argument("--all-rows", action="store_true",
                    help="the last layer computes every row (default: the rows the session reads, as in use)")
    ap.add_argument("--attention-layer", choices=("csa", "hca", "sliding", "indexer"),
                    help="time one real-shaped attention core instead (no checkpoint)")
    a = ap.parse_args()
    import homerun  # noqa: F401 - before torch (its OpenMP settings: torch's spinning workers take the pool's cores)

    if a.attention_layer == "indexer":
        return indexer_layer(a)
    if a.attention_layer:
        return attention_layer(a)
    if not a.checkpoint:
        ap.error("--checkpoint is required (or --attention-layer)")

    import torch

    from homerun.bench.setup import open_target
    from homerun.kernels import dispatch
    from homerun.models.deepseek_v4 import model as v4model

    target, _, _ = open_target(a.checkpoint, kind="native", dtype="float32", device="cpu", act=a.expert_act)
    model = target.model
    if a.chunk:
        model.max_chunk_tokens = a.chunk
    if a.all_rows:  # the session's forwards without their out_rows: every row of the last layer runs
        fwd = model._forward
        model._forward = lambda *args, out_rows=None, **kw: fwd(*args, **kw)
    net = model.net
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(256, net.args.vocab_size, (a.prompt,), generator=g).tolist()
    clock = _Clock()
    ks = dispatch.kernels_for("cpu", torch.float32, a.prompt)
    sets = {type(ks), type(dispatch.for_act(ks, net.experts.act))}
    families = dict(FAMILIES)
    if a.per_method:
        families = {name: name for name in (*FAMILIES, "rope_cos_sin", "route")}
    for cls in sets:
        for name, fam in families.items():
            if name in vars(cls) or any(name in vars(b) for b in cls.__mro__[1:]):
                setattr(cls, name, clock.wrap(getattr(cls, name), fam))
    for name, fam in MODEL_STEPS.items():
        setattr(v4model.DeepseekV4, name, clock.wrap(getattr(v4model.DeepseekV4, name), fam))
    _wrap_heap_trim(clock)
    experts = net.experts
    per_expert: list[torch.Tensor] = []  # tokens each routed expert got, per (chunk, layer) call

    def counted(fwd):
        def forward(layer, h, idx, w):
            per_expert.append(torch.bincount(idx.reshape(-1).long().cpu(), minlength=net.args.n_routed_experts))
            return fwd(layer, h, idx, w)

        return forward

    experts.forward = clock.wrap(counted(experts.forward), "routed experts")
    total_wall = total_cpu = 0.0
    rss_load = _rss_bytes("VmRSS")
    for _ in range(max(1, a.repeat)):
        clock.wall.clear()
        clock.cpu.clear()
        per_expert.clear()
        _reset_peak_rss()
        w0, c0 = time.perf_counter(), time.process_time()
        model.session().feed(ids)
        total_wall, total_cpu = time.perf_counter() - w0, time.process_time() - c0
    fams = sorted(clock.wall, key=lambda f: -clock.wall[f])
    other_w = total_wall - sum(clock.wall.values())
    other_c = total_cpu - sum(clock.cpu.values())
    doc = {"checkpoint": a.checkpoint, "prompt": a.prompt, "prefill_s": total_wall, "prefill_cpu_s": total_cpu,
           "tok_s": a.prompt / total_wall, "cpu_ms_per_token": 1e3 * total_cpu / a.prompt,
           "chunk_tokens": model.max_chunk_tokens, "all_rows": a.all_rows, "rss_after_load_bytes": rss_load,
           "peak_rss_bytes": _rss_bytes("VmHWM"), "tokens_per_expert": _per_expert_stats(per_expert), "kernel_sets": sorted(c.__name__ for c in sets),
           "families": {f: {"wall_s": clock.wall[f], "cpu_s": clock.cpu[f], "wall_share": clock.wall[f] / total_wall}
                        for f in fams},
           "other": {"wall_s": other_w, "cpu_s": other_c, "wall_share": other_w / total_wall},
           "rss_anon_bytes": _rss_bytes("RssAnon")}
    if not a.json:
        tpe = doc["tokens_per_expert"]
        print(f"prefill {a.prompt} tokens in {model.max_chunk_tokens}-token chunks: {total_wall:.2f} s wall "
              f"({a.prompt / total_wall:.1f} tok/s), {total_cpu:.2f} CPU-s, peak RSS {doc['peak_rss_bytes'] / 2**30:.2f} "
              f"GiB (after load {rss_load / 2**30:.2f}); tokens per routed expert: mean {tpe['mean_active']:.1f} over "
              f"{tpe['active_share']:.0%} of experts active, median {tpe['median_active']:.0f}")
        for f in fams + ["other"]:
            r = doc["families"].get(f, doc["other"])
            print(f"  {f:24} {r['wall_s']:7.3f} s  {100 * r['wall_share']:5.1f}%  cpu {r['cpu_s']:7.3f} s")
    print(json.dumps(doc, indent=None if not a.json else 2))
    return 0


def _wrap_heap_trim(clock: _Clock) -> None:
    """Charge the prefill heap policy's malloc_trim to HEAP_TRIM (a no-op where the policy does not apply)."""
    from homerun.kernels import cpu_heap

    lib = cpu_heap._glibc()
    if lib is None:
        return

    class _Timed:  # the bound libc with its malloc_trim timed
        malloc_trim = staticmethod(clock.wrap(lib.malloc_trim, HEAP_TRIM))

        def __getattr__(self, name):
            return getattr(lib, name)

    cpu_heap._state["libc"] = _Timed()


def _rss_bytes(field: str) -> int:
    """This process's VmRSS or VmHWM (peak) from /proc/self/status, in bytes (0 where there is no procfs)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: "5" to clear_refs), so the peak is this prefill's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _per_expert_stats(counts: list) -> dict:
    """Tokens per routed expert over every (chunk, layer) expert call: the mean and median over the experts that got
    any token (the fused op's per-expert batch), the share of experts active, and the quartiles of active batches."""
    import torch

    if not counts:
        return {"calls": 0, "mean_active": 0.0, "median_active": 0.0, "active_share": 0.0, "p25_active": 0.0,
                "p75_active": 0.0, "mean_all": 0.0}
    c = torch.stack(counts).float()
    act = c[c > 0]
    q = torch.quantile(act, torch.tensor([0.25, 0.5, 0.75])).tolist()
    return {"calls": len(counts), "mean_active": act.mean().item(), "median_active": q[1], "p25_active": q[0],
            "p75_active": q[2], "active_share": act.numel() / c.numel(), "mean_all": c.mean().item()}


def attention_layer(a: argparse.Namespace) -> int:
    """One V4-Flash attention core over a prompt of a.prompt tokens: torch set vs native, wall and CPU seconds."""
    import torch

    from homerun.kernels import dispatch
    from homerun.kernels.torch_set import TorchKernels

    T, H, D, W, K = a.prompt, 64, 512, 128, 512
    rate = {"csa": 4, "hca": 128, "sliding": 0}[a.attention_layer]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(T, H, D, generator=g)
    keys = torch.randn(T, D, generator=g)
    comp = torch.randn(T // rate, D, generator=g) if rate else None
    sink = torch.randn(H, generator=g)
    # the model's block sizing (DeepseekV4._attend): score temporaries, CSA's gathered rows and indexer page
    per_q = H * (W + (K if rate == 4 else T // max(rate, 1)))
    if rate == 4:
        page = min(T // 4, 256)
        per_q += K * D + 64 * page + 2 * (K + page)
    qb = max(1, min(T, (1 << 24) // per_q))
    while qb > 1 and qb * H * (qb + W) > (1 << 24):
        qb //= 2
    native = dispatch.kernels_for("cpu", torch.float32, T)
    doc: dict = {"layer": a.attention_layer, "prompt": T, "query_block": qb}
    for name, ks in (("torch", TorchKernels()), ("native", native), ("torch", TorchKernels()), ("native", native)):
        w0, c0 = time.perf_counter(), time.process_time()
        for s0 in range(0, T, qb):
            s1 = min(s0 + qb, T)
            k0 = max(0, s0 - (W - 1))
            n_vis = s1 // rate if rate else 0
            sel = None
            if rate == 4 and n_vis:
                sel = torch.randint(0, n_vis, (s1 - s0, min(K, n_vis)), generator=g)
            ks.attend_prefill(q[s0:s1], keys[k0:s1], k0, W, comp[:n_vis] if rate else None, sel, s0, rate, sink,
                           D**-0.5)
        doc[name] = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}  # the second run stays
    if not a.json:
        print(f"{a.attention_layer} attention core, {T} tokens: torch {doc['torch']['cpu_s']:.2f} CPU-s "
              f"({doc['torch']['wall_s']:.2f} s), native {doc['native']['cpu_s']:.2f} CPU-s "
              f"({doc['native']['wall_s']:.2f} s)")
    print(json.dumps(doc))
    return 0


def _csa_query_block(T: int, H: int, D: int, W: int, K: int, Hi: int, page: int) -> int:
    """DeepseekV4._attend's query block for a CSA layer (score temporaries, gathered rows, the indexer's page)."""
    per_q = H * (W + K) + K * D + Hi * page + 2 * (K + page)
    qb = max(1, min(T, (1 << 24) // per_q))
    while qb > 1 and qb * H * (qb + W) > (1 << 24):
        qb //= 2
    return qb


def indexer_layer(a: argparse.Namespace) -> int:
    """One V4-Flash CSA layer's indexer top-k over a prompt of a.prompt tokens, in the model's query blocks and key
    pages: torch set vs native, wall and CPU seconds, alternating (torch, native, torch, native; each second run is
    reported, the first warms up)."""
    import torch

    from homerun.kernels import dispatch
    from homerun.kernels.torch_set import TorchKernels

    T, Hi, Di, K, rate, page = a.prompt, 64, 128, 512, 4, 256
    g = torch.Generator().manual_seed(0)
    iq = torch.randn(T, Hi, Di, generator=g)
    iw = torch.randn(T, Hi, generator=g) * Hi**-0.5
    keys = torch.randn(T // rate, Di, generator=g)
    qb = _csa_query_block(T, 64, 512, 128, K, Hi, min(T // rate, page))
    native = dispatch.kernels_for("cpu", torch.float32, T)
    doc: dict = {"layer": "indexer", "prompt": T, "query_block": qb, "page_rows": page, "runs": []}
    for name, ks in (("torch", TorchKernels()), ("native", native), ("torch", TorchKernels()), ("native", native)):
        w0, c0 = time.perf_counter(), time.process_time()
        for s0 in range(0, T, qb):
            s1 = min(s0 + qb, T)
            n_vis = s1 // rate
            if not n_vis:
                continue
            thr = (torch.arange(s0, s1) + 1) // rate
            pages = [(r0, keys[r0 : min(r0 + page, n_vis)]) for r0 in range(0, n_vis, page)]
            ks.index_topk(iq[s0:s1], iw[s0:s1], pages, n_vis, thr, K, Di**-0.5)
        run = {"set": name, "wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
        doc["runs"].append(run)
        doc[name] = run  # the second run stays
    if not a.json:
        print(f"indexer top-k, {T} tokens: torch {doc['torch']['cpu_s']:.2f} CPU-s ({doc['torch']['wall_s']:.2f} s), "
              f"native {doc['native']['cpu_s']:.2f} CPU-s ({doc['native']['wall_s']:.2f} s)")
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
