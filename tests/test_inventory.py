"""Byte inventories: the exact V4 figures from the cards alone and from the shipped inventories read as headers,
per-expert bytes of the other formats, and local / Hub header reading."""

import json
import math
import struct

import pytest

from homerun.plan import inventory

from conftest import REFERENCE, needs_reference
from homerun.errors import CheckpointError, UnknownModelError
from homerun.plan.inventory import (DTYPE_BYTES, classify, inventory_file_tensors, inventory_from_config,
                               inventory_from_tensors, resolve_model, synth_tensors)
from homerun.plan.specs import load_card, parse_config

FLASH_TOTAL, FLASH_TENSORS, FLASH_PER_EXPERT = 159_609_485_896, 69_187, 13_369_344
PRO_TOTAL, PRO_TENSORS, PRO_PER_EXPERT = 864_704_792_696, 145_116, 35_094_528


def _check_flash(inv):
    assert inv.total_bytes == FLASH_TOTAL
    assert inv.tensor_count == FLASH_TENSORS
    assert round(inv.routed_expert_bytes / 1e9, 3) == 147.170
    assert inv.bytes_per_expert == FLASH_PER_EXPERT
    assert round(inv.non_expert_bytes / 1e9, 3) == 8.846
    assert inv.routed_expert_bytes == 43 * 256 * FLASH_PER_EXPERT


def _check_pro(inv):
    assert inv.total_bytes == PRO_TOTAL
    assert inv.tensor_count == PRO_TENSORS
    assert inv.bytes_per_expert == PRO_PER_EXPERT
    assert round(inv.routed_expert_bytes / 1e9, 3) == 822.054  # deepseek-v4.md §4.5
    assert round(inv.non_expert_bytes / 1e9, 3) == 28.694


def test_v4_figures_from_cards_alone():
    _check_flash(inventory_from_config(load_card("deepseek-ai/DeepSeek-V4-Flash")))
    _check_pro(inventory_from_config(load_card("deepseek-ai/DeepSeek-V4-Pro")))


def test_v4_active_params_match_the_doc():
    # deepseek-v4.md §1: active per token (main, without the embedding, with lm_head) Flash 13.27B, Pro 48.85B.
    assert round(inventory_from_config(load_card("v4-flash")).active_params_per_token / 1e9, 2) == 13.27
    assert round(inventory_from_config(load_card("v4-pro")).active_params_per_token / 1e9, 2) == 48.85


def test_flash_0731_backbone_equals_flash_without_mtp():
    inv = inventory_from_config(load_card("v4-flash-0731"))
    assert inv.total_bytes == 156_015_698_140  # §3.12: 166,878,536,440 - 10,862,838,300 DSpark
    assert inv.mtp_bytes == 0 and inv.notes


@needs_reference()
@pytest.mark.parametrize("which,check", [("flash", _check_flash), ("pro", _check_pro)])
def test_v4_figures_from_shipped_inventories_as_headers(which, check):
    spec = load_card(f"v4-{which}")
    rows = inventory_file_tensors(REFERENCE / f"{which}-tensor-inventory.json.gz")
    check(inventory_from_tensors(spec, rows, "inventory file"))


@needs_reference()
def test_name_classifier_matches_the_inventory_classes():
    import gzip

    spec = load_card("v4-flash")
    with gzip.open(REFERENCE / "flash-tensor-inventory.json.gz", "rt") as f:
        rows = json.load(f)
    wrong = [(n, c) for n, _, _, c in rows if classify(spec, n) != ("mtp" if c.startswith("mtp_") else c)]
    assert not wrong[:5]


def test_v3_fp8_expert_bytes_include_fp32_scale_inv():
    spec = load_card("deepseek-ai/DeepSeek-V3")
    inv = inventory_from_config(spec)
    d, i = 7168, 2048
    scale = 4 * math.ceil(i / 128) * math.ceil(d / 128)  # fp32 per 128x128 block, same grid for [i,d] and [d,i]
    assert inv.bytes_per_expert == 3 * (d * i + scale)
    assert spec.moe_layers == 61 - 3 and inv.mtp_bytes > 0


def test_gpt_oss_mxfp4_expert_bytes():
    spec = load_card("openai/gpt-oss-120b")
    d, i = 2880, 2880
    packed = (2 * i * d + d * i) // 2  # two FP4 codes per byte
    scales = (2 * i * d + d * i) // 32  # one e8m0 byte per 32 weights
    bias = (2 * i + d) * 2  # bf16 biases, per expert
    assert inventory_from_config(spec).bytes_per_expert == packed + scales + bias


@pytest.mark.parametrize("model", ["qwen3-235b", "qwen3-30b", "mixtral"])
def test_bf16_expert_bytes(model):
    spec = load_card(model)
    assert inventory_from_config(spec).bytes_per_expert == 3 * spec.hidden_size * spec.moe_intermediate_size * 2


# ---- headers: local directories ----------------------------------------------------------------------------------


def _write_safetensors(path, tensors):
    header, offset = {}, 0
    for name, shape, dtype in tensors:
        n = DTYPE_BYTES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.write(b"\0" * offset)


def _write_checkpoint(directory, config, tensors, shards=2):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    tensors = list(tensors)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = tensors[s::shards]
        _write_safetensors(directory / name, part)
        weight_map.update({t[0]: name for t in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


TINY = {
    "deepseek_v4": dict(model_type="deepseek_v4", hidden_size=256, num_hidden_layers=3, num_attention_heads=4, head_dim=128,
                        q_lora_rank=128, o_groups=2, o_lora_rank=128, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=128, index_n_heads=2, index_head_dim=64, vocab_size=512,
                        compress_ratios=[0, 4, 128, 0], num_hash_layers=1, num_nextn_predict_layers=1, expert_dtype="fp4",
                        max_position_embeddings=4096, sliding_window=128, qk_rope_head_dim=64),
    "deepseek_v3": dict(model_type="deepseek_v3", hidden_size=256, num_hidden_layers=3, first_k_dense_replace=1,
                        intermediate_size=512, num_attention_heads=4, kv_lora_rank=128, q_lora_rank=128,
                        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=4, n_shared_experts=1,
                        num_experts_per_tok=2, moe_intermediate_size=128, vocab_size=512, max_position_embeddings=4096,
                        num_nextn_predict_layers=1, quantization_config={"quant_method": "fp8"}),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      vocab_size=512, max_position_embeddings=4096),
    "mixtral": dict(model_type="mixtral", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=256,
                    vocab_size=512, max_position_embeddings=4096),
    "gpt_oss": dict(model_type="gpt_oss", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2,
                    intermediate_size=128, vocab_size=512, max_position_embeddings=4096, sliding_window=8,
                    quantization_config={"quant_method": "mxfp4"}),
}


def _tensors_for(spec):
    if spec.arch == "deepseek_v4":
        from homerun.formats.v4_layout import v4_tensors

        return [(t.name, t.shape, t.dtype) for t in v4_tensors(dict(spec.config))]
    return list(synth_tensors(spec))


@pytest.mark.parametrize("arch", list(TINY))
def test_local_headers_match_config_inventory(tmp_path, arch):
    spec = parse_config(TINY[arch], name="tiny")
    ckpt = tmp_path / "tiny"
    _write_checkpoint(ckpt, TINY[arch], _tensors_for(spec))
    spec2, from_headers = resolve_model(str(ckpt))
    from_config = inventory_from_config(spec)
    assert from_headers.source.startswith("safetensors headers")
    for key in ("total_bytes", "tensor_count", "bytes_by_class", "routed_expert_bytes", "bytes_per_expert",
                "non_expert_bytes", "mtp_bytes", "active_params_per_token"):
        assert getattr(from_headers, key) == getattr(from_config, key), key
    data_bytes = 0
    for shard in ckpt.glob("*.safetensors"):  # file size minus the 8-byte length and the JSON header
        with open(shard, "rb") as f:
            data_bytes += shard.stat().st_size - 8 - struct.unpack("<Q", f.read(8))[0]
    assert from_headers.total_bytes == data_bytes
    assert from_headers.bytes_by_class["routed"] == spec.routed_experts_total * from_headers.bytes_per_expert


def test_config_only_directory_and_config_file(tmp_path):
    d = tmp_path / "cfgonly"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY["mixtral"]))
    _, inv = resolve_model(str(d))
    assert inv.source.startswith("config.json")
    _, inv2 = resolve_model(str(d / "config.json"))
    assert inv2.total_bytes == inv.total_bytes


def test_missing_shard_and_corrupt_header_are_checkpoint_errors(tmp_path):
    spec = parse_config(TINY["qwen3_moe"])
    ckpt = tmp_path / "ck"
    _write_checkpoint(ckpt, TINY["qwen3_moe"], _tensors_for(spec))
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        resolve_model(str(ckpt))
    (ckpt / "model-00002-of-00002.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        resolve_model(str(ckpt))


def test_hub_headers_are_read_without_weights(monkeypatch, tmp_path):
    """--hub path: config.json via hf_hub_download, tensors via get_safetensors_metadata (both faked here)."""
    import types

    import huggingface_hub

    spec = parse_config(TINY["mixtral"], name="org/tiny")
    tensors = _tensors_for(spec)
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(TINY["mixtral"]))
    calls = []

    def fake_meta(repo_id, revision=None):
        calls.append(repo_id)
        info = {n: types.SimpleNamespace(shape=list(s), dtype=dt) for n, s, dt in tensors}
        return types.SimpleNamespace(files_metadata={"model.safetensors": types.SimpleNamespace(tensors=info)})

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(inventory, "_hub_reachable", lambda timeout_s=3.0: True)  # the fake Hub below answers
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", fake_meta)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, fn, revision=None: str(cfg_file))
    spec2, inv = resolve_model("org/tiny")
    assert calls == ["org/tiny"] and inv.source.startswith("hub")
    assert inv.total_bytes == inventory_from_config(spec).total_bytes


def test_unknown_model_offline_is_a_usage_error():
    with pytest.raises(UnknownModelError, match="no-such/model"):
        resolve_model("no-such/model")


def test_unknown_repo_fails_fast_when_the_hub_is_unreachable(monkeypatch):
    # An offline machine must get exit 2 at once, not huggingface_hub's retries; the hint lists the cards.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(inventory, "_hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(UnknownModelError) as err:
        inventory.resolve_model("nosuch/model")
    assert "unreachable" in err.value.message and "deepseek-ai/DeepSeek-V4-Flash" in err.value.hint
