"""The log-spaced encoder's shared primitives: cache-sized blocks, the log step, magnitude codes and
exact squared errors.

A leaf of the package (it imports only :mod:`qins.codec` and :mod:`qins.formats`): :mod:`qins.encode`,
:mod:`qins.calibrated` and the kernels (:mod:`qins.kernels`, :mod:`qins.kernels.reference`) all round
with exactly these functions.
"""
from __future__ import annotations

import torch

from .codec import SMALLEST_NORMAL
from .formats import num_levels

__all__: list[str] = []

_CHUNK = 1 << 16  # elements per block in the passes over the weight (stays in L2)


def _chunks(mag: torch.Tensor) -> list[tuple[slice, slice]]:
    """Blocks ``(rows, cols)`` of about ``_CHUNK`` elements that stay in cache, each element in exactly
    one: a single row in column blocks of ``_CHUNK``; rows of ``_CHUNK`` or more elements one a block;
    shorter rows ``_CHUNK // cols`` a block (whole rows, so each block's rows keep their own range)."""
    rows, cols = mag.shape
    if rows == 1 or cols >= _CHUNK:
        step = _CHUNK if rows == 1 else cols
        return [(slice(r, r + 1), slice(c, c + step)) for r in range(rows) for c in range(0, cols, step)]
    per = max(1, _CHUNK // cols)
    return [(slice(r, r + per), slice(None)) for r in range(0, rows, per)]


def _level_step(lo: torch.Tensor, hi: torch.Tensor, k: int) -> torch.Tensor:
    """The float32 log step ``δ = (hi - lo)/(K - 1)`` of each range, ``SMALLEST_NORMAL`` where it is 0
    (every backend of the final codes divides by exactly this)."""
    delta = (hi - lo) / float(k - 1)
    return torch.where(delta > 0, delta, SMALLEST_NORMAL)


def _mag_codes(mag: torch.Tensor, gap: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, packed: bool,
               table: torch.Tensor) -> torch.Tensor:
    """Magnitude codes (float, 0..K) of ``[R, N]`` magnitudes for float32 ranges ``[R, 1]`` and their
    ``[R, 256]`` tables (``level_table``; only level K is read here).

    ``gap = hi - log|w|`` (``+inf`` for zeros). Code ``1 + j`` with ``j = round(gap/δ)``,
    ``δ = (hi - lo)/(K - 1)``, when ``j <= K - 1``; otherwise the nearer of 0 and level K (so
    zeros get 0). A row with ``δ = 0`` gives code 1 to its largest magnitude and flushes the rest.
    """
    k = num_levels(packed)
    j = torch.round(gap / _level_step(lo, hi, k)).clamp_(min=0)  # gap < 0: a capped log_max
    flush = torch.where(mag >= table[:, k : k + 1] * 0.5, float(k - 1), -1.0)  # 2|w| >= level_K, exactly
    return j.where(j < k, flush).add_(1.0)


def _sq_error(mag: torch.Tensor, codes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Row-wise ``Σ(|w| - |ŵ|)²`` in float64; signs are always kept, so this is ``Σ(w - ŵ)²``."""
    dec = torch.gather(table, 1, codes.long())  # table [R, 256] or [1, 256] for codes [R, N] or [1, N]
    # |w| and ŵ are within a factor 2 of each other (or ŵ = 0), so the float32 difference is exact
    # (Sterbenz); squares and sums are float64.
    return (mag - dec).double().square_().sum(dim=1)
