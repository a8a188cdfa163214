"""The cost model's default hybrid launch count (homerun.bench.cost_model.STANDIN_HYBRID_LAUNCHES) is what the
device check's graphs_hybrid step counts on a CUDA stand-in now: a launch count is the code's, so the stand-in's is
the device's, and a change to the code's launches must re-record it (the command is in cost_model.py)."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402

from homerun.bench import cost_model as cm  # noqa: E402
from homerun.bench.graph_check import step_graphs_hybrid  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")


def test_the_recorded_hybrid_launches_are_the_standins_count():
    rec = step_graphs_hybrid(tiny=True)
    assert rec["bit_equal"] and rec["same_cache_traffic"]
    assert (rec["launches_per_token"], rec["n_layers"]) == cm.STANDIN_HYBRID_LAUNCHES, (
        "re-record STANDIN_HYBRID_LAUNCHES in homerun/bench/cost_model.py with the count above")
