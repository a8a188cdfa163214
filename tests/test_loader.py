"""The checkpoint loader: zero-copy stored-dtype tensors, experts as an ExpertSource, and a named error for every
kind of broken checkpoint (truncated shard, missing/extra/mistyped/misshaped tensor, missing file, bad config)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from homerun.errors import CheckpointError, ConfigError, ExitCode
from homerun.formats.loader import QUIRKS, open_checkpoint, read_shard_header
from homerun.formats.quant import dequant_fp4
from homerun.formats.v4_layout import v4_tensors
from offload.base import ReferenceExpertBackend
from conftest import REFERENCE, needs_reference
from tiny import make_checkpoint

INDEX = "model.safetensors.index.json"


@pytest.fixture
def ckpt_dir(tmp_path, tiny_checkpoint):
    """A private copy of the session's "mixed" checkpoint, free to break (copying is faster than rewriting)."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "mixed")


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())


def _rewrite_shard(path, tensor_name, edit):
    """Rewrite the shard holding `tensor_name` with edit(dict of tensors) applied; keeps the index in sync."""
    index = _index(path)
    fname = index["weight_map"][tensor_name]
    with safe_open(str(path / fname), framework="pt") as f:
        tensors = {n: f.get_tensor(n).clone() for n in f.keys()}
    edit(tensors)
    save_file(tensors, str(path / fname))
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != fname}
    index["weight_map"].update({n: fname for n in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return fname


def _error(path, exc_type=CheckpointError):
    with pytest.raises(exc_type) as info:
        open_checkpoint(path)
    assert info.value.exit_code == ExitCode.USAGE and info.value.hint
    return info.value.message


def test_opens_and_matches_layout(tiny_checkpoints):
    for kind, path in tiny_checkpoints.items():
        ckpt = open_checkpoint(path)
        cfg = json.loads((path / "config.json").read_text())
        assert ckpt.config == cfg and ckpt.quirks == ()
        assert ckpt.names == [t.name for t in v4_tensors(cfg)]
        assert ckpt.nbytes == _index(path)["metadata"]["total_size"]
        assert ckpt.has_mtp and ckpt.expert_dtype == "fp4"
        assert ckpt.generation_config["temperature"] == 1.0
        assert ckpt.file_bytes > ckpt.nbytes


def test_get_returns_stored_dtypes_zero_copy(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    expect = {
        "embed.weight": torch.bfloat16, "hc_head_fn": torch.float32, "layers.1.attn.wq_a.weight": torch.float8_e4m3fn,
        "layers.1.attn.wq_a.scale": torch.float8_e8m0fnu, "layers.2.ffn.experts.0.w1.weight": torch.int8,
        "layers.0.ffn.gate.tid2eid": torch.int64,
    }
    for name, dtype in expect.items():
        a, b = ckpt.get(name), ckpt.get(name)
        assert a.dtype == dtype and tuple(a.shape) == ckpt.layout[name].shape
        assert a.data_ptr() == b.data_ptr()  # both views of the same mapped pages, not copies
    with safe_open(str(tiny_checkpoint / ckpt.stored("embed.weight").file), framework="pt") as f:
        assert torch.equal(ckpt.get("embed.weight"), f.get_tensor("embed.weight"))
    with pytest.raises(CheckpointError, match="layers.99"):
        ckpt.get("layers.99.attn.wq_a.weight")


def test_expert_source(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    cfg = ckpt.config
    w = ckpt.expert(2, 7)
    assert w.fmt == "fp4" and torch.equal(w.w2, ckpt.get("layers.2.ffn.experts.7.w2.weight"))
    w1, _, _ = w.dequant()
    assert torch.equal(w1, dequant_fp4(ckpt.get("layers.2.ffn.experts.7.w1.weight"),
                                      ckpt.get("layers.2.ffn.experts.7.w1.scale")))
    assert w1.shape == (cfg["moe_intermediate_size"], cfg["hidden_size"])
    mtp = ckpt.expert(cfg["num_hidden_layers"], 0)  # the MTP block follows the main layers
    assert torch.equal(mtp.w1, ckpt.get("mtp.0.ffn.experts.0.w1.weight"))
    backend = ReferenceExpertBackend(ckpt.expert, swiglu_limit=cfg["swiglu_limit"])
    x = torch.randn(3, cfg["hidden_size"])
    y = backend.forward(2, x, torch.tensor([[0, 1], [1, 2], [0, 2]]), torch.full((3, 2), 0.5))
    assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().sum() > 0


def test_truncated_shard(ckpt_dir):
    shard = ckpt_dir / "model-00002-of-00006.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    msg = _error(ckpt_dir)
    assert "truncated" in msg and shard.name in msg
    cut = read_shard_header(ckpt_dir / "model-00001-of-00006.safetensors")  # intact shards still parse
    assert cut


def test_truncated_header(ckpt_dir):
    shard = ckpt_dir / "model-00003-of-00006.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    assert shard.name in _error(ckpt_dir)


def test_missing_tensor(ckpt_dir):
    name = "layers.1.attn.indexer.wq_b.scale"
    _rewrite_shard(ckpt_dir, name, lambda t: t.pop(name))
    msg = _error(ckpt_dir)
    assert name in msg and "missing" in msg and str(ckpt_dir) in msg


def test_missing_tensor_still_in_index(ckpt_dir):
    name = "layers.2.ffn.experts.3.w3.scale"
    fname = _index(ckpt_dir)["weight_map"][name]
    _rewrite_shard(ckpt_dir, name, lambda t: t.pop(name))
    index = _index(ckpt_dir)
    index["weight_map"][name] = fname  # the index still promises it
    (ckpt_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = _error(ckpt_dir)
    assert name in msg and fname in msg and "no shard holds it" in msg


def test_wrong_dtype(ckpt_dir):
    name = "layers.2.attn.wkv.weight"

    def edit(t):
        t[name] = t[name].to(torch.bfloat16)

    fname = _rewrite_shard(ckpt_dir, name, edit)
    msg = _error(ckpt_dir)
    assert name in msg and fname in msg and "BF16" in msg and "F8_E4M3" in msg


def test_wrong_shape(ckpt_dir):
    name = "layers.0.attn.attn_sink"

    def edit(t):
        t[name] = torch.zeros(t[name].shape[0] + 1)

    fname = _rewrite_shard(ckpt_dir, name, edit)
    msg = _error(ckpt_dir)
    assert name in msg and fname in msg and "shape" in msg


def test_extra_tensor(ckpt_dir):
    fname = _rewrite_shard(ckpt_dir, "embed.weight", lambda t: t.update({"layers.0.attn.bogus": torch.zeros(2)}))
    msg = _error(ckpt_dir)
    assert "layers.0.attn.bogus" in msg and fname in msg


def test_index_names_missing_file(ckpt_dir):
    (ckpt_dir / "model-00004-of-00006.safetensors").unlink()
    msg = _error(ckpt_dir)
    assert "model-00004-of-00006.safetensors" in msg and "does not exist" in msg


def test_index_disagrees_with_shard(ckpt_dir):
    index = _index(ckpt_dir)
    index["weight_map"]["norm.weight"] = "model-00006-of-00006.safetensors"
    (ckpt_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "norm.weight" in _error(ckpt_dir)


@pytest.mark.parametrize(
    "field, value",
    [("hidden_size", 0), ("n_routed_experts", "8"), ("compress_ratios", [0, 4]), ("compress_ratios", [0, 3, 128, 0]),
     ("num_experts_per_tok", 99), ("o_groups", 3), ("qk_rope_head_dim", 256), ("expert_dtype", "int4"),
     ("model_type", "llama"), ("num_hash_layers", -1)],
)
def test_bad_config_field(ckpt_dir, field, value):
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    cfg[field] = value
    (ckpt_dir / "config.json").write_text(json.dumps(cfg))
    assert repr(field) in _error(ckpt_dir, ConfigError)


def test_config_not_json(ckpt_dir):
    (ckpt_dir / "config.json").write_text("{not json")
    assert "config.json" in _error(ckpt_dir, ConfigError)


def test_mtp_absent_is_allowed_partial_is_not(tmp_path, ckpt_dir):
    bare = open_checkpoint(make_checkpoint(tmp_path, "mixed", include_mtp=False))
    assert not bare.has_mtp and not any(n.startswith("mtp.") for n in bare.names)
    name = "mtp.0.e_proj.weight"
    _rewrite_shard(ckpt_dir, name, lambda t: t.pop(name))
    assert name in _error(ckpt_dir)


def test_quirk_initial_flash_revision_without_expert_dtype(ckpt_dir):
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    del cfg["expert_dtype"]
    (ckpt_dir / "config.json").write_text(json.dumps(cfg))
    ckpt = open_checkpoint(ckpt_dir)
    assert ckpt.expert_dtype == "fp4" and ckpt.expert(1, 0).fmt == "fp4"
    assert [q.name for q in ckpt.quirks] == ["flash-initial-expert-dtype"] and QUIRKS[0] in ckpt.quirks


def test_single_file_checkpoint_without_index(tmp_path, tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    out = tmp_path / "single"
    out.mkdir()
    save_file({n: ckpt.get(n) for n in ckpt.names}, str(out / "model.safetensors"))
    shutil.copy(tiny_checkpoint / "config.json", out / "config.json")
    single = open_checkpoint(out)
    assert single.names == ckpt.names and single.files == ["model.safetensors"]
    assert single.generation_config == {}


def test_not_a_directory(tmp_path):
    assert "not a checkpoint directory" in _error(tmp_path / "nope")


_RSS_PROBE = r"""
import json, sys, time, torch
from homerun.formats.loader import open_checkpoint

def status():
    d = dict(l.split(':', 1) for l in open('/proc/self/status'))
    return {k: int(d[k].split()[0]) * 1024 for k in ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile')}

before = status()
t0 = time.perf_counter()
ckpt = open_checkpoint(sys.argv[1])
open_s = time.perf_counter() - t0
after_open = status()
t0 = time.perf_counter()
checksum = 0
for name in ckpt.names:  # read one byte of every 4 KiB page: the kernel maps in every page, as a full load would
    t = ckpt.get(name).reshape(-1).view(torch.uint8)
    checksum += int(t[::4096].sum(dtype=torch.int64))
touch_s = time.perf_counter() - t0
print(json.dumps({"checksum": checksum, "nbytes": ckpt.nbytes, "file_bytes": ckpt.file_bytes, "open_s": open_s, "touch_s": touch_s,
                  "before": before, "after_open": after_open, "after_touch": status()}))
"""


@pytest.mark.slow
def test_peak_rss_real_shaped_flash_layer(tmp_path):
    """Issue 3: peak RSS while loading <= 1.1 x checkpoint bytes + 1 GiB, on V4-Flash's real per-layer shapes
    (hidden 4096, 256 FP4 experts, vocab 129280; one CSA layer, no MTP: ~5.9 GB). Minutes and ~6 GB of disk."""
    import subprocess
    import sys

    from homerun.formats.checkpoint import flash_shaped_config, write_checkpoint

    path = tmp_path / "flash-1layer"
    try:
        write_checkpoint(path, flash_shaped_config(1), include_mtp=False)
        proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path)], capture_output=True, text=True,
                              timeout=1800, check=True)
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(m, indent=1))
        assert m["after_open"]["RssAnon"] - m["before"]["RssAnon"] < 256 * 2**20  # validation maps no tensor data
        assert m["after_touch"]["VmHWM"] <= 1.1 * m["nbytes"] + 2**30
        # The tensor bytes are file-backed pages (page cache), not anonymous copies.
        assert m["after_touch"]["RssAnon"] - m["before"]["RssAnon"] < 512 * 2**20
    finally:
        shutil.rmtree(path, ignore_errors=True)


@needs_reference()
def test_validates_the_real_flash_inventory_on_sparse_shards(tmp_path):
    """Conformance: V4-Flash's published inventory (69,187 tensors) written as sparse shards (headers only, holes for
    data: ~0 disk) under the initial revision's config.json (no expert_dtype) opens cleanly via the quirk table."""
    import gzip

    from homerun.formats.checkpoint import _header_bytes, _plan_shards
    from homerun.formats.v4_layout import TensorInfo

    cfg = json.loads((REFERENCE / "flash-config.json").read_text())
    assert "expert_dtype" not in cfg
    inventory = json.loads(gzip.open(REFERENCE / "flash-tensor-inventory.json.gz").read())
    tensors = [TensorInfo(n, tuple(s), d, c) for n, s, d, c in inventory]
    shards = _plan_shards(tensors, 3_500_000_000)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        head = _header_bytes(shard)
        with open(tmp_path / fname, "wb") as f:
            f.write(head)
            f.truncate(len(head) + sum(t.nbytes for t in shard))  # a hole: no disk blocks
        weight_map.update({t.name: fname for t in shard})
    total = sum(t.nbytes for t in tensors)
    (tmp_path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ckpt = open_checkpoint(tmp_path)
    assert len(ckpt.names) == 69187 and ckpt.nbytes == 159_609_485_896 == total
    assert ckpt.expert_dtype == "fp4" and [q.name for q in ckpt.quirks] == ["flash-initial-expert-dtype"]
    assert ckpt.has_mtp and ckpt.expert(42, 255).w1.shape == (2048, 2048)
