"""The μ-law spacing's encoder: the range that minimises the (weighted) squared error, and exact
nearest-level codes.

Levels (:func:`qins.formats.level_table`, ``spacing="mulaw"``): ``m_j = exp(hi - j·δ) - z`` for
``j = 0..K-1`` with ``δ = (hi - lo)/K`` and ``z = exp(lo)``; ``j = K`` would be 0, code 0. With
``D = hi - lo`` the span and ``X`` the top level, ``z = X/(e^D - 1)``: ``D`` alone sets the shape
(``D → 0``: int8's uniform grid; large ``D``: the log grid) and ``X`` the scale.

**Range.** A weight ``|w|`` rounded to its nearest level has error about uniform over the step
``(|w| + z)·δ`` around it, so a row's error is modelled by
``E(D) = (D/K)²/12 · Σ_i c_i·(|w_i| + z(D))²`` with ``c_i = 1`` (data-free) or the column's input
second moment (calibrated, :mod:`qins.calibrated`). It needs three sums per row
(``Σc``, ``Σc|w|``, ``Σcw²``), so every candidate ``D`` of a fine grid is scored at once; the best
two are then scored exactly (encoded and their error summed, on every 4th column of rows of 256
columns or more) and the better kept.
``X = max|w|``: no weight is clipped.

**Codes.** Each ``|w|`` goes to the nearest table value of its row (the float32 table the kernels
decode, not the formula), ties to the larger level; exact zeros to code 0. So
``|ŵ - w| = min_j |m_j - |w||`` exactly, and ``<= (e^δ - 1)/2·(|w| + z)`` (up to float32
rounding of the levels) for ``|w|`` up to the top level.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .codec import SMALLEST_NORMAL
from .formats import LOG_FLOAT32_MAX, LOG_FLOAT32_MIN, level_table, num_levels, spacing_steps

__all__ = ["mulaw_range", "shared_mulaw_range", "shared_model", "shared_choice", "shared_rows", "SharedRange",
           "nearest_codes", "SPANS"]

#: candidate spans ``D`` (nats): geometric from 0.02 (close to int8's uniform grid) to 24
SPANS = tuple(0.02 * (1200.0 ** (i / 191)) for i in range(192))
_SAMPLE = 4  # wide rows: the candidates are scored exactly on every 4th column
_EXACT = 2  # candidates scored exactly: the model's best two (a third costs a pass over the weight for ~2% of error)
_CHUNK = 1 << 19  # elements per block of the exact passes


def _top_log(top: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """float64 ``hi = ln X - ln(1 - e^-D)`` for top levels ``X = top`` and spans ``D`` (broadcast)."""
    return top.log() - torch.log(-torch.expm1(-spans))


def _ranges(hi: torch.Tensor, spans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(lo, hi)`` of float64 :func:`_top_log` values ``hi`` and spans ``spans``:
    ``lo = hi - D``, both capped into the range states accept."""
    lo = hi - spans
    hi32 = hi.clamp(max=LOG_FLOAT32_MAX).to(torch.float32)
    lo32 = torch.minimum(lo.clamp(min=LOG_FLOAT32_MIN).to(torch.float32), hi32)
    return lo32, hi32


def _bracket(mag: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, table: torch.Tensor, packed: bool):
    """``(j0, a, b)``: the level index ``j0`` just above ``|w|`` (``floor(t)``, ``t = (hi - ln(|w| + z))/δ``;
    index ``K`` is 0) and the table values ``a`` of ``j0`` and ``b`` of ``j0 + 1`` (capped at ``K``)."""
    k = num_levels(packed)
    delta = (hi - lo) / float(spacing_steps(packed, "mulaw"))
    t = (hi - torch.log(mag + torch.exp(lo))).div_(delta)
    j0 = t.floor_().clamp_(0, k).long()
    mags = torch.cat([table[:, 1 : k + 1], torch.zeros_like(table[:, :1])], 1)  # index j: level j; K: 0
    return j0, mags.gather(1, j0), mags.gather(1, (j0 + 1).clamp_(max=k))


def nearest_codes(mag: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, table: torch.Tensor,
                  packed: bool) -> torch.Tensor:
    """Magnitude codes (int64, 0..K) of ``mag`` ``[R, N]`` (``|w|``, float32) for mulaw ranges
    ``[R, 1]`` with tables ``[R, 256]``: the nearest of the row's levels and 0, ties to the larger
    level (exact zeros get 0).

    ``t = (hi - ln(|w| + z))/δ`` places ``|w|`` between levels ``floor(t)`` and ``floor(t) + 1``
    (level ``K`` is 0); float32 rounding moves ``t`` by far less than a step, so where it crosses
    an integer ``|w|`` is within rounding of that level, which is then one of the two candidates
    and the nearest. The comparison itself reads the table: exact."""
    k = num_levels(packed)
    j0, a, b = _bracket(mag, lo, hi, table, packed)
    take_b = (b - mag).abs_() < (a - mag).abs_()  # ties keep a: the larger level
    j = j0.add_(take_b)  # K (the zero) wraps to code 0 below
    return j.add_(1).remainder_(k + 1)


def _blocks(rows: int, cols: int) -> list[tuple[slice, slice]]:
    """``(rows, cols)`` blocks of about ``_CHUNK`` elements: whole rows, or one row in column blocks."""
    if rows == 1 or cols >= _CHUNK:
        step = _CHUNK
        return [(slice(r, r + 1), slice(c, c + step)) for r in range(rows) for c in range(0, cols, step)]
    per = max(1, _CHUNK // max(cols, 1))
    return [(slice(r, min(rows, r + per)), slice(None)) for r in range(0, rows, per)]


def encode_rows(mag: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, packed: bool,
                table: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 magnitude codes of ``mag`` ``[R, N]`` for ranges ``[R, 1]``, block by block; ``table``
    (``[R, 256]``): the values the codes decode to, when not the ranges' own ``level_table``."""
    table = level_table(lo.reshape(-1), hi.reshape(-1), packed, "mulaw") if table is None else table
    out = torch.empty(mag.shape, dtype=torch.uint8, device=mag.device)
    for r, c in _blocks(*mag.shape):
        out[r, c] = nearest_codes(mag[r, c], lo[r], hi[r], table[r], packed).to(torch.uint8)
    return out


def _exact_error(mag: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, packed: bool,
                 c: torch.Tensor | None, table: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise ``Σ c·(|w| - |ŵ|)²`` (float64 ``[R]``) of the nearest-level codes of ranges ``[R, 1]``
    (``table``: as :func:`encode_rows`)."""
    table = level_table(lo.reshape(-1), hi.reshape(-1), packed, "mulaw") if table is None else table
    err = torch.zeros(mag.shape[0], dtype=torch.float64, device=mag.device)
    for r, cols in _blocks(*mag.shape):
        m = mag[r, cols]
        _, a, b = _bracket(m, lo[r], hi[r], table[r], packed)
        e = torch.minimum(a.sub_(m).abs_(), b.sub_(m).abs_()).square_()  # the nearest level's error
        err[r] += (e * c[:, cols]).sum(1, dtype=torch.float64) if c is not None else e.sum(1, dtype=torch.float64)
    return err


def _row_model(mag: torch.Tensor, packed: bool, column_weight: torch.Tensor | None):
    """``(top, spans, zu, model)``: each row's ``max|w|`` (float64 ``[R, 1]``), :data:`SPANS` ``[1, C]``,
    the offset ``z`` of each span in units of ``max|w|`` (``[1, C]``) and the modelled error ``[R, C]``
    of every row and span in units of ``max|w|²`` (scale-free: the same argmin per row, and nothing
    overflows near float32's maximum). Module docstring: ``E(D)``."""
    k = num_levels(packed)
    top = mag.amax(1, keepdim=True).double()
    u = mag * torch.where(top > 0, 1.0 / top, 0.0).to(torch.float32)
    if column_weight is None:
        a0 = torch.full_like(top, float(mag.shape[1]))
        a1, a2 = u.sum(1, keepdim=True, dtype=torch.float64), (u * u).sum(1, keepdim=True, dtype=torch.float64)
    else:
        c = column_weight.to(torch.float32).reshape(1, -1)
        a0 = column_weight.to(torch.float64).sum().expand_as(top)
        u.mul_(c.sqrt())
        a1 = (u * c.sqrt()).sum(1, keepdim=True, dtype=torch.float64)
        a2 = (u * u).sum(1, keepdim=True, dtype=torch.float64)
    del u
    spans = torch.tensor(SPANS, dtype=torch.float64, device=mag.device).reshape(1, -1)
    zu = 1.0 / torch.expm1(spans)
    return top, spans, zu, (spans / k).square() * (a2 + 2 * zu * a1 + zu.square() * a0)


def mulaw_range(mag: torch.Tensor, packed: bool,
                column_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 range ``(lo, hi)`` (``[R, 1]`` each) of rows ``mag`` ``[R, N]`` (``|w|``) that
    minimises ``Σ_i c_i·(|w_i| - |ŵ_i|)²`` over :data:`SPANS`, with ``c = column_weight`` ``[N]``
    (``>= 0``) or 1. Module docstring: the model picks, the best :data:`_EXACT` are scored exactly.

    A row whose largest magnitude is 0 or too small for normal levels (below about ``K·2**-126``)
    gets the range of ``X = 1, D = 1`` and flushes to zero (every ``|w|`` there is below 1.6e-36).
    A row near float32's maximum gets the widest span, its top level capped 1e-5 below ``max|w|``."""
    rows = mag.shape[0]
    k = num_levels(packed)
    top, spans, zu, model = _row_model(mag, packed, column_weight)
    z = top * zu
    # spans whose smallest level (≈ z·δ) would not be a normal float32, or whose logs leave the range
    hi64 = _top_log(top, spans)
    lo, hi = _ranges(hi64, spans)
    small = z * torch.expm1(spans / k) < 4 * SMALLEST_NORMAL
    # a range capped at LOG_FLOAT32_MAX has a top level below max|w| (rows near float32's maximum):
    # only the widest span, whose cap costs < 1e-5 relative, is kept for those
    capped = hi64 > LOG_FLOAT32_MAX + 1e-5
    capped[:, -1] = False
    model = torch.where(small | capped, math.inf, model)
    order = model.argsort(1)[:, :_EXACT]
    dead = ~torch.isfinite(model.gather(1, order[:, :1])) | (top <= 0)
    one = torch.ones_like(top)
    fallback = _ranges(_top_log(one, one), one)
    best_lo = torch.where(dead, fallback[0], lo.gather(1, order[:, :1]))
    best_hi = torch.where(dead, fallback[1], hi.gather(1, order[:, :1]))
    if _EXACT > 1 and rows:
        # scored on every _SAMPLE-th column of wide rows: the candidates are close, and a full pass
        # each would put the encode past 3x the minmax encode
        step = _SAMPLE if mag.shape[1] >= 64 * _SAMPLE else 1
        c = None if column_weight is None else column_weight.to(torch.float64).reshape(1, -1)[:, ::step]
        mag = mag[:, ::step]
        best_err = _exact_error(mag, best_lo, best_hi, packed, c)
        for i in range(1, _EXACT):
            idx = order[:, i : i + 1]
            ok = torch.isfinite(model.gather(1, idx)) & ~dead  # [R, 1]
            lo_i = torch.where(ok, lo.gather(1, idx), best_lo)
            hi_i = torch.where(ok, hi.gather(1, idx), best_hi)
            err_i = _exact_error(mag, lo_i, hi_i, packed, c)
            better = (err_i < best_err) & ok.reshape(-1)
            best_err = torch.where(better, err_i, best_err)
            best_lo = torch.where(better.unsqueeze(1), lo_i, best_lo)
            best_hi = torch.where(better.unsqueeze(1), hi_i, best_hi)
    return best_lo, best_hi



class SharedRange(NamedTuple):
    """A ``shared_tables`` range: the layer's tables and each row's view of its table.

    ``log_min``/``log_max``: float32 ``[n]``, tables whose top level is ~1; ``row_table``: uint8
    ``[R]``, each row's table; ``row_scale``: float32 ``[R, 1]``, positive; ``table``: ``[R, 256]``,
    row ``r`` = ``row_scale[r]`` times its table (the values its codes decode to, as
    :func:`qins.formats.decode_codes` computes them); ``lo``/``hi``: float64 ``[R, 1]`` logs of the
    scaled rows (``log + ln row_scale``), only to bracket a magnitude between two levels before the
    exact comparison on ``table``: float64, because a row scaled near float32's maximum (or its
    smallest normal) has logs whose ``exp`` leaves float32's range, and a bracket computed in
    float32 would put every magnitude under the top level."""

    log_min: torch.Tensor
    log_max: torch.Tensor
    row_table: torch.Tensor
    row_scale: torch.Tensor
    table: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor


def _scale_below(top: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """float32 row scales: ``max|w| / level`` (the top level on the largest weight, up to two
    roundings; 1 for an all-zero row), stepped down to the largest float32 whose product by the
    row's top ``level`` is finite."""
    s = torch.where(top > 0, top.double() / level.double(), 1.0).to(torch.float32)
    bad = ~torch.isfinite(s * level)
    while bool(bad.any()):
        s = torch.where(bad, torch.nextafter(s, torch.zeros_like(s)), s)
        bad = ~torch.isfinite(s * level)
    return s


def shared_range(mag: torch.Tensor, packed: bool, spans: torch.Tensor, row_table: torch.Tensor) -> SharedRange:
    """The :class:`SharedRange` of tables of spans ``spans`` (nats, float64 ``[n]``) with rows
    ``mag`` ``[R, N]`` on tables ``row_table`` (int ``[R]``): each table's top level is
    ``qins_exp(hi) - qins_exp(lo) ~ 1``, each row's scale puts its top level on its ``max|w|``."""
    d = spans.to(torch.float64).reshape(-1, 1)
    lo, hi = _ranges(_top_log(torch.ones_like(d), d), d)  # [n, 1]
    tables = level_table(lo.reshape(-1), hi.reshape(-1), packed, "mulaw")  # [n, 256]
    idx = row_table.long()
    scale = _scale_below(mag.amax(1, keepdim=True), tables[idx, 1:2])
    shift = scale.double().log()
    lo_r = lo[idx].double() + shift
    hi_r = hi[idx].double() + shift
    return SharedRange(lo.reshape(-1), hi.reshape(-1), row_table.to(torch.uint8), scale, tables[idx] * scale,
                       lo_r, hi_r)


def shared_mulaw_range(mag: torch.Tensor, packed: bool, tables: int,
                       column_weight: torch.Tensor | None = None) -> SharedRange:
    """The ``shared_tables`` range of rows ``mag`` ``[R, N]`` (``|w|``): ``tables`` spans of
    :data:`SPANS` and a span per row that together minimise the layer's ``Σ_r Σ_i c_i·(|w_ri| -
    |ŵ_ri|)²``, each row scaled to its ``max|w|`` (no weight clipped): :func:`shared_choice` of the
    rows' models, then :func:`shared_rows`. Always ``tables`` tables; deterministic; ``tables`` in 1..16."""
    picks, order = shared_choice(*shared_model(mag, packed, column_weight), tables)
    return shared_rows(mag, packed, picks, order, column_weight)


def shared_model(mag: torch.Tensor, packed: bool,
                 column_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top, model)`` of rows ``mag``: each row's ``max|w|`` (float64 ``[R, 1]``) and modelled error
    of every span (``[R, C]``, units of its ``max|w|²``), row by row, so blocks of rows can be
    concatenated for :func:`shared_choice`."""
    top, _, _, model = _row_model(mag, packed, column_weight)
    return top, model


def shared_choice(top: torch.Tensor, model: torch.Tensor, tables: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's spans and each row's candidates from the row models (:func:`shared_model`):
    ``picks`` (int64 ``[tables]``, indices into :data:`SPANS`, ascending) and ``order`` (``[R,
    _EXACT]``, indices into ``picks``, the row's best first).

    Greedy: the best span for the whole layer, then each next the one that lowers the layer's
    modelled error most, each row taking the best chosen span for it; where no other span lowers
    any row's model the rest repeat the first (a layer always has ``tables`` tables)."""
    rows = top.shape[0]
    # each row's model in its max|w|² relative to the largest row's: nothing overflows near float32's max
    model = model * ((top / top.max().clamp_min(1e-300)).square() if rows else top)
    chosen = [int(model.sum(0).argmin())] if rows else [0]
    best = model[:, chosen[0]].clone()
    while len(chosen) < min(tables, len(SPANS)) and rows:
        gain = (best.unsqueeze(1) - model).clamp_min(0).sum(0)
        gain[chosen] = -1.0
        j = int(gain.argmax())
        if float(gain[j]) <= 0:
            break
        chosen.append(j)
        best = torch.minimum(best, model[:, j])
    chosen.sort()
    chosen += [chosen[0]] * (tables - len(chosen))
    picks = torch.tensor(chosen, device=model.device)
    return picks, model[:, picks].argsort(1)[:, :_EXACT]


def shared_rows(mag: torch.Tensor, packed: bool, picks: torch.Tensor, order: torch.Tensor,
                column_weight: torch.Tensor | None = None) -> SharedRange:
    """The :class:`SharedRange` of rows ``mag`` on the layer's spans ``picks`` with candidates
    ``order`` (:func:`shared_choice`, these rows' part): each row's candidates are scored exactly
    (every 4th column of rows of 256 columns or more), as :func:`mulaw_range` does, and the best kept."""
    spans = torch.tensor(SPANS, dtype=torch.float64, device=mag.device)[picks]
    cand = shared_range(mag, packed, spans, order[:, 0])
    if order.shape[1] > 1 and mag.shape[0] and len(picks) > 1:
        step = _SAMPLE if mag.shape[1] >= 64 * _SAMPLE else 1
        c64 = None if column_weight is None else column_weight.to(torch.float64).reshape(1, -1)[:, ::step]
        err = _exact_error(mag[:, ::step], cand.lo, cand.hi, packed, c64, cand.table)
        for i in range(1, order.shape[1]):
            alt = shared_range(mag, packed, spans, order[:, i])
            err_i = _exact_error(mag[:, ::step], alt.lo, alt.hi, packed, c64, alt.table)
            better = err_i < err
            err = torch.where(better, err_i, err)
            # a row's fields depend only on its own table: take each row's from the better candidate
            keep = better.unsqueeze(1)
            cand = cand._replace(row_table=torch.where(better, alt.row_table, cand.row_table),
                                 **{f: torch.where(keep, getattr(alt, f), getattr(cand, f))
                                    for f in ("row_scale", "table", "lo", "hi")})
    return cand
