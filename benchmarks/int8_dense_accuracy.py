"""Issue 19: would int8 x int8 (VNNI) dense prefill linears stay within the accuracy bound? A torch emulation, no C.

The dense FP8 linears (e4m3 + ue8m0 128x128 scales) run today as exact FP8 -> bf16 weights times bf16-rounded
activations (`cpu_gemm.prefill_linear`). The candidate re-quantizes each weight per call to int8 with one scale per
(output row, K-block of `kb` columns), float (amax / 127) or a power of two (2^ceil(log2(amax / 127))), and multiplies
it with the activations quantized exactly as the expert path does (`cpu_experts.quantize_act_int8`: per 32-column
block, d = amax / 127, round half even). Error: the tests' per-linear measure, ||y - ref|| / ||ref|| over the whole
output (`tests/test_cpu_experts.rel_err`), ref = x @ W^T in float64 with W the true dequantized weight.

Variants ("w" = weight planes, "x" = activation planes; VNNI passes = w planes x x planes):
  bf16          the current path (exact weights, bf16 activations)            -- for comparison
  x8            exact weights, q8 activations: the activations' share alone
  w8/kb32f      int8 weights kb 32 float scale, exact activations: the weights' share alone
  w8x8/kb32f, kb32p, kb128f, kb128p   single plane both sides (1 VNNI pass): the candidate
  w16x8/kb128f  two-plane weight (int8 hi + int8 residual lo, float scales), q8 activations (2 passes)
  w8x16/kb32f   one weight plane, two-plane activations (q8 + q8 of the residual, the expert down path's) (2 passes)
  w16x16/kb128f two planes each side, lo x lo dropped (3 passes)

Parts: (1) synthetic families at one shape: weights Gaussian, Student-t (df 3) and Gaussian with outlier input
columns, times activations RMS-normed (gamma 1 +- 0.1), RMS-normed with a few outlier channels (20-60x, as real LLM
hidden states have), and SwiGLU outputs (the shared expert's w2 input); (2) every FP8 linear of a checkpoint
(default: a freshly written tiny "mixed" one; --checkpoint: e.g. the synthetic one-layer V4-Flash); (3) a tiny
model's prefill logits against fp32 when every dense linear takes the variant (experts fp32, router exact, as the
fast set keeps it).

    python benchmarks/int8_dense_accuracy.py [--rows 256] [--n 4096 --k 4096] [--checkpoint DIR] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.getcwd())

import homerun  # noqa: E402,F401  before torch: its OMP_WAIT_POLICY=PASSIVE applies only then
import torch  # noqa: E402

from homerun.formats.quant import dequant_fp8, quant_fp8  # noqa: E402
from homerun.kernels.cpu_experts import quantize_act_int8  # noqa: E402

ACT_BLOCK = 32  # the expert path's activation block


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """The tests' per-linear measure (tests/test_cpu_experts.rel_err)."""
    return float((y.double() - ref.double()).norm() / ref.double().norm())


# ------------------------------------------------------------------------------------------------- quantizers


def act_q8(x: torch.Tensor) -> torch.Tensor:
    """The expert path's q8 activations, dequantized (fp32; exact products of int8 and the fp32 scale)."""
    q, d = quantize_act_int8(x)
    return (q.float().reshape(*d.shape, ACT_BLOCK) * d.unsqueeze(-1)).reshape(x.shape)


def act_q8x2(x: torch.Tensor) -> torch.Tensor:
    """Two activation planes: q8 and q8 of the residual (what the expert down projection does for its input)."""
    hi = act_q8(x)
    return hi + act_q8(x - hi)


def weight_q8(w: torch.Tensor, kb: int, pow2: bool) -> torch.Tensor:
    """int8 with one scale per (row, kb columns), dequantized: float scale amax/127, or 2^ceil(log2(amax/127))."""
    n, k = w.shape
    b = w.reshape(n, k // kb, kb)
    amax = b.abs().amax(-1, keepdim=True)
    s = amax / 127.0
    if pow2:
        s = torch.exp2(torch.ceil(torch.log2(s.clamp_min(1e-38))))
    s = torch.where(amax > 0, s, torch.ones_like(s))
    return (torch.round(b / s).clamp(-127, 127) * s).reshape(n, k)


def weight_q8x2(w: torch.Tensor, kb: int) -> torch.Tensor:
    """Two weight planes: int8 hi and int8 of the residual, each with its own float block scale."""
    hi = weight_q8(w, kb, False)
    return hi + weight_q8(w - hi, kb, False)


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


ident = lambda t: t  # noqa: E731

# name -> (weight transform, activation transform, VNNI passes or None for a non-int8 path)
VARIANTS = {
    "bf16": (ident, bf16, None),
    "x8": (ident, act_q8, None),
    "w8/kb32f": (lambda w: weight_q8(w, 32, False), ident, None),
    "w8x8/kb32f": (lambda w: weight_q8(w, 32, False), act_q8, 1),
    "w8x8/kb32p": (lambda w: weight_q8(w, 32, True), act_q8, 1),
    "w8x8/kb128f": (lambda w: weight_q8(w, 128, False), act_q8, 1),
    "w8x8/kb128p": (lambda w: weight_q8(w, 128, True), act_q8, 1),
    "w16x8/kb128f": (lambda w: weight_q8x2(w, 128), act_q8, 2),
    "w8x16/kb32f": (lambda w: weight_q8(w, 32, False), act_q8x2, 2),
    "w16x16/kb128f": (lambda w: weight_q8x2(w, 128), act_q8x2, 3),
}
SINGLE_PLANE = [v for v, (_, _, p) in VARIANTS.items() if p == 1]


def errors(w_true: torch.Tensor, xs: list[torch.Tensor]) -> list[dict[str, float]]:
    """rel error of every variant for y = x @ w_true^T (w_true fp32 [N, K]), one dict per x (fp32 [T, K])."""
    refs = [x.double() @ w_true.double().T for x in xs]
    out: list[dict[str, float]] = [{} for _ in xs]
    for name, (fw, fx, _) in VARIANTS.items():
        wq = fw(w_true)
        for i, x in enumerate(xs):  # fp32 GEMM: ~1e-6 relative, far below what is measured
            out[i][name] = rel_err(fx(x) @ wq.T, refs[i])
    return out


# ---------------------------------------------------------------------------------------------- families


def fp8_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """The true weight a checkpoint holds: w through e4m3 with 128x128 power-of-two block scales."""
    q, s = quant_fp8(w)
    return dequant_fp8(q, s)


def weight_family(name: str, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    std = 1.0 / k**0.5
    if name == "gaussian":
        w = torch.randn(n, k, generator=g) * std
    elif name == "student_t3":
        # Student-t with 3 degrees of freedom: a normal over the root of a chi-square / 3
        chi = torch.randn(n, k, 3, generator=g).pow(2).sum(-1) / 3
        w = torch.randn(n, k, generator=g) / chi.sqrt() * std
    elif name == "outlier_cols":
        w = torch.randn(n, k, generator=g) * std
        cols = torch.randperm(k, generator=g)[: max(1, k // 512)]
        w[:, cols] *= 10.0
    else:
        raise ValueError(name)
    return fp8_roundtrip(w)


WEIGHT_FAMILIES = ("gaussian", "student_t3", "outlier_cols")
ACT_FAMILIES = ("normed", "normed_outliers", "swiglu")


def act_family(name: str, t: int, k: int, g: torch.Generator) -> torch.Tensor:
    if name == "swiglu":
        a, b = torch.randn(t, k, generator=g) * 1.5, torch.randn(t, k, generator=g)
        return torch.nn.functional.silu(a) * b
    h = torch.randn(t, k, generator=g) * torch.exp(torch.randn(t, 1, generator=g))  # token scales differ
    gamma = 1.0 + 0.1 * torch.randn(k, generator=g)
    if name == "normed_outliers":
        # a few fixed channels 20-60x the rest in every token: the post-norm outlier features of real LLMs
        ch = torch.randperm(k, generator=g)[: max(1, k // 512)]
        gamma[ch] *= 20.0 + 40.0 * torch.rand(ch.numel(), generator=g)
    elif name != "normed":
        raise ValueError(name)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * gamma


def synthetic(rows: int, n: int, k: int) -> dict[str, dict[str, float]]:
    out = {}
    for wf in WEIGHT_FAMILIES:
        w = weight_family(wf, n, k, torch.Generator().manual_seed(1))
        xs = [act_family(af, rows, k, torch.Generator().manual_seed(2)) for af in ACT_FAMILIES]
        for af, e in zip(ACT_FAMILIES, errors(w, xs)):
            out[f"{wf} x {af}"] = e
    return out


# ------------------------------------------------------------------------------------------- checkpoints


def checkpoint_linears(path: Path, max_out: int = 0):
    """(name, true fp32 weight) for every FP8 weight (a .scale beside it) of a checkpoint directory, one at a time;
    max_out > 0 keeps the first max_out rows (a smaller study of the same weights)."""
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys = set(st.keys())
            for key in sorted(keys):
                if not key.endswith(".weight") or key[: -len("weight")] + "scale" not in keys:
                    continue
                if ".experts." in key and "shared_experts" not in key:
                    continue  # routed experts: FP4, already int8 x int8
                w = st.get_tensor(key)
                if w.dtype != torch.float8_e4m3fn:
                    continue
                s = st.get_tensor(key[: -len("weight")] + "scale")
                if max_out:
                    w, s = w[:max_out], s[: -(-max_out // 128)]
                yield key, dequant_fp8(w, s)


def checkpoint_study(path: Path, rows: int, max_out: int) -> dict[str, dict[str, float]]:
    """Every FP8 linear times each activation family; the worst family per variant."""
    out = {}
    for key, w in checkpoint_linears(path, max_out):
        k = w.shape[1]
        per_family = errors(w, [act_family(af, rows, k, torch.Generator().manual_seed(3)) for af in ACT_FAMILIES])
        out[f"{key} {list(w.shape)}"] = {v: max(e[v] for e in per_family) for v in VARIANTS}
        del w
    return out


# ---------------------------------------------------------------------------------------------- tiny model


@contextlib.contextmanager
def dense_linears_as(variant: str):
    """Every FP8 linear and every bf16-weight linear wider than the fast set's exact router width runs `variant`
    (QLinear's torch paths patched; the model must run the torch kernel set)."""
    from homerun.kernels.dispatch import EXACT_MAX_OUT
    from homerun.models.layers import QLinear

    fw, fx, _ = VARIANTS[variant]
    orig_fwd, orig_grp = QLinear.torch_forward, QLinear.torch_grouped

    def takes(lin: QLinear) -> bool:
        return lin.scale is not None or (lin.weight.dtype == torch.bfloat16 and lin.out_features > EXACT_MAX_OUT)

    def fwd(self, x):
        if not takes(self):
            return orig_fwd(self, x)
        shape = x.shape
        y = fx(x.reshape(-1, shape[-1]).float()) @ fw(self.dequant(torch.float32)).T
        return y.reshape(*shape[:-1], -1).to(x.dtype)

    def grp(self, x, groups):
        if not takes(self):
            return orig_grp(self, x, groups)
        per = self.out_features // groups
        w = self.dequant(torch.float32)
        ys = [fx(x[:, g].float()) @ fw(w[g * per : (g + 1) * per]).T for g in range(groups)]
        return torch.stack(ys, dim=1).to(x.dtype)

    QLinear.torch_forward, QLinear.__call__, QLinear.torch_grouped, QLinear.grouped = fwd, fwd, grp, grp
    try:
        yield
    finally:
        QLinear.torch_forward, QLinear.__call__ = orig_fwd, orig_fwd
        QLinear.torch_grouped, QLinear.grouped = orig_grp, orig_grp


def tiny_logits(path: Path, tokens: int, variants: list[str]) -> dict[str, dict[str, float]]:
    """Prefill logits of the tiny model per variant against fp32 (experts fp32, torch kernel set): whole-matrix
    relative error, median row error, rows off by > 5e-2 (discrete flips: a router or indexer near-tie settled the
    other way), max |diff| over max |ref| (the fast-mode test's measure, bound 5e-2), and argmax agreement."""
    import homerun
    from homerun.kernels import dispatch

    model = homerun.load(path, expert_act="fp32")
    ids = torch.randint(0, model.args.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    restore = dispatch.set_native(False)
    try:
        ref = model.logits(ids)
        out = {}
        for v in variants:
            with dense_linears_as(v):
                got = model.logits(ids)
            rows = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
            out[v] = {"rel": rel_err(got, ref), "median_row": float(rows.median()), "flips": int((rows > 0.05).sum()),
                      "max_abs_over_scale": float((got - ref).abs().max() / ref.abs().max()),
                      "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}
    finally:
        restore()
    return out


def write_tiny(root: Path) -> Path:
    from homerun.formats.checkpoint import tiny_config, write_checkpoint

    path = root / "tiny-mixed"
    write_checkpoint(path, tiny_config("mixed"))
    return path


# -------------------------------------------------------------------------------------------------- main


def run(rows: int, n: int, k: int, checkpoint: Path | None, max_out: int, tokens: int, tiny: Path | None) -> dict:
    rec: dict = {"rows": rows, "shape": [n, k], "variants": {v: p for v, (_, _, p) in VARIANTS.items()}}
    rec["synthetic"] = synthetic(rows, n, k)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny or write_tiny(Path(tmp))
        rec["checkpoint"] = checkpoint_study(checkpoint or tiny, rows, max_out)
        rec["tiny_logits"] = tiny_logits(tiny, tokens, [v for v in VARIANTS if v not in ("x8", "w8/kb32f")])
    every = list(rec["synthetic"].values()) + list(rec["checkpoint"].values())
    rec["worst"] = {v: max(e[v] for e in every) for v in VARIANTS}
    return rec


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256, help="activation rows (tokens) per linear")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--checkpoint", type=Path, help="a checkpoint directory whose FP8 linears to study")
    ap.add_argument("--max-out", type=int, default=0, help="study only the first rows of each checkpoint weight")
    ap.add_argument("--tokens", type=int, default=600, help="tiny model prompt length")
    ap.add_argument("--tiny", type=Path, help="a tiny checkpoint to use (default: write the mixed preset)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    for field, v, m in (("--k", a.k, ACT_BLOCK * 4), ("--n", a.n, 1), ("--rows", a.rows, 1)):
        if v <= 0 or v % m:
            print(f"int8_dense_accuracy: {field} {v} must be a positive multiple of {m}", file=sys.stderr)
            sys.exit(2)
    torch.manual_seed(0)
    rec = run(a.rows, a.n, a.k, a.checkpoint, a.max_out, a.tokens, a.tiny)
    if a.json:
        print(json.dumps(rec))
    elif __name__ == "__main__":
        for part in ("synthetic", "checkpoint"):
            print(f"\n{part}: rel error per linear")
            print(f"{'':48s}" + "".join(f"{v:>14s}" for v in VARIANTS))
            for row, e in rec[part].items():
                print(f"{row[:48]:48s}" + "".join(f"{e[v]:14.2e}" for v in VARIANTS))
        print("\nworst:  " + "  ".join(f"{v} {e:.2e}" for v, e in rec["worst"].items()))
        print("\ntiny logits vs fp32:")
        for v, r in rec["tiny_logits"].items():
            print(f"  {v:16s} " + "  ".join(f"{m} {x:.3e}" for m, x in r.items()))
    return rec


if __name__ == "__main__":
    main()
