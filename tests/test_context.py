"""Long context: paged KV storage (no copies on growth, exact accounting, plan prediction vs allocated bytes), the
capacity ramp against budget and live free memory, the prefill ETA, bounded reads per decode step, Think Max gating
and a long synthetic run with bounded RSS."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

import pytest
import torch

import homerun
from homerun.errors import ContextFullError
from homerun.models.kv import PagedRows, free_memory_bytes
from homerun.models.deepseek_v4 import LAYER_HCA

try:  # glibc: hand freed heap memory back to the OS, so RSS measures live memory (the RSS test below)
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
except (OSError, AttributeError, TypeError):
    _malloc_trim = None


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads on a shared box
    yield
    torch.set_num_threads(n)


def _ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


def _measured_state_bytes(sess) -> int:
    """Bytes of the storages behind every tensor of the session state, each storage counted once."""
    seen: dict[int, int] = {}

    def add(t):
        if t is not None:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    for s in sess._states:
        add(s.window)
        for c in (s.comp, s.index_comp):
            if c is None:
                continue
            for page in c.store.pages:
                for t in page if isinstance(page, tuple) else (page,):
                    add(t)
            for t in (c.pending_kv, c.pending_gate, c.overlap_kv, c.overlap_gate):
                add(t)
    return sum(seen.values())


@pytest.fixture(scope="module")
def ref(tiny_checkpoints):
    return homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[16384], expert_act="fp32")


# ---------------------------------------------------------------------------------------------- paged storage


def test_paged_rows_write_read_gather():
    store = PagedRows(5, torch.float32, "cpu", page_rows=4)
    full = torch.randn(23, 5)
    end = 0
    for n in (3, 1, 7, 12):  # writes that start and end mid-page and span several pages
        end = store.write(end, full[end : end + n])
    assert end == 23 and len(store.pages) == 6 and store.capacity_rows == 24
    assert store.nbytes == 24 * 5 * 4
    assert torch.equal(store.view(23), full) and torch.equal(store.view(3), full[:3])
    idx = torch.tensor([[0, 22, 5], [13, 13, 4]])
    assert torch.equal(store.gather(idx), full[idx])
    rows = [r0 for r0, _ in store.iter_pages(10)]
    assert rows == [0, 4, 8] and sum(p.shape[0] for _, p in store.iter_pages(10)) == 10


def test_growth_does_not_copy_stored_pages(ref):
    sess = ref.session()
    sess.feed(_ids(600, ref.args.vocab_size, seed=1))
    csa = next(s.comp for s in sess._states if s.index_comp is not None)
    first = [p.data_ptr() for p in csa.store.pages]
    sess.feed(_ids(1500, ref.args.vocab_size, seed=2))
    assert len(csa.store.pages) >= len(first)
    now = next(s.comp for s in sess._states if s.index_comp is not None)
    assert [p.data_ptr() for p in now.store.pages[: len(first)]] == first


@pytest.mark.parametrize("kind", ["mixed", "csa", "hca"])
def test_small_pages_equal_one_page(kind, tiny_checkpoints):
    """Many small pages (CSA 32 rows, HCA 1 row) give the same logits as one big page, prefill and decode."""
    big = homerun.load(tiny_checkpoints[kind], ramp_tokens=[4096], page_tokens=4096, expert_act="fp32")
    small = homerun.load(tiny_checkpoints[kind], ramp_tokens=[4096], page_tokens=128, max_chunk_tokens=200, expert_act="fp32")
    ids = _ids(700, big.args.vocab_size, seed=3)
    want = big.logits(ids)
    sess = small.session()
    sess.feed(ids[:650])
    assert _rel_err(sess.last_logits, want[649]) <= 1e-4
    for t in range(650, 700):
        out = sess.feed(ids[t : t + 1])
        assert _rel_err(out, want[t]) <= 1e-4
    assert sess.kv_bytes == small.kv_bytes_at(700)


def test_kv_prediction_matches_allocated(tiny_checkpoints):
    """The plan-style prediction (kv_bytes_at) is within 5% of the bytes actually allocated (storages walked), and
    kv_allocated_bytes equals the measured bytes exactly; the slack is at most one page per store."""
    model = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[16384], page_tokens=256, max_chunk_tokens=1024, expert_act="fp32")
    sess = model.session()
    fed = 0
    for n in (3000, 5000, 8192):
        sess.feed(_ids(n - fed, model.args.vocab_size, seed=n))
        fed = n
        measured = _measured_state_bytes(sess)
        assert sess.kv_allocated_bytes == measured
        assert sess.kv_bytes == model.kv_bytes_at(n)
        assert abs(measured - model.kv_bytes_at(n)) <= 0.05 * measured
        one_page_each = sum(c.store.page_rows * c.store.row_bytes
                            for s in sess._states for c in (s.comp, s.index_comp) if c is not None)
        assert 0 <= measured - sess.kv_bytes <= one_page_each


# ------------------------------------------------------------------------------------------------------- ramp


def test_ramp_token_by_token_then_full(tiny_checkpoints, ref):
    model = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[64, 128, 256], page_tokens=128, expert_act="fp32")
    ids = _ids(260, model.args.vocab_size, seed=4)
    want = ref.logits(ids[:256])
    sess = model.session()
    steps: list[int] = []
    sess.on_capacity = steps.append
    sess.feed(ids[:50])
    caps = {}  # token index -> capacity once it is in
    t = 50
    while t < 256:
        # Token by token around each ramp step (and up to the last one); one chunk between them.
        n = 1 if t < 70 or 120 <= t < 140 or t >= 250 else (120 if t < 120 else 250) - t
        out = sess.feed(ids[t : t + n])
        t += n
        caps[t - 1] = sess.capacity_tokens
        assert _rel_err(out, want[t - 1]) <= 1e-4
    assert steps == [128, 256] and sorted(set(caps.values())) == [64, 128, 256]
    assert (caps[63], caps[64], caps[127], caps[128]) == (64, 128, 128, 256)  # grew exactly when token 65 / 129 came
    kv_before, logits_before = sess.kv_bytes, sess.last_logits.clone()
    with pytest.raises(ContextFullError, match="last ramp step is 256"):
        sess.feed(ids[256:258])
    assert sess.n_tokens == 256 and sess.kv_bytes == kv_before and torch.equal(sess.last_logits, logits_before)
    # Still usable: empty feeds give the last logits; a reset session feeds again.
    assert torch.equal(sess.feed([]), logits_before)
    sess.reset()
    assert _rel_err(sess.feed(ids[:20]), want[19]) <= 1e-4


def test_ramp_checks_live_free_memory(tiny_checkpoints, ref, monkeypatch):
    model = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[64, 128, 256], page_tokens=128, expert_act="fp32")
    ids = _ids(200, model.args.vocab_size, seed=5)
    sess = model.session()
    sess.feed(ids[:60])
    free = {"bytes": 1000}
    monkeypatch.setattr(model, "free_kv_memory_bytes", lambda: free["bytes"])
    with pytest.raises(ContextFullError, match="free") as info:
        sess.feed(ids[60:200])
    assert "close other programs" in info.value.hint
    assert sess.n_tokens == 60 and sess.capacity_tokens == 64  # nothing lost, nothing processed
    free["bytes"] = 1 << 40
    out = sess.feed(ids[60:200])
    assert sess.capacity_tokens == 256 and _rel_err(out, ref.logits(ids)[-1]) <= 1e-4


def test_free_memory_probe_reports_host_ram():
    free = free_memory_bytes("cpu")
    assert free is None or free > 0


# ----------------------------------------------------------------------------------------------- prefill ETA


def test_prefill_eta_before_and_after_first_chunk(tiny_checkpoints):
    model = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[8192], max_chunk_tokens=256, expert_act="fp32")
    sess = model.session()
    events: list[tuple] = []
    sess.on_prefill = lambda eta_s, n: events.append(("eta", eta_s, n))
    sess.on_progress = lambda done, total: events.append(("progress", done, total))
    ids = _ids(2600, model.args.vocab_size, seed=6)
    sess.feed(ids[:1100])  # no speed measured yet: the ETA comes after the first chunk
    assert [e[0] for e in events[:2]] == ["progress", "eta"] and events[1][2] == 1100 and events[1][1] > 0
    assert [e for e in events if e[0] == "progress"][-1][1:] == (1100, 1100)
    events.clear()
    sess.feed(ids[1100:1110])  # short feeds get no ETA
    assert all(e[0] == "progress" for e in events)
    events.clear()
    sess.feed(ids[1110:2600])  # measured now: the ETA comes before anything is processed
    assert events[0][0] == "eta" and events[0][2] == 1490 and events[0][1] > 0
    assert sum(e[0] == "eta" for e in events) == 1
    assert model.stats()["prefill_tok_s"] > 0


# ------------------------------------------------------------------------------------- bounded attention reads


def test_decode_step_reads_are_bounded(tiny_checkpoints, monkeypatch):
    """A decode step at depth N reads: HCA entries (N/128 rows), the indexer keys one page at a time, and only the
    top-k selected CSA entries. Nothing of size N/4 is materialized."""
    model = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[4096], page_tokens=256, max_chunk_tokens=1024, expert_act="fp32")
    sess = model.session()
    ids = _ids(3001, model.args.vocab_size, seed=7)
    sess.feed(ids[:3000])
    seen = {"view": [], "page": [], "gather": []}
    orig_view, orig_pages, orig_gather = PagedRows.view, PagedRows.iter_pages, PagedRows.gather

    def view(self, n):
        seen["view"].append((self.page_rows, n))
        return orig_view(self, n)

    def iter_pages(self, n):
        for r0, rows in orig_pages(self, n):
            seen["page"].append(rows.shape[0])
            yield r0, rows

    def gather(self, idx):
        seen["gather"].append(tuple(idx.shape))
        return orig_gather(self, idx)

    monkeypatch.setattr(PagedRows, "view", view)
    monkeypatch.setattr(PagedRows, "iter_pages", iter_pages)
    monkeypatch.setattr(PagedRows, "gather", gather)
    sess.feed(ids[3000:3001])
    a = model.args
    hca_rows = max(1, model.page_tokens // a.hca_rate)
    assert seen["view"] and all(pr == hca_rows and n <= 3001 // a.hca_rate for pr, n in seen["view"])
    assert seen["page"] and max(seen["page"]) <= model.page_tokens // a.csa_rate
    assert seen["gather"] == [(1, a.index_topk)]
    assert LAYER_HCA in a.layer_kinds


# ------------------------------------------------------------------------------------------------ think max


def test_think_max_gating(tiny_checkpoints, monkeypatch):
    full = homerun.load(tiny_checkpoints["mixed"], expert_act="fp32")  # default ramp up to 1M; tiny KV fits anywhere
    ok, reason = full.think_max_available()
    assert ok and "393,216" in reason
    short = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[64, 128, 256], expert_act="fp32")
    ok, reason = short.think_max_available()
    assert not ok and "256" in reason
    capped = homerun.load(tiny_checkpoints["mixed"], kv_budget_bytes=full.kv_bytes_at(262144), expert_act="fp32")
    ok, reason = capped.think_max_available()
    assert not ok and "budget" in reason
    monkeypatch.setattr(full, "free_kv_memory_bytes", lambda: 1000)
    ok, reason = full.think_max_available()
    assert not ok and "free" in reason
    st = full.stats()
    assert st["kv_device"] == "cpu" and st["kv_page_tokens"] % full.args.hca_rate == 0
    assert st["think_max_available"] is False and "free" in st["think_max_reason"]


# ------------------------------------------------------------------------------------------- long synthetic run


def _live_rss(proc) -> int:
    """RSS with the allocator's free memory handed back first (glibc malloc_trim), so that it counts live memory:
    the prefill transients (attention scores grow with the context) are freed, and would otherwise stay mapped."""
    if _malloc_trim is None:
        pytest.skip("needs glibc's malloc_trim to measure live RSS")
    gc.collect()
    _malloc_trim(0)
    return proc.memory_info().rss


def _long_run(checkpoint, n_tokens: int, chunk: int) -> dict:
    psutil = pytest.importorskip("psutil")
    model = homerun.load(checkpoint, ramp_tokens=[n_tokens], max_chunk_tokens=chunk, expert_act="fp32")
    proc = psutil.Process(os.getpid())
    sess = model.session()
    sess.feed(_ids(chunk, model.args.vocab_size, seed=0))  # warm the allocator and the weights in
    samples = [(sess.n_tokens, _live_rss(proc))]
    for c0 in range(chunk, n_tokens, chunk):
        sess.feed(_ids(min(chunk, n_tokens - c0), model.args.vocab_size, seed=c0))
        samples.append((sess.n_tokens, _live_rss(proc)))
    assert sess.n_tokens == n_tokens
    return {"samples": samples, "kv_allocated_bytes": sess.kv_allocated_bytes,
            "kv_predicted_bytes": model.kv_bytes_at(n_tokens), "logits": sess.last_logits}


# Documented bound for the long run: live RSS grows per context token by at most the predicted KV bytes per token
# plus RSS_ALLOWANCE_PER_TOKEN (the token history is a Python list of ints, ~36 B a token; measured on the tiny model:
# KV 285 B/token, RSS slope ~308 B/token), and in all by at most that times the tokens plus RSS_ALLOWANCE_BYTES (page
# granularity: the KV grows a page of rows at a time).
RSS_ALLOWANCE_PER_TOKEN = 64
RSS_ALLOWANCE_BYTES = 1 << 20


def _check_long_run(r: dict) -> None:
    assert torch.isfinite(r["logits"]).all()
    assert abs(r["kv_allocated_bytes"] - r["kv_predicted_bytes"]) <= 0.05 * r["kv_allocated_bytes"]
    (t0, rss0), (t1, rss1) = r["samples"][0], r["samples"][-1]
    per_token = r["kv_predicted_bytes"] / t1 + RSS_ALLOWANCE_PER_TOKEN
    # least-squares slope of live RSS against context tokens
    ts, rs = zip(*r["samples"])
    mt, mr = sum(ts) / len(ts), sum(rs) / len(rs)
    slope = sum((t - mt) * (x - mr) for t, x in zip(ts, rs)) / sum((t - mt) ** 2 for t in ts)
    assert slope <= per_token, (slope, per_token, r["samples"])
    assert rss1 - rss0 <= (t1 - t0) * per_token + RSS_ALLOWANCE_BYTES, (rss1 - rss0, r["samples"])


def test_long_run_8k_rss_bounded(tiny_checkpoint):
    _check_long_run(_long_run(tiny_checkpoint, 8192, 1024))


@pytest.mark.slow
def test_long_run_64k_rss_bounded(tiny_checkpoint):
    _check_long_run(_long_run(tiny_checkpoint, 65536, 2048))


# --------------------------------------------------------------------------------------------------- FP8 KV


def test_fp8_rows_layout_and_roundtrip():
    from homerun.models.kv import Fp8PagedRows, fp8_row_bytes

    assert fp8_row_bytes(512, 64, False) == 584 and fp8_row_bytes(128, 0, True) == 132  # deepseek-v4.md section 5
    store = Fp8PagedRows(512, torch.float32, "cpu", page_rows=8, rope_dim=64)
    x = torch.randn(20, 512, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 20)[:, None]
    store.write(0, x)
    assert store.nbytes == 24 * 584
    got = store.view(20)
    assert torch.equal(got[:, 448:], x[:, 448:].to(torch.bfloat16).float())  # rope dims: bf16
    blocks = (got[:, :448] - x[:, :448]).abs().view(20, 7, 64).amax(-1)
    assert (blocks <= x[:, :448].abs().view(20, 7, 64).amax(-1) * 2**-4).all()  # e4m3: 3 mantissa bits
    assert torch.equal(store.gather(torch.tensor([[19, 3]])), got[[19, 3]].unsqueeze(0))
    keys = Fp8PagedRows(128, torch.float32, "cpu", page_rows=8, scale_fp32=True)
    keys.write(0, x[:5, :128])
    assert keys.nbytes == 8 * 132
    # One fp32 scale per row: e4m3's 3 mantissa bits bound the error by 2^-4 of the row's largest value (a relative
    # bound per element fails for values in e4m3's subnormal range, which an unseeded draw hit now and then).
    err = (keys.view(5) - x[:5, :128]).abs().amax(-1)
    assert (err <= x[:5, :128].abs().amax(-1) * 2**-4).all()


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_compact_kv_dtypes(kv_dtype, tiny_checkpoints, ref):
    model = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[16384], page_tokens=256, kv_dtype=kv_dtype, expert_act="fp32")
    ids = _ids(900, model.args.vocab_size, seed=9)
    sess = model.session()
    out = sess.feed(ids)
    assert sess.kv_bytes == model.kv_bytes_at(900) < ref.kv_bytes_at(900)
    assert sess.kv_allocated_bytes == _measured_state_bytes(sess)
    assert model.stats()["kv_dtype"] == kv_dtype
    want, got = ref.logits(ids), model.logits(ids)
    assert _rel_err(out, got[-1]) <= 1e-5
    # Lossy but close: mean per-position relative error and top-1 agreement against exact fp32 entries.
    rel = ((got - want).abs().amax(-1) / want.abs().amax(-1)).mean().item()
    assert rel <= (2e-3 if kv_dtype == "bf16" else 2e-2)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.95


# ------------------------------------------------------------------------------------------------ placement


@pytest.mark.gpu
def test_kv_on_gpu_or_host_gives_the_same_logits(tiny_checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    on_gpu = homerun.load(tiny_checkpoint, device="cuda", ramp_tokens=[4096], page_tokens=256, expert_act="fp32")
    on_host = homerun.load(tiny_checkpoint, device="cuda", ramp_tokens=[4096], page_tokens=256, kv_device="cpu", expert_act="fp32")
    assert on_gpu.stats()["kv_device"].startswith("cuda") and on_host.stats()["kv_device"] == "cpu"
    ids = _ids(700, on_gpu.args.vocab_size, seed=10)
    a, b = on_gpu.session(), on_host.session()
    assert _rel_err(b.feed(ids), a.feed(ids)) <= 1e-4
    csa = next(s.comp for s in b._states if s.comp is not None)
    assert csa.store.pages[0].device.type == "cpu"


# ------------------------------------------------------------------------------------------------------ chat


def test_chat_shows_ramp_steps_and_prefill_eta(tiny_checkpoint, monkeypatch):
    import homerun.cli.commands.chat as chat_cmd
    from homerun.chat.session import ChatSession

    model = homerun.load(tiny_checkpoint, ramp_tokens=[64, 128, 4096], max_chunk_tokens=512, expert_act="fp32")
    chat = ChatSession(model, autosave=False)
    lines: list[str] = []

    class Out:
        def info(self, msg: str) -> None:
            lines.append(msg)

    chat_cmd.attach_context_hooks(chat, Out())
    monkeypatch.setattr(chat_cmd, "PREFILL_ETA_SHOW_S", 0.0)
    chat._kv.feed(_ids(1500, model.args.vocab_size, seed=11))
    assert any("Context grew to 128 tokens" in x for x in lines)
    assert any("Context grew to 4,096 tokens" in x for x in lines)
    assert any("Prefilling 1,500 tokens" in x for x in lines)
    ok, reason = chat.set_think("max").kind, chat.think
    assert ok == "error" and reason == "off"  # the ramp ends at 4096: Think Max refused
