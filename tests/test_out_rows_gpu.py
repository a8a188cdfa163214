"""`out_rows` (issue 19) on the GPU path: CUDA stand-ins running the Triton kernel set under the interpreter, one
device and a pipeline split over two (the last layer on the second). The kept rows' hidden within fp32 rounding of
the full forward's, every layer's state bit-equal to it, chunk after chunk; a session's decode after its prefill equal
to the decode after an every-row prefill."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.engine.placement import single_device, split_layers  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from test_out_rows import check, decode_after_both_prefills  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

# an 8-token window and a top-k of 4: window transitions and a strict top-k subset within a few short chunks
CHUNKS = ((20, slice(-1, None)), (9, slice(0, 0)), (1, slice(-1, None)), (14, slice(3, 6)), (11, slice(-1, None)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tiny import make_checkpoint

    root = tmp_path_factory.mktemp("out-rows")
    return {kind: make_checkpoint(root, kind, sliding_window=8, index_topk=4) for kind in ("mixed", "hca")}


@pytest.mark.parametrize("kind,n_devices", [("mixed", 1), ("hca", 2)])
def test_kept_rows_on_cuda_standins(checkpoints, kind, n_devices):
    pl = (single_device(3, "standin:0", gpu_path=True, experts="device") if n_devices == 1 else
          split_layers(3, [f"standin:{i}" for i in range(n_devices)], kind="cuda-standin", experts="device"))
    model = load(checkpoints[kind], dtype="float32", experts="reference", placement=pl, cuda_graphs="off")
    assert {lay.flavor for lay in model.net.layers} == {"gpu"}
    assert len(set(model.net.sites[1:-1])) == n_devices  # the layers' sites: one per device of the split
    ids = torch.randint(0, model.args.vocab_size, (60,), generator=torch.Generator().manual_seed(6))
    check(model.net, ids, CHUNKS)
    # a session's prefill (20-token chunks: the first two keep no row) then decode, against an every-row prefill
    model.max_chunk_tokens = 20
    decode_after_both_prefills(model, ids[:50], 6)
