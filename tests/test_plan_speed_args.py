"""decode_speed's disk link: a disk share with no known disk bandwidth is refused, not divided by zero."""

import pytest

from homerun.plan.inventory import resolve_model
from homerun.plan.planner import PlanOptions
from homerun.plan.records import _Ctx
from homerun.plan.specs import kv_layout
from homerun.plan.speed import decode_speed
from profiles import load_profile


def _ctx():
    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    opts = PlanOptions()
    return _Ctx(spec, inv, load_profile("rtx5090-192gb"), opts, kv_layout(spec, opts.kv_dtype))


_ARGS = dict(resident_bytes=1e9, hit_rate=0.5, local_gbps=1000.0, local_name="vram", pcie_gbps=50.0, dram_gbps=100.0)


@pytest.mark.parametrize("disk_gbps", [None, 0.0])
def test_disk_fraction_without_disk_bandwidth_names_the_field(disk_gbps):
    with pytest.raises(ValueError, match="disk_gbps") as exc:
        decode_speed(_ctx(), disk_fraction=0.25, disk_gbps=disk_gbps, **_ARGS)
    assert "\n" not in str(exc.value)


def test_disk_link_slows_decode_by_its_share():
    c = _ctx()
    none = decode_speed(c, **_ARGS)  # no disk share: the bandwidth is not needed
    slow = decode_speed(c, disk_fraction=0.25, disk_gbps=1.0, **_ARGS)
    fast = decode_speed(c, disk_fraction=0.25, disk_gbps=1000.0, **_ARGS)
    assert slow["decode_tok_s"] < fast["decode_tok_s"] <= none["decode_tok_s"]
    assert slow["decode_tok_s_upper_bound"] < none["decode_tok_s_upper_bound"]
