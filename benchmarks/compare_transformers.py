"""homerun vs transformers' DeepseekV4ForCausalLM on the same synthetic official-format checkpoint.

Each side runs in its own subprocess (so neither's memory or threads leak into the other): load, prefill a fixed
prompt, then greedy-decode a few untimed warm-up tokens and N timed ones, one at a time with a KV cache. Reported
per side: load time, decode tok/s and peak RSS (ru_maxrss: anonymous memory plus the checkpoint pages it touched
through mmap). The checkpoint is written once (homerun.bench.synthetic, V4-Flash's real per-layer shapes with fewer
layers, experts and vocabulary) and reused.

The sides alternate (homerun, transformers, homerun, ...) for --repeat rounds, and the figures compared are each
side's median: a shared VM's memory bandwidth drifts by +-20% over minutes, so one run of each, minutes apart, can
land in different phases. The DRAM read bandwidth measured just before every run is recorded next to it.

transformers runs as it does out of the box on a CPU: the FP8/FP4 checkpoint is dequantized to bf16 at load
(finegrained-fp8 quantizer) and computed in bf16. homerun keeps the weights packed, computes in fp32 and runs the
routed experts on its native CPU kernels (int8 activation blocks by default where a SIMD int8 kernel exists;
`--expert-act fp32` for the exact kernels).

    python benchmarks/compare_transformers.py       # 3 layers x 48 experts, vocab 16384: 2.7 GB packed; 3 rounds
    python benchmarks/compare_transformers.py --layers 2 --experts 32 --vocab 129280  # lm head dominates: 3.3 GB
    python benchmarks/compare_transformers.py --layers 1 --experts 64 --gen 32 --json
    python benchmarks/compare_transformers.py --checkpoint ./some-v4-checkpoint
    python benchmarks/compare_transformers.py --checkpoint CKPT --prefill 512,4096 --repeat 3   # prefill tok/s
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _ids(n: int, vocab: int, seed: int = 7) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(256, vocab // 4), vocab, (n,), generator=g).tolist()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_now() -> dict:
    """Resident memory at the end, split into anonymous (allocations) and file-backed (mmap'd checkpoint) pages."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = {"RssAnon:": "rss_anon_bytes", "RssFile:": "rss_file_bytes"}.get(line.split()[0] if line else "")
            if key:
                out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def worker_homerun(ckpt: str, prompt: int, gen: int, warmup: int, act: str = "auto", pre_warm: int = 0,
                   all_rows: bool = False) -> dict:
    import homerun  # noqa: F401 - before torch, so homerun's OpenMP wait policy applies as it does in the CLI
    import torch

    from homerun.bench.setup import open_target

    t0 = time.perf_counter()
    target, backend, _ = open_target(ckpt, kind="native", dtype="float32", device="cpu", act=act)
    model = target.model
    load_s = time.perf_counter() - t0
    if all_rows:  # the session's forwards without their out_rows: the last layer runs every row (a per-layer figure)
        fwd = model._forward
        model._forward = lambda *args, out_rows=None, **kw: fwd(*args, **kw)
    if pre_warm:  # an untimed short prefill first: weights paged in, threads and allocator warm
        model.session().feed(_ids(pre_warm, model.args.vocab_size, seed=3))
    sess = model.session()
    t0, c0 = time.perf_counter(), time.process_time()
    logits = sess.feed(_ids(prompt, model.args.vocab_size))
    prefill_s, prefill_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    out = []
    for i in range(warmup + gen):
        if i == warmup:
            t0 = time.perf_counter()
        tok = int(torch.argmax(logits))
        out.append(tok)
        logits = sess.feed([tok])
    decode_s = max(time.perf_counter() - t0, 1e-9)
    return {"side": "homerun", "backend": backend, "expert_act": target.act, "compute_dtype": "float32",
            "all_rows": all_rows,
            "load_s": load_s,
            "prefill_tok_s": prompt / prefill_s, "prefill_cpu_s": prefill_cpu_s, "decode_tok_s": gen / decode_s,
            "tokens": out, "peak_rss_bytes": _peak_rss_bytes(), **_rss_now()}


def worker_transformers(ckpt: str, prompt: int, gen: int, warmup: int, pre_warm: int = 0, chunk: int = 0) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    model.eval()
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    out = []
    with torch.inference_mode():
        if pre_warm:
            model(torch.tensor([_ids(pre_warm, vocab, seed=3)]), use_cache=True)
        t0, c0 = time.perf_counter(), time.process_time()
        ids, past = torch.tensor([_ids(prompt, vocab)]), None
        # chunk > 0: the prompt in chunks through transformers' own cache (its eager attention's [heads, T, T]
        # scores do not fit 24 GB at 4096 tokens in one pass; chunked logits match the whole pass to bf16 noise)
        for s0 in range(0, prompt, chunk or prompt):
            res = model(ids[:, s0 : s0 + (chunk or prompt)], past_key_values=past, use_cache=True)
            past = res.past_key_values
        prefill_s, prefill_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        past, logits = res.past_key_values, res.logits[0, -1]
        for i in range(warmup + gen):
            if i == warmup:
                t0 = time.perf_counter()
            tok = int(torch.argmax(logits))
            out.append(tok)
            res = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, logits = res.past_key_values, res.logits[0, -1]
        decode_s = max(time.perf_counter() - t0, 1e-9)
    return {"side": "transformers", "backend": type(model).__name__, "compute_dtype": str(model.dtype).replace("torch.", ""),
            "load_s": load_s, "prefill_chunk_tokens": chunk or prompt, "prefill_tok_s": prompt / prefill_s,
            "prefill_cpu_s": prefill_cpu_s,
            "decode_tok_s": gen / decode_s, "tokens": out,
            "peak_rss_bytes": _peak_rss_bytes(), **_rss_now()}


def run_side(side: str, ckpt: str, prompt: int, gen: int, warmup: int, timeout_s: int, act: str = "auto",
             pre_warm: int = 0, hf_chunk: int = 0, all_rows: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--checkpoint", ckpt, "--prompt", str(prompt), "--gen", str(gen),
           "--warmup", str(warmup), "--expert-act", act, "--pre-warm", str(pre_warm), "--hf-chunk", str(hf_chunk)]
    if all_rows:
        cmd.append("--all-rows")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]
        if proc.returncode == -signal.SIGKILL:  # no traceback: the kernel's OOM killer is the usual sender
            err = [f"killed by SIGKILL (out of memory, if the kernel log says oom-kill); its last line: {err[0][:120]}"]
        return {"side": side, "error": err, "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _dram_gbps() -> float | None:
    """This machine's DRAM read bandwidth right now (native reader, best of 3), or None without the kernels."""
    try:
        from homerun.bench.setup import measure_dram_read_gbps

        return measure_dram_read_gbps(reps=3)
    except Exception:  # noqa: BLE001 - a bandwidth note is optional
        return None


def build_checkpoint(layers: int, experts: int, vocab: int | None, root: str | None) -> tuple[str, int]:
    from homerun.bench.synthetic import build_synthetic

    overrides = {"n_routed_experts": experts, **({"vocab_size": vocab} if vocab else {})}
    syn = build_synthetic("deepseek-ai/DeepSeek-V4-Flash", n_layers=layers, root=root, overrides=overrides)
    return str(syn.path), syn.total_bytes


def _packed_bytes(ckpt: str) -> int:
    index = json.loads((Path(ckpt) / "model.safetensors.index.json").read_text())
    return int(index["metadata"]["total_size"])


def prefill_mode(a: argparse.Namespace, ckpt: str, write_s: float) -> int:
    """Prefill tok/s of both sides at each prompt length: alternating rounds, medians, peak RSS ratio, the 2x goal."""
    prompts = [int(p) for p in str(a.prefill).split(",") if p.strip()]
    doc: dict = {"checkpoint": ckpt, "packed_bytes": _packed_bytes(ckpt), "checkpoint_ready_s": write_s,
                 "threads": os.cpu_count(), "repeat": a.repeat, "pre_warm_tokens": a.pre_warm,
                 "hf_chunk_tokens": a.hf_chunk, "prompts": {}}
    for n in prompts:
        runs: dict[str, list[dict]] = {"homerun": [], "transformers": []}
        for _ in range(max(1, a.repeat)):
            for side in ("homerun", "transformers"):
                dram = _dram_gbps()
                r = run_side(side, ckpt, n, 0, 0, a.timeout, a.expert_act, a.pre_warm, a.hf_chunk, a.all_rows)
                r["dram_read_gbps_before"] = dram
                r.pop("tokens", None)
                runs[side].append(r)
                if not a.json:
                    got = f"{r['prefill_tok_s']:.2f} tok/s ({r['prefill_cpu_s']:.1f} CPU-s), peak RSS " \
                          f"{r['peak_rss_bytes'] / 1e9:.2f} GB" \
                        if "error" not in r else f"error: {r['error']}"
                    print(f"prompt {n:>6} {side:13} {got}", flush=True)
        ok = {s: [r for r in rs if "error" not in r] for s, rs in runs.items()}
        rec: dict = {"homerun": runs["homerun"], "transformers": runs["transformers"]}
        if ok["homerun"] and ok["transformers"]:
            med = {s: statistics.median([r["prefill_tok_s"] for r in rs]) for s, rs in ok.items()}
            # tokens per CPU-second (all threads): on a shared host the wall figure follows the neighbours' load
            per_cpu = {s: statistics.median([n / max(r["prefill_cpu_s"], 1e-9) for r in rs]) for s, rs in ok.items()}
            rss = {s: max(r["peak_rss_bytes"] for r in rs) for s, rs in ok.items()}
            rec.update(homerun_prefill_tok_s_median=med["homerun"], transformers_prefill_tok_s_median=med["transformers"],
                       prefill_speedup=med["homerun"] / med["transformers"],
                       homerun_prefill_tok_per_cpu_s_median=per_cpu["homerun"],
                       transformers_prefill_tok_per_cpu_s_median=per_cpu["transformers"],
                       prefill_speedup_per_cpu_s=per_cpu["homerun"] / per_cpu["transformers"],
                       peak_rss_ratio=rss["homerun"] / rss["transformers"],
                       goal_prefill_2x=med["homerun"] >= 2 * med["transformers"],
                       goal_half_rss=rss["homerun"] <= 0.5 * rss["transformers"])
            if not a.json:
                print(f"prompt {n}: prefill (medians) homerun {med['homerun']:.2f} vs transformers "
                      f"{med['transformers']:.2f} tok/s: {rec['prefill_speedup']:.2f}x (goal >= 2x: "
                      f"{rec['goal_prefill_2x']}); per CPU-second {rec['prefill_speedup_per_cpu_s']:.2f}x; peak RSS "
                      f"ratio {rec['peak_rss_ratio']:.2f}", flush=True)
        elif ok["homerun"]:  # transformers failed every round (e.g. out of memory): homerun's figures alone
            rec.update(homerun_prefill_tok_s_median=statistics.median([r["prefill_tok_s"] for r in ok["homerun"]]),
                       homerun_peak_rss_bytes=max(r["peak_rss_bytes"] for r in ok["homerun"]),
                       transformers_failed=sorted({e for r in runs["transformers"] for e in r.get("error", [])}))
            if not a.json:
                print(f"prompt {n}: transformers failed every round ({rec['transformers_failed'][0]}); homerun "
                      f"{rec['homerun_prefill_tok_s_median']:.2f} tok/s", flush=True)
        doc["prompts"][str(n)] = rec
    print(json.dumps(doc, indent=None if not a.json else 2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="an existing official-format V4 checkpoint (default: write a synthetic one)")
    ap.add_argument("--layers", type=int, default=3, help="synthetic layers (V4-Flash shapes)")
    ap.add_argument("--experts", type=int, default=48, help="synthetic routed experts per layer")
    ap.add_argument("--vocab", type=int, default=16384, help="synthetic vocabulary (V4: 129280); a small one keeps "
                    "the lm head from dominating a few-layer model, as the layers dominate the real 43/61-layer one")
    ap.add_argument("--root", help="where the synthetic checkpoint is written (default $HOMERUN_HOME/synthetic)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (prefill, not the compared figure)")
    ap.add_argument("--gen", type=int, default=16, help="greedy decode steps to time")
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps first (as llama-bench warms up)")
    ap.add_argument("--repeat", type=int, default=3, help="alternating rounds of both sides; medians are compared")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per side")
    ap.add_argument("--json", action="store_true", help="print only the JSON document")
    ap.add_argument("--expert-act", default="auto", help="homerun's expert activations: auto (int8 blocks where a "
                    "SIMD int8 kernel exists), fp32 (exact), int8, bf16")
    ap.add_argument("--prefill", help="prefill mode: comma-separated prompt lengths (e.g. 512,4096); compares prefill "
                    "tok/s (medians of alternating rounds) after an untimed --pre-warm prefill, no decode")
    ap.add_argument("--pre-warm", type=int, default=64, help="prefill mode: untimed warm-up prompt tokens first")
    ap.add_argument("--hf-chunk", type=int, default=0, help="prefill mode: feed transformers' prompt in chunks of "
                    "this many tokens through its cache (0: one pass; 512 fits 4096-token prompts in 24 GB)")
    ap.add_argument("--all-rows", action="store_true", help="homerun's last layer computes every row, not only the "
                    "rows a session reads (its default; on a 3-layer checkpoint a third of the work)")
    ap.add_argument("--worker", choices=("homerun", "transformers"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hf_chunk < 0:
        ap.error(f"--hf-chunk must be >= 0, got {a.hf_chunk} (0: one pass)")
    if a.worker:
        if a.worker == "homerun":
            print(json.dumps(worker_homerun(a.checkpoint, a.prompt, a.gen, a.warmup, a.expert_act, a.pre_warm,
                                            a.all_rows)))
        else:
            print(json.dumps(worker_transformers(a.checkpoint, a.prompt, a.gen, a.warmup, a.pre_warm, a.hf_chunk)))
        return 0
    ckpt = a.checkpoint
    t0 = time.perf_counter()
    if ckpt is None:
        ckpt, _ = build_checkpoint(a.layers, a.experts, a.vocab, a.root)
    write_s = time.perf_counter() - t0
    if a.prefill:
        return prefill_mode(a, ckpt, write_s)
    packed = _packed_bytes(ckpt)
    runs: dict[str, list[dict]] = {"homerun": [], "transformers": []}
    for _ in range(max(1, a.repeat)):
        for side in ("homerun", "transformers"):
            dram = _dram_gbps()
            r = run_side(side, ckpt, a.prompt, a.gen, a.warmup, a.timeout, a.expert_act)
            r["dram_read_gbps_before"] = dram
            runs[side].append(r)
    ok = {s: [r for r in rs if "error" not in r] for s, rs in runs.items()}
    doc = {"checkpoint": ckpt, "packed_bytes": packed, "checkpoint_ready_s": write_s, "prompt_tokens": a.prompt,
           "gen_tokens": a.gen, "warmup_tokens": a.warmup, "threads": os.cpu_count(), "repeat": a.repeat,
           "homerun": runs["homerun"], "transformers": runs["transformers"]}
    if ok["homerun"] and ok["transformers"]:
        med = {s: statistics.median([r["decode_tok_s"] for r in rs]) for s, rs in ok.items()}
        rss = {s: max(r["peak_rss_bytes"] for r in rs) for s, rs in ok.items()}
        h0, t0 = ok["homerun"][0], ok["transformers"][0]
        same = sum(x == y for x, y in zip(h0["tokens"], t0["tokens"]))
        pairs = [h["decode_tok_s"] / t["decode_tok_s"] for h, t in zip(runs["homerun"], runs["transformers"])
                 if "error" not in h and "error" not in t]
        doc.update(homerun_decode_tok_s_median=med["homerun"], transformers_decode_tok_s_median=med["transformers"],
                   decode_speedup=med["homerun"] / med["transformers"], decode_speedup_per_round=pairs,
                   peak_rss_ratio=rss["homerun"] / rss["transformers"],
                   greedy_tokens_agree=f"{same}/{len(h0['tokens'])}",
                   goal_decode_3x=med["homerun"] >= 3 * med["transformers"],
                   goal_half_rss=rss["homerun"] <= 0.5 * rss["transformers"])
    if not a.json:
        print(f"checkpoint {ckpt} ({packed / 1e9:.2f} GB packed), prompt {a.prompt}, decode {a.gen} tokens, "
              f"{a.repeat} alternating rounds")
        print(f"{'':14}{'load s':>9}{'prefill t/s':>13}{'decode t/s':>12}{'peak RSS GB':>13}{'DRAM GB/s':>11}  dtype")
        for i in range(max(1, a.repeat)):
            for side in ("homerun", "transformers"):
                s = runs[side][i]
                if "error" in s:
                    print(f"{side:14}error: {s['error']}")
                    continue
                dram = s["dram_read_gbps_before"]
                print(f"{side:14}{s['load_s']:9.1f}{s['prefill_tok_s']:13.2f}{s['decode_tok_s']:12.2f}"
                      f"{s['peak_rss_bytes'] / 1e9:13.2f}{dram if dram else float('nan'):11.1f}  {s['compute_dtype']}")
        if "decode_speedup" in doc:
            per = ", ".join(f"{x:.2f}" for x in doc["decode_speedup_per_round"])
            print(f"decode (medians) homerun {doc['homerun_decode_tok_s_median']:.2f} vs transformers "
                  f"{doc['transformers_decode_tok_s_median']:.2f} tok/s: speed-up {doc['decode_speedup']:.2f}x "
                  f"(goal >= 3x: {doc['goal_decode_3x']}; per round {per})")
            print(f"peak RSS ratio {doc['peak_rss_ratio']:.2f} (goal <= 0.5: {doc['goal_half_rss']}); greedy tokens "
                  f"agree {doc['greedy_tokens_agree']} (bf16 vs fp32 on random weights)")
    print(json.dumps(doc, indent=None if not a.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
