"""`homerun serve` against the in-process engine on the same checkpoint (issue 16's closing figures):

- decode tok/s through the HTTP server (openai client, streaming) against `Model.generate` in-process, alternating
  rounds, medians and their ratio;
- turn-2 time to first token on a conversation of a few thousand tokens, with prefix reuse against a full re-prefill
  (a fresh engine), as a ratio.

    python benchmarks/serve_bench.py [--checkpoint DIR] [--rounds 4] [--gen 64] [--context 4000]

Without --checkpoint the tiny "mixed" preset of tests/tiny.py is written to a temp dir.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import uvicorn

import homerun
from homerun.serve.app import Settings, bind_socket, create_app
from homerun.serve.engine import Engine


class Server:
    def __init__(self, engine: Engine) -> None:
        self.sock = bind_socket("127.0.0.1", 0)
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine, Settings(model_name="bench")),
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.sock.getsockname()[1]
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


MSG = [{"role": "user", "content": "hello"}]


def served_decode_tok_s(srv: Server, gen: int) -> float:
    """Decode rate through HTTP: (time for `gen` tokens - time for 1) / (tokens - 1), same prompt, greedy; the
    prompt is reused from the live state both times, so the difference is decode (plus per-token server work)."""
    def timed(n: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = srv.client.chat.completions.create(model="bench", messages=MSG, max_tokens=n, temperature=0)
        return time.perf_counter() - t0, r.usage.completion_tokens

    t1, _ = timed(1)
    tn, n = timed(gen)
    return (n - 1) / (tn - t1) if n > 1 else float("nan")


def inprocess_decode_tok_s(model, gen: int) -> float:
    """The same measurement in-process: `Model.generate` on the encoded prompt, 1 token and `gen` tokens."""
    from homerun.chat.encoding import encode_messages

    prompt = model.tokenizer.encode(encode_messages(MSG, thinking_mode="chat"))

    def timed(n: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        k = sum(1 for _ in model.generate(prompt, max_new_tokens=n, temperature=0.0))
        return time.perf_counter() - t0, k

    t1, _ = timed(1)
    tn, n = timed(gen)
    return (n - 1) / (tn - t1) if n > 1 else float("nan")


def ttft(srv: Server, messages: list[dict]) -> tuple[float, int, int]:
    """Time to the first token: a one-token request (prefill of what is not reused + one decode step), whatever
    text that token decodes to; with the prompt and cached token counts from usage."""
    t0 = time.perf_counter()
    r = srv.client.chat.completions.create(model="bench", messages=messages, max_tokens=1, temperature=0)
    s = time.perf_counter() - t0
    details = r.usage.prompt_tokens_details
    return s, (details.cached_tokens or 0) if details is not None else 0, r.usage.prompt_tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--context", type=int, default=4000, help="approximate tokens of the turn-1 conversation")
    a = ap.parse_args()
    path = a.checkpoint
    if path is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny import make_checkpoint

        path = str(make_checkpoint(Path(tempfile.mkdtemp()), "mixed"))
    model = homerun.load(path, expert_act="fp32")
    srv = Server(Engine(model))
    served, local = [], []
    for _ in range(a.rounds):  # alternate, so drift hits both sides alike
        served.append(served_decode_tok_s(srv, a.gen))
        local.append(inprocess_decode_tok_s(model, a.gen))
    doc = "word " * a.context
    turn1 = [{"role": "user", "content": doc + "\nSummarize."}]
    r1 = srv.client.chat.completions.create(model="bench", messages=turn1, max_tokens=8, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content or ""},
                     {"role": "user", "content": "And in one word?"}]
    reuse_s, cached, prompt_tokens = ttft(srv, turn2)
    srv.close()
    fresh = Server(Engine(homerun.load(path, expert_act="fp32")))
    full_s, fresh_cached, _ = ttft(fresh, turn2)
    fresh.close()
    out = {"served_decode_tok_s": statistics.median(served), "inprocess_decode_tok_s": statistics.median(local),
           "served_over_inprocess": statistics.median(served) / statistics.median(local),
           "rounds": {"served": served, "inprocess": local},
           "turn2_prompt_tokens": prompt_tokens, "turn2_prompt_tokens_cached": cached,
           "fresh_engine_cached": fresh_cached, "turn2_ttft_reuse_s": reuse_s, "turn2_ttft_full_prefill_s": full_s,
           "ttft_speedup": full_s / reuse_s}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
