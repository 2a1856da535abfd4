"""Perplexity of a causal LM on real text, and paired bootstrap intervals between formats.

Windows: the token ids are cut into windows of ``ctx + 1`` tokens that overlap by one token, so the
``ctx`` targets of consecutive windows tile the text exactly once (no target is scored twice, none
is skipped; a last partial window is dropped). With ``bos`` the BOS id is put before every window
(Gemma needs it). Every target is scored with the context of its own window only.

Per-token negative log-likelihoods (nats, float64) are returned as ``[windows, ctx]``, so formats
measured on the same text pair token by token. :func:`paired_bootstrap` resamples blocks of
``block`` consecutive targets (the same blocks for every format) with a seeded generator:
deterministic intervals.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["windows", "token_nll", "perplexity", "increase_pct", "paired_bootstrap", "kl_divergence", "Interval"]


def windows(ids: torch.Tensor, ctx: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """The ``ctx + 1``-token windows of 1-d ``ids`` (see the module docstring)."""
    if ids.dim() != 1 or ctx < 1:
        raise ValueError(f"windows needs 1-d ids and ctx >= 1, got shape {tuple(ids.shape)}, ctx {ctx}")
    n = (ids.numel() - 1) // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    return [ids[i * ctx : i * ctx + ctx + 1] for i in range(n)]


@torch.no_grad()
def token_nll(model: torch.nn.Module, wins: Sequence[torch.Tensor], *, bos: int | None = None,
              batch: int = 4, on_logprobs: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """``[len(wins), ctx]`` float64 per-target NLLs of ``model`` (``model(ids).logits``).

    ``on_logprobs(i, logp)``, when given, receives window ``i``'s float32 log-probabilities
    ``[ctx, vocab]`` (for :func:`kl_divergence`)."""
    out = []
    for start in range(0, len(wins), batch):
        chunk = torch.stack(list(wins[start : start + batch]))
        inp = chunk[:, :-1]
        if bos is not None:
            inp = torch.cat([torch.full((inp.shape[0], 1), bos, dtype=inp.dtype), inp], 1)
        logits = model(inp).logits.float()
        if bos is not None:
            logits = logits[:, 1:]
        logp = torch.log_softmax(logits, -1)
        tgt = chunk[:, 1:]
        out.append(-logp.gather(2, tgt.unsqueeze(2)).squeeze(2).double())
        if on_logprobs is not None:
            for j in range(logp.shape[0]):
                on_logprobs(start + j, logp[j])
    return torch.cat(out)


def perplexity(nll: torch.Tensor) -> float:
    """``exp(mean NLL)``."""
    return math.exp(float(nll.mean()))


def increase_pct(nll: torch.Tensor, ref: torch.Tensor) -> float:
    """The perplexity increase over ``ref``'s, in percent: ``100·(ppl/ppl_ref - 1)``."""
    return 100.0 * math.expm1(float(nll.mean() - ref.mean()))


@dataclass(frozen=True)
class Interval:
    """A point estimate and its paired bootstrap interval (percentage points)."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, *, block: int = 128, resamples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> Interval:
    """Interval of ``increase_pct(a, ref) - increase_pct(b, ref)`` (points of perplexity increase),
    resampling the same blocks of ``block`` consecutive targets for ``a``, ``b`` and ``ref``."""
    flat = [t.reshape(-1) for t in (a, b, ref)]
    if not flat[0].numel() == flat[1].numel() == flat[2].numel():
        raise ValueError("paired_bootstrap needs NLLs of the same targets")
    nblocks = flat[0].numel() // block
    if nblocks < 2:
        raise ValueError(f"paired_bootstrap needs at least 2 blocks of {block} targets")
    sums = [t[: nblocks * block].reshape(nblocks, block).sum(1) for t in flat]  # [nblocks] each
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, nblocks, (resamples, nblocks), generator=gen)
    means = [s[pick].sum(1) / (nblocks * block) for s in sums]
    diff = 100.0 * (torch.expm1(means[0] - means[2]) - torch.expm1(means[1] - means[2]))
    q = torch.quantile(diff, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=diff.dtype))
    value = increase_pct(flat[0], flat[2]) - increase_pct(flat[1], flat[2])
    return Interval(value, float(q[0]), float(q[1]))


def kl_divergence(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(p_ref ‖ p)`` (nats, float64) of two ``[..., vocab]`` log-probability tensors."""
    ref = ref_logp.double()
    return (ref.exp() * (ref - logp.double())).sum(-1)
