"""`homerun download` offline: a fake Hub (HfApi.model_info + a fetch that copies from a tiny checkpoint) drives the
real file selection, skip/resume, size checks, commit record and CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoSibling
from typer.testing import CliRunner

import homerun.formats.download as dl
from homerun.formats.download import RECORD_FILE, download, is_needed, read_record
from homerun.errors import DownloadError, UnknownModelError

COMMIT = "60d8d7070000000000000000000000000000abcd"
EXTRA = {"README.md": b"# card", "inference/model.py": b"print()", "original/x.safetensors": b"xx",
         "encoding/encoding_dsv4.py": b"pass"}


class FakeHub:
    """model_info lists a tiny checkpoint plus files we must not fetch; fetch copies one file (feeding progress)."""

    def __init__(self, source: Path, *, sizes: dict[str, int] | None = None, exc: Exception | None = None):
        self.source = source
        self.fetched: list[str] = []
        self.exc = exc
        real = {p.name: p.stat().st_size for p in source.iterdir()}
        self.sizes = {**real, **{k: len(v) for k, v in EXTRA.items()}, **(sizes or {})}

    def model_info(self, repo, *, revision=None, files_metadata=False):
        if self.exc is not None:
            raise self.exc
        assert files_metadata
        return SimpleNamespace(sha=COMMIT, siblings=[RepoSibling(rfilename=n, size=s) for n, s in self.sizes.items()])

    def fetch(self, repo, filename, revision, local_dir, tqdm_class):
        assert is_needed(filename), filename
        self.fetched.append(filename)
        data = (self.source / filename).read_bytes()
        bar = tqdm_class(total=len(data), initial=0, unit="B")
        for i in range(0, len(data), 1 << 18):
            bar.update(len(data[i:i + (1 << 18)]))
        bar.close()
        dest = (local_dir or self.source.parent / "cache" / "snapshots" / COMMIT) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return str(dest)


@pytest.fixture
def source(tmp_path, tiny_checkpoint):
    src = tmp_path / "hub"
    shutil.copytree(tiny_checkpoint, src)
    return src


def test_selects_only_needed_files():
    assert is_needed("model-00001-of-00046.safetensors") and is_needed("tokenizer.json")
    assert is_needed("model.safetensors.index.json") and is_needed("generation_config.json")
    for name in EXTRA:
        assert not is_needed(name), name


def test_download_then_resume_skips_complete_files(tmp_path, source):
    hub = FakeHub(source)
    seen = []
    res = download("deepseek-ai/Tiny", local_dir=tmp_path / "out", api=hub, fetch=hub.fetch,
                   progress=lambda d, t, n: seen.append((d, t)))
    names = sorted(p.name for p in source.iterdir())
    assert sorted(hub.fetched) == names and [f.name for f in res.files] == names
    assert res.commit == COMMIT and res.revision == "main" and res.local_dir == str(tmp_path / "out")
    assert res.fetched_bytes == res.total_bytes == sum((source / n).stat().st_size for n in names)
    assert seen[-1] == (res.total_bytes, res.total_bytes)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    rec = read_record(tmp_path / "out")
    assert rec["commit"] == COMMIT and rec["repo"] == "deepseek-ai/Tiny" and len(rec["files"]) == len(names)
    for n in names:
        assert (tmp_path / "out" / n).read_bytes() == (source / n).read_bytes()

    # A second run fetches only what is missing or incomplete.
    shard = next(n for n in names if n.endswith(".safetensors"))
    (tmp_path / "out" / "config.json").unlink()
    p = tmp_path / "out" / shard
    p.write_bytes(p.read_bytes()[:100])
    hub2 = FakeHub(source)
    res2 = download("deepseek-ai/Tiny", local_dir=tmp_path / "out", api=hub2, fetch=hub2.fetch)
    assert sorted(hub2.fetched) == sorted(["config.json", shard])
    assert sum(f.skipped for f in res2.files) == len(names) - 2
    assert res2.fetched_bytes == (source / "config.json").stat().st_size + (source / shard).stat().st_size


def test_size_mismatch_with_repo_metadata(tmp_path, source):
    hub = FakeHub(source, sizes={"tokenizer.json": 12})
    with pytest.raises(DownloadError, match="tokenizer.json"):
        download("r/x", local_dir=tmp_path / "out", api=hub, fetch=hub.fetch)
    assert not (tmp_path / "out" / RECORD_FILE).exists()


def test_truncated_shard_is_caught(tmp_path, source):
    shard = sorted(source.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-64])  # the repo itself lists the short size
    hub = FakeHub(source)
    with pytest.raises(DownloadError, match=shard.name):
        download("r/x", local_dir=tmp_path / "out", api=hub, fetch=hub.fetch)


def test_index_total_size_mismatch(tmp_path, source):
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] += 1
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    hub = FakeHub(source)
    with pytest.raises(DownloadError, match="total_size"):
        download("r/x", local_dir=tmp_path / "out", api=hub, fetch=hub.fetch)


def test_cache_mode_checks_the_snapshot_commit(tmp_path, source):
    hub = FakeHub(source)
    res = download("r/x", api=hub, fetch=hub.fetch)  # no local_dir: files land in the (fake) cache snapshot
    assert Path(res.local_dir).name == COMMIT and read_record(res.local_dir)["commit"] == COMMIT

    def moved(repo, filename, revision, local_dir, tqdm_class):
        path = Path(hub.fetch(repo, filename, revision, local_dir, tqdm_class))
        other = path.parent.parent / ("f" * 40) / filename
        other.parent.mkdir(parents=True, exist_ok=True)
        return str(path.replace(other))

    shutil.rmtree(source.parent / "cache")
    with pytest.raises(DownloadError, match="branch moved"):
        download("r/x", api=hub, fetch=moved)


def test_hub_errors_are_homerun_errors(tmp_path, source):
    missing = RepositoryNotFoundError("404", response=SimpleNamespace(headers={}, status_code=404, request=None))
    for exc, kind in ((missing, UnknownModelError), (OfflineModeIsEnabled("offline"), DownloadError),
                      (ConnectionError("down"), DownloadError)):
        hub = FakeHub(source, exc=exc)
        with pytest.raises(kind) as info:
            download("r/x", local_dir=tmp_path, api=hub, fetch=hub.fetch)
        assert "r/x" in info.value.message and info.value.hint

    def broken(*args):
        raise ConnectionResetError("reset by peer")

    with pytest.raises(DownloadError, match="resume|reset") as info:
        download("r/x", local_dir=tmp_path / "o", api=FakeHub(source), fetch=broken)
    assert "again" in info.value.hint


def test_not_a_checkpoint_repo(tmp_path, source):
    for p in source.glob("*.safetensors"):
        p.unlink()
    hub = FakeHub(source)
    with pytest.raises(DownloadError, match="safetensors"):
        download("r/x", local_dir=tmp_path / "o", api=hub, fetch=hub.fetch)


def test_cli_json(tmp_path, source, monkeypatch):
    from homerun.cli.app import app

    hub = FakeHub(source)
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: hub)
    monkeypatch.setattr(dl, "_hub_fetch", hub.fetch)
    result = CliRunner().invoke(app, ["download", "deepseek-ai/Tiny", "--local-dir", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["commit"] == COMMIT and doc["total_bytes"] > 0 and len(doc["files"]) == len(list(source.iterdir()))
    assert {"name", "size_bytes", "skipped"} <= set(doc["files"][0])
    human = CliRunner().invoke(app, ["download", "deepseek-ai/Tiny", "--local-dir", str(tmp_path / "o")])
    assert human.exit_code == 0 and COMMIT in human.stdout and "already complete" in human.stdout
    hub.exc = RepositoryNotFoundError("404", response=SimpleNamespace(headers={}, status_code=404, request=None))
    result = CliRunner().invoke(app, ["download", "nobody/nothing", "--json"])
    # CliRunner bypasses cli._App.__call__, which would turn this into "Error: ..." and exit code 2.
    assert isinstance(result.exception, UnknownModelError) and result.exception.exit_code == 2
    assert result.stdout == ""
