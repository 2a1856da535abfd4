"""Triton backend of ``qins::linear``.

``linear(x, codes, sign, log_min, log_max, bias)`` computes ``x @ ŵᵀ + bias`` like
:func:`qins.kernels.reference.linear`, in two Triton launches per call:

1. ``_table_kernel`` builds the ``[R, 256]`` float32 decode table (``R = out`` per row, 1 per
   tensor) from the logs, with the operation sequence of :func:`qins.formats.qins_exp` /
   :func:`qins.formats.level_table`: ``δ = (hi - lo) / S``, ``t = hi - j·δ``, ``n = rint(t·log2e)``
   (round-half-even via the exact ``±1.5·2²³`` trick, valid for ``|t·log2e| < 2²²``), Cody-Waite
   reduction, Horner, two exact power-of-two factors. It is launched with
   ``enable_fp_fusion=False`` so that a GPU build does not contract ``a·b + c`` into an FMA, and
   divides with ``div_rn`` (IEEE), not ``/`` (approximate on NVIDIA). The tables are bit-identical
   to ``level_table``'s in the interpreter, and the sm_90 PTX holds only IEEE ``.rn`` float32 ops
   (both ``tests/test_triton.py``); ``tests/test_triton_cuda.py`` checks the tables on a GPU.
2. ``_gemv_kernel`` (batches up to :data:`GEMV_MAX_M`): one program per ``bn`` output rows and row
   of x gathers each code's weight from its row's table (packed: one gather from the signed table;
   split: the unsigned table times the ±1 sign), multiplies by x converted to float32 and adds into
   a ``[bn, bk]`` float32 accumulator, summed across ``bk`` at the end. ``_linear_kernel`` (larger
   batches): one program per ``[bm, bn]`` output tile, the same gathered weights, ``tl.dot`` with
   ``input_precision="ieee"`` (no TF32). The bias is added in float32 and the result cast to
   ``x.dtype`` by torch, as in the reference. :class:`Config` picks kernel and block sizes.

So this backend differs from the reference only in accumulation order (bound: ``2·γ_n·S``, see
``tests/test_triton.py``). The per-row table costs ``1 KiB`` of global memory traffic per output
row and call.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["linear", "table", "plan", "Config", "CANDIDATES", "default_config", "GEMV_MAX_M"]

logger = logging.getLogger(__name__)

TABLE = 256
_TABLE = tl.constexpr(TABLE)  # what the kernels read: compiled Triton sees only constexpr globals


@dataclass(frozen=True)
class Config:
    """A launch configuration of :func:`linear`.

    ``kind="gemv"``: one program per ``bn`` output rows and per row of x, summing ``w·x`` products
    in a ``[bn, bk]`` float32 accumulator reduced at the end (small batches, memory-bound).
    ``kind="tile"``: one program per ``[bm, bn]`` output tile, ``tl.dot`` (IEEE float32, no TF32)
    over ``bk``-wide chunks (larger batches). Both sum the same float32 products in float32: they
    differ from the reference only in summation order.
    """

    kind: str
    bn: int
    bk: int
    bm: int = 1
    num_warps: int = 4

    def __post_init__(self) -> None:
        if self.kind not in ("gemv", "tile"):
            raise ValueError(f"Config.kind must be 'gemv' or 'tile', got {self.kind!r}")
        if self.kind == "gemv" and self.bm != 1:
            raise ValueError("a gemv Config has bm=1")
        for v in (self.bn, self.bk, self.bm, self.num_warps):
            if v < 1 or v & (v - 1):
                raise ValueError(f"Config block sizes and num_warps must be powers of two, got {self}")
        if self.kind == "tile" and min(self.bm, self.bn, self.bk) < 16:
            raise ValueError(f"tl.dot needs tile blocks of at least 16, got {self}")

    @property
    def name(self) -> str:
        head = f"{self.kind}-n{self.bn}-k{self.bk}"
        return head + (f"-m{self.bm}" if self.kind == "tile" else "") + f"-w{self.num_warps}"


#: every configuration the GPU check runs and times (``perf/cuda_bench.py``, ``tests/test_triton_cuda.py``)
CANDIDATES = (
    Config("gemv", bn=4, bk=256),
    Config("gemv", bn=2, bk=512),
    Config("gemv", bn=4, bk=512),
    Config("gemv", bn=1, bk=1024),
    Config("gemv", bn=2, bk=1024, num_warps=8),
    Config("gemv", bn=8, bk=256),
    Config("gemv", bn=16, bk=128),
    Config("gemv", bn=8, bk=512, num_warps=8),
    Config("tile", bn=32, bk=32, bm=16),
    Config("tile", bn=64, bk=32, bm=32),
    Config("tile", bn=64, bk=32, bm=64),
    Config("tile", bn=128, bk=32, bm=64, num_warps=8),
)
#: batches (rows of x) up to this run the gemv kernel by default, larger ones the tile kernel
GEMV_MAX_M = 8
# The defaults, by batch: the fastest candidates on an NVIDIA H200 (perf/cuda_bench.py, cold weights,
# 3072x3072 and 3072x8192, packed and split; geometric mean of the four ratios to F.linear fp32):
# 1 row gemv-n1-k1024 (1.49x), 2..8 rows gemv-n2-k512 (2.74x at 8), 9..63 tile-n32-m16 (best at
# 16 and 32), 64+ tile-n64-m64 (3.0-3.3x faster than tile-n32-m16 at 512).
_DEFAULT_ONE_ROW = Config("gemv", bn=1, bk=1024)
_DEFAULT_GEMV = Config("gemv", bn=2, bk=512)
_DEFAULT_SMALL_TILE = Config("tile", bn=32, bk=32, bm=16)
_DEFAULT_TILE = Config("tile", bn=64, bk=32, bm=64)


def default_config(m: int) -> Config:
    """The configuration :func:`linear` uses for ``m`` rows of x when none is given."""
    if m <= 1:
        return _DEFAULT_ONE_ROW
    if m <= GEMV_MAX_M:
        return _DEFAULT_GEMV
    return _DEFAULT_SMALL_TILE if m < 64 else _DEFAULT_TILE


@triton.jit
def _qins_exp(t):
    # qins_exp(t), one correctly rounded float32 op at a time (see qins.formats.qins_exp).
    n = (t * 1.44269504088896341 + 12582912.0) - 12582912.0  # rint, ties to even
    f = (t - n * 0.693359375) - n * -2.12194440e-4
    p = tl.zeros_like(f) + 1.9875691500e-4
    p = p * f + 1.3981999507e-3
    p = p * f + 8.3334519073e-3
    p = p * f + 4.1665795894e-2
    p = p * f + 1.6666665459e-1
    p = p * f + 5.0000001201e-1
    y = ((p * f) * f + f) + 1.0
    ni = n.to(tl.int32)
    a = ni >> 1  # floor(n / 2)
    b = ni - a
    return (y * ((a + 127) << 23).to(tl.float32, bitcast=True)) * ((b + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _table_kernel(lo_ptr, hi_ptr, out_ptr, PACKED: tl.constexpr, MULAW: tl.constexpr):
    r = tl.program_id(0)
    lo = tl.load(lo_ptr + r)
    hi = tl.load(hi_ptr + r)
    # div_rn: a correctly rounded division. A plain ``/`` compiles to the approximate
    # ``div.full.f32`` on NVIDIA GPUs (found by tests/test_triton_cuda.py on an H200).
    # Steps (qins.formats.spacing_steps): K - 1 for the log spacing, K for mulaw.
    if PACKED:
        delta = tl.math.div_rn(hi - lo, 127.0 if MULAW else 126.0)
    else:
        delta = tl.math.div_rn(hi - lo, 255.0 if MULAW else 254.0)
    e = tl.arange(0, _TABLE)
    if PACKED:
        code = e % 128  # entries 128..255 are the negated 0..127
    else:
        code = e
    j = (code - 1).to(tl.float32)  # j = code - 1; code 0 is masked to zero below
    mag = _qins_exp(hi - j * delta)
    if MULAW:
        mag = mag - _qins_exp(lo + tl.zeros_like(j))
    mag = tl.where(code == 0, 0.0, mag)
    if PACKED:
        mag = tl.where(e >= 128, -mag, mag)
    tl.store(out_ptr + r * _TABLE + e, mag)


@triton.jit
def _linear_kernel(
    x_ptr, codes_ptr, sign_ptr, table_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_cn, stride_ck, stride_sn, stride_sk,
    HAS_SIGN: tl.constexpr, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if PER_ROW:
        trow = offs_n.to(tl.int64) * _TABLE
    else:
        trow = offs_n.to(tl.int64) * 0
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < K
        xm = mask_m[:, None] & mask_k[None, :]
        xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk, mask=xm, other=0.0)
        xt = xt.to(tl.float32)
        cm = mask_n[:, None] & mask_k[None, :]
        cidx = offs_n[:, None].to(tl.int64) * stride_cn + offs_k[None, :] * stride_ck
        code = tl.load(codes_ptr + cidx, mask=cm, other=0).to(tl.int32)
        w = tl.load(table_ptr + trow[:, None] + code, mask=cm, other=0.0)  # [BN, BK]
        if HAS_SIGN:
            sidx = offs_n[:, None].to(tl.int64) * stride_sn + offs_k[None, :] * stride_sk
            s = tl.load(sign_ptr + sidx, mask=cm, other=1).to(tl.float32)
            w = w * s
        acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    ym = mask_m[:, None] & mask_n[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=ym)


@triton.jit
def _gemv_kernel(
    x_ptr, codes_ptr, sign_ptr, table_ptr, bias_ptr, y_ptr,
    M, N, K,  # M unused (one program per row of x): the tile kernel's argument list
    stride_xm, stride_xk, stride_cn, stride_ck, stride_sn, stride_sk,
    HAS_SIGN: tl.constexpr, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    if PER_ROW:
        trow = offs_n.to(tl.int64) * _TABLE
    else:
        trow = offs_n.to(tl.int64) * 0
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < K
        xv = tl.load(x_ptr + m * stride_xm + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
        cm = mask_n[:, None] & mask_k[None, :]
        cidx = offs_n[:, None].to(tl.int64) * stride_cn + offs_k[None, :] * stride_ck
        code = tl.load(codes_ptr + cidx, mask=cm, other=0).to(tl.int32)
        w = tl.load(table_ptr + trow[:, None] + code, mask=cm, other=0.0)  # [BN, BK]
        if HAS_SIGN:
            sidx = offs_n[:, None].to(tl.int64) * stride_sn + offs_k[None, :] * stride_sk
            s = tl.load(sign_ptr + sidx, mask=cm, other=1).to(tl.float32)
            w = w * s
        acc += w * xv[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
    tl.store(y_ptr + m * N + offs_n, out, mask=mask_n)


def plan(cfg: Config, m: int, n: int) -> tuple:
    """``(kernel, grid, block constexprs)`` of a launch of ``cfg`` for ``m`` rows of x and ``n``
    outputs. A gemv grid has one program per row of x on axis 1, which holds at most 65535."""
    if cfg.kind == "gemv":
        torch._check(m <= 65535, lambda: f"a gemv launch takes at most 65535 rows of x, got {m}")
        return _gemv_kernel, (triton.cdiv(n, cfg.bn), m), dict(BN=cfg.bn, BK=cfg.bk)
    return _linear_kernel, (triton.cdiv(m, cfg.bm), triton.cdiv(n, cfg.bn)), dict(BM=cfg.bm, BN=cfg.bn, BK=cfg.bk)


def table(log_min: torch.Tensor, log_max: torch.Tensor, packed: bool, spacing: int = 0) -> torch.Tensor:
    """The ``[R, 256]`` float32 decode table, computed by ``_table_kernel`` (cf. ``level_table``;
    ``spacing`` 0 log, 1 mulaw)."""
    lo = log_min.to(torch.float32).reshape(-1).contiguous()
    hi = log_max.to(torch.float32).reshape(-1).contiguous()
    torch._check(lo.shape == hi.shape, lambda: "log_min and log_max must have the same shape")
    out = torch.empty((lo.shape[0], TABLE), dtype=torch.float32, device=lo.device)
    if lo.shape[0]:
        _table_kernel[(lo.shape[0],)](lo, hi, out, PACKED=packed, MULAW=bool(spacing), enable_fp_fusion=False)
    return out


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
    config: Config | None = None,
) -> torch.Tensor:
    """``x @ decode_codes(codes, sign, log_min, log_max, row_table=..., row_scale=...)ᵀ + bias``
    (float32 math, ``x.dtype`` out).

    ``spacing``: 0 log, 1 mulaw (:func:`qins.formats.level_table`). Shared tables (``[n]`` logs,
    ``row_table`` uint8 and ``row_scale`` float32 ``[out]``): each row's table is gathered into
    per-row tables for the kernel, each output is multiplied by its row's scale after the dot
    product, then the bias is added. ``config``: the launch configuration, :func:`default_config`
    of the batch when ``None``."""
    torch._check(codes.dim() == 2 and codes.dtype == torch.uint8, lambda: "codes must be uint8 [out, in]")
    out_f, in_f = codes.shape
    torch._check(x.shape[-1] == in_f, lambda: f"x has {x.shape[-1]} features, codes {in_f}")
    if sign is not None:
        torch._check(sign.shape == codes.shape and sign.dtype == torch.int8, lambda: "sign must be int8 like codes")
    per_row = log_min.dim() == 1
    torch._check(log_min.shape == log_max.shape, lambda: "log_min and log_max must have the same shape")
    torch._check(log_min.dim() == 0 or tuple(log_min.shape) == (out_f,) or row_table is not None,
                 lambda: "logs must be 0-d or [out]")
    # the kernel reads out_f bias values: a shorter bias would be read out of bounds
    torch._check(
        bias is None or tuple(bias.shape) == (out_f,), lambda: f"bias must be [{out_f}], got {tuple(bias.shape)}"
    )
    torch._check((row_table is None) == (row_scale is None), lambda: "row_table and row_scale come together")
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2 = x.reshape(m, in_f)
    b = None if bias is None else bias.to(torch.float32).contiguous()
    if row_scale is not None and m and in_f and out_f:
        idx = row_table.to(torch.int64)  # per-row logs of each row's table: the same table values
        y = linear(x2.to(torch.float32), codes, sign, log_min[idx], log_max[idx], None, spacing, None, None, config)
        y = y * row_scale.to(torch.float32)
        return (y if b is None else y + b).to(x.dtype).reshape(*lead, out_f)
    if m == 0 or in_f == 0 or out_f == 0:
        y = torch.zeros((m, out_f), dtype=torch.float32, device=x.device)
        if b is not None:
            y = y + b
        return y.to(x.dtype).reshape(*lead, out_f)
    tab = table(log_min, log_max, packed=sign is None, spacing=spacing)
    y = torch.empty((m, out_f), dtype=torch.float32, device=x.device)
    s = codes if sign is None else sign
    cfg = default_config(m) if config is None else config
    kernel, grid, blocks = plan(cfg, m, out_f)
    logger.debug("qins triton linear: x %s codes %s per_row=%s packed=%s", tuple(x2.shape), tuple(codes.shape),
                 per_row, sign is None)
    strides = (x2.stride(0), x2.stride(1), codes.stride(0), codes.stride(1), s.stride(0), s.stride(1))
    kernel[grid](
        x2, codes, s, tab, y if b is None else b, y, m, out_f, in_f, *strides,
        HAS_SIGN=sign is not None, PER_ROW=per_row, HAS_BIAS=b is not None, num_warps=cfg.num_warps, **blocks,
    )
    return y.to(x.dtype).reshape(*lead, out_f)
