"""The pure-torch oracles and fallbacks of the kernels (any device): ``qins::linear`` (fp32
compute), and the mse range search's rounding-deviation score and final codes/errors."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import SPACINGS, decode_codes
from ..rounding import _chunks, _mag_codes, _sq_error

__all__ = ["linear", "rounding_deviation", "range_codes"]


def linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    sign: torch.Tensor | None,
    log_min: torch.Tensor,
    log_max: torch.Tensor,
    bias: torch.Tensor | None,
    spacing: int = 0,
    row_table: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ ŵᵀ + bias`` with ``ŵ = decode_codes(codes, sign, log_min, log_max, row_table=row_table,
    row_scale=row_scale)``
    in level spacing ``SPACINGS[spacing]`` (0 log, 1 mulaw).

    x is converted to float32, the product and the bias are computed in float32 and the result is
    cast back to ``x.dtype``. Materialises the full fp32 weight (this is the slow, simple path).
    """
    w = decode_codes(codes, sign, log_min, log_max, dtype=torch.float32, spacing=SPACINGS[spacing],
                     row_table=row_table, row_scale=row_scale)
    b = None if bias is None else bias.to(torch.float32)
    return F.linear(x.to(torch.float32), w, b).to(x.dtype)


def rounding_deviation(
    mag: torch.Tensor, gap: torch.Tensor, inv: torch.Tensor, unit: torch.Tensor, floor2: torch.Tensor, tau: torch.Tensor
) -> torch.Tensor:
    """``[R, C]`` float64: ``Σ_k a_k·d_ki² - Σ_k a_k / 12`` per row and candidate span.

    ``a = max((mag·unit)² - floor2, 0)``, ``t = min(gap, tau)·inv[:, i]``, ``d = t - round(t)``
    (ties to even); ``mag``/``gap`` ``[R, cols]``, ``inv`` ``[R, C]``, the rest ``[R, 1]``, all
    float32. Element-wise work in float32, sums in float32 per block of rows, then float64.
    """
    dev = torch.zeros(inv.shape, dtype=torch.float64, device=mag.device)
    for r, c in _chunks(mag):
        g = gap[r, c].clamp_max(tau[r])  # finite everywhere (zeros have gap = +inf)
        a = mag[r, c].mul(unit[r]).square_().sub_(floor2[r]).clamp_min_(0.0)
        dev[r] -= a.sum(1, keepdim=True).double() / 12.0
        for i in range(inv.shape[1]):
            t = g.mul(inv[r, i : i + 1])
            t.sub_(torch.round(t)).square_()
            dev[r, i] += torch.linalg.vecdot(a, t, dim=1).double()
    return dev


def range_codes(
    mag: torch.Tensor, gap: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, tables: torch.Tensor, packed: bool,
    write: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mse search's final comparison: ``err [R, S]`` float64 and the uint8 codes of range ``write``.

    For each of the ``S`` ranges ``(lo[:, s], hi)`` (float32 ``[R, S]`` and ``[R, 1]``) of each row,
    with its table ``tables[s]`` (``[R, 256]``): the codes of :func:`qins.rounding._mag_codes` and
    ``err[r, s] = Σ(|w| - table[code])²`` (float32 differences, exact; squares and sums in
    float64). ``write < 0``: no codes (``None``).
    """
    rows, ranges = mag.shape[0], lo.shape[1]
    err = torch.zeros(rows, ranges, dtype=torch.float64, device=mag.device)
    codes = torch.empty(mag.shape, dtype=torch.uint8, device=mag.device) if write >= 0 else None
    for r, c in _chunks(mag):
        m, g = mag[r, c], gap[r, c]
        for s in range(ranges):
            table = tables[s][r]
            block = _mag_codes(m, g, lo[r, s : s + 1], hi[r], packed, table)
            err[r, s] += _sq_error(m, block, table)
            if s == write:
                codes[r, c] = block  # type: ignore[index]
    return err, codes
