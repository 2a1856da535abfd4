"""Activation-aware encoding: ranges and codes that minimise a layer's output error.

Given the layer's input second moment ``H = E[x xᵀ]`` (:func:`qins.calibrate`), the expected
squared output error of a quantized weight is ``tr(E H Eᵀ)`` with ``E = W - Ŵ``. The data-free
encoder (:func:`qins.encode`) minimises ``‖E‖²`` instead, which spends the log grid's precision
where the weights are, not where the activations make errors expensive. Two steps, both per row:

1. **Ranges** (``log_min``, ``log_max``): searched to minimise ``Σ_j H_jj·(w_j - ŵ_j)²``, the
   output error of independent rounding errors. Candidates are a grid of top clips (``log_max`` may
   sit below ``ln max|w|``: the largest weights then take level 1) by spans, refined around each
   row's best; the data-free range is always a candidate and wins ties, so the weighted error is
   never larger than the data-free encoding's (with the same rounding).
2. **Codes** (``error_feedback=True``): GPTQ-style (Frantar et al., 2022) error feedback. Columns are
   taken in decreasing ``H_jj``; each is rounded to its row's nearest level (log rounding, as the
   data-free encoder) and its error is spread over the columns not yet rounded through the
   Cholesky factor of ``H⁻¹`` (damped by 1% of the mean diagonal), in blocks of 128 columns.

The stored format and the decode are unchanged: any decoder, kernel and ``qins.load`` reads these
codes. The guarantee ``|log|ŵ| - log|w|| <= δ/2 + ε`` of the data-free encoder does not hold here,
by design (error feedback moves weights to absorb their neighbours' errors).
"""
from __future__ import annotations

import math

import torch

from .codec import _validate
from .encode import Encoded, encode
from .formats import LOG_FLOAT32_MIN, QinsConfig, level_table, num_levels, spacing_steps
from .mulaw import SharedRange, _bracket, mulaw_range, nearest_codes, shared_mulaw_range
from .rounding import _level_step, _mag_codes

__all__ = ["encode_calibrated", "weighted_error", "output_error"]

#: top clips (``log_max = ln(c·max|w|)``) and spans (nats, ``log_max - log_min``) of the first grid
_CLIPS = (1.0, 0.95, 0.9, 0.85)
_SPANS = {True: tuple(2.0 + 0.6 * i for i in range(12)), False: tuple(3.5 + 0.9 * i for i in range(12))}
#: per-row refinement around the best: relative steps of the clip and of the span
_REFINE = ((0.02, 0.1), (0.007, 0.035))
_BLOCK = 128  # columns per error-feedback block
_DAMP = 0.01  # damping of H, as a fraction of its mean diagonal


def _round(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, packed: bool, table: torch.Tensor | None = None,
           spacing: str = "log") -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude codes (0..K) and signed decoded values of ``w`` ``[R, N]`` for ranges ``[R, 1]``: log
    rounding (as :func:`qins.encode`) for the log spacing, the nearest level for mulaw."""
    table = level_table(lo.reshape(-1), hi.reshape(-1), packed, spacing) if table is None else table
    mag = w.abs()
    if spacing == "mulaw":
        codes = nearest_codes(mag, lo, hi, table, packed)
    else:
        codes = _mag_codes(mag, hi - torch.log(mag), lo, hi, packed, table)
    dec = torch.gather(table, 1, codes.long())
    return codes, torch.where(torch.signbit(w), -dec, dec)


def weighted_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per row ``Σ_j h_j·(w_j - ŵ_j)²`` (float64, ``[R]``) for column weights ``h`` ``[N]``."""
    return ((w.double() - w_hat.double()).square() * h.double()).sum(1)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, moment: torch.Tensor) -> float:
    """``tr((W - Ŵ) H (W - Ŵ)ᵀ)``: the expected squared output error summed over rows (float64)."""
    e = w.double() - w_hat.double()
    return float(torch.einsum("ij,jk,ik->", e, moment.double(), e))


def _approx_error(mag: torch.Tensor, logw: torch.Tensor, h: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                  packed: bool) -> torch.Tensor:
    """``Σ_j h_j·(|w_j| - ŵ_j)²`` per row (float32, ``[R]``) for ranges ``[R, 1]``, with the levels
    computed by ``torch.exp`` rather than the bit-exact table: a ranking score for the search, which
    ends with an exact comparison."""
    steps = num_levels(packed) - 1
    delta = _level_step(lo, hi, steps + 1)
    j = torch.round((hi - logw) / delta).clamp_(min=0)
    bottom = torch.exp(lo)
    flush = torch.where(mag >= 0.5 * bottom, bottom, torch.zeros_like(bottom))
    dec = torch.where(j <= steps, torch.exp(hi - j * delta), flush)
    return (mag - dec).square_() @ h


def _search_ranges(w: torch.Tensor, h: torch.Tensor, lo0: torch.Tensor, hi0: torch.Tensor,
                   packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranges ``[R, 1]`` (float32) with the least weighted error; ``(lo0, hi0)`` on ties.

    Candidates are scored by :func:`_approx_error`; the best is then compared exactly (decoded
    through the table) with the data-free range ``(lo0, hi0)`` and kept only where it is better."""
    mag = w.abs()
    logw = torch.log(mag)
    h32 = h.to(torch.float32)
    log_top = logw.amax(1, keepdim=True).clamp(min=LOG_FLOAT32_MIN)  # an all-zero row: -inf
    best_lo, best_hi = lo0, hi0
    best = _approx_error(mag, logw, h32, lo0, hi0, packed)

    def consider(lo: torch.Tensor, hi: torch.Tensor) -> None:
        nonlocal best, best_lo, best_hi
        hi = hi.clamp(max=hi0)
        lo = torch.minimum(lo.clamp(min=LOG_FLOAT32_MIN), hi)  # every level a normal float32
        err = _approx_error(mag, logw, h32, lo, hi, packed)
        better = err < best
        best = torch.where(better, err, best)
        best_lo, best_hi = torch.where(better.unsqueeze(1), lo, best_lo), torch.where(better.unsqueeze(1), hi, best_hi)

    for clip in _CLIPS:
        hi = log_top + float(torch.log(torch.tensor(clip)))
        for span in _SPANS[packed]:
            consider(hi - span, hi)
    for dc, ds in _REFINE:
        clip = torch.exp(best_hi - log_top)
        span = best_hi - best_lo
        for a in (-1, 0, 1):
            hi = log_top + torch.log((clip * (1 + a * dc)).clamp(max=1.0))
            for b in (-1, 0, 1):
                if a or b:
                    consider(hi - span * (1 + b * ds), hi)
    exact_new = weighted_error(w, _round(w, best_lo, best_hi, packed)[1], h)
    exact_old = weighted_error(w, _round(w, lo0, hi0, packed)[1], h)
    keep = (exact_new < exact_old).unsqueeze(1)
    return torch.where(keep, best_lo, lo0), torch.where(keep, best_hi, hi0)


def _mulaw_values(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, packed: bool,
                  table: torch.Tensor) -> torch.Tensor:
    """``_round(w, lo, hi, packed, table, "mulaw")[1]`` without the codes: the nearer of
    :func:`qins.mulaw._bracket`'s two levels is the table entry that the code would read (the zero
    included), so the codes' integer arithmetic and the gather through them are skipped."""
    mag = w.abs()
    _, a, b = _bracket(mag, lo, hi, table, packed)
    dec = torch.where((b - mag).abs_() < (a - mag).abs_(), b, a)  # ties keep a, as nearest_codes
    return torch.where(torch.signbit(w), -dec, dec)


def _mulaw_ranges(w: torch.Tensor, h: torch.Tensor, packed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mulaw ranges ``[R, 1]`` searched for the least ``Σ_j h_j·(w_j - ŵ_j)²``; the data-free
    range where it is as good (compared exactly), so the weighted error is never larger. Also their
    ``[R, 256]`` tables: a table row depends only on its own range, so the chosen rows of the two
    candidates' tables are the chosen ranges' table."""
    mag = w.abs()
    lo0, hi0 = mulaw_range(mag, packed)
    lo, hi = mulaw_range(mag, packed, column_weight=h)
    table_new = level_table(lo.reshape(-1), hi.reshape(-1), packed, "mulaw")
    table_old = level_table(lo0.reshape(-1), hi0.reshape(-1), packed, "mulaw")
    new = weighted_error(w, _mulaw_values(w, lo, hi, packed, table_new), h)
    old = weighted_error(w, _mulaw_values(w, lo0, hi0, packed, table_old), h)
    keep = (new < old).unsqueeze(1)
    return torch.where(keep, lo, lo0), torch.where(keep, hi, hi0), torch.where(keep, table_new, table_old)


def _shared_ranges(w: torch.Tensor, h: torch.Tensor, packed: bool, tables: int) -> SharedRange:
    """The ``shared_tables`` ranges searched for the least ``Σ_r Σ_j h_j·(w_rj - ŵ_rj)²`` over the
    layer; the data-free ones where they are as good (compared exactly), as :func:`_mulaw_ranges` per row."""
    mag = w.abs()
    best, best_err = None, math.inf
    for cand in (shared_mulaw_range(mag, packed, tables), shared_mulaw_range(mag, packed, tables, column_weight=h)):
        err = float(weighted_error(w, _mulaw_values(w, cand.lo, cand.hi, packed, cand.table), h).sum())
        if best is None or err < best_err:
            best, best_err = cand, err
    return best


def _feedback_codes(w: torch.Tensor, moment: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, packed: bool,
                    spacing: str = "log", table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-style codes: magnitude codes (uint8 ``[R, N]``) and the negative mask of the values rounded.
    ``table``: the ranges' ``level_table``, when the caller has it."""
    rows, n = w.shape
    table = level_table(lo.reshape(-1), hi.reshape(-1), packed, spacing) if table is None else table
    H = moment.to(torch.float64).clone()
    diag = torch.diagonal(H)
    dead = diag <= 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    H = H[perm][:, perm]
    damp = _DAMP * torch.diagonal(H).mean()
    eye = torch.eye(n, dtype=torch.float64, device=H.device)
    for _ in range(6):  # a singular H (too few calibration rows) gets more damping
        chol, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            break
        damp = damp * 10
    else:
        raise ValueError("encode_calibrated: the input moment is not positive definite even after damping")
    U = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).to(torch.float32)
    W = w[:, perm].to(torch.float32).clone()
    # The loop runs once per column, so its cost is the number of torch calls and the memory they
    # touch, not arithmetic: everything that does not depend on the column is computed once, each
    # block is worked on transposed (a column is then a contiguous row that stays in cache, not a
    # strided walk over all of W), and each step is the same float32 operations on the same values
    # as _round and the update (so the same codes, bit for bit), with fewer calls. Exact operations
    # (abs, sign, comparisons, gathers, copies) may be merged or change layout; the rounded ones
    # (log, sub, div, mul, the block's matmul) keep their order, operands and shapes.
    step = _column_rounder(lo, hi, packed, table, spacing)
    idx = torch.empty(n, rows, dtype=torch.int64, device=w.device)  # per column: an index into the rounder's levels
    neg = torch.empty(n, rows, dtype=torch.bool, device=w.device)  # per column: the sign bits
    q = torch.empty(rows, 1, dtype=torch.float32, device=w.device)  # the column's signed rounded values
    udiag = torch.diagonal(U)  # 0-d float32 divisors, as U[i, i]
    scratch = torch.empty(_BLOCK, rows, dtype=torch.float32, device=w.device)
    for i1 in range(0, n, _BLOCK):
        i2 = min(i1 + _BLOCK, n)
        W1 = W[:, i1:i2].t().contiguous()  # [block, R]
        err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            col, e = W1[i].unsqueeze(1), err1[i : i + 1]
            idx[c].unsqueeze(1).copy_(step(col, q, neg[c].unsqueeze(1)))
            torch.div(col - q, udiag[c], out=e.t())
            # column i itself is never read again, so only the later ones take the update
            if c + 1 < i2:
                prod = torch.mul(U[c, c + 1 : i2].unsqueeze(1), e, out=scratch[: i2 - c - 1])
                W1[i + 1 :].sub_(prod)
        W[:, i2:] -= err1.t().contiguous() @ U[i1:i2, i2:]
    k = num_levels(packed)
    # mulaw: index j is level j + 1, and j = K the zero, code 0
    codes = torch.where(idx == k, 0, idx + 1).to(torch.uint8) if spacing == "mulaw" else idx.to(torch.uint8)
    inv = torch.argsort(perm)
    return codes[inv].t().contiguous(), neg[inv].t().contiguous()


def _signed(dec: torch.Tensor, col: torch.Tensor, q: torch.Tensor, neg: torch.Tensor) -> None:
    """``neg = signbit(col)`` and ``q = where(neg, -dec, dec)``, as :func:`_round` (not ``copysign``,
    which differs from it for a negative level, a degenerate range's table)."""
    torch.signbit(col, out=neg)
    torch.where(neg, -dec, dec, out=q)


def _column_rounder(lo: torch.Tensor, hi: torch.Tensor, packed: bool, table: torch.Tensor, spacing: str):
    """``step(col, q, neg)``: rounds one column ``col`` ``[R, 1]`` as :func:`_round` does, writes its
    signed decoded values into ``q`` and its sign bits into ``neg`` (``[R, 1]`` each) and returns an
    int64 ``[R, 1]`` index: the magnitude code for the log spacing, ``(code - 1) mod (K + 1)`` for
    mulaw (:func:`_feedback_codes` maps it back).

    The per-range quantities are computed once, by the same operations as :func:`qins.mulaw._bracket`
    and :func:`qins.rounding._mag_codes`."""
    k = num_levels(packed)
    if spacing == "mulaw":
        delta = (hi - lo) / float(spacing_steps(packed, "mulaw"))
        z = torch.exp(lo)
        # level j at index j (j = K: the zero), and one more zero so that index j + 1 needs no cap
        levels = torch.cat([table[:, 1 : k + 1], torch.zeros_like(table[:, :2])], 1)
        pair = torch.arange(2, device=lo.device).reshape(1, 2)

        def step(col: torch.Tensor, q: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
            mag = col.abs()
            t = (hi - torch.log(mag + z)).div_(delta)
            j0 = t.floor_().clamp_(0, k).long()
            ab = levels.gather(1, j0 + pair)  # the levels j0 and j0 + 1 (nearest_codes' a and b)
            d = ab.sub_(mag).abs_()
            j = j0.add_(d[:, 1:] < d[:, :1])  # ties keep a: the larger level
            _signed(levels.gather(1, j), col, q, neg)
            return j

        return step
    delta = _level_step(lo, hi, k)
    half = table[:, k : k + 1] * 0.5

    def step(col: torch.Tensor, q: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        mag = col.abs()
        j = torch.round((hi - torch.log(mag)) / delta).clamp_(min=0)
        flush = torch.where(mag >= half, float(k - 1), -1.0)
        c = j.where(j < k, flush).add_(1.0).long()
        _signed(table.gather(1, c), col, q, neg)
        return c

    return step


def encode_calibrated(weight: torch.Tensor, moment: torch.Tensor, config: QinsConfig | None = None, *,
                      error_feedback: bool = True) -> Encoded:
    """Encode a 2-d ``weight`` ``[out, in]`` for inputs of second moment ``moment`` ``[in, in]``.

    Returns the tensors of :func:`qins.encode` for ``config`` (``row_scale`` too when
    ``shared_tables``; same format, same decode). ``config`` must be per row (the default ``QinsConfig()``);
    its ``log_range`` is not used.
    With ``error_feedback=False`` only the ranges change and the codes round each weight to its
    nearest level. Deterministic. Raises ``ValueError`` for a per-tensor config, a moment of the
    wrong shape or with NaN/Inf, and the inputs :func:`qins.encode` refuses.
    """
    config = config or QinsConfig()
    if not config.per_row:
        raise ValueError("encode_calibrated needs a per_row config (its ranges are chosen per output row)")
    _validate(weight)
    if weight.dim() != 2:
        raise ValueError(f"encode_calibrated needs a 2-d [out, in] weight, got shape {tuple(weight.shape)}")
    if moment.shape != (weight.shape[1], weight.shape[1]) or not bool(torch.isfinite(moment).all()):
        raise ValueError(f"moment must be a finite [{weight.shape[1]}, {weight.shape[1]}] tensor, "
                         f"got {tuple(moment.shape)}")
    with torch.no_grad():
        moment = moment.to(weight.device)
        w = weight.detach().to(torch.float32)
        h = torch.diagonal(moment).to(torch.float64).clamp_min(0)
        h = h / h.mean().clamp_min(1e-300)
        spacing = config.spacing
        table = shared = None
        if config.shared_tables:
            shared = _shared_ranges(w, h, config.packed, config.shared_tables)
            lo, hi, table = shared.lo, shared.hi, shared.table
        elif spacing == "mulaw":
            lo, hi, table = _mulaw_ranges(w, h, config.packed)
        else:
            _, _, lo0, hi0 = encode(w, QinsConfig(packed=config.packed, log_range="mse", per_row=True, spacing="log"))
            lo, hi = _search_ranges(w, h, lo0.reshape(-1, 1), hi0.reshape(-1, 1), config.packed)
        if error_feedback:
            mags, negative = _feedback_codes(w, moment, lo, hi, config.packed, spacing, table)
        else:
            mags = _round(w, lo, hi, config.packed, table, spacing=spacing)[0].to(torch.uint8)
            negative = torch.signbit(w)
        if config.packed:
            codes, sign = mags | (negative.to(torch.uint8) << 7), None
        else:
            codes, sign = mags, torch.where(negative, -1, 1).to(torch.int8)
        assert int(mags.max()) <= num_levels(config.packed)
        if shared is not None:
            return codes, sign, shared.log_min, shared.log_max, shared.row_table, shared.row_scale.reshape(-1)
        return codes, sign, lo.reshape(-1), hi.reshape(-1)
