"""ModelSpec parsing of the shipped cards and KV bytes per token (deepseek-v4.md §2, §5, §8)."""

import json

import pytest

from homerun.errors import ConfigError, UnknownModelError
from homerun.plan.specs import card_index, find_card, kv_layout, load_card, parse_config, read_json

FLASH = "deepseek-ai/DeepSeek-V4-Flash"
PRO = "deepseek-ai/DeepSeek-V4-Pro"


@pytest.mark.parametrize("repo", list(card_index()))
def test_every_card_parses_and_is_a_moe(repo):
    spec = load_card(repo)
    assert spec.name == repo
    assert spec.n_routed_experts > spec.experts_per_tok > 0
    assert spec.moe_layers > 0
    assert len(spec.layer_types) == spec.num_layers
    assert spec.to_dict()["routed_experts_total"] == spec.moe_layers * spec.n_routed_experts


def test_card_aliases_are_case_insensitive_and_unique():
    seen = {}
    for repo, entry in card_index().items():
        for alias in [repo, *entry["aliases"]]:
            assert alias.lower() not in seen, f"alias {alias} used twice"
            seen[alias.lower()] = repo
            assert find_card(alias.upper())[0] == repo
    assert find_card("no-such-model") is None
    with pytest.raises(UnknownModelError):
        load_card("no-such-model")


def test_v4_layer_schedule_and_formats():
    flash, pro = load_card(FLASH), load_card(PRO)
    # §2.2: Flash 2 SWA / 21 CSA / 20 HCA; Pro 0 / 30 / 31.
    assert [flash.layer_types.count(t) for t in ("swa", "csa", "hca")] == [2, 21, 20]
    assert [pro.layer_types.count(t) for t in ("swa", "csa", "hca")] == [0, 30, 31]
    assert flash.expert_format == pro.expert_format == "fp4"  # current Flash revision carries expert_dtype
    assert flash.routed_experts_total == 43 * 256
    f0731 = load_card("v4-flash-0731")
    assert f0731.has_dspark and f0731.layer_types == flash.layer_types


def test_initial_flash_revision_reads_as_fp8_experts():
    cfg = read_json(find_card(FLASH)[1])
    cfg.pop("expert_dtype")
    assert parse_config(cfg).expert_format == "fp8"  # why the card pins the current revision (§9.1)


def test_kv_bytes_per_token_v4():
    flash, pro = load_card(FLASH), load_card(PRO)
    assert kv_layout(flash, "bf16").bytes_per_token == 6880  # §5.2
    assert kv_layout(flash, "fp8").bytes_per_token == 3850.25
    assert kv_layout(pro, "bf16").bytes_per_token == 9848
    # §5.2 table: Flash BF16 at 1M = per-token x T (whole pages: 4,096 tokens divide 1M) + sliding windows = 7.220 GB,
    # and the runtime's open windows (CSA 4 rows of kv and gate in two series, overlaps with an fp32 gate; HCA 128).
    windows = 43 * 128 * 512 * 2
    opened = 21 * (2 * 4 * 1024 * 2 + 4 * 512 * 6 + 2 * 4 * 256 * 2 + 4 * 128 * 6) + 20 * 2 * 128 * 512 * 2
    assert kv_layout(flash).constant_bytes == windows + opened == 11_631_616
    assert kv_layout(flash).bytes_for(1048576) == 6880 * 1048576 + windows + opened
    assert round((6880 * 1048576 + windows) / 1e9, 3) == 7.220


def test_kv_bytes_per_token_mla_and_gqa():
    v3 = load_card("deepseek-ai/DeepSeek-V3")
    assert kv_layout(v3).bytes_per_token == 70272  # §8: 61 x (512 + 64) x 2
    assert kv_layout(v3, "fp8").bytes_per_token == 40016
    q = load_card("Qwen/Qwen3-235B-A22B")
    cfg = q.config
    expected = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
    assert kv_layout(q).bytes_per_token == expected
    assert kv_layout(q, "fp8").bytes_per_token == expected / 2
    oss = load_card("openai/gpt-oss-120b")
    full = oss.config["layer_types"].count("full_attention")
    per_layer = 2 * oss.config["num_key_value_heads"] * oss.config["head_dim"] * 2
    assert kv_layout(oss).bytes_per_token == full * per_layer  # sliding layers hold a constant window
    assert kv_layout(oss).constant_bytes == (36 - full) * 128 * per_layer


def test_missing_and_bad_keys_name_the_key(tmp_path):
    cfg = dict(load_card(FLASH).config)
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        parse_config(cfg, source="x/config.json")
    cfg = dict(load_card("mixtral").config, num_local_experts="eight")
    with pytest.raises(ConfigError, match="num_local_experts"):
        parse_config(cfg)
    with pytest.raises(ConfigError, match="llama"):
        parse_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_json(bad)
    with pytest.raises(ConfigError, match="kv dtype"):
        kv_layout(load_card(FLASH), "fp4")


def test_qwen3_sparse_step_and_mlp_only_layers():
    cfg = dict(load_card("qwen3-30b").config, decoder_sparse_step=2, mlp_only_layers=[1])
    spec = parse_config(cfg)
    # HF rule: MoE iff layer not in mlp_only_layers and (layer + 1) % step == 0.
    assert spec.dense_layers == tuple(i for i in range(48) if i == 1 or (i + 1) % 2)


def test_cards_are_valid_json_objects():
    for entry in card_index().values():
        path = find_card(entry["aliases"][0])[1]
        assert isinstance(json.loads(path.read_text()), dict)
