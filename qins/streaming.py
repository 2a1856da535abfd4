"""Encoding one weight with bounded memory: :func:`encode_rows` and :func:`encoded_layer`.

Used by quantize on load (:mod:`qins.integrations.transformers.load`) and ``qins quantize``
(:mod:`qins.integrations.transformers.checkpoint`). A
per-row format encodes each row on its own (its range and codes depend on that row only), so the
weight is encoded in blocks of rows of about :data:`ROW_BLOCK_ELEMENTS` elements (at least two rows
each), each cast to the
compute dtype just before it is encoded: besides the source tensor and the codes, only one block's
temporaries exist at a time (a few times the block, tens of MiB at the default), whatever the
weight's size. The result equals :func:`qins.encode` of the whole weight cast to that dtype, bit for
bit (``tests/test_streaming.py`` pins it). A per-tensor format needs the whole tensor's range: it
is encoded in one piece (peak about 4.5x the weight in float32).
"""
from __future__ import annotations

from typing import Any

import torch

from .encode import encode, encode_shared
from .formats import QinsConfig
from .layer import ProjectiveLinear
from .state import CODE_BUFFERS

__all__ = ["ROW_BLOCK_ELEMENTS", "encode_rows", "encoded_layer"]

#: elements per encoded block of rows (1 Mi: 4 MiB in float32)
ROW_BLOCK_ELEMENTS = 1 << 20


def encode_rows(weight: torch.Tensor, config: QinsConfig, dtype: torch.dtype | None = None,
                block_elements: int = ROW_BLOCK_ELEMENTS,
                ) -> tuple[torch.Tensor | None, ...]:
    """``encode(weight.to(dtype), config)`` (``stored``, ``sign`` or None, ``log_min``, ``log_max``,
    and with shared tables ``row_table``, ``row_scale``), computed block by block of rows when
    ``config.per_row`` (shared tables: :func:`qins.encode.encode_shared`'s two passes over the blocks). ``weight``: 2-D
    ``[out, in]``, any float
    dtype; ``dtype`` defaults to ``weight.dtype``. Raises ``ValueError`` as :func:`qins.encode` does
    (a NaN/±Inf weight), naming the row index as seen in the whole weight."""
    dtype = dtype or weight.dtype
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    # never a one-row block: encode reads a one-row input as a whole tensor (a finer histogram for
    # the mse search), which would change that row's range
    step = max(2, block_elements // max(1, cols))
    if not config.per_row or step >= rows - 1:
        return encode(weight.to(dtype), config)
    starts = list(range(0, rows, step))
    if rows - starts[-1] == 1:
        starts.pop()  # the last row joins the block before it
    if config.shared_tables:  # the layer's tables from every row's model, then the codes, block by block
        return encode_shared(weight, config, list(zip(starts, starts[1:] + [rows])), dtype)
    stored = torch.empty(rows, cols, dtype=torch.uint8, device=weight.device)
    sign = None if config.packed else torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    log_min = torch.empty(rows, dtype=torch.float32, device=weight.device)
    log_max = torch.empty(rows, dtype=torch.float32, device=weight.device)
    for start, end in zip(starts, starts[1:] + [rows]):
        try:
            s, g, lo, hi = encode(weight[start:end].to(dtype), config)
        except ValueError as exc:
            raise ValueError(f"rows {start}-{end - 1}: {exc}") from exc
        stored[start:end] = s
        if sign is not None:
            sign[start:end] = g
        log_min[start:end] = lo
        log_max[start:end] = hi
    return stored, sign, log_min, log_max


def encoded_layer(weight: torch.Tensor, config: QinsConfig, *, cache_weight: bool = True,
                  dtype: torch.dtype | None = None, device: Any = None) -> ProjectiveLinear:
    """A bias-free :class:`ProjectiveLinear` holding :func:`encode_rows` of ``weight``, computing in
    ``dtype`` (default ``weight.dtype``) on ``device`` (default ``weight``'s): the layer
    ``ProjectiveLinear.from_linear`` makes from an ``nn.Linear`` with that weight in that dtype."""
    dtype = dtype or weight.dtype
    device = weight.device if device is None else torch.device(device)
    with torch.no_grad():
        codes = encode_rows(weight.to(device), config, dtype)
        layer = ProjectiveLinear(weight.shape[1], weight.shape[0], bias=False, config=config,
                                 cache_weight=False, device=device, dtype=dtype)
        for name, value in zip(CODE_BUFFERS, codes):
            if value is not None:
                getattr(layer, name).copy_(value)
        del codes
        layer.cache_weight = bool(cache_weight)
        layer.invalidate_cache()
    return layer
