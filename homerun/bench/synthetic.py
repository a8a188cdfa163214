"""Random-weight official-format models with a shipped card's REAL per-layer shapes, for `homerun bench --synthetic`:
measure what a rig does with V4-Flash or V4-Pro before downloading 160 or 865 GB.

`build_synthetic(card)` writes (through `homerun.formats.checkpoint.write_checkpoint`) a checkpoint with the card's config
and as many layers as this machine holds (at least one; free RAM and free disk are checked). The layers are routed
(not hash) MoE layers in the card's mix of attention kinds (CSA/HCA/sliding, CSA first on a tie), since those are
the layers that dominate the full model. The MTP block is left out (plain decoding never runs it). Checkpoints live
in `$HOMERUN_HOME/synthetic/` (or a given root) and are reused when the same config and seed were written before by
the same writer (`WRITER_VERSION` is part of the directory's hash, so a newer writer never touches an older one's
directory, which a running process may have mapped). A write goes to a temporary directory renamed into place, under
a lock file, so concurrent builders of one checkpoint write it once and readers never see it half-written.

Not here: timing (homerun.bench.model_bench) and extrapolation to the full model (the bench does it through the planner).
The weights are random: output text is meaningless, only the bytes and the shapes are real.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

try:
    import fcntl
except ImportError:  # Windows: no advisory lock; the rename still keeps readers off a half-written one
    fcntl = None

from homerun.errors import DoesNotFitError, UnknownModelError, UsageError

MARKER_FILE = "homerun-synthetic.json"
# Keep the synthetic model's bytes within this share of available RAM, so the benchmark measures memory, not disk.
RAM_FRACTION = 0.6
DISK_FRACTION = 0.9
_KIND_ORDER = (4, 128, 0)  # CSA first on a tie: the costlier attention kind, so per-layer figures err on the slow side


@dataclass(frozen=True)
class SyntheticModel:
    path: Path
    card: str  # the card's repo id
    n_layers: int  # layers written
    card_layers: int  # layers of the full model
    compress_ratios: tuple[int, ...]
    seed: int
    total_bytes: int  # tensor payload on disk
    layer_bytes: int  # bytes one more layer adds
    fixed_bytes: int  # embedding, head, final norm, mHC head
    reused: bool
    write_s: float  # 0 when reused
    reason: str  # why this many layers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["compress_ratios"] = list(self.compress_ratios)
        return d


def card_config(card: str) -> tuple[str, dict[str, Any]]:
    """(repo id, config dict) of a shipped DeepSeek-V4 card (repo id or alias)."""
    from homerun.plan.specs import card_index, find_card, read_json

    hit = find_card(card)
    if hit is None:
        v4 = [r for r in card_index() if "V4" in r]
        raise UnknownModelError(f"--synthetic: no shipped card named {card!r}", hint=f"use one of: {', '.join(v4)}")
    repo, path = hit
    cfg = read_json(path)
    if cfg.get("model_type") != "deepseek_v4":
        raise UsageError(f"--synthetic needs a DeepSeek-V4 card, {repo} is {cfg.get('model_type')!r}",
                         hint="use deepseek-ai/DeepSeek-V4-Flash or deepseek-ai/DeepSeek-V4-Pro")
    return repo, cfg


def layer_mix(card_cfg: Mapping[str, Any], n_layers: int) -> list[int]:
    """compress_ratios for n routed layers in the proportions of the card's non-hash layers (largest deficit first)."""
    total = int(card_cfg["num_hidden_layers"])
    n_hash = int(card_cfg.get("num_hash_layers", 0))
    pool = [int(r) for r in card_cfg["compress_ratios"][n_hash:total]] or [int(r) for r in card_cfg["compress_ratios"][:total]]
    share = {k: pool.count(k) / len(pool) for k in _KIND_ORDER if k in pool}
    taken = {k: 0 for k in share}
    out = []
    for i in range(n_layers):
        kind = max(share, key=lambda k: (share[k] * (i + 1) - taken[k], -_KIND_ORDER.index(k)))
        taken[kind] += 1
        out.append(kind)
    return out


def synthetic_config(card_cfg: Mapping[str, Any], n_layers: int, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The card's config with n routed layers (no hash layers) in the card's attention mix; `overrides` replace
    fields afterwards (tests shrink the shapes this way)."""
    if n_layers < 1:
        raise UsageError(f"a synthetic model needs at least 1 layer, got {n_layers}")
    cfg = copy.deepcopy(dict(card_cfg))
    cfg["num_hidden_layers"] = n_layers
    cfg["num_hash_layers"] = 0
    cfg["compress_ratios"] = layer_mix(card_cfg, n_layers) + [0]  # trailing entry: the (unwritten) MTP block
    cfg.setdefault("expert_dtype", "fp4")
    cfg.update(copy.deepcopy(dict(overrides or {})))
    return cfg


def layer_and_fixed_bytes(cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(bytes of the largest routed layer kind in this config, fixed bytes), from the exact tensor layout (MTP
    excluded). Fixed = embedding, head, final norm and mHC head."""
    from homerun.formats.checkpoint import checkpoint_bytes

    fixed = checkpoint_bytes(dict(cfg, num_hidden_layers=0, compress_ratios=[0], num_hash_layers=0), include_mtp=False)
    kinds = set(int(r) for r in cfg["compress_ratios"][: int(cfg["num_hidden_layers"])]) or {4}
    per_layer = max(checkpoint_bytes(dict(cfg, num_hidden_layers=1, compress_ratios=[k, 0], num_hash_layers=0),
                                     include_mtp=False) for k in kinds) - fixed
    return per_layer, fixed


def layers_that_fit(card_cfg: Mapping[str, Any], overrides: Mapping[str, Any] | None, *, avail_ram_bytes: int,
                    free_disk_bytes: int) -> tuple[int, str]:
    """How many layers this machine holds (>= 1 when the disk takes one), and why."""
    per_layer, fixed = layer_and_fixed_bytes(synthetic_config(card_cfg, 1, overrides))
    by_ram = int((RAM_FRACTION * avail_ram_bytes - fixed) // per_layer)
    by_disk = int((DISK_FRACTION * free_disk_bytes - fixed) // per_layer)
    total = int(card_cfg["num_hidden_layers"])
    n = max(1, min(by_ram, by_disk, total))
    if by_disk < 1:
        raise DoesNotFitError(
            f"one synthetic layer needs {(fixed + per_layer) / 1e9:.1f} GB of disk, {free_disk_bytes / 1e9:.1f} GB free",
            hint="free disk space, or point --synthetic-dir at a bigger disk")
    why = (f"{n} of {total} layers: {per_layer / 1e9:.2f} GB per layer + {fixed / 1e9:.2f} GB fixed; "
           f"{RAM_FRACTION:.0%} of {avail_ram_bytes / 2**30:.1f} GiB available RAM holds {max(by_ram, 0)}, "
           f"{DISK_FRACTION:.0%} of {free_disk_bytes / 2**30:.1f} GiB free disk holds {by_disk}")
    if by_ram < 1:
        why += "; RAM holds less than one layer, so pages will come from disk during the run"
    return n, why


def default_root() -> Path:
    from homerun.plan.hardware import homerun_home

    return homerun_home() / "synthetic"


def _config_sha(cfg: Mapping[str, Any], seed: int) -> str:
    from homerun.formats.checkpoint import WRITER_VERSION

    key = {"config": cfg, "seed": seed, "writer": WRITER_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _complete(path: Path, sha: str) -> bool:
    """A finished write of this config and seed by this writer (an older writer's bytes differ: written again)."""
    from homerun.formats.checkpoint import WRITER_VERSION

    marker = path / MARKER_FILE
    if not marker.is_file() or not (path / "model.safetensors.index.json").is_file():
        return False
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return done.get("config_sha") == sha and done.get("writer") == WRITER_VERSION


@contextlib.contextmanager
def _write_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (held until the block ends; the kernel drops it if the process dies)."""
    if fcntl is None:
        yield
        return
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the finished write into place. What was there (an interrupted or stale write) is renamed aside first and
    then removed: its files are unlinked, never truncated, so a process that mapped them keeps reading its bytes."""
    old = None
    if path.exists():
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_synthetic(
    card: str,
    *,
    n_layers: int | None = None,
    root: str | Path | None = None,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> SyntheticModel:
    """Write (or reuse) the synthetic checkpoint of `card`; n_layers None = as many as this machine holds."""
    import psutil

    from homerun.formats.checkpoint import WRITER_VERSION, checkpoint_bytes, write_checkpoint

    repo, card_cfg = card_config(card)
    root = Path(root) if root is not None else default_root()
    root.mkdir(parents=True, exist_ok=True)
    if n_layers is None:
        n_layers, why = layers_that_fit(card_cfg, overrides, avail_ram_bytes=psutil.virtual_memory().available,
                                        free_disk_bytes=shutil.disk_usage(root).free)
    else:
        why = f"{n_layers} layers requested"
    cfg = synthetic_config(card_cfg, n_layers, overrides)
    per_layer, fixed = layer_and_fixed_bytes(cfg)
    total = checkpoint_bytes(cfg, include_mtp=False)
    sha = _config_sha(cfg, seed)
    slug = repo.split("/")[-1].lower()
    path = root / f"{slug}-L{n_layers}-s{seed}-{sha[:10]}"
    common = dict(card=repo, n_layers=n_layers, card_layers=int(card_cfg["num_hidden_layers"]),
                  compress_ratios=tuple(cfg["compress_ratios"][:n_layers]), seed=seed, total_bytes=total,
                  layer_bytes=per_layer, fixed_bytes=fixed, reason=why)
    if _complete(path, sha):
        return SyntheticModel(path=path, reused=True, write_s=0.0, **common)
    free = shutil.disk_usage(root).free
    if total > DISK_FRACTION * free:
        raise DoesNotFitError(f"the synthetic {repo} with {n_layers} layers needs {total / 1e9:.1f} GB, "
                              f"{free / 1e9:.1f} GB free under {root}", hint="use fewer --synthetic-layers")
    with _write_lock(root / f"{path.name}.lock"):
        if _complete(path, sha):  # another process wrote it while this one waited for the lock
            return SyntheticModel(path=path, reused=True, write_s=0.0, **common)
        t0 = time.perf_counter()
        tmp = root / f"{path.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)  # this pid's interrupted earlier write
        write_checkpoint(tmp, cfg, seed=seed, include_mtp=False, progress=progress)
        write_s = time.perf_counter() - t0
        (tmp / MARKER_FILE).write_text(json.dumps({"config_sha": sha, "card": repo, "seed": seed,
                                                   "n_layers": n_layers, "writer": WRITER_VERSION,
                                                   "write_s": write_s}, indent=2) + "\n")
        _swap_in(tmp, path)
    return SyntheticModel(path=path, reused=False, write_s=write_s, **common)
