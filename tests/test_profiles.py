"""Hardware profiles: shipped TOMLs cite their numbers, validation names the bad key (exit 2), `profiles` command,
measured.json, and `--hw auto`."""

import json
import re
import sys

import pytest

from homerun.errors import ConfigError, ProfileError
from profiles import PROFILES_DIR, list_profiles, load_profile, load_profile_file

SHIPPED = {"rtx5090-192gb", "2xh100", "3xh100", "m3-ultra-512gb", "rtx4090-128gb", "rtx3090-64gb", "strix-halo-128gb",
           "dgx-spark", "epyc-4090", "epyc-genoa-768gb"}
VALUE_LINE = re.compile(r"^\s*(\w+)\s*=\s*(-?[\d.]+|true|false|\[.*\])\s*(#.*)?$")


def run_cli(capsys, *args):
    from homerun.cli.app import app

    with pytest.raises(SystemExit) as exc:
        app(args=list(args), prog_name="homerun")
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def test_all_required_profiles_ship_and_load():
    assert SHIPPED <= set(list_profiles())
    for name in list_profiles():
        p = load_profile(name)
        assert p.name == name and p.source == f"builtin:{name}.toml"
        assert p.cpu.ram_gib > 0 and p.cpu.mem_bw_gbps > 0


# A public source (a site, a repo's issue/PR number or file, a README, a product brief, a review or news page) or a
# label saying why there is none. Docs outside the repository (../shared) are not citations.
_CITATION = re.compile(r"\.(com|net|org|io|au)\b|#\d+|readme|doc/|product brief|reddit|review|news|macworld|"
                       r"assumption|policy|arithmetic|unified")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_number_cites_its_source(name):
    text = (PROFILES_DIR / f"{name}.toml").read_text()
    assert "hardware.md" not in text and "../shared" not in text, f"{name}: cites a document outside the repository"
    for line in text.splitlines():
        m = VALUE_LINE.match(line)
        if m and m.group(1) != "schema_version":
            comment = (m.group(3) or "").lower()
            assert _CITATION.search(comment), f"{name}: uncited value: {line.strip()}"


def test_profile_facts_the_plans_rely_on():
    assert load_profile("rtx5090-192gb").gpu_list[0].vram_gib == 32
    assert len(load_profile("3xh100").gpu_list) == 3 and len(load_profile("2xh100").gpu_list) == 2
    mac = load_profile("m3-ultra-512gb")
    assert mac.memory.unified and mac.memory.gpu_limit_gib < mac.cpu.ram_gib


def _write(tmp_path, text):
    path = tmp_path / "rig.toml"
    path.write_text(text)
    return path


def _base():
    return (PROFILES_DIR / "rtx5090-192gb.toml").read_text()


def test_unknown_key_is_exit_2_naming_the_key(tmp_path, capsys):
    path = _write(tmp_path, _base().replace("vram_gib = 32", "vram_gb = 32"))
    with pytest.raises(ProfileError, match=r"gpus\[0\]\.vram_gb"):
        load_profile_file(path)
    code, out, err = run_cli(capsys, "plan", "v4-flash", "--hw", str(path))
    assert code == 2 and "gpus[0].vram_gb" in err and out == ""
    top = _write(tmp_path, "turbo = true\n" + _base())
    with pytest.raises(ProfileError, match="'turbo'"):
        load_profile_file(top)


def test_wrong_type_is_exit_2_naming_the_key(tmp_path, capsys):
    path = _write(tmp_path, _base().replace("ram_gib = 192", 'ram_gib = "lots"'))
    code, _, err = run_cli(capsys, "plan", "v4-flash", "--hw", str(path))
    assert code == 2 and "cpu.ram_gib" in err and "number" in err
    flag = _write(tmp_path, _base().replace("fp8 = true", "fp8 = 1"))
    with pytest.raises(ProfileError, match=r"gpus\[0\]\.fp8.*boolean"):
        load_profile_file(flag)
    neg = _write(tmp_path, _base().replace("mem_bw_gbps = 60", "mem_bw_gbps = -1"))
    with pytest.raises(ProfileError, match="cpu.mem_bw_gbps"):
        load_profile_file(neg)
    broken = _write(tmp_path, "name = \n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile_file(broken)


def test_unknown_profile_name_is_exit_2(capsys):
    code, _, err = run_cli(capsys, "plan", "v4-flash", "--hw", "no-such-rig")
    assert code == 2 and "no-such-rig" in err


def test_profiles_command_lists_and_shows(capsys):
    code, out, _ = run_cli(capsys, "profiles", "--json")
    assert code == 0
    assert {r["name"] for r in json.loads(out)["profiles"]} == set(list_profiles())
    code, out, _ = run_cli(capsys, "profiles", "rtx5090-192gb", "--json")
    assert code == 0 and json.loads(out)["profile"]["gpus"][0]["mem_bw_gbps"] == 1792
    code, out, _ = run_cli(capsys, "profiles")
    assert code == 0 and "rtx5090-192gb" in out


# ---- measured.json and auto -------------------------------------------------------------------------------------


def _measured(tmp_path, monkeypatch, data):
    from homerun.plan.hardware import measured_path

    home = tmp_path / "home"
    monkeypatch.setenv("HOMERUN_HOME", str(home))
    home.mkdir()
    measured_path().write_text(json.dumps(data))


def test_measured_efficiency_changes_the_estimate(tmp_path, monkeypatch, capsys):
    _, out, _ = run_cli(capsys, "plan", "v4-flash", "--hw", "rtx5090-192gb", "--json")
    before = json.loads(out)["predicted"]
    _measured(tmp_path, monkeypatch, {"schema_version": 1, "efficiency": {"dram": 0.9, "pcie": 0.95},
                                      "expert_cache_hit_rate": {"deepseek-ai/DeepSeek-V4-Flash": 0.5}})
    _, out, _ = run_cli(capsys, "plan", "v4-flash", "--hw", "rtx5090-192gb", "--json")
    after = json.loads(out)["predicted"]
    assert after["efficiency"]["source"].startswith("measured")
    assert after["efficiency"]["dram"] == 0.9 and after["expert_cache_hit_rate"] == 0.5
    assert after["decode_tok_s"] != before["decode_tok_s"]


@pytest.mark.parametrize("data,key", [({"schema_version": 1, "speed": 1}, "speed"),
                                      ({"schema_version": 1, "efficiency": {"dram": "fast"}}, "efficiency.dram"),
                                      ({"schema_version": 1, "bandwidth_gbps": {"nvlink": 1}}, "bandwidth_gbps.nvlink"),
                                      ({"schema_version": 2}, "schema_version")])
def test_bad_measured_json_names_the_key(tmp_path, monkeypatch, data, key):
    from homerun.plan.hardware import load_measured

    _measured(tmp_path, monkeypatch, data)
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_measured()


def test_cpu_kernel_fallback_when_native_module_is_missing(monkeypatch):
    from homerun.plan.hardware import cpu_kernel_info

    monkeypatch.setitem(sys.modules, "homerun.kernels.cpu_experts", None)  # import now raises ImportError
    info = cpu_kernel_info()
    assert info["path"] == "torch" and info["reason"] == "torch (native kernels not built)"


def test_hw_auto_detects_this_machine(capsys):
    code, out, _ = run_cli(capsys, "plan", "qwen3-30b", "--hw", "auto", "--no-measure", "--json")
    doc = json.loads(out)
    assert doc["hardware"]["profile"] == "auto"
    assert doc["cpu_kernel"]["path"] in {"avx512", "avx2", "neon", "portable", "torch"}
    assert doc["detection"]["cpu_flags"] is not None
    assert code in (0, 3)  # whether a 61 GB model fits depends on this machine
