"""KV snapshots (issue 18): save and restore time against a re-prefill of the same tokens, and bytes on disk per
token against the plan's kv_bytes_per_token.

    python benchmarks/snapshot_bench.py tiny --tokens 65536 [--kv-dtype auto|bf16|fp8]
    python benchmarks/snapshot_bench.py synthetic --tokens 4096 [--kv-dtype ...]   # 1-layer real-shaped V4-Flash

`tiny`: the "mixed" tiny preset of tests/tiny.py (SWA + CSA + HCA, head_dim 128), written once under --cache.
`synthetic`: `homerun.bench.synthetic.build_synthetic("flash", n_layers=1)` (one CSA layer at V4-Flash's real
shapes, 5.7 GB; reused from HOMERUN_HOME/synthetic once written). Each run: prefill N random token ids (timed),
save, restore (timed; the file is in the page cache, so this is the warm-read figure; a cold read adds
file size / disk read speed), then check the restored session gives the live session's next logits bit for bit.
Prints one JSON record; --out appends it to a JSONL file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _model(which: str, cache: Path, kv_dtype: str, n: int):
    import homerun

    if which == "tiny":
        sys.path.insert(0, str(HERE.parent / "tests"))
        from tiny import make_checkpoint

        path = cache / "mixed-s0"
        if not (path / "config.json").is_file():
            path = make_checkpoint(cache, "mixed")
    else:
        from homerun.bench.synthetic import build_synthetic

        path = build_synthetic("flash", n_layers=1).path
    step = 1 << max(n, 1024).bit_length()
    return homerun.load(path, ramp_tokens=[step], kv_dtype=kv_dtype), path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=["tiny", "synthetic"])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--kv-dtype", default="auto", choices=["auto", "bf16", "fp8"])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "homerun-snapshot-bench")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    a.cache.mkdir(parents=True, exist_ok=True)

    import torch

    from homerun.plan.specs import kv_layout, parse_config

    model, path = _model(a.model, a.cache, a.kv_dtype, a.tokens)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.args.vocab_size, (a.tokens + 4,), generator=g).tolist()
    live = model.session()
    t0 = time.perf_counter()
    live.feed(ids[: a.tokens])
    prefill_s = time.perf_counter() - t0
    kv_bytes = live.kv_bytes

    snap = a.cache / f"{a.model}-{a.tokens}-{a.kv_dtype}.kv.safetensors"
    t0 = time.perf_counter()
    live.save(snap)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = model.restore(snap)
    restore_s = time.perf_counter() - t0
    exact = all(torch.equal(live.feed([t]), back.feed([t])) for t in ids[a.tokens :])

    size = snap.stat().st_size
    kv_dtype = model.stats()["kv_dtype"]
    plan_kv = kv_layout(parse_config(model.config), "fp8" if kv_dtype == "fp8" else "bf16")
    rec = {
        "model": a.model, "checkpoint": str(path), "tokens": a.tokens, "kv_dtype": kv_dtype,
        "n_layers": model.args.n_layers, "layer_kinds": list(model.args.layer_kinds),
        "prefill_s": round(prefill_s, 3), "prefill_tok_s": round(a.tokens / prefill_s, 1),
        "save_s": round(save_s, 3), "restore_s": round(restore_s, 3),
        "save_GBps": round(size / save_s / 1e9, 3), "restore_GBps": round(size / restore_s / 1e9, 3),
        "speedup_vs_prefill": round(prefill_s / restore_s, 1), "restored_logits_exact": exact,
        "file_bytes": size, "kv_bytes": kv_bytes, "overhead_bytes": size - kv_bytes,
        "file_bytes_per_token": round(size / a.tokens, 2),
        "runtime_kv_bytes_per_token": round(model.kv_bytes_at(a.tokens) / a.tokens, 2),
        "plan_kv_dtype": plan_kv.dtype, "plan_kv_bytes_per_token": plan_kv.bytes_per_token,
        "plan_kv_bytes_at_tokens": plan_kv.bytes_for(a.tokens),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
    }
    print(json.dumps(rec))
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
    snap.unlink()


if __name__ == "__main__":
    main()
