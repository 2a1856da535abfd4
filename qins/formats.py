"""QINS storage formats: the configuration object, the deterministic level tables, and decoding.

Two layouts, each per tensor or per output row:

* **split** (2 bytes/weight): ``codes`` uint8 with 0 = exact zero and 1..255 the magnitude levels
  (1 the largest, 255 the smallest), plus ``sign`` int8 in {-1, +1}. The seed's layout.
* **packed** (1 byte/weight): bit 7 is the sign, bits 0..6 the magnitude code: 0 = exact zero,
  1 = the largest level, 127 = the smallest. No sign buffer.

With ``K`` levels (255 split, 127 packed), ``S = K - 1`` steps, ``D = log_max - log_min`` and
``δ = D / S`` (float32), code ``k`` in 1..K decodes to ``qins_exp(log_max - (k - 1)·δ)``: level 1 is
``exp(log_max)``, level K is ``exp(log_min)`` (up to float32 rounding), and neighbouring levels are a
factor ``e^δ`` apart. Invariant for a weight ``w`` with ``|w|`` in ``[exp(log_min), exp(log_max)]``:
``|log|ŵ| - log|w|| <= δ/2 + ε`` with ``ε = qins_log_slack(log_min, log_max)``.

**Spacing.** The above is ``spacing="log"``: geometric levels, the log code's relative error
everywhere. ``spacing="mulaw"`` (the default) is the same code read through a μ-law compander: with
``δ = D / K`` (one more step) and ``z = qins_exp(log_min)``, code ``k`` decodes to
``qins_exp(log_max - (k - 1)·δ) - z``. The levels are geometric in ``|w| + z``, so they are
logarithmic near the top (steps ∝ ``|w| + z``) and uniform near zero (steps ≈ ``z·δ``), and the
``K + 1``-th step lands on 0: code 0. As ``D → 0`` they become int8's uniform grid; as ``D`` grows,
the log grid. Invariant: the row's levels are strictly decreasing and positive (checked on load),
and an encoder rounds ``|w|`` to the nearest of them or 0, so ``|ŵ - w| <= (e^δ - 1)/2·(|w| + z)``.

The tables are computed by :func:`qins_exp`, an ``exp`` built only from correctly rounded float32
``+ - * /``, rounding to nearest integer and exact powers of two. The same sequence of operations
in C++ (compiled without FMA contraction) or Triton gives bit-identical tables, so every kernel
backend and this reference decode the same weights and differ only in accumulation order.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["QinsConfig", "qins_exp", "level_table", "decode_codes", "num_levels", "SPACINGS", "MAX_SHARED_TABLES",
           "DEFAULT_SHARED_TABLES"]

LogRange = Literal["minmax", "mse"]
Spacing = Literal["log", "mulaw"]
#: the most tables a ``shared_tables`` layer may have (the kernels' ``kMaxTables``)
MAX_SHARED_TABLES = 16
#: ``QinsConfig().shared_tables``: per-row mulaw configs share this many tables unless told otherwise
DEFAULT_SHARED_TABLES = 16
#: level spacings, in their kernel id order (``spacing_id``): ``"log"`` 0, ``"mulaw"`` 1
SPACINGS = ("log", "mulaw")

# Cody-Waite split of ln 2 and the Cephes expf polynomial (relative error < 2 ulp on [-ln2/2, ln2/2]).
#: The largest float32 ``log_max`` whose level ``qins_exp(log_max)`` is finite (and ≤ ``ln`` of
#: float32's maximum): ``ln(3.4028235e38)`` rounds *up* in float32 (to 88.72283935546875), so an
#: encoder storing that rounding would decode the largest weights to ``inf``. Encoders cap ``log_max``
#: here; the capped level is 7.3e-6 nats below float32's maximum, inside the float32 slack ε.
LOG_FLOAT32_MAX = 88.72283172607422
#: The smallest float32 ``log_min`` accepted, chosen so that every level of every table with
#: ``LOG_FLOAT32_MIN <= log_min <= log_max <= LOG_FLOAT32_MAX`` is a normal float32 (>= 2**-126): it
#: is 4.27e-5 nats above ``ln(2**-126) = -87.3365447...`` (whose float32 rounding, -87.3365478515625,
#: decodes to a subnormal). The margin covers the rounding of a level's argument
#: ``log_max - j·δ``, which can land below ``log_min`` by at most ``3u·D + u·|arg| <= 3.7e-5`` nats
#: (``u = 2**-24``, span ``D <= 176.06``), plus ``qins_exp``'s error (< 3 ulp, 3.6e-7). Below the
#: bound, ``qins_exp`` leaves the normal range, and past ``n = -252`` its power-of-two factors no
#: longer fit a float32 exponent (-200 gave inf/NaN tables). Encoders clamp ``log_min`` here.
LOG_FLOAT32_MIN = -87.33650207519531
_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375  # 9 significant bits: n * _LN2_HI is exact for |n| <= 2**15
_LN2_LO = -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


@dataclass(frozen=True)
class QinsConfig:
    """How a weight is stored (torchao-style config object; immutable and hashable).

    Args:
        packed: ``True`` for the 1-byte format (sign in bit 7, 127 levels), ``False`` for the
            2-byte split format (uint8 code + int8 sign, 255 levels).
        log_range: ``"minmax"``: ``log_min``/``log_max`` are the logs of the smallest non-zero and
            the largest ``|w|`` (the seed's rule). ``"mse"``: ``log_max = ln max|w|`` and
            ``log_min`` is searched to minimise ``Σ(w - ŵ)²``; weights below ``exp(log_min)`` go to
            the nearer of 0 and the smallest level.
        per_row: one ``log_min``/``log_max`` per output row (``[out]`` buffers) instead of one
            per tensor.
        spacing: ``"mulaw"`` (levels geometric in ``|w| + exp(log_min)``: logarithmic at the top,
            uniform near zero; the range is the MSE-best μ per row or tensor, ``log_range`` unused)
            or ``"log"`` (geometric levels, the seed's spacing). Module docstring.
        shared_tables: ``None`` (default): :data:`DEFAULT_SHARED_TABLES` for per-row mulaw
            configs, else 0. ``0``: every row has its own range and table. ``n`` in 1..16: the
            layer has ``n`` μ-law tables (``[n]`` ``log_min``/``log_max``, top level ~1); each row
            decodes through one of them (``row_table``, uint8 ``[out]``) scaled by its ``row_scale``
            (float32 ``[out]``, the row's ``max|w|``), as int8 scales one grid per channel. The
            kernels then build ``n`` tables per call instead of one per row, which is what narrow
            rows (a few hundred columns) spend most of their time on. Needs ``per_row=True`` and
            ``spacing="mulaw"``.

    The default (packed, mse, per row) is the smallest and, per byte, the most accurate format
    measured here (README, "Choosing a format"). ``QinsConfig.codec_compatible()`` reproduces the seed's
    codes exactly (those of :func:`qins.convert_to_qins`).
    """

    packed: bool = True
    log_range: LogRange = "mse"
    per_row: bool = True
    spacing: Spacing = "mulaw"
    shared_tables: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.packed, bool) or not isinstance(self.per_row, bool):
            raise TypeError(f"packed and per_row must be bool, got {self.packed!r}, {self.per_row!r}")
        if self.shared_tables is None:  # the default: shared tables wherever the format allows them
            auto = DEFAULT_SHARED_TABLES if self.per_row and self.spacing == "mulaw" else 0
            object.__setattr__(self, "shared_tables", auto)
        if isinstance(self.shared_tables, bool) or not isinstance(self.shared_tables, int):
            raise TypeError(f"shared_tables must be an int, got {self.shared_tables!r}")
        if not 0 <= self.shared_tables <= MAX_SHARED_TABLES:
            raise ValueError(f"shared_tables must be in 0..{MAX_SHARED_TABLES}, got {self.shared_tables}")
        if self.shared_tables and not (self.per_row and self.spacing == "mulaw"):
            raise ValueError("shared_tables scales shared mulaw tables per output row: it needs per_row=True and "
                             f"spacing='mulaw', got per_row={self.per_row!r}, spacing={self.spacing!r}")
        if self.log_range not in ("minmax", "mse"):
            raise ValueError(f"log_range must be 'minmax' or 'mse', got {self.log_range!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {self.spacing!r}")
        if self.spacing == "mulaw" and self.log_range != "mse":
            raise ValueError(f"log_range={self.log_range!r} is a rule of the log spacing; pass spacing='log' with it "
                             "(the mulaw spacing always searches its range for the least squared error)")

    @classmethod
    def codec_compatible(cls) -> QinsConfig:
        """Split, log spacing, minmax range, one range per tensor: the codes of
        :func:`qins.convert_to_qins`, code for code."""
        return cls(packed=False, log_range="minmax", per_row=False, spacing="log")

    @classmethod
    def seed(cls) -> QinsConfig:
        """Deprecated name of :meth:`codec_compatible` (warns ``FutureWarning``)."""
        warnings.warn("QinsConfig.seed() is renamed QinsConfig.codec_compatible()", FutureWarning, stacklevel=2)
        return cls.codec_compatible()

    @property
    def spacing_id(self) -> int:
        """The kernels' id of :attr:`spacing` (0 log, 1 mulaw)."""
        return SPACINGS.index(self.spacing)

    def log_shape(self, rows: int) -> tuple[int, ...]:
        """The shape of ``log_min``/``log_max`` for a weight of ``rows`` rows: ``(n,)`` with ``n``
        shared tables, ``(rows,)`` per row, ``()`` per tensor."""
        if self.shared_tables:
            return (self.shared_tables,)
        return (rows,) if self.per_row else ()

    @property
    def levels(self) -> int:
        """Number of non-zero magnitude levels: 127 packed, 255 split."""
        return num_levels(self.packed)

    @property
    def bytes_per_weight(self) -> int:
        return 1 if self.packed else 2


def num_levels(packed: bool) -> int:
    """127 magnitude levels for the packed format, 255 for the split one."""
    return 127 if packed else 255


def _pow2(n: torch.Tensor) -> torch.Tensor:
    """Exact ``2**n`` (float32) for integer-valued float32 ``n`` in [-126, 127], from the bits."""
    return ((n.to(torch.int32) + 127) << 23).view(torch.float32)


def qins_exp(t: torch.Tensor) -> torch.Tensor:
    """Deterministic float32 ``exp(t)`` for float32 ``t`` in [-87.3, 88.7] (relative error < 3 ulp).

    Steps (each a correctly rounded float32 operation, in this order; kernels repeat it exactly):
    ``n = rint(t·log2e)``; ``f = (t - n·LN2_HI) - n·LN2_LO``; ``p = poly(f)`` by Horner with separate
    multiply and add; ``exp(t) = ((p·f·f + f) + 1)·2^a·2^b`` with ``a = floor(n/2)``, ``b = n - a``
    (two exact power-of-two factors, so ``n = 128`` near float32's maximum does not overflow early).
    """
    t = t.to(torch.float32)
    n = torch.round(t * _LOG2E)
    f = (t - n * _LN2_HI) - n * _LN2_LO
    p = torch.full_like(f, _EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        p = p * f + c
    y = ((p * f) * f + f) + 1.0
    a = torch.floor(n * 0.5)
    return (y * _pow2(a)) * _pow2(n - a)


def spacing_steps(packed: bool, spacing: str = "log") -> int:
    """``S``, the divisor of the log step ``δ = (log_max - log_min)/S``: ``K - 1`` for the log
    spacing (``log_min`` is the smallest level's log), ``K`` for mulaw (``log_min`` is the offset's)."""
    k = num_levels(packed)
    return k - 1 if spacing == "log" else k


def level_table(log_min: torch.Tensor, log_max: torch.Tensor, packed: bool, spacing: str) -> torch.Tensor:
    """The ``[R, 256]`` float32 decode table for 0-d (``R = 1``) or ``[R]`` float32 log buffers.

    Split: ``table[r, 0] = 0`` and ``table[r, k] = qins_exp(log_max[r] - (k - 1)·δ[r]) - z[r]`` for
    k = 1..255, unsigned (multiply by ``sign``). Packed: entries 0..127 likewise with 127 levels, and
    ``table[r, 128 + k] = -table[r, k]`` (so byte 128 is -0.0): decoding is one gather, no multiply.
    ``δ = (log_max - log_min) / S`` in float32 (:func:`spacing_steps`: ``S = K - 1`` for
    ``spacing="log"``, ``K`` for ``"mulaw"``); ``z = 0`` (log) or ``qins_exp(log_min)`` (mulaw).
    Every backend computes these operations in this order (a subtraction of 0 changes nothing, so the
    log tables are those of the log-only format). Traceable: no ``.item()``, no data-dependent flow.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    lo = log_min.to(torch.float32).reshape(-1, 1)
    hi = log_max.to(torch.float32).reshape(-1, 1)
    k = num_levels(packed)
    delta = (hi - lo) / float(spacing_steps(packed, spacing))
    j = torch.arange(k, device=lo.device, dtype=torch.float32)  # j = code - 1
    mags = qins_exp(hi - j * delta)
    if spacing == "mulaw":
        mags = mags - qins_exp(lo)
    zero = torch.zeros_like(hi)
    half = torch.cat([zero, mags], dim=1)  # [R, k + 1]
    if packed:
        return torch.cat([half, -half], dim=1)
    return half


def valid_levels(log_min: torch.Tensor, log_max: torch.Tensor, packed: bool, spacing: str) -> torch.Tensor:
    """Per range (shape of ``log_min``): whether its table's levels are finite, strictly decreasing and
    normal floats (``>= 2**-126``), so that nearest rounding is well defined and every backend
    decodes the same normal values."""
    k = num_levels(packed)
    t = level_table(log_min, log_max, packed, spacing)[:, 1 : k + 1]
    ok = torch.isfinite(t).all(1) & (t[:, -1] >= 2.0**-126) & (t[:, :-1] > t[:, 1:]).all(1)
    return ok.reshape(log_min.shape)


def decode_codes(
    codes: torch.Tensor,
    sign: torch.Tensor | None,
    log_min: torch.Tensor,
    log_max: torch.Tensor,
    row_table: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    spacing: str,
) -> torch.Tensor:
    """Decode ``[out, in]`` codes to weights in ``dtype``. ``sign is None`` means packed codes;
    ``spacing`` (required: ``config.spacing``) as :func:`level_table`. The positional arguments are
    :func:`qins.encode`'s tensors in its order: ``decode_codes(*encode(w, config), spacing=...)``.

    Per tensor (0-d logs): one gather from the 256-entry table. Per row (``[out]`` logs): a row-wise
    gather. Split codes are multiplied by their ±1 sign (exact; code 0 with sign -1 gives -0.0).
    Shared tables (``[n]`` logs, ``row_table`` uint8 ``[out]`` and ``row_scale`` float32 ``[out]``):
    row ``r`` reads table ``row_table[r]`` and is then multiplied by ``row_scale[r]``, one
    correctly rounded product per weight.
    """
    if (row_table is None) != (row_scale is None):
        raise ValueError("decode_codes: row_table and row_scale come together (shared_tables formats)")
    table = level_table(log_min, log_max, packed=sign is None, spacing=spacing)
    idx = codes.to(torch.int64)
    if row_table is not None:
        w = table[row_table.to(torch.int64).unsqueeze(1), idx]
    elif table.shape[0] == 1:
        w = table[0][idx]
    else:
        w = torch.gather(table, 1, idx)
    if sign is not None:
        w = w * sign
    if row_scale is not None:
        w = w * row_scale.to(torch.float32).reshape(-1, 1)
    return w.to(dtype)
