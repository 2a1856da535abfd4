"""QINS codec: pure tensor functions for 8-bit inverse log-magnitude weight storage.

Format (per tensor):

* ``stored`` — uint8 code. Code 0 means an exact zero. Codes 1..255 are levels on a log scale,
  *inverse* in magnitude: code 1 is the largest level ``exp(log_max)``, code 255 the smallest
  ``exp(log_min)``. With ``n = (log|w| - log_min) / (log_max - log_min)`` the ideal code is
  ``round(255 - 254 * n)``.
* ``sign`` — int8, -1 or +1 (the sign bit of the float, so ``-0.0`` keeps its sign).
* ``log_min``, ``log_max`` — natural logs of the smallest and largest encodable magnitude.

Decoding is a lookup in a 256-entry float32 table ``levels`` built by :func:`qins_levels`:
``levels[0] = 0`` and, for ``k`` in 1..255, ``levels[k] ≈ exp(log_min + n_k·D)`` with
``n_k = (255 - k) / 254`` and ``D = log_max - log_min``. With Python-float logs (what
:func:`convert_to_qins` returns) the table is computed in float64 and rounded once; with 0-d
float32 tensors (a layer's buffers) it is computed in float32 on their device, compile-friendly.
The encoder applies the formula above in float32 (element-wise work is float32 whatever the
input dtype); the range scalars are float64.

Rounding ties and sub-normals: weights with ``|w| < 2**-126`` (float32 sub-normals) are below the
range and go to whichever of {0, ``levels[255]``} is nearer (exactly halfway: ``levels[255]``).

Invariant (see :func:`qins_error_bound` and :func:`qins_log_slack`): every weight with
``|w|`` in ``[exp(log_min), exp(log_max)]`` decodes to ``ŵ`` with the same sign and
``|log|ŵ| - log|w|| <= Δ/2 + ε``, ``Δ = (log_max - log_min) / 254``.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "convert_to_qins",
    "reconstruct_from_qins",
    "qins_levels",
    "qins_error_bound",
    "qins_log_slack",
    "SMALLEST_NORMAL",
]

#: Smallest positive normal float32 (2**-126). Magnitudes below it are "too small for the range".
SMALLEST_NORMAL: float = torch.finfo(torch.float32).tiny
_FLOAT32_MAX: float = torch.finfo(torch.float32).max
_STEPS = 254  # intervals between level 1 and level 255

Scalar = float | torch.Tensor


def qins_error_bound(log_min: float, log_max: float) -> float:
    """Half a quantisation step in log space: ``Δ/2`` with ``Δ = (log_max - log_min) / 254``.

    Invariant: every weight with ``|w|`` in ``[exp(log_min), exp(log_max)]`` decodes to ``ŵ`` with
    ``|log|ŵ| - log|w|| <= Δ/2`` in exact arithmetic. Because the element-wise logs and the
    layer's decode table are float32, the guarantee that the implementation meets is ``Δ/2 + ε``
    with the float32 slack
    ``ε = qins_log_slack(log_min, log_max) = 2**-20 * (1 + |log_min| + |log_max|)``
    (about 8x the worst-case sum of the roundings of log, exp and the products involved).
    Units: natural-log units (nats); a bound of ``b`` means ``|ŵ|/|w|`` lies in ``[e^-b, e^b]``.
    """
    if not (math.isfinite(log_min) and math.isfinite(log_max)) or log_max < log_min:
        raise ValueError(f"need finite log_min <= log_max, got {log_min!r}, {log_max!r}")
    return (log_max - log_min) / _STEPS / 2.0


def qins_log_slack(log_min: float, log_max: float) -> float:
    """Float32 slack ``ε = 2**-20 * (1 + |log_min| + |log_max|)`` on top of :func:`qins_error_bound`.

    It covers the float32 roundings of ``log|w|`` (≤ 1 ulp of ``|log|w||``), of the stored
    ``log_min``/``log_max`` and ``D``, of ``exp`` and of the products in :func:`qins_levels`,
    with a safety factor of about 8. For ``|log| <= 100`` it is below 2e-4 nats.
    """
    return 2.0**-20 * (1.0 + abs(log_min) + abs(log_max))


def _as_scalar_tensor(x: Scalar, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.dim() != 0:
            raise ValueError(f"log_min/log_max must be 0-d, got shape {tuple(x.shape)}")
        return x.to(device=device, dtype=torch.float32)
    return torch.tensor(float(x), dtype=torch.float32, device=device)


def qins_levels(log_min: Scalar, log_max: Scalar, *, device: torch.device | None = None) -> torch.Tensor:
    """The 256-entry float32 decode table: ``levels[0] = 0``, ``levels[k] ≈ exp(log_min + n_k·D)``.

    ``n_k = (255 - k)/254`` and ``D = log_max - log_min``, so ``levels[1] ≈ exp(log_max)`` and
    ``levels[255] ≈ exp(log_min)``; non-decreasing from code 255 to code 1, clamped to float32's max.

    Precision follows the inputs. Python floats (what :func:`convert_to_qins` returns) and float64
    tensors: the table is computed in float64 on the CPU and rounded once to float32, so every level
    is the float32 nearest to ``exp(log_min + n_k·D)``. Float32 0-d tensors (the layer's buffers):
    computed in float32 on their device, traceable by torch.compile (no ``.item()``, no
    data-dependent control flow), as ``exp(log_min)·exp(a)·exp(b)·exp(n·D - a - b)`` with
    ``a = min(n·D, 80)`` and ``b = min(n·D - a, 80)``, so that no factor overflows over float32's whole
    normal range (``n·D`` up to 176.1 nats; below 160 nats ``exp(n·D - a - b) = 1`` exactly).
    """
    as_tensor = [isinstance(v, torch.Tensor) for v in (log_min, log_max)]
    if device is None:
        device = log_min.device if as_tensor[0] else torch.device("cpu")  # type: ignore[union-attr]
    wide = not any(as_tensor) or all(
        v.dtype == torch.float64 for v in (log_min, log_max) if isinstance(v, torch.Tensor)
    )
    if wide:
        lo = float(log_min)
        d = float(log_max) - lo
        k = torch.arange(256, dtype=torch.float64)
        levels = torch.exp(lo + (255.0 - k) / _STEPS * d).clamp(max=_FLOAT32_MAX)
        levels[0] = 0.0
        return levels.to(device=device, dtype=torch.float32)
    lo_t = _as_scalar_tensor(log_min, device)
    hi_t = _as_scalar_tensor(log_max, device)
    k = torch.arange(256, device=device, dtype=torch.float32)
    nd = (255.0 - k) / float(_STEPS) * (hi_t - lo_t)
    a = torch.clamp(nd, max=80.0)
    b = torch.clamp(nd - a, max=80.0)
    levels = torch.exp(lo_t) * torch.exp(a) * torch.exp(b) * torch.exp(nd - a - b)
    levels = torch.clamp(levels, max=_FLOAT32_MAX)
    return torch.where(k == 0, torch.zeros_like(levels), levels)


def _validate(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"expected a floating-point tensor, got dtype {weight.dtype}")
    if weight.dim() == 0:
        raise ValueError("expected a tensor with at least one dimension, got a 0-d tensor")
    if weight.numel() == 0:
        raise ValueError(f"expected a non-empty tensor, got shape {tuple(weight.shape)}")
    flat = weight.detach().reshape(-1)
    peaks = torch.stack([flat[block].to(torch.float32).abs().amax() for block in _blocks(flat)])
    if bool(torch.isfinite(peaks.amax())):
        return  # every value is finite in float32: a NaN, ±Inf or overflow makes its block's peak non-finite
    bad = ~torch.isfinite(weight)
    n_bad = int(bad.sum())
    if n_bad:
        first = torch.nonzero(bad)[0].tolist()
        value = weight[tuple(first)].item()
        raise ValueError(
            f"weight has {n_bad} non-finite value(s) (NaN or ±Inf); first at index {tuple(first)} = {value}"
        )
    if weight.dtype != torch.float32 and weight.dtype.itemsize > 4:
        # Finite in float64 but not in float32: encoding works on float32 values.
        over = ~torch.isfinite(weight.to(torch.float32))
        n_over = int(over.sum())
        if n_over:
            first = torch.nonzero(over)[0].tolist()
            value = weight[tuple(first)].item()
            raise ValueError(
                f"weight has {n_over} value(s) that overflow float32 (|w| > {_FLOAT32_MAX:.4g}); "
                f"first at index {tuple(first)} = {value}"
            )


def convert_to_qins(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Encode a float tensor as ``(stored, sign, log_min, log_max)``.

    * ``stored``: uint8, same shape. 0 = exact zero; 1..255 per the module docstring; the largest
      ``|w|`` gets code 1 and the smallest encodable one code 255. Codes are monotone: within one
      tensor ``|w1| <= |w2|`` implies ``code1 >= code2`` (zero counted as code 0 only for ``w == 0``).
    * ``sign``: int8, -1 where the sign bit is set (including ``-0.0``), else +1.
    * ``log_min``/``log_max``: Python floats, the float64 logs of the smallest and largest
      magnitude among the weights with ``|w| >= SMALLEST_NORMAL`` (2**-126, float32's smallest
      normal). All-zero input gives ``0.0, 0.0``. (A layer keeps them as float32 0-d buffers.)

    Weights below ``SMALLEST_NORMAL`` (float32 subnormals) are too small for the range: each goes to
    whichever of {0, the smallest level} is nearer in absolute value. A tensor whose magnitudes are
    all equal encodes to code 1 with ``log_min == log_max`` and decodes (with these Python floats)
    to exactly that magnitude.

    Element-wise work is float32 for every input dtype (fp16, bf16, fp64 inputs are cast to float32
    first, so the codes depend only on the float32 values); the two range scalars are float64.
    On the CPU it runs in two passes of blocks of ``_CPU_BLOCK`` elements (range and signs, then
    codes), so its temporaries are a few MiB whatever the tensor's size. The input is never modified.

    Raises:
        ValueError: non-float dtype, 0-d or empty tensor, or any NaN/±Inf (the message gives their
            count and the first index).
    """
    with torch.no_grad():
        _validate(weight)
        flat = weight.detach().reshape(-1)
        codes = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
        sign = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        code_flat, sign_flat = codes.view(-1), sign.view(-1)
        # Pass 1, per block: the sign, and the extremes (the smallest over normal magnitudes).
        mins, maxs = [], []
        for block in _blocks(flat):
            w = flat[block].to(torch.float32)
            sign_flat[block] = torch.where(torch.signbit(w), -1, 1)
            mag = w.abs()
            mins.append(torch.where(mag >= SMALLEST_NORMAL, mag, math.inf).min())
            maxs.append(mag.max())
        min_mag, max_mag = torch.stack(mins).min(), torch.stack(maxs).max()
        if math.isinf(float(min_mag)):  # no normal magnitude
            return codes.zero_(), sign, 0.0, 0.0
        # The range in float64 from the exact float32 extremes: log_min = log(min |w|) etc.
        log_min, log_max = math.log(float(min_mag)), math.log(float(max_mag))
        smallest = qins_levels(log_min, log_max, device=weight.device)[255]
        for block in _blocks(flat):
            code_flat[block] = _codes(flat[block].to(torch.float32).abs(), min_mag, max_mag, log_min, log_max, smallest)
        return codes, sign, log_min, log_max


def _codes(mag: torch.Tensor, min_mag, max_mag, log_min: float, log_max: float, smallest) -> torch.Tensor:
    """The uint8 codes of float32 magnitudes ``mag`` (a block) in the range of the whole tensor."""
    normal = mag >= SMALLEST_NORMAL
    span = log_max - log_min
    if span > 0.0:
        n = (torch.log(torch.where(normal, mag, min_mag)) - log_min) / span
        codes = torch.round(255.0 - 254.0 * n).clamp_(1, 255).to(torch.uint8)
        # The extremes get their codes by definition, whatever float32 did to their logs (it
        # matters only when the span is near float32's resolution); monotonicity is preserved.
        codes = torch.where(mag == max_mag, 1, torch.where(mag == min_mag, 255, codes)).to(torch.uint8)
    else:  # all normal magnitudes are equal
        codes = torch.ones_like(mag, dtype=torch.uint8)
    below = torch.where(mag * 2.0 >= smallest, 255, 0).to(torch.uint8)  # nearer of {0, smallest level}
    codes = torch.where(normal, codes, below)
    return torch.where(mag == 0, 0, codes).to(torch.uint8)


#: Elements per block of the CPU encode and decode: a block's temporaries (at most 8 bytes an
#: element) stay in cache and come from the heap, so a large tensor makes no temporaries of its own
#: size (each of those is a fresh mmap whose page faults cost more than the arithmetic). A multiple
#: of the SIMD width, so the element-wise kernels split the data as they would unblocked.
_CPU_BLOCK = 1 << 18


def _blocks(flat: torch.Tensor) -> list[slice]:
    """Slices covering ``flat``: blocks of ``_CPU_BLOCK`` on the CPU, one slice elsewhere."""
    n = flat.numel()
    step = _CPU_BLOCK if flat.device.type == "cpu" else max(n, 1)
    return [slice(start, start + step) for start in range(0, n, step)]


def reconstruct_from_qins(
    stored: torch.Tensor,
    sign: torch.Tensor,
    log_min: Scalar,
    log_max: Scalar,
    *,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode codes back to weights: ``ŵ = sign · levels[stored]``, cast to ``dtype``.

    ``log_min``/``log_max`` may be Python floats or 0-d tensors (the layer passes its 0-d float32
    buffers, so nothing here calls ``.item()`` and torch.compile never specialises on their values).
    Code 0 decodes to 0.0 (``-0.0`` where the sign is negative). If ``out`` is given it receives the
    result (it must have ``stored``'s shape; any dtype, cast from ``dtype``) and is returned.

    The decode writes straight into the result (or ``out`` when it is contiguous and of ``dtype``),
    on the CPU in blocks of ``_CPU_BLOCK`` elements: its extra memory is a few MiB whatever the
    tensor's size.
    """
    if stored.dtype != torch.uint8:
        raise ValueError(f"stored must be uint8, got {stored.dtype}")
    if sign.shape != stored.shape:
        raise ValueError(f"sign shape {tuple(sign.shape)} != stored shape {tuple(stored.shape)}")
    if out is not None and out.shape != stored.shape:
        raise ValueError(f"out shape {tuple(out.shape)} != stored shape {tuple(stored.shape)}")
    # Gather, then multiply by the ±1 sign (exact; 0 * -1 gives -0.0): one pass each, ~3x faster
    # than torch.where on CPU; rounding the 256-entry table to ``dtype`` first equals rounding after.
    levels = qins_levels(log_min, log_max, device=stored.device).to(dtype)
    direct = out is not None and out.dtype == dtype and out.is_contiguous()
    result = out if direct else torch.empty(stored.shape, dtype=dtype, device=stored.device)
    codes, signs, flat = stored.reshape(-1), sign.reshape(-1), result.view(-1)
    for block in _blocks(codes):
        torch.index_select(levels, 0, codes[block].long(), out=flat[block]).mul_(signs[block])
    return result if out is None or direct else out.copy_(result)
