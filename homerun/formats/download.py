"""Fetch a DeepSeek-V4 checkpoint from the Hugging Face Hub: only the files inference needs, resumable, checked.

`download(repo)` asks the Hub which commit `revision` points to and which files it holds, then fetches the
weights (`*.safetensors` + index), `config.json`, `generation_config.json`, `tokenizer.json` and
`tokenizer_config.json` through `huggingface_hub.hf_hub_download`. That resumes interrupted files; files already
complete locally are skipped without a request. Afterwards every file's size is checked against the repo
metadata, every shard's header against its file size, and the shards' tensor bytes against the index's
`metadata.total_size`. The exact commit is recorded in `homerun-download.json` next to the files.

Files go to the Hugging Face cache by default (so `homerun.load("owner/name")` finds them offline) or to
`local_dir`. Progress is reported through a callback; nothing here prints.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Callable

from homerun.errors import CheckpointError, DownloadError, UnknownModelError

NEEDED_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
RECORD_FILE = "homerun-download.json"
# progress(done_bytes, total_bytes, current_file): bytes still to fetch in this run, not counting skipped files.
Progress = Callable[[int, int, str], None]
# fetch(repo_id, filename, revision, local_dir, tqdm_class) -> local path of the downloaded file.
Fetch = Callable[[str, str, str, "Path | None", Any], str]


@dataclass(frozen=True)
class DownloadedFile:
    name: str
    size_bytes: int
    skipped: bool  # already complete locally


@dataclass(frozen=True)
class DownloadResult:
    repo: str
    revision: str  # what was asked for (branch, tag or commit)
    commit: str  # the exact commit the files come from
    local_dir: str
    files: list[DownloadedFile] = field(default_factory=list)
    total_bytes: int = 0
    fetched_bytes: int = 0
    elapsed_s: float = 0.0

    @property
    def fetched_gbps(self) -> float:
        return self.fetched_bytes / 1e9 / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fetched_gbps"] = self.fetched_gbps
        return d


def is_needed(filename: str) -> bool:
    """Top-level files matching NEEDED_PATTERNS (no inference/ code, no original/ weights, no docs)."""
    return "/" not in filename and any(fnmatch(filename, p) for p in NEEDED_PATTERNS)


def _repo_listing(api: Any, repo: str, revision: str) -> tuple[str, dict[str, int | None]]:
    """(commit sha, {needed file: size or None}) from the Hub, with errors mapped to HomerunError."""
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = api.model_info(repo, revision=revision, files_metadata=True)
    except RepositoryNotFoundError as exc:
        raise UnknownModelError(f"{repo}: no such model repo on the Hub (or it is gated/private)",
                                hint="check the repo id; for gated repos log in with `hf auth login`") from exc
    except RevisionNotFoundError as exc:
        raise DownloadError(f"{repo}: revision {revision!r} does not exist", hint="pass a branch, tag or commit") from exc
    except OfflineModeIsEnabled as exc:
        raise DownloadError(f"{repo}: cannot reach the Hub while HF_HUB_OFFLINE is set",
                            hint="unset HF_HUB_OFFLINE to download") from exc
    except Exception as exc:  # noqa: BLE001 - HTTP/network errors come from several libraries; all mean the same
        raise DownloadError(f"{repo}: cannot list the repo ({type(exc).__name__}: {exc})",
                            hint="check the network (and HF_TOKEN for gated repos) and retry") from exc
    files = {s.rfilename: s.size for s in (info.siblings or []) if is_needed(s.rfilename)}
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        raise DownloadError(f"{repo}@{info.sha}: has no config.json or no *.safetensors files",
                            hint="this is not a safetensors model checkpoint")
    return str(info.sha), files


class _Tracker:
    """Turns huggingface_hub's per-file progress bars into one byte count. A file may get several bars (xet:
    reconstruction + transfer), so a file's progress is the largest any of its bars reached, capped at its size."""

    def __init__(self, total_bytes: int, progress: Progress | None) -> None:
        self.total_bytes = total_bytes
        self.progress = progress
        self.finished_bytes = 0
        self.file = ""
        self.file_size = 0
        self.file_done = 0

    def start(self, name: str, size: int) -> None:
        self.file, self.file_size, self.file_done = name, size, 0

    def bar_at(self, n: int) -> None:
        done = min(n, self.file_size) if self.file_size else n
        if done > self.file_done:
            self.file_done = done
            self._report()

    def finish(self) -> None:
        self.finished_bytes += self.file_size
        self.file_done = 0
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.finished_bytes + self.file_done, self.total_bytes, self.file)


def _tqdm_class(tracker: _Tracker):
    """A silent tqdm whose updates feed the tracker (hf_hub_download accepts any tqdm class)."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _Bar(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            self._homerun_n = int(kwargs.get("initial") or 0)
            super().__init__(*args, **kwargs)
            tracker.bar_at(self._homerun_n)

        def update(self, n: float | None = 1) -> bool | None:
            self._homerun_n += int(n or 0)
            tracker.bar_at(self._homerun_n)
            return super().update(n)

    return _Bar


def _hub_fetch(repo: str, filename: str, revision: str, local_dir: Path | None, tqdm_class: Any) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename, revision=revision, local_dir=local_dir, tqdm_class=tqdm_class)


def _local_copy(lookup: Callable[[str], str | None], filename: str, size: int | None) -> str | None:
    path = lookup(filename)
    if path and size is not None and Path(path).is_file() and Path(path).stat().st_size == size:
        return path
    return None


def _cache_lookup(repo: str, commit: str, local_dir: Path | None) -> Callable[[str], str | None]:
    if local_dir is not None:
        return lambda name: str(local_dir / name) if (local_dir / name).is_file() else None
    from huggingface_hub import try_to_load_from_cache

    def lookup(name: str) -> str | None:
        hit = try_to_load_from_cache(repo, name, revision=commit)
        return hit if isinstance(hit, str) else None

    return lookup


def verify_download(root: Path, sizes: dict[str, int | None]) -> None:
    """File sizes against the repo metadata, shard headers against file sizes, tensor bytes against the index."""
    from homerun.formats.loader import INDEX_FILE, read_shard_header

    for name, size in sizes.items():
        actual = (root / name).stat().st_size
        if size is not None and actual != size:
            raise DownloadError(f"{name}: {actual} bytes on disk, the repo says {size}",
                                hint="delete the file and run `homerun download` again")
    shards = sorted(n for n in sizes if n.endswith(".safetensors"))
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        return
    index = _read_json_object(index_path, DownloadError)
    weight_map = index.get("weight_map", {})
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise DownloadError(f"{INDEX_FILE}: weight_map is not an object of tensor name -> file name",
                            hint="the repo's index is corrupt at this revision")
    missing = sorted(set(weight_map.values()) - set(shards))
    if missing:
        raise DownloadError(f"{INDEX_FILE} names {missing[0]}, which the repo does not have",
                            hint="the repo is incomplete at this revision")
    payload = 0
    for name in shards:
        try:
            payload += sum(st.nbytes for st in read_shard_header(root / name).values())
        except CheckpointError as exc:
            raise DownloadError(exc.message, hint="delete the file and run `homerun download` again") from exc
    metadata = index.get("metadata") or {}
    want = metadata.get("total_size") if isinstance(metadata, dict) else None
    if want is not None and (isinstance(want, bool) or not isinstance(want, int)):
        raise DownloadError(f"{INDEX_FILE}: metadata.total_size = {want!r} is not an integer",
                            hint="the repo's index is corrupt at this revision")
    if want is not None and want != payload:
        raise DownloadError(f"shards hold {payload} tensor bytes, {INDEX_FILE} says metadata.total_size = {want}",
                            hint="the download is incomplete or mixes revisions; run `homerun download` again")


def download(
    repo: str,
    *,
    revision: str | None = None,
    local_dir: str | Path | None = None,
    api: Any = None,
    fetch: Fetch | None = None,
    progress: Progress | None = None,
) -> DownloadResult:
    """Download the needed files of `repo` at `revision` (default "main"); returns what was fetched and from which
    commit. `api` (an HfApi) and `fetch` are injectable for offline tests."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    fetch = fetch or _hub_fetch
    revision = revision or "main"
    target = Path(local_dir).expanduser() if local_dir is not None else None
    commit, sizes = _repo_listing(api, repo, revision)
    lookup = _cache_lookup(repo, commit, target)
    present = {name: _local_copy(lookup, name, size) for name, size in sizes.items()}
    todo = [name for name in sorted(sizes) if present[name] is None]
    tracker = _Tracker(sum(sizes[n] or 0 for n in todo), progress)
    bar = _tqdm_class(tracker)
    paths = {n: p for n, p in present.items() if p is not None}
    t0 = time.perf_counter()
    for name in todo:
        tracker.start(name, sizes[name] or 0)
        # The branch name (not the sha) keeps the cache's refs/<branch> pointing at this commit; the snapshot
        # directory each file lands in is checked against `commit` below.
        try:
            paths[name] = fetch(repo, name, revision, target, bar)
        except Exception as exc:  # noqa: BLE001 - as above: any transport error, same advice
            raise DownloadError(f"{repo}: fetching {name} failed ({type(exc).__name__}: {exc})",
                                hint="run the same command again: finished files are kept and partial ones resume") from exc
        tracker.finish()
    elapsed_s = time.perf_counter() - t0
    root = _common_root(paths, commit, target)
    verify_download(root, sizes)
    files = [DownloadedFile(n, (root / n).stat().st_size, present[n] is not None) for n in sorted(sizes)]
    result = DownloadResult(repo, revision, commit, str(root), files, sum(f.size_bytes for f in files),
                            tracker.total_bytes, elapsed_s)
    record = {**result.to_dict(), "downloaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (root / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return result


def _common_root(paths: dict[str, str], commit: str, target: Path | None) -> Path:
    """The one directory all files are in; in the HF cache that is snapshots/<commit>, which proves that every file
    comes from the same commit (the branch may have moved while we downloaded)."""
    if target is not None:
        return target
    roots = {Path(p).parent for p in paths.values()}
    if len(roots) != 1:
        raise DownloadError(f"files landed in {len(roots)} snapshot directories: the branch moved during the download",
                            hint="run `homerun download` again, or pass --revision with a commit sha")
    root = roots.pop()
    if root.parent.name == "snapshots" and root.name != commit:
        raise DownloadError(f"files come from commit {root.name}, the Hub said {commit}: the branch moved",
                            hint="run `homerun download` again, or pass --revision with a commit sha")
    return root


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The homerun-download.json of a checkpoint directory, or None if it was not fetched by `homerun download`."""
    p = Path(path) / RECORD_FILE
    return _read_json_object(p, CheckpointError) if p.is_file() else None


def _read_json_object(path: Path, error: type[Exception]) -> dict[str, Any]:
    """A JSON object from `path`, or `error` naming the file (unreadable, not UTF-8, not JSON, not an object)."""
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise error(f"{path}: not a readable JSON file ({exc})",
                    hint="delete it and run `homerun download` again") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, got {type(obj).__name__}",
                    hint="delete it and run `homerun download` again")
    return obj
