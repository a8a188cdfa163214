"""The planner's CPU prefill estimate (issue 19, `homerun.plan.compute` + `speed.cpu_prefill_speed`): hand-computed
figures for two profiles (this AVX2 host's two Zen 3 cores, and the shipped CPU-only EPYC Genoa), the check against
the measurement in benchmarks/prefill_cpu.md ("Prefill by depth"), and where the figure lands in a plan."""

from __future__ import annotations

import json

import pytest

from homerun.bench.synthetic import synthetic_config
from homerun.plan.compute import (attention_keys_per_token, cpu_unit_peaks, depth_flops_per_token,
                                  linear_flops_per_token, mean_capped)
from homerun.plan.hardware import Detection, cpu_peaks_option
from homerun.plan.inventory import inventory_from_config, resolve_model
from homerun.plan.planner import PlanOptions, plan
from homerun.plan.specs import parse_config
from profiles import CpuSpec, HardwareProfile, load_profile

# The efficiencies, written out (homerun.plan.compute's fits, from benchmarks/prefill_cpu.md): experts int8, dense,
# attention, indexer, elementwise share, the fixed cost once per prompt in tokens of one layer's linears, and per layer
# in tokens of that layer's. AVX2: the 2-core Zen 3 host; AVX-512 (+ VNNI, VBMI, BF16): the 2-core Zen 5.
AVX2 = (0.26, 0.57, 0.5, 0.37, 0.07, 0.0, 0.0)
AVX512 = (0.38, 0.69, 0.46, 0.65, 0.08, 265.0, 0.0)
E_INT8, E_DENSE, E_ATTN, E_INDEX, ELEMENTWISE, PER_PROMPT, PER_LAYER = AVX2
ZEN4_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512vbmi", "avx512_bf16")

# V4-Flash per prompt token, by hand: 43 MoE layers x top-6 x (gate, up, down) x 4096 x 2048, 2 FLOPs per MAC
FLASH_EXPERT_FLOPS = 2 * 43 * 6 * 3 * 4096 * 2048  # 12.99 GOP


def host_profile(cores: int = 2, clock_ghz: float = 3.2, flags: tuple[str, ...] = ("avx2", "fma")) -> HardwareProfile:
    """The measured host: 2 Zen 3 vCPUs, AVX2 + FMA, no AVX-512; 3.2 GHz is its one-core fp32 peak (102.8 GFLOP per
    CPU-second, benchmarks/prefill_cpu.md) over 32 FLOPs per cycle. RAM made large enough for V4-Flash to fit."""
    return HardwareProfile(name="host", description="2 Zen 3 cores", source="test",
                           cpu=CpuSpec(name="EPYC Zen 3", cores=cores, ram_gib=512, mem_bw_gbps=20,
                                       flags=flags, clock_ghz=clock_ghz))


@pytest.fixture(scope="module")
def flash():
    return resolve_model("deepseek-ai/DeepSeek-V4-Flash")


@pytest.fixture(scope="module")
def flash_one_layer(flash):
    """The one real-shaped CSA layer of the by-depth measurement (bench.synthetic's n_layers=1 config)."""
    spec = parse_config(synthetic_config(dict(flash[0].config), 1), "flash-L1")
    assert spec.layer_types == ("csa",)
    return spec, inventory_from_config(spec)


def test_linear_split_sums_to_the_gpu_estimates_active_params(flash):
    spec, inv = flash
    lin = linear_flops_per_token(spec, inv)
    assert lin["routed_experts"] == FLASH_EXPERT_FLOPS
    assert lin["lm_head"] == 2 * 4096 * 129280
    assert sum(lin.values()) == 2 * inv.active_params_per_token


def test_mean_keys_match_a_discrete_count():
    for p, rate, cap in ((4096, 1, 128), (4096, 4, 512), (1000, 4, 512), (32768, 128, None), (100, 1, None)):
        discrete = sum(min(t / rate, cap if cap is not None else float("inf")) for t in range(p)) / p
        assert mean_capped(p, rate, cap) == pytest.approx(discrete, rel=2e-3, abs=0.6)
    # by hand, a 4096-token prompt: window 128 - 128^2 / 8192 = 126; CSA top-512 of t/4: 512 - 512^2 x 4 / 8192 = 384
    spec = resolve_model("deepseek-ai/DeepSeek-V4-Flash")[0]
    assert attention_keys_per_token(spec, "csa", 4096) == 126 + 384
    assert attention_keys_per_token(spec, "hca", 4096) == 126 + 4096 / 256
    assert attention_keys_per_token(spec, "swa", 4096) == 126
    d = depth_flops_per_token(spec, "csa", 4096)
    assert d == {"attention": 4 * 64 * 512 * 510, "indexer": 2 * 64 * 128 * 512}


def _hand_tok_s(dense_flops: float, int8: float, dense_peak: float, fp32: float, fit=AVX2,
                all_rows: bool = False) -> float:
    """V4-Flash at a 4096-token prompt (the default decode depth) by hand: 21 CSA, 20 HCA, 2 sliding-only layers.
    Unless all_rows, the last layer (CSA) runs 1 of the 4096 rows past its state projections (wkv 4096 x 512; the
    compressor's and the indexer's key compressor's wkv + wgate, 2 x 512 and 2 x 128 wide): a mean layer's linears
    less those, its attention core and indexer, x 4095 / 4096 per token."""
    E_INT8, E_DENSE, E_ATTN, E_INDEX, ELEMENTWISE, PER_PROMPT, PER_LAYER = fit
    attention = 4 * 64 * 512 * (21 * 510 + 20 * 142 + 2 * 126)  # keys per layer kind, as above
    indexer = 21 * 2 * 64 * 128 * 512  # every earlier 1/4-rate entry: mean 4096 / 8
    head = 2 * 4096 * 129280 / 4096  # the lm head, once per prompt
    experts = FLASH_EXPERT_FLOPS
    # the fixed cost is sized in every row's linears: the rows left out below do not shrink it
    fixed = (PER_PROMPT / 43 + PER_LAYER) / 4096 * (experts / (int8 * 1e9 * E_INT8)
                                                   + dense_flops / (dense_peak * 1e9 * E_DENSE))
    if not all_rows:
        share = 4095 / 4096
        state = 4096 * 512 + 2 * 4096 * 2 * 512 + 2 * 4096 * 2 * 128
        experts -= share * FLASH_EXPERT_FLOPS / 43
        dense_flops -= share * (dense_flops / 43 - 2 * state)
        attention -= share * 4 * 64 * 512 * 510
        indexer -= share * 2 * 64 * 128 * 512
    t = (experts / (int8 * 1e9 * E_INT8) + dense_flops / (dense_peak * 1e9 * E_DENSE)
         + head / (dense_peak * 1e9 * E_DENSE) + attention / (fp32 * 1e9 * E_ATTN) + indexer / (fp32 * 1e9 * E_INDEX))
    linears = experts / (int8 * 1e9 * E_INT8) + dense_flops / (dense_peak * 1e9 * E_DENSE)
    # the fixed cost, spread over the prompt's tokens: once per prompt (a 43rd of the 43 layers' linears) + per layer
    t += ELEMENTWISE * linears + fixed
    return 1 / t


def test_hand_computed_cpu_prefill_on_the_measured_avx2_host(flash):
    spec, inv = flash
    p = plan(spec, inv, host_profile())
    pred = p.predicted
    # peaks: 2 cores x 3.2 GHz x 32 FLOPs (two 256-bit FMA pipes) = 204.8 GFLOP/s; int8 x 2.27 (the AVX2 tile) = 464.9
    assert pred["cpu_peak_gops"] == pytest.approx({"int8": 464.896, "fp32": 204.8, "bf16": None})
    assert pred["cpu_prefill_units"]["dense"] == "fp32"  # no bf16 units
    dense = 2 * (inv.active_params_per_token - 43 * 6 * 3 * 4096 * 2048 - 4096 * 129280)
    want = _hand_tok_s(dense, 464.896, 204.8, 204.8)
    assert pred["cpu_prefill_tok_s"] == pytest.approx(want, rel=1e-9)
    assert 3.5 < want < 4.5  # ~4.0 tok/s
    # every row of the last layer (a per-layer measurement's runs): 1/43 of the layers' work more, ~2.5 %
    every = plan(spec, inv, host_profile(), PlanOptions(prefill_all_rows=True)).predicted["cpu_prefill_tok_s"]
    assert every == pytest.approx(_hand_tok_s(dense, 464.896, 204.8, 204.8, all_rows=True), rel=1e-9)
    assert 1.02 < want / every < 1.03
    # CPU only: the CPU figure is the plan's prefill figure, with its reason
    assert p.mode == "cpu-only" and pred["prefill_tok_s"] == pred["cpu_prefill_tok_s"]
    assert pred["prefill_reason"].startswith("the CPU runs prefill") and "int8" in pred["prefill_reason"]
    decision = [d for d in p.decisions if d["what"] == "CPU prefill"]
    assert decision and decision[0]["choice"] == f"{want:.2f} tok/s"
    assert "benchmarks/prefill_cpu.md" in decision[0]["reason"]


def test_hand_computed_cpu_prefill_on_the_cpu_only_epyc_genoa(flash):
    spec, inv = flash
    prof = load_profile("epyc-genoa-768gb")
    p = plan(spec, inv, prof)
    pred = p.predicted
    # 32 cores x 3.25 GHz x 32 (Zen 4: AVX-512 on 256-bit units) = 3328 GFLOP/s; VNNI int8 x4 = 13312; AVX512-BF16 x2
    assert pred["cpu_peak_gops"] == pytest.approx({"int8": 13312.0, "fp32": 3328.0, "bf16": 6656.0})
    assert pred["cpu_prefill_units"]["dense"] == "bf16"
    dense = 2 * (inv.active_params_per_token - 43 * 6 * 3 * 4096 * 2048 - 4096 * 129280)
    want = _hand_tok_s(dense, 13312.0, 6656.0, 3328.0, fit=AVX512)  # Zen 4 has every flag of the AVX-512 fit
    assert p.mode == "cpu-only" and pred["cpu_prefill_tok_s"] == pytest.approx(want, rel=1e-9)
    assert pred["prefill_tok_s"] == pred["cpu_prefill_tok_s"] and 143 < want < 150  # 146.9 (every row: 143.2)
    assert pred["cpu_prefill_fit"] == "avx512" and pred["cpu_prefill_efficiency"]["fit"] == "avx512"


@pytest.mark.parametrize("prompt,measured_one_layer,measured_43", [(1024, 170, 3.95), (8192, 161, 3.74),
                                                                    (32768, 139, 3.22)])
def test_prediction_against_the_by_depth_measurement(flash, flash_one_layer, prompt, measured_one_layer, measured_43):
    """benchmarks/prefill_cpu.md, "Prefill by depth": one real-shaped CSA layer on 2 idle cores of this AVX2 host
    (CPU-seconds / 2): 170 / 161 / 139 tok/s at 1K / 8K / 32K; the full model extrapolated as 43 such layers: 3.95 /
    3.74 / 3.22. The plan, with the quiet 2-thread measured peaks (466 int8, 204 fp32 GOP/s), is within 5 %."""
    spec1, inv1 = flash_one_layer
    # the measurement ran every row of its one layer (before out_rows): so does this plan
    opts = PlanOptions(context_tokens=65536, prefill_prompt_tokens=prompt, prefill_chunk_tokens=min(prompt, 2048),
                       cpu_peaks={"int8": 466.0, "fp32": 204.0, "bf16": None, "source": "measured (test)"},
                       prefill_all_rows=True)
    one = plan(spec1, inv1, host_profile(), opts).predicted
    assert one["cpu_peak_source"] == "measured (test)" and one["cpu_prefill_prompt_tokens"] == prompt
    assert one["cpu_prefill_tok_s"] == pytest.approx(measured_one_layer, rel=0.05)
    # 43 CSA layers (the measurement's upper bound on time) against the extrapolation
    assert one["cpu_prefill_tok_s"] / 43 == pytest.approx(measured_43, rel=0.05)
    # the real layer mix (20 HCA and 2 sliding-only layers have no indexer and fewer keys) is faster than 43 x CSA
    full = plan(*flash, host_profile(), opts).predicted
    assert one["cpu_prefill_tok_s"] / 43 < full["cpu_prefill_tok_s"] < 1.15 * one["cpu_prefill_tok_s"] / 43


def test_chunks_under_512_rows_run_the_dense_linears_at_the_small_row_efficiency(flash):
    spec, inv = flash
    dense = 2 * (inv.active_params_per_token - 43 * 6 * 3 * 4096 * 2048 - 4096 * 129280)
    for chunk, eff in ((256, 0.25), (511, 0.25), (512, 0.57)):
        pred = plan(spec, inv, host_profile(), PlanOptions(prefill_chunk_tokens=chunk, prefill_all_rows=True)).predicted
        assert pred["cpu_prefill_seconds_per_token"]["dense"] == pytest.approx(dense / (204.8e9 * eff), rel=1e-12)
        assert pred["cpu_prefill_efficiency"]["dense"] == eff and f"{chunk}-row chunks" in pred["cpu_prefill_reason"]


def test_a_gpu_plan_keeps_its_gpu_figure_and_shows_the_cpu_one(flash):
    spec, inv = flash
    p = plan(spec, inv, load_profile("epyc-4090"))
    pred = p.predicted
    assert p.mode == "hybrid" and pred["prefill_reason"].startswith("per chunk")
    assert pred["cpu_prefill_tok_s"] == pytest.approx(plan(spec, inv, load_profile("epyc-genoa-768gb"))
                                                      .predicted["cpu_prefill_tok_s"], rel=1e-12)
    assert pred["prefill_tok_s"] != pred["cpu_prefill_tok_s"]


def test_no_clock_no_cpu_estimate_and_the_reason_says_so(flash):
    spec, inv = flash
    p = plan(spec, inv, host_profile(clock_ghz=None))
    pred = p.predicted
    assert pred["cpu_prefill_tok_s"] is None and pred["prefill_tok_s"] is None
    assert "clock_ghz" in pred["cpu_prefill_reason"] and "clock_ghz" in pred["prefill_reason"]
    assert [d["choice"] for d in p.decisions if d["what"] == "CPU prefill"] == ["not estimated"]


def test_unit_peaks_by_isa():
    def peaks(flags, per_cycle=None, cores=1, clock=1.0):
        return cpu_unit_peaks(CpuSpec(name="x", cores=cores, ram_gib=1, mem_bw_gbps=1, flags=flags, clock_ghz=clock,
                                      fp32_flops_per_cycle=per_cycle))

    p = peaks(("avx2", "avx512f", "avx512_vnni", "avx512vbmi"))  # Ice Lake-class: two 512-bit FMA pipes, VNNI
    assert (p["fp32"], p["int8"], p["bf16"], p["int8_unit"]) == (64.0, 256.0, None, "avx512_vnni")
    p = peaks(("avx2", "avx512f", "avx512_vnni"))  # Cascade Lake: VNNI without VBMI runs the AVX2 tile
    assert (p["int8_unit"], p["int8"]) == ("avx2", pytest.approx(32 * 2.27))
    p = peaks(("avx2", "avx512f"))  # AVX-512 without VNNI: the 256-bit AVX2 tile, at two 256-bit pipes' rate
    assert (p["fp32"], p["int8"]) == (64.0, pytest.approx(32 * 2.27))
    p = peaks(("avx2", "avx512f", "amx"), cores=2, clock=2.0)  # AMX-BF16: 1024 FLOPs per cycle per core
    assert p["bf16"] == 2 * 2.0 * 1024 and p["bf16_unit"] == "amx_bf16"
    p = peaks(("neon",), per_cycle=32.0)
    assert (p["fp32"], p["int8"]) == (32.0, 64.0)
    assert peaks(()).get("fp32") is None  # no SIMD path known: no peak


def test_auto_detection_peaks_become_the_plan_option():
    det = Detection(dram_read_gbps=20.0, h2d_gbps=None, gpus=(), cpu_flags=("avx2",), assumed=(), seconds=0.1,
                    cpu_peak_gops={"int8": 150.0, "bf16": None, "fp32": 80.0})
    opt = cpu_peaks_option(det)
    assert opt["int8"] == 150.0 and opt["fp32"] == 80.0 and "measured" in opt["source"]
    assert cpu_peaks_option(Detection(20.0, None, (), (), (), 0.1)) is None


def test_plan_json_and_table_carry_the_cpu_prefill(capsys):
    from homerun.cli.app import app

    with pytest.raises(SystemExit) as exc:
        app(args=["plan", "deepseek-ai/DeepSeek-V4-Flash", "--hw", "epyc-genoa-768gb", "--json"], prog_name="homerun")
    assert (exc.value.code or 0) == 0
    doc = json.loads(capsys.readouterr().out)
    pred = doc["predicted"]
    assert pred["prefill_tok_s"] == pred["cpu_prefill_tok_s"] > 0
    assert set(pred["cpu_prefill_seconds_per_token"]) == {"routed_experts", "dense", "lm_head", "attention", "indexer",
                                                          "elementwise", "per_prompt"}
    with pytest.raises(SystemExit):
        app(args=["plan", "deepseek-ai/DeepSeek-V4-Flash", "--hw", "epyc-genoa-768gb"], prog_name="homerun")
    out = capsys.readouterr().out
    assert "CPU prefill" in out and f"{pred['cpu_prefill_tok_s']:,.2f} tok/s" in out


def test_auto_detection_measures_the_unit_peaks():
    from homerun.kernels import cpu_gemm
    from homerun.plan.hardware import measure_cpu_peaks

    if not cpu_gemm.available():
        pytest.skip("native kernels not built: --hw auto has no measured peaks")
    peaks = measure_cpu_peaks()
    # both units an x86 prefill uses were measured (their ratio is not checked: on a shared host one run may be slowed)
    assert peaks is not None and peaks["fp32"] > 0 and peaks["int8"] is not None and peaks["int8"] > 0
    assert cpu_peaks_option(Detection(1.0, None, (), (), (), 0.1, cpu_peak_gops=peaks))["int8"] == peaks["int8"]


def test_auto_detection_takes_each_units_best_of_a_few_rounds(monkeypatch):
    """`--hw auto` measures the unit peaks in a few rounds and keeps each unit's best (a neighbour only lowers a
    peak), as bench does before and after its run; no round starts past the budget. The measurement is mocked."""
    from homerun.plan import hardware

    rounds = [{"int8": 100.0, "bf16": 40.0, "fp32": 50.0}, {"int8": 210.0, "bf16": 30.0, "fp32": None},
              {"int8": 150.0, "bf16": 80.0, "fp32": 45.0}, {"int8": 999.0, "bf16": 999.0, "fp32": 999.0}]
    calls = []

    def once():
        calls.append(1)
        return dict(rounds[len(calls) - 1])

    monkeypatch.setattr(hardware, "_measure_cpu_peaks_once", once)
    got = hardware.measure_cpu_peaks(rounds=3, budget_s=60.0, gap_s=0.0)
    assert len(calls) == 3 and got == {"int8": 210.0, "bf16": 80.0, "fp32": 50.0}
    calls.clear()
    assert hardware.measure_cpu_peaks(rounds=3, budget_s=0.0, gap_s=0.0) == rounds[0] and len(calls) == 1
    monkeypatch.setattr(hardware, "_measure_cpu_peaks_once", lambda: None)  # no native kernels: nothing to repeat
    assert hardware.measure_cpu_peaks(rounds=3, budget_s=60.0, gap_s=0.0) is None
    low = {"int8": 1.0, "bf16": None, "fp32": 1.0}
    assert hardware.best_peaks(low, {"int8": 0.5, "fp32": 1.0}) is low and hardware.best_peaks(None, None) is None


@pytest.mark.parametrize("flags,fit,missing", [
    (ZEN4_FLAGS, "avx512", None),
    (("avx2", "avx512f", "avx512_vnni", "avx512vbmi"), "avx2", "avx512_bf16"),  # Ice Lake: no bf16 units
    (("avx2", "avx512f", "avx512_vnni", "avx512_bf16"), "avx2", "avx512vbmi"),  # VNNI without VBMI: the AVX2 tile
    (("avx2", "avx512f", "amx"), "avx2", "avx512_vnni, avx512vbmi, avx512_bf16"),  # the SPR profiles as written
    (("avx2", "avx512f"), "avx2", "avx512_vnni, avx512vbmi, avx512_bf16"),  # strix-halo as written
    (("avx2", "fma"), "avx2", "avx512f, avx512_vnni, avx512vbmi, avx512_bf16"),
    (("neon",), "avx2", "avx512f"),
])
def test_the_fit_follows_the_isa_and_the_reason_says_why(flags, fit, missing):
    from homerun.plan.compute import AVX2_FIT, AVX512_FIT, cpu_prefill_fit

    got, why = cpu_prefill_fit(flags)
    assert got is {"avx2": AVX2_FIT, "avx512": AVX512_FIT}[fit]
    if missing is None:
        assert "avx512_vnni" in why and "lacks" not in why
    else:
        assert f"lacks {missing}" in why
    assert (AVX2_FIT.experts_int8, AVX2_FIT.dense, AVX2_FIT.attention, AVX2_FIT.indexer,
            AVX2_FIT.elementwise_fraction, AVX2_FIT.per_prompt_linear_tokens, AVX2_FIT.per_layer_linear_tokens) == AVX2
    assert (AVX512_FIT.experts_int8, AVX512_FIT.dense, AVX512_FIT.attention, AVX512_FIT.indexer,
            AVX512_FIT.elementwise_fraction, AVX512_FIT.per_prompt_linear_tokens,
            AVX512_FIT.per_layer_linear_tokens) == AVX512


@pytest.mark.parametrize("name,fit", [("epyc-genoa-768gb", "avx512"), ("epyc-4090", "avx512"),
                                      ("rtx5090-192gb", "avx512"), ("2xh100", "avx2"), ("3xh100", "avx2"),
                                      ("strix-halo-128gb", "avx2"), ("rtx3090-64gb", "avx2")])
def test_shipped_profiles_get_the_fit_of_their_flags(flash, name, fit):
    from homerun.plan.compute import cpu_prefill_fit

    prof = load_profile(name)
    assert cpu_prefill_fit(prof.cpu.flags)[0].name == fit
    pred = plan(*flash, prof).predicted
    if "cpu_prefill_reason" not in pred:  # plans that make no CPU estimate (a GPU sharing the memory pool)
        return
    assert pred["cpu_prefill_fit"] == fit and pred["cpu_prefill_fit_reason"]
    if pred["cpu_prefill_tok_s"] is not None:
        assert f"the {fit} fit" in pred["cpu_prefill_reason"] and pred["cpu_prefill_efficiency"]["fit"] == fit


def test_the_avx512_fit_on_the_one_layer_at_its_measured_peaks(flash_one_layer):
    """Same peaks, two ISAs: the AVX-512 host's plan runs each part at its own fit's efficiency."""
    spec1, inv1 = flash_one_layer
    peaks = {"int8": 900.0, "fp32": 230.0, "bf16": 460.0, "source": "measured (test)"}
    opts = PlanOptions(context_tokens=65536, prefill_prompt_tokens=32768, cpu_peaks=peaks)
    fast = plan(spec1, inv1, host_profile(flags=ZEN4_FLAGS), opts).predicted
    slow = plan(spec1, inv1, host_profile(), opts).predicted
    for part, e512, e2 in (("routed_experts", AVX512[0], AVX2[0]), ("dense", AVX512[1], AVX2[1]),
                           ("attention", AVX512[2], AVX2[2]), ("indexer", AVX512[3], AVX2[3])):
        ratio = slow["cpu_prefill_seconds_per_token"][part] / fast["cpu_prefill_seconds_per_token"][part]
        assert ratio == pytest.approx(e512 / e2, rel=1e-12)
    assert fast["cpu_prefill_fit"] == "avx512" and slow["cpu_prefill_fit"] == "avx2"


def test_a_cpu_prompt_shorter_than_a_chunk_is_planned_as_itself(flash):
    """The CPU estimate is for the prompt asked (the GPU estimate's floor of one 2048-token chunk doubled a 1K
    prompt's attention and indexer depth); below a chunk only the GPU figure keeps the floor."""
    p = plan(*flash, host_profile(), PlanOptions(prefill_prompt_tokens=1024, prefill_chunk_tokens=2048)).predicted
    assert p["cpu_prefill_prompt_tokens"] == 1024 and "a 1024-token prompt" in p["cpu_prefill_reason"]
    two = plan(*flash, host_profile(), PlanOptions(prefill_prompt_tokens=2048, prefill_chunk_tokens=2048)).predicted
    assert p["cpu_prefill_seconds_per_token"]["attention"] < two["cpu_prefill_seconds_per_token"]["attention"]


def test_the_plan_line_names_the_fit(capsys):
    from homerun.cli.app import app

    with pytest.raises(SystemExit):
        app(args=["plan", "deepseek-ai/DeepSeek-V4-Flash", "--hw", "epyc-genoa-768gb"], prog_name="homerun")
    out = " ".join(capsys.readouterr().out.split())
    assert "efficiencies: the avx512 fit, the CPU has avx512f + avx512_vnni + avx512vbmi + avx512_bf16" in out


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """The tiny "mixed" preset with 64 routed experts, top-2: a routed expert's mean batch is 16 tokens in a 512-token
    chunk, so the CPU's chunk doubles to 1024 (32 tokens), as V4-Flash's (256 experts, top-6) does."""
    from homerun.formats.checkpoint import tiny_config, write_checkpoint

    path = tmp_path_factory.mktemp("wide-experts") / "wide"
    return write_checkpoint(path, {**tiny_config("mixed"), "n_routed_experts": 64, "num_experts_per_tok": 2})


@pytest.mark.parametrize("routed, top_k, chunk", [
    (256, 6, 1024),  # V4-Flash: 12 tokens per expert at 512, 24 at 1024
    (384, 6, 2048),  # V4-Pro: 16 at 1024, 32 at 2048
    (48, 6, 512),  # the 48-expert benchmark checkpoint: 64 per expert at 512 already
    (8, 2, 512), (0, 0, 512),  # the tiny preset; a dense model
    (4096, 4, 2048),  # capped at 2048
    (64, 3, 512),  # exactly 24 at 512: no doubling
])
def test_the_cpu_chunk_grows_until_an_expert_batch_reaches_24_tokens(routed, top_k, chunk):
    from homerun.plan.records import cpu_prefill_chunk_tokens, prefill_chunk_tokens

    assert cpu_prefill_chunk_tokens(routed, top_k) == chunk
    assert prefill_chunk_tokens(False, routed_experts=routed, experts_per_token=top_k) == chunk
    assert prefill_chunk_tokens(True, routed_experts=routed, experts_per_token=top_k) == 2048
    assert prefill_chunk_tokens(False, 300, routed_experts=routed, experts_per_token=top_k) == 300


@pytest.mark.parametrize("which, cpu_chunk", [("tiny", 512), ("wide", 1024)])
@pytest.mark.parametrize("profile, gpu", [("epyc-genoa-768gb", False), ("rtx5090-192gb", True),
                                          ("dgx-spark", False), ("strix-halo-128gb", False)])
def test_the_plan_charges_the_chunk_the_runtime_runs(tiny_checkpoint, wide_checkpoint, which, cpu_chunk, profile,
                                                     gpu):
    """One source for the prefill chunk (homerun.plan.records.prefill_chunk_tokens): a plan's chunk (its activations
    margin, its prefill figures, its decision) is the one `homerun.load` runs with the plan's placement: on the CPU,
    512 grown while a routed expert's mean batch is under 24 tokens (the tiny preset's 8 experts, top-2: 512; 64
    experts, top-2: 1024, as V4-Flash; benchmarks/prefill_cpu.md), 2048 on a GPU (here a CUDA stand-in). The CPU
    estimate beside a GPU plan is what the CPU would run: its own chunk. A one-pool (unified memory) plan places every
    layer on the host, so its CPU runs prefill, whether or not the profile gives its GPU a compute figure (strix-halo
    does, dgx-spark does not): one rule (records.gpu_runs_prefill)."""
    import homerun
    from homerun.engine.placement import placement_from_plan
    from homerun.plan.speed import activation_bytes

    ckpt = tiny_checkpoint if which == "tiny" else wide_checkpoint
    spec, inv = resolve_model(str(ckpt))
    p = plan(spec, inv, load_profile(profile), PlanOptions())
    model = homerun.load(ckpt, placement=placement_from_plan(p, standin="cuda"))
    chunk = model.max_chunk_tokens
    assert chunk == (2048 if gpu else cpu_chunk)
    assert p.predicted["prefill_chunk_tokens"] == chunk
    assert p.devices[0].margins["activations"] == activation_bytes(spec, chunk)
    assert {"what": "prefill chunk", "choice": f"{chunk} tokens"}.items() <= next(
        d for d in p.decisions if d["what"] == "prefill chunk").items()
    cpu_only = homerun.load(ckpt)  # the CPU's own chunk, which the CPU estimate charges on either plan
    assert p.predicted["cpu_prefill_chunk_tokens"] == cpu_only.max_chunk_tokens == cpu_chunk
    if p.predicted["cpu_prefill_tok_s"] is not None:  # dgx-spark's profile gives no CPU clock: no CPU estimate
        assert f"{cpu_chunk}-row chunks" in p.predicted["cpu_prefill_reason"]


def test_an_explicit_chunk_reaches_the_plan_and_the_runtime(tiny_checkpoint):
    import homerun

    spec, inv = resolve_model(str(tiny_checkpoint))
    p = plan(spec, inv, load_profile("epyc-genoa-768gb"), PlanOptions(prefill_chunk_tokens=300))
    assert p.predicted["prefill_chunk_tokens"] == p.predicted["cpu_prefill_chunk_tokens"] == 300
    assert "requested" in next(d for d in p.decisions if d["what"] == "prefill chunk")["reason"]
    assert homerun.load(tiny_checkpoint, max_chunk_tokens=300).max_chunk_tokens == 300
    g = plan(spec, inv, load_profile("rtx5090-192gb"), PlanOptions(prefill_chunk_tokens=300)).predicted
    assert g["prefill_chunk_tokens"] == g["cpu_prefill_chunk_tokens"] == 300


@pytest.mark.parametrize("prompt", [1024, 4096, 16384])
def test_the_fixed_cost_is_spread_over_the_prompt(flash, prompt):
    """The fixed cost is paid once per prompt (265 tokens of one mean layer's linears: 265 / 43 of all 43 layers'), so
    per token it is that over the prompt: 4x smaller at 4K than at 1K, relative to the linears' own seconds (every
    row's: the last layer's rows a session leaves out do not shrink a cost measured per prompt)."""
    spec, inv = flash
    pred = plan(spec, inv, load_profile("epyc-genoa-768gb"), PlanOptions(prefill_prompt_tokens=prompt)).predicted
    every = plan(spec, inv, load_profile("epyc-genoa-768gb"),
                 PlanOptions(prefill_prompt_tokens=prompt, prefill_all_rows=True)).predicted
    secs, every_secs = pred["cpu_prefill_seconds_per_token"], every["cpu_prefill_seconds_per_token"]
    assert pred["cpu_prefill_prompt_tokens"] == prompt
    assert AVX512[5:] == (265.0, 0.0)  # the fit's per-prompt and per-layer terms
    linears = every_secs["routed_experts"] + every_secs["dense"]
    assert secs["routed_experts"] + secs["dense"] < linears
    assert secs["per_prompt"] == pytest.approx(265 / 43 / prompt * linears, rel=1e-12)
    assert secs["per_prompt"] == pytest.approx(every_secs["per_prompt"], rel=1e-12)


def test_the_last_layers_unread_rows_are_left_out_in_proportion_to_the_layers(flash, flash_one_layer):
    """A session's prefill runs V4's last layer for the prompt's last row alone (issue 19, out_rows): the plan's
    saving is ~1/43 of the layers' work on V4-Flash and most of a one-layer model's, which is what lets a bench on a
    few-layer synthetic model extrapolate through the plan; with prefill_all_rows nothing is left out."""
    from homerun.plan.compute import last_layer_skip_per_token

    opts = dict(context_tokens=65536, prefill_prompt_tokens=4096)
    ratio = {}
    for name, model in (("full", flash), ("one", flash_one_layer)):
        rows = [plan(*model, host_profile(), PlanOptions(**opts, prefill_all_rows=a)).predicted for a in (False, True)]
        ratio[name] = rows[0]["cpu_prefill_tok_s"] / rows[1]["cpu_prefill_tok_s"]
    assert 1.02 < ratio["full"] < 1.03 and ratio["one"] > 10
    spec, inv = flash
    skip = last_layer_skip_per_token(spec, inv, 4096)
    assert skip["routed_experts"] == pytest.approx(4095 / 4096 * FLASH_EXPERT_FLOPS / 43, rel=1e-12)
    assert skip["attention"] == pytest.approx(4095 / 4096 * 4 * 64 * 512 * 510, rel=1e-12)
    assert last_layer_skip_per_token(spec, inv, 1) == dict.fromkeys(skip, 0.0)  # a one-token prompt: nothing unread


def test_a_gpu_prefill_leaves_out_the_same_rows(flash):
    """The GPU prefill estimate's compute (2 x active params per token) less the same linears of the last layer's
    unread rows as the CPU estimate's: ~1/43 of the layers' linears on V4-Flash at 4096 tokens, said in its reason."""
    from homerun.plan.compute import last_layer_skip_per_token

    spec, inv = flash
    rows = [plan(spec, inv, load_profile("epyc-4090"), PlanOptions(prefill_prompt_tokens=4096, prefill_all_rows=a))
            for a in (False, True)]
    assert [p.mode for p in rows] == ["hybrid", "hybrid"]
    kept, every = (p.predicted for p in rows)
    assert kept["prefill_prompt_tokens"] == every["prefill_prompt_tokens"] == 4096
    skip = last_layer_skip_per_token(spec, inv, 4096)
    full = 2.0 * inv.active_params_per_token
    ratio = kept["prefill_seconds_per_chunk"]["compute"] / every["prefill_seconds_per_chunk"]["compute"]
    assert ratio == pytest.approx((full - skip["routed_experts"] - skip["dense"]) / full, rel=1e-12)
    assert 0.97 < ratio < 0.985  # the lm head and the state projections still run for every row
    gflop = (skip["routed_experts"] + skip["dense"]) / 1e9
    assert f"less the last layer's {gflop:.2f} GFLOP per token of rows no one reads" in kept["prefill_reason"]
    assert "no one reads" not in every["prefill_reason"]
    # the weights and streaming bounds are per chunk and per pass whatever rows run: unchanged; this plan is bound by
    # streaming experts, so its tok/s is the same
    others = {k: v for k, v in kept["prefill_seconds_per_chunk"].items() if k != "compute"}
    assert set(others) == {"weights", "expert_streaming"}
    assert others == {k: every["prefill_seconds_per_chunk"][k] for k in others}
    assert kept["prefill_bottleneck"] == "expert_streaming" and kept["prefill_tok_s"] == every["prefill_tok_s"]
