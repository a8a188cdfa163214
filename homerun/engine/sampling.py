"""Next-token choice from one logits row: greedy, or temperature / top-k / top-p sampling with an explicit
`torch.Generator` (a seed makes a run reproducible). Batch size 1. No model code, no I/O. `check_sampling` states
and checks each setting's range without importing torch, so the CLI can refuse a bad flag at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping

from homerun.errors import NumericError, UsageError

if TYPE_CHECKING:
    import torch


# The valid range of each sampling setting, as the CLI's help and errors state it.
SEED_MAX = 2**64 - 1
# What `sample_tensor` returns for a logits row holding NaN: no token has this id, so the one readback of the id
# (`read_token`) finds a broken step without a host sync of its own.
NAN_TOKEN = -1
SAMPLING_RANGES: dict[str, str] = {
    "temperature": "a finite number >= 0 (0 = greedy)",
    "top_p": "in (0, 1] (1 = off)",
    "top_k": "an integer >= 0 (0 = off)",
    "max_new_tokens": "an integer >= 1",
    "seed": f"an integer from 0 to {SEED_MAX}",
}


def _out_of_range(name: str, value: Any) -> bool:
    if name == "temperature":
        return not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0)
    if name == "top_p":
        return not (isinstance(value, (int, float)) and 0.0 < value <= 1.0)  # NaN fails both comparisons
    if name == "top_k":
        return not (isinstance(value, int) and value >= 0)
    if name == "max_new_tokens":
        return not (isinstance(value, int) and value >= 1)
    if name == "seed":
        return not (isinstance(value, int) and 0 <= value <= SEED_MAX)
    raise KeyError(name)


def check_sampling(**values: Any) -> None:
    """Raise UsageError naming the first setting out of its range (None means unset and is always valid). Run
    before anything is generated, so a bad value fails at once instead of in every later turn."""
    for name, value in values.items():
        if value is not None and _out_of_range(name, value):
            raise UsageError(f"{name.replace('_', '-')} must be {SAMPLING_RANGES[name]}, got {value!r}",
                             hint="temperature 0 means greedy (argmax)" if name == "temperature" else None)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 (or greedy=True) means argmax; top_p 1.0 and top_k 0/None disable those filters."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    greedy: bool = False

    def __post_init__(self) -> None:
        check_sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0 or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def resolve(
        cls,
        generation_config: Mapping[str, Any] | None = None,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        greedy: bool = False,
    ) -> "SamplingParams":
        """Explicit arguments win; missing ones come from generation_config.json (defaults 1.0 / 1.0 / off).
        generation_config `do_sample: false` means greedy unless a temperature is given."""
        gc = dict(generation_config or {})
        if temperature is None and gc.get("do_sample") is False:
            greedy = True
        t = float(temperature if temperature is not None else gc.get("temperature", 1.0))
        p = float(top_p if top_p is not None else gc.get("top_p", 1.0))
        k = top_k if top_k is not None else gc.get("top_k")
        return cls(temperature=t, top_p=p, top_k=int(k) if k else None, greedy=greedy)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded with `seed`, or from OS entropy when seed is None. Make it where the logits are
    (`generate` does): `sample_tensor` draws on the logits' device and refuses a generator elsewhere. Each device
    type has its own generator (the CPU's Mersenne Twister, CUDA's Philox), so one seed reproduces a run on one
    device but gives other tokens on the CPU than on a GPU (whose bf16 logits differ from the CPU's anyway)."""
    import torch  # lazily: the CLI checks sampling flags (check_sampling) before anything imports torch

    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled fp32 logits [V] with the top-k / top-p filtered tokens set to -inf. Temperature comes
    first, so top-p sees the tempered distribution; top-k keeps the k largest (and any tied with the k-th, as
    transformers does), then top-p keeps the smallest set of the rest that covers top_p (of tokens tied where the
    set ends, the lowest ids)."""
    import torch

    x = logits.float() / max(params.temperature, 1e-8)
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        kept = _top_p_on_host(x, params.top_p) if x.device.type == "cpu" else None
        x = _top_p_sorted(x, params.top_p) if kept is None else kept
    return x


def _top_p_drop(sorted_x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which places of the descending logits top-p drops: a token goes when the tokens before it already cover
    top_p. The first token always stays: the mass before it is exactly 0 and top_p > 0 (SamplingParams checks it)."""
    import torch

    probs = torch.softmax(sorted_x, dim=-1)
    return (torch.cumsum(probs, dim=-1) - probs) >= top_p


def _top_p_sorted(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p through a full sort (stable: of tied tokens the lower id comes first). No host read, so a device
    runs it without a sync; on the host the sort of the whole vocabulary is most of a sampled token's cost."""
    import torch

    sorted_x, order = torch.sort(x, descending=True, stable=True)
    drop = _top_p_drop(sorted_x, top_p)
    return x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))


def _top_p_on_host(x: torch.Tensor, top_p: float) -> torch.Tensor | None:
    """`_top_p_sorted`'s result without its argsort: numpy sorts the values alone (a vectorized sort, ~30x
    faster at V4's vocabulary), the same softmax and cumsum of those values give the same drops, and the kept
    set is then every token above the last kept value plus, of the tokens tied with it, the lowest ids (the
    stable order). None (take the sorted path) without numpy, for NaN logits, or where rounding dropped a token
    before the last kept one (there the stable order itself would be needed)."""
    try:
        import numpy as np
    except ImportError:  # torch runs without numpy
        return None
    import torch

    xn = x.numpy()
    if np.isnan(xn).any():
        return None
    # The values torch.sort(descending) returns (ties and the sign of zero change no softmax or cumsum bit).
    sorted_xn = np.sort(xn)[::-1].copy()
    keep_at = ~_top_p_drop(torch.from_numpy(sorted_xn), top_p).numpy()
    n_keep = int(keep_at.sum())
    if not keep_at[:n_keep].all():
        return None
    last = sorted_xn[n_keep - 1]
    keep = xn > last
    tied = np.flatnonzero(xn == last)[: n_keep - int(keep.sum())]
    keep[tied] = True
    return x.masked_fill(torch.from_numpy(~keep), float("-inf"))


def nan_logits_error(where: str) -> NumericError:
    return NumericError(f"NaN logits at {where}: the model, a kernel or the device computed NaN",
                        hint="a bug, not a setting: report it with the model, placement and prompt")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]. Raises NumericError for a row holding NaN (argmax would return some id)."""
    import torch

    if logits.dim() != 1:
        raise UsageError(f"sample() takes one logits row [V], got shape {tuple(logits.shape)}")
    if bool(torch.isnan(logits).any()):
        raise nan_logits_error("sample()")
    if params.is_greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits, params), dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


def sampling_draw(logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None = None) -> torch.Tensor | None:
    """The random draw one sampled token takes from `generator`: q ~ Exp(1), one per vocabulary entry, drawn by
    `exponential_` on the logits' device (ATen's one-sample `torch.multinomial` fast path draws the same). None for
    greedy, which draws nothing. The generator must be on the logits' device (`make_generator(seed,
    logits.device)`): a host generator beside GPU logits would draw V values on the CPU and copy them up every token
    (about 2 ms and 517 KB at V4's vocabulary), so it is refused. A caller that must choose again from other logits
    of the same step (a speculated step's redo) passes this draw back to `sample_tensor` instead of saving and
    restoring the generator's state around a second draw."""
    import torch

    if params.is_greedy:
        return None
    if generator is not None and generator.device != logits.device:
        raise UsageError(f"the sampling generator is on {generator.device} but the logits are on {logits.device}",
                         hint="make it with make_generator(seed, logits.device)")
    return torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(1, generator=generator)


def sample_tensor(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None, *,
                  draw: torch.Tensor | None = None) -> torch.Tensor:
    """`sample` without the readback: the token id as an int64 tensor [1] on the logits' device, so a decode loop can
    feed it to the next step and read it back once (`read_token`). Draws what `sample` draws from the same generator
    state: `torch.multinomial` of one sample is argmax(probs / q) with q ~ Exp(1) (`sampling_draw`, or `draw` when
    given: then the generator is not touched).

    A row holding NaN gives NAN_TOKEN, decided on the device without a pass of its own over the row: the choice is
    `torch.max`, whose value is NaN exactly when its input holds one (ATen's max reduction prefers NaN, on the CPU and
    in CUDA's MaxOps), and a NaN logit stays NaN through the temperature, both filters (every comparison with it is
    false, so nothing drops it) and the softmax, then divided by a draw q > 0 (ATen's `exponential_` avoids 0; a 0
    over a dropped token would read as NaN: a false alarm, where argmax had chosen the dropped token). So the check
    is two launches on one element (isnan, masked_fill). Sampled, a +inf logit is caught too: its softmax is NaN
    (inf - inf), which `sample` refuses as well."""
    import torch

    if logits.dim() != 1:
        raise UsageError(f"sample() takes one logits row [V], got shape {tuple(logits.shape)}")
    if params.is_greedy:
        best, token = torch.max(logits, 0)
    else:
        probs = torch.softmax(filter_logits(logits, params), dim=-1)
        q = draw if draw is not None else sampling_draw(logits, params, generator)
        best, token = torch.max(probs / q, 0)
    return token.masked_fill(torch.isnan(best), NAN_TOKEN).reshape(1)


def read_token(token: torch.Tensor, where: str) -> int:
    """The id `sample_tensor` returned, read back (a decode loop's one host sync per token). Raises NumericError
    naming `where` (the step) when the logits held NaN."""
    token_id = int(token)
    if token_id == NAN_TOKEN:
        raise nan_logits_error(where)
    return token_id
