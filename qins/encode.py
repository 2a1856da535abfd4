"""Encoding a float weight in any :class:`~qins.formats.QinsConfig` format, and the MSE range search.

:func:`encode` returns ``(codes, sign, log_min, log_max)``: uint8 codes, int8 sign (``None`` when
packed), and float32 logs, 0-d per tensor or ``[out]`` per row; a ``shared_tables`` config has
``[n]`` logs and adds ``row_table`` (uint8 ``[out]``) and ``row_scale`` (float32 ``[out]``)
(:class:`qins.formats.QinsConfig`). The seed config returns exactly the codes of
:func:`qins.convert_to_qins`.

Guarantees (``δ = (log_max - log_min)/S``, ``S = 126`` packed or ``254`` split, per row or tensor):

* ``|w|`` in ``[exp(log_min), exp(log_max)]``: same sign and ``|log|ŵ| - log|w|| <= δ/2 + ε``
  (``ε = qins_log_slack(log_min, log_max)``).
* ``|w| < exp(log_min)`` (only ``log_range="mse"`` leaves weights there, plus float32 sub-normals):
  ``ŵ`` is whichever of ``{0, ±level_K}`` is nearer (``level_K ≈ exp(log_min)``), so
  ``|ŵ - w| <= exp(log_min)/2·(1 + ε)`` and the sign is kept whenever ``ŵ ≠ 0``.
* Exact zeros stay exact (with their sign bit).
* ``log_range="mse"`` never has a larger ``Σ(w - ŵ)²`` than ``"minmax"`` on the same tensor (per row
  when ``per_row``): the search's best candidate is compared exactly with the minmax range and the
  better one is kept.
"""
from __future__ import annotations

import math

import torch

from . import kernels
from .codec import SMALLEST_NORMAL, _validate, convert_to_qins
from .formats import LOG_FLOAT32_MAX, LOG_FLOAT32_MIN, QinsConfig, level_table, num_levels
from .mulaw import encode_rows, mulaw_range, shared_choice, shared_model, shared_rows
from .rounding import _chunks, _mag_codes, _sq_error

__all__ = ["encode", "encode_shared"]

#: ``(codes, sign, log_min, log_max)``, plus ``row_table, row_scale`` for ``shared_tables`` configs
Encoded = tuple[torch.Tensor, ...]

_COARSE = 48  # candidate spans in the first pass (fractions c/48 of the minmax span)
_FINE = 16  # candidates in the refinement pass, between the coarse neighbours of the best
_BINS = 128  # histogram bins of log|w| per row (per tensor: 4096)
# Local rounds around the best span so far, scored with their in-range rounding weight by weight:
# (number of spans, half-width), evenly spaced over best·[1 - width, 1 + width], plus the best itself.
_LOCAL = ((14, 0.075), (6, 0.005))


def _rows(weight: torch.Tensor, per_row: bool) -> torch.Tensor:
    w = weight.detach().to(torch.float32)
    if per_row:
        if w.dim() != 2:
            raise ValueError(f"per_row needs a 2-d [out, in] weight, got shape {tuple(w.shape)}")
        return w
    return w.reshape(1, -1)


def _model_errors(hist: torch.Tensor, lo0: torch.Tensor, hi: torch.Tensor, spans: torch.Tensor,
                  steps: int) -> torch.Tensor:
    """Modelled ``Σ(w - ŵ)²`` per row and candidate span (``[R, C]``, float64) from a log histogram.

    ``hist`` ``[R, B]`` counts ``log|w|`` in B uniform bins over ``[lo0, hi]``; a bin's weights are
    taken at its centre. In range: ``Σw²·E[(e^r - 1)²]`` for a rounding residual ``r ~ U(-δ/2, δ/2)``.
    Below: each bin goes to 0 or to ``e^L`` by its centre, with that choice's error. Prefix sums
    make it O(R·(B + C)).
    """
    rows, nbins = hist.shape
    span0 = (hi - lo0).double()
    centers = lo0.double() + (torch.arange(nbins, dtype=torch.float64, device=hist.device) + 0.5) / nbins * span0
    count = hist.double()
    e1 = centers.exp()
    zero = torch.zeros(rows, 1, dtype=torch.float64, device=hist.device)
    prefix = [torch.cat([zero, x.cumsum(1)], 1) for x in (count, count * e1, count * e1 * e1)]  # [R, B+1]
    lo = hi.double() - spans  # [R, C]

    def first_bin_at_or_above(x: torch.Tensor) -> torch.Tensor:  # bins whose centre >= x
        pos = torch.ceil((x - lo0.double()) / span0.clamp_min(1e-30) * nbins - 0.5)
        return pos.clamp(0, nbins).long()

    b_in = first_bin_at_or_above(lo)
    b_lv = first_bin_at_or_above(lo - math.log(2.0))
    n_c, s1_c, s2_c = prefix
    s2_all = s2_c[:, -1:]
    s2_in = s2_all - s2_c.gather(1, b_in)
    seg = [p.gather(1, b_in) - p.gather(1, b_lv) for p in prefix]
    e_lo = lo.exp()
    err_level = seg[0] * e_lo * e_lo - 2 * e_lo * seg[1] + seg[2]
    err_zero = s2_c.gather(1, b_lv)
    x = spans / steps / 2
    sinhc = lambda a: torch.where(a < 1e-8, torch.ones_like(a), torch.sinh(a) / a.clamp_min(1e-300))  # noqa: E731
    rel = sinhc(2 * x) - 2 * sinhc(x) + 1  # E[(e^r - 1)^2]
    return s2_in * rel + err_level + err_zero


def _log_histogram(mag: torch.Tensor, gap: torch.Tensor, span0: torch.Tensor, nbins: int) -> torch.Tensor:
    """Counts ``[R, nbins]`` of ``log|w|`` in uniform bins over ``[lo0, hi]``, block by block.

    Magnitudes below ``lo0`` (zeros, sub-normals) go to a dropped bin.
    """
    rows = mag.shape[0]
    scale = (nbins / span0.clamp_min(1e-30)).to(torch.float32)
    top = span0.to(torch.float32)
    hist = torch.zeros(rows, nbins + 1, dtype=torch.int64, device=mag.device)
    base = torch.arange(rows, device=mag.device).unsqueeze(1) * (nbins + 1)
    for r, c in _chunks(mag):
        pos = (top[r] - gap[r, c]).mul_(scale[r]).floor_().clamp_(-1, nbins - 1)
        pos = pos.where(pos >= 0, float(nbins)).long().add_(base[: pos.shape[0]])
        hist[r] += torch.bincount(pos.reshape(-1), minlength=pos.shape[0] * (nbins + 1)).reshape(-1, nbins + 1)
    return hist[:, :nbins]


def _rounding_deviation(mag: torch.Tensor, gap: torch.Tensor, hi: torch.Tensor, spans: torch.Tensor,
                        steps: int) -> torch.Tensor:
    """``Σ w²·(d² - 1/12)`` per row and candidate span (``[R, C]``, float64), over the weights that
    every candidate keeps in range (``hi - log|w| < min span``).

    ``d = t - round(t)``, ``t = (hi - log|w|)/δ``, is a weight's offset from its nearest level in
    steps ``δ = span/steps``; ``δ²·Σw²·d²`` is its rounding error to second order, and ``1/12`` the
    mean of ``d²`` that :func:`_model_errors` assumes. Weights are taken as ``w² - θ²``
    (``θ = exp(hi - min span)``, clamped at 0): 0 for the weights outside that range (up to rounding
    at its edge, where it is ~0 anyway) without a mask; squares are relative to ``exp(2·hi)``, so
    nothing overflows. A ranking score, not an exact error: only the final comparison is exact.
    The sums run in :func:`qins.kernels.rounding_deviation` (native on CPU, one pass).
    """
    tau = spans.min(1, keepdim=True).values.to(torch.float32)  # [R, 1]
    inv = torch.where(spans > 0, steps / spans.clamp_min(1e-300), 0.0).to(torch.float32)  # [R, C]
    unit = torch.exp(-hi)  # [R, 1]: magnitudes relative to max|w| (<= 1 up to rounding)
    floor2 = torch.exp(-2.0 * tau)
    return kernels.rounding_deviation(mag, gap, inv, unit, floor2, tau) * torch.exp(2.0 * hi.double())


def _search(mag: torch.Tensor, gap: torch.Tensor, lo0: torch.Tensor, hi: torch.Tensor,
            packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The MSE-best ``log_min`` per row (``[R, 1]`` float32) and the uint8 magnitude codes for it.

    1. A histogram of ``log|w|`` per row models the error of every candidate span at once
       (:func:`_model_errors`): coarse ``c/48`` of the minmax span, then finer around the best.
    2. Spans around the model's best (``_LOCAL``: 14 over ±7.5%, then 6 over ±0.5% of the best of
       those) are scored by the model plus their in-range rounding computed weight by weight
       (:func:`_rounding_deviation`): which span's levels happen to fall close to the largest
       weights is what the histogram cannot see, and it moves the error by a few percent from one
       span to the next.
    3. The best-scored range is encoded and its exact ``Σ(w - ŵ)²`` compared with the minmax
       range's; minmax is kept on a tie or when it is better (per row, or for the whole tensor).
    """
    rows = mag.shape[0]
    nbins = _BINS if rows > 1 else 4096
    span0 = (hi - lo0).double()
    hist = _log_histogram(mag, gap, span0, nbins)
    steps = num_levels(packed) - 1
    fracs = torch.arange(1, _COARSE + 1, device=mag.device, dtype=torch.float64) / _COARSE
    best = _model_errors(hist, lo0, hi, span0 * fracs, steps).argmin(1, keepdim=True).double() + 1
    fine = (best - 1 + torch.arange(_FINE + 1, device=mag.device, dtype=torch.float64) * 2 / _FINE).clamp(
        1 / _FINE, _COARSE) / _COARSE
    spans = span0 * fine
    span_best = spans.gather(1, _model_errors(hist, lo0, hi, spans, steps).argmin(1, keepdim=True))
    lo_best = torch.where(span0 > 0, hi.double() - span_best, lo0.double()).to(torch.float32)
    for count, width in _LOCAL:
        offsets = torch.linspace(1 - width, 1 + width, count, device=mag.device, dtype=torch.float64)
        los = torch.where(span0 > 0, hi.double() - ((hi - lo_best).double() * offsets).clamp(max=span0), lo0.double())
        los = torch.cat([lo_best, los.to(torch.float32)], 1)  # the best so far stays a candidate
        spans = (hi - los).double()  # the spans the float32 ranges really have
        score = (_model_errors(hist, lo0, hi, spans, steps)
                 + (spans / steps).square() * _rounding_deviation(mag, gap, hi, spans, steps))
        lo_best = los.gather(1, score.argmin(1, keepdim=True))  # first minimum: the incumbent on a tie

    ranges = (lo0, lo_best)
    # [2, R, 256]
    tables = torch.stack([level_table(lo.reshape(-1), hi.reshape(-1), packed, spacing="log") for lo in ranges])
    err, out = kernels.range_codes(mag, gap, torch.cat(ranges, 1), hi, tables, packed, write=1)
    keep = err[:, :1] <= err[:, 1:]  # minmax on a tie (per tensor: the one row is the whole tensor)
    if bool(keep.any()):
        idx = keep.reshape(-1).nonzero().reshape(-1)
        out[idx] = _encode_blocks(mag[idx], gap[idx], lo0[idx], hi[idx], packed)
    return torch.where(keep, lo0, lo_best), out


def _capped(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(log_min, log_max)`` inside ``[LOG_FLOAT32_MIN, LOG_FLOAT32_MAX]`` with ``log_min <=
    log_max``: the range :func:`qins.state.check_qins_state` accepts, whose levels are all finite and
    normal. ``ln`` of float32's maximum rounds up in float32 (an infinite top level), and ``ln`` of its
    smallest normal rounds to a log whose level is subnormal: magnitudes within 4.3e-5 nats above
    2**-126 fall just below the range and round to the nearer of 0 and the smallest level."""
    hi = hi.clamp(LOG_FLOAT32_MIN, LOG_FLOAT32_MAX)
    return torch.minimum(lo.clamp(min=LOG_FLOAT32_MIN), hi), hi


def _encode_blocks(mag: torch.Tensor, gap: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   packed: bool) -> torch.Tensor:
    """uint8 magnitude codes for the ranges ``lo``/``hi`` (``[R, 1]``), computed block by block."""
    out = torch.empty(mag.shape, dtype=torch.uint8, device=mag.device)
    table = level_table(lo.reshape(-1), hi.reshape(-1), packed, spacing="log")
    for r, c in _chunks(mag):
        out[r, c] = _mag_codes(mag[r, c], gap[r, c], lo[r], hi[r], packed, table[r])  # r: a slice of rows
    return out


def encode(weight: torch.Tensor, config: QinsConfig | None = None) -> Encoded:
    """Encode ``weight`` (any float dtype; 2-d for ``per_row``) in ``config``'s format.

    Returns ``(codes, sign, log_min, log_max)``: ``codes`` uint8 of ``weight``'s shape; ``sign`` int8
    ±1 (split) or ``None`` (packed, sign in bit 7); ``log_min``/``log_max`` float32, 0-d per tensor
    or ``[out]`` per row. With ``config.shared_tables = n``: ``(codes, sign, log_min, log_max,
    row_table, row_scale)``, ``[n]`` logs (the layer's tables), uint8 ``row_table`` and float32
    ``row_scale`` ``[out]``; each ``|w|`` is coded to the nearest of its row's decoded values
    (``row_scale[r]`` times its table) or 0, exactly. Guarantees in the module docstring. Raises
    ``ValueError`` for NaN/±Inf,
    non-float, 0-d or empty input (as :func:`qins.convert_to_qins`).
    """
    with torch.no_grad():
        config = config or QinsConfig()
        _validate(weight)
        if config == QinsConfig.codec_compatible():
            codes, sign, lo, hi = convert_to_qins(weight)
            lo, hi = (torch.tensor(v, dtype=torch.float32, device=weight.device) for v in (lo, hi))
            return (codes, sign, *_capped(lo, hi))
        w = _rows(weight, config.per_row)
        if config.shared_tables:
            return encode_shared(w, config)
        mag = w.abs()
        if config.spacing == "mulaw":
            lo, hi = mulaw_range(mag, config.packed)
            return _with_sign(weight, w, encode_rows(mag, lo, hi, config.packed), lo, hi, config)
        logw = torch.log(mag)  # -inf for zeros; sub-normals fall below every range
        lo = torch.where(mag >= SMALLEST_NORMAL, logw, math.inf).amin(1, keepdim=True)
        empty = ~torch.isfinite(lo)  # no normal magnitude in the row: everything flushes
        lo, hi = _capped(lo, logw.amax(1, keepdim=True))
        hi, lo = torch.where(empty, 0.0, hi), torch.where(empty, 0.0, lo)
        gap = hi - logw
        if config.log_range == "mse":
            lo, codes = _search(mag, gap, lo, hi, config.packed)
        else:
            codes = _encode_blocks(mag, gap, lo, hi, config.packed)
        if config.log_range == "mse" and not config.packed and not config.per_row:
            # The split per-tensor minmax format is the seed's codec (its own rounding of the range and
            # codes); keep "never worse than minmax" against exactly that encoding.
            seed = encode(weight, QinsConfig.codec_compatible())
            table = level_table(lo.reshape(-1), hi.reshape(-1), False, spacing="log")
            seed_table = level_table(seed[2].reshape(-1), seed[3].reshape(-1), False, spacing="log")
            if _sq_error(mag, seed[0].reshape(1, -1), seed_table) <= _sq_error(mag, codes, table):
                return seed
        return _with_sign(weight, w, codes, lo, hi, config)


def encode_shared(weight: torch.Tensor, config: QinsConfig, row_blocks: list[tuple[int, int]] | None = None,
                  dtype: torch.dtype | None = None) -> Encoded:
    """:func:`encode` of a 2-d ``weight`` in a ``shared_tables`` config, reading it block by block of
    rows (``row_blocks``: ``[(start, end)]`` covering every row in order; default one block), each
    block converted to ``dtype`` (default its own) and then float32.

    Two passes: every row's model (:func:`qins.mulaw.shared_model`, ``[R, 192]`` float64), from
    which the layer's tables are chosen; then each block's rows, ranges and codes. The transient
    memory is a few float32 copies of one block plus the models, so a layer larger than the memory
    can be encoded from a lazily read tensor. A NaN/±Inf is named with its block's rows when there
    are several blocks. The codes equal those of one block: the tables depend only on the models,
    and a row's range and codes only on its own weights."""
    rows = weight.shape[0]
    blocks = row_blocks or [(0, rows)]

    def block(start: int, end: int) -> torch.Tensor:
        w = weight[start:end] if dtype is None else weight[start:end].to(dtype)
        try:
            _validate(w)
        except ValueError as exc:
            if len(blocks) == 1:
                raise
            raise ValueError(f"rows {start}-{end - 1}: {exc}") from exc
        return w.detach().to(torch.float32)

    models = [shared_model(block(s, e).abs(), config.packed) for s, e in blocks]  # never in place: a view
    picks, order = shared_choice(torch.cat([t for t, _ in models]), torch.cat([m for _, m in models]),
                                 config.shared_tables)
    del models
    codes = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    sign = None if config.packed else torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    row_table = torch.empty(rows, dtype=torch.uint8, device=weight.device)
    row_scale = torch.empty(rows, dtype=torch.float32, device=weight.device)
    lo = hi = None
    for start, end in blocks:
        w = block(start, end)
        mag = w.abs()
        r = shared_rows(mag, config.packed, picks, order[start:end])
        c, g, lo, hi = _with_sign(w, w, encode_rows(mag, r.lo, r.hi, config.packed, r.table), r.log_min, r.log_max,
                                  config)
        codes[start:end] = c
        if sign is not None:
            sign[start:end] = g
        row_table[start:end] = r.row_table
        row_scale[start:end] = r.row_scale.reshape(-1)
    return codes, sign, lo, hi, row_table, row_scale


def _with_sign(weight: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
               config: QinsConfig) -> Encoded:
    """``(codes, sign, log_min, log_max)`` from magnitude codes ``[R, N]`` and ranges ``[R, 1]``:
    the sign in bit 7 (packed) or an int8 ±1 tensor (split), shapes as ``weight`` and the config."""
    negative = torch.signbit(w)
    if config.packed:
        codes = codes | (negative.to(torch.uint8) << 7)
        sign = None
    else:
        sign = torch.where(negative, -1, 1).to(torch.int8).reshape(weight.shape)
    shape = (-1,) if config.per_row else ()
    return codes.reshape(weight.shape), sign, lo.reshape(shape), hi.reshape(shape)
