"""Fused QINS kernels: one op, ``torch.ops.qins.linear``.

``linear(x, codes, sign, log_min, log_max, bias) -> y`` computes ``x @ ŵᵀ + bias`` with
``ŵ = qins.formats.decode_codes(codes, sign, log_min, log_max, spacing=...)`` (``sign is None``: packed
1-byte codes), accumulating in float32 and returning ``x.dtype``. The decode table is rebuilt
inside the op from the logs (bit-identical to :func:`qins.formats.level_table`), so backends
differ from :mod:`qins.kernels.reference` only in accumulation order.

Backends: on CPU the native C++ kernels (``qins/kernels/cpu``, JIT-built on first use and
cached) unless ``QINS_KERNEL=reference``; if the build fails, the reference runs and one
warning is issued (``QINS_KERNEL=native`` makes the failure an error instead).
``QINS_CPU_ISA=avx512|avx2|scalar`` forces one native CPU path (tests).

On CUDA the default runs the Triton kernel (:mod:`qins.kernels.triton_kernel`) for batches of at
most :data:`CUDA_TRITON_MAX_ROWS` rows and the reference (decode, then cuBLAS) above, the faster
of the two at each measured batch on an H200; if triton cannot be imported, the reference runs
and one warning is issued. ``QINS_KERNEL=triton`` runs Triton for every batch (an error without
triton), and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, how it is
tested without a GPU); other CPU calls keep the native kernels. Other devices run the reference.

Layers call :func:`fused_linear`: the same op, whose body runs directly (no dispatcher) for eager
no-grad calls on plain CPU tensors; compile, tracing, autograd, modes and subclasses see the op.

Autograd: registered through the reference formula (``grad_x = grad_y @ ŵ``,
``grad_bias = Σ grad_y``; codes and logs get no gradient), so training through the op works on
every backend; the forward stays the fused kernel.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from types import ModuleType

import torch

from ..formats import SPACINGS, decode_codes, num_levels
from ..rounding import _level_step
from . import reference
from .cpu import build as _build

__all__ = [
    "linear", "fused_linear", "rounding_deviation", "range_codes", "backend_name", "native_module", "triton_module",
    "cpu_isa", "ISAS",
]

logger = logging.getLogger(__name__)

ISAS = {"scalar": 1, "avx2": 2, "avx512": 3}
_ISA_NAMES = {v: k for k, v in ISAS.items()}
_UNSET = object()
_native: object = _UNSET  # the loaded module, None after a failed build, _UNSET before trying
_triton: ModuleType | None = None  # qins.kernels.triton_kernel, imported on first use
_triton_missing = False  # True after triton failed to import in auto mode (warned once)
#: CUDA's default runs Triton for batches up to this many rows of x and the reference (decode,
#: then cuBLAS) above: on an H200 Triton was 7.4-9.1x faster than the reference at 1 row and
#: 1.5-2.2x at 8, and slower for split layers from 16-32 rows (perf/cuda_bench.py; README "GPU")
CUDA_TRITON_MAX_ROWS = 8


def _kernel_env() -> str:
    kind = os.environ.get("QINS_KERNEL", "").strip().lower() or "auto"
    if kind not in ("auto", "native", "reference", "triton"):
        raise ValueError(f"QINS_KERNEL must be 'native', 'reference' or 'triton', got {kind!r}")
    return kind


_native_lock = threading.Lock()  # one first build per process, whichever thread gets there first


def native_module() -> ModuleType | None:
    """The native CPU module, built on first use; ``None`` if the build failed (warned once).

    Thread-safe: concurrent first calls build once and all see the same result."""
    global _native
    if _native is _UNSET:
        with _native_lock:
            if _native is _UNSET:
                _native, error = _load_native()
                if error is not None and _kernel_env() == "native":
                    raise RuntimeError("QINS_KERNEL=native but the native CPU kernels failed to build") from error
    if _native is None and _kernel_env() == "native":
        raise RuntimeError("QINS_KERNEL=native but the native CPU kernels are unavailable")
    return _native  # type: ignore[return-value]


def _load_native() -> tuple[ModuleType | None, Exception | None]:
    """``(module, None)``, or ``(None, the build's exception)`` with one warning (none under
    ``QINS_KERNEL=native``, where the caller raises)."""
    try:
        return _build.load_native(), None
    except Exception as exc:  # noqa: BLE001 - any build failure means: fall back
        if _kernel_env() != "native":
            logger.debug("qins native build failed", exc_info=True)
            warnings.warn(
                f"qins: the native CPU kernels failed to build ({type(exc).__name__}: {str(exc)[:300]}); "
                "qins::linear falls back to the (slow) reference implementation",
                RuntimeWarning,
                stacklevel=4,
            )
        return None, exc


def cpu_isa() -> int:
    """The native CPU path to run: ``QINS_CPU_ISA`` if set, else 0 (the best this CPU supports)."""
    name = os.environ.get("QINS_CPU_ISA", "").strip().lower()
    if not name:
        return 0
    if name not in ISAS:
        raise ValueError(f"QINS_CPU_ISA must be one of {sorted(ISAS)}, got {name!r}")
    return ISAS[name]


def triton_module() -> ModuleType:
    """:mod:`qins.kernels.triton_kernel`, imported on first use (needs the ``triton`` package)."""
    global _triton
    if _triton is None:
        try:
            from . import triton_kernel
        except ImportError as exc:
            raise RuntimeError("QINS_KERNEL=triton but triton cannot be imported") from exc
        _triton = triton_kernel
    return _triton


def _triton_available() -> bool:
    """Whether triton imports; ``False`` after a failed import (warned once)."""
    global _triton_missing
    if _triton_missing:
        return False
    try:
        triton_module()
    except RuntimeError as exc:
        _triton_missing = True
        logger.debug("qins: triton import failed", exc_info=True)
        warnings.warn(
            f"qins: triton cannot be imported ({exc.__cause__!r:.300}); qins::linear on CUDA falls back to "
            "the (slow) reference implementation",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _use_triton(device: torch.device, rows: int) -> bool:
    """Whether ``rows`` rows of x on ``device`` run the Triton kernel (``QINS_KERNEL=triton``: every
    batch; by default: CUDA batches of at most :data:`CUDA_TRITON_MAX_ROWS` rows)."""
    kind = _kernel_env()
    if kind == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET", "") == "1"
        return device.type == "cuda" or (device.type == "cpu" and interpreted)
    return kind == "auto" and device.type == "cuda" and rows <= CUDA_TRITON_MAX_ROWS and _triton_available()


def _use_native(device: torch.device) -> bool:
    return device.type == "cpu" and _kernel_env() != "reference" and native_module() is not None


def backend_name(device: torch.device | str = "cpu") -> str:
    """Which implementation ``qins::linear`` runs on ``device``: ``"native-avx512"``, ...,
    ``"triton"`` (only with ``QINS_KERNEL=triton``), ``"reference"``."""
    device = torch.device(device)
    if _use_triton(device, 1):  # what a one-row call runs; the name says what larger batches run
        triton_module()  # raises if triton is missing: never report a backend that cannot run
        if _kernel_env() == "auto":
            return f"triton (batch <= {CUDA_TRITON_MAX_ROWS}, else reference)"
        return "triton"
    if not _use_native(device):
        return "reference"
    isa = cpu_isa() or native_module().best_isa()
    return f"native-{_ISA_NAMES[isa]}"


@torch.library.custom_op("qins::linear", mutates_args=())
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
    """``x @ decode_codes(codes, sign, log_min, log_max, spacing, row_table, row_scale)ᵀ + bias`` in
    float32, returned in ``x.dtype``. ``spacing``: 0 log, 1 mulaw (``QinsConfig.spacing_id``).
    Shared tables: ``[n]`` logs, ``row_table`` uint8 ``[out]`` and ``row_scale`` float32 ``[out]``,
    the scale applied to each output after its dot product."""
    return _dispatch(x, codes, sign, log_min, log_max, bias, spacing, row_table, row_scale)


def _dispatch(x, codes, sign, log_min, log_max, bias, spacing=0, row_table=None, row_scale=None) -> torch.Tensor:
    """The op's body: the Triton, native or reference backend, as :func:`backend_name` reports.
    CPU calls outside ``QINS_KERNEL=triton`` (the common case) read the environment once and never
    ask about Triton."""
    kind = _kernel_env()
    on_cpu = x.device.type == "cpu"
    if (kind == "triton" or not on_cpu) and _use_triton(x.device, x.numel() // max(x.shape[-1], 1)):  # rows of x
        return triton_module().linear(x, codes, sign, log_min, log_max, bias, spacing, row_table, row_scale)
    native = native_module() if on_cpu and kind != "reference" else None
    if native is not None:
        return native.linear(x, codes, sign, log_min, log_max, bias, spacing, cpu_isa(), row_table, row_scale)
    return reference.linear(x, codes, sign, log_min, log_max, bias, spacing, row_table, row_scale)


def fused_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    sign: torch.Tensor | None,
    log_min: torch.Tensor,
    log_max: torch.Tensor,
    bias: torch.Tensor | None = None,
    spacing: int = 0,
    row_table: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``qins::linear`` as layers call it: the same result, the op's body run directly when nothing
    needs the op itself.

    That is an eager call on plain CPU tensors with no gradient to record: the dispatcher and the
    ``custom_op`` wrappers cost ~10 µs a call (hot), more when a weight stream has evicted them; at
    3072x3072, batch 1, weights cold they took ~8 points off the achieved fraction of the streaming
    floor (AMD EPYC Zen 5; docs/perf.md). Everything else calls the op: ``torch.compile`` and
    ``torch.jit.trace`` (which must see one opaque op), tensor subclasses and dispatch modes (fake
    tensors, ``__torch_function__``), autograd, other devices.
    """
    if (
        type(x) is torch.Tensor
        and type(codes) is torch.Tensor
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._len_torch_dispatch_stack() == 0
    ):
        return _dispatch(x, codes, sign, log_min, log_max, bias, spacing, row_table, row_scale)
    return linear(x, codes, sign, log_min, log_max, bias, spacing, row_table, row_scale)


def rounding_deviation(
    mag: torch.Tensor, gap: torch.Tensor, inv: torch.Tensor, unit: torch.Tensor, floor2: torch.Tensor, tau: torch.Tensor
) -> torch.Tensor:
    """The mse range search's rounding-deviation score ``[R, C]`` float64 (formula in
    :func:`qins.kernels.reference.rounding_deviation`): the native kernel on CPU as
    :func:`backend_name` reports (Triton has none: the native kernel runs there), else the reference.
    Backends differ only in summation order."""
    if _use_native(mag.device):
        args = [t.to(torch.float32).contiguous() for t in (mag, gap, inv, unit, floor2, tau)]
        return native_module().rounding_deviation(*args, cpu_isa())
    return reference.rounding_deviation(mag, gap, inv, unit, floor2, tau)


def range_codes(
    mag: torch.Tensor, gap: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, tables: torch.Tensor, packed: bool,
    write: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mse search's final codes and exact errors (:func:`qins.kernels.reference.range_codes`):
    native on CPU as :func:`rounding_deviation`, else the reference. The codes are identical on every
    backend; the float64 error sums differ only in order."""
    if not _use_native(mag.device):
        return reference.range_codes(mag, gap, lo, hi, tables, packed, write)
    k = num_levels(packed)
    delta = _level_step(lo, hi, k)  # [R, S], the steps qins.rounding._mag_codes divides by
    half = tables[:, :, k].t() * 0.5
    args = [t.to(torch.float32).contiguous() for t in (mag, gap, delta, half, tables)]
    err, codes = native_module().range_codes(*args, k, write, cpu_isa())
    return err, (codes if write >= 0 else None)


def _linear_fake(x, codes, sign, log_min, log_max, bias, spacing=0, row_table=None, row_scale=None):
    """The op's fake (meta) implementation: shape checks and an empty ``[..., out]`` in ``x.dtype``.

    It is also what the dispatcher picks when only some inputs are on the meta device: then it must
    refuse (an empty tensor on ``x``'s real device would be uninitialised memory), not compute."""
    devices = {t.device for t in (x, codes, sign, log_min, log_max, bias, row_table, row_scale) if t is not None}
    torch._check(
        len(devices) == 1, lambda: f"qins::linear: every tensor must be on one device, got {sorted(map(str, devices))}"
    )
    torch._check(x.shape[-1] == codes.shape[1])
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


linear.register_fake(_linear_fake)


def _setup_context(ctx, inputs, output) -> None:
    x, codes, sign, log_min, log_max, bias, spacing, row_table, row_scale = inputs
    ctx.save_for_backward(codes, sign, log_min, log_max, row_table, row_scale)
    ctx.spacing = spacing
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    codes, sign, log_min, log_max, row_table, row_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = decode_codes(codes, sign, log_min, log_max, dtype=torch.float32, spacing=SPACINGS[ctx.spacing],
                         row_table=row_table, row_scale=row_scale)
        grad_x = (grad.to(torch.float32) @ w).to(ctx.x_dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[5]:
        grad_bias = grad.to(torch.float32).reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias, None, None, None


linear.register_autograd(_backward, setup_context=_setup_context)
