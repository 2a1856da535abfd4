"""Versioned, validated state for :class:`~qins.ProjectiveLinear`.

A layer's ``state_dict`` holds ``stored``, ``sign`` (split only), ``log_min``, ``log_max``,
``row_table`` and ``row_scale`` (shared tables only) and ``bias``; its metadata
(``state_dict._metadata[prefix]``) holds ``version`` (2) and ``"qins"``: ``{"packed": bool, "per_row":
bool, "log_range": str, "spacing": str}``, plus ``"shared_tables": n`` for those formats (no
``spacing``: ``"log"``, the only spacing before ``"mulaw"``). Version 1 (or no metadata, e.g. after a
plain safetensors round trip) is read from the keys and shapes: ``sign`` present means split,
``[out]`` logs mean per row; the seed's states are split and per tensor.

:func:`check_qins_state` runs before a layer changes anything and raises ``ValueError`` naming the
key and the problem, so a bad state never leaves a half-loaded layer.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from .formats import LOG_FLOAT32_MAX, LOG_FLOAT32_MIN, QinsConfig, level_table, valid_levels

__all__ = ["check_qins_state", "format_metadata", "CODE_BUFFERS"]


class QinsCoded(Protocol):
    """What :func:`check_qins_state` reads of a layer (:class:`~qins.ProjectiveLinear`,
    :class:`~qins.ProjectiveEmbedding`): its format and the ``(rows, columns)`` of its codes."""

    @property
    def config(self) -> QinsConfig: ...

    @property
    def qins_weight_shape(self) -> tuple[int, int]: ...

#: a coded module's buffers in the order :func:`qins.encode` returns them (sign: split only;
#: row_table, row_scale: shared tables only)
CODE_BUFFERS = ("stored", "sign", "log_min", "log_max", "row_table", "row_scale")
_QINS_KEYS = CODE_BUFFERS


def format_metadata(config: QinsConfig) -> dict[str, Any]:
    """The ``"qins"`` metadata entry for ``config`` (plain JSON-able values; ``shared_tables`` only
    when set, so the other formats' entries are those written before it existed)."""
    meta = {
        "packed": config.packed, "per_row": config.per_row, "log_range": config.log_range, "spacing": config.spacing
    }
    if config.shared_tables:
        meta["shared_tables"] = config.shared_tables
    return meta


def _describe(packed: bool, per_row: bool, shared: int = 0) -> str:
    rows = f"{shared} shared table(s) scaled per row" if shared else "per row"
    return f"{'packed (1 byte/weight)' if packed else 'split (2 bytes/weight)'}, {rows if per_row else 'per tensor'}"


def check_qins_state(
    layer: QinsCoded, state_dict: Mapping[str, Any], prefix: str, local_metadata: Mapping[str, Any]
) -> None:
    """Raise ``ValueError`` unless ``state_dict`` holds a complete, valid QINS state for ``layer``.

    ``layer`` is a :class:`~qins.ProjectiveLinear` or :class:`~qins.ProjectiveEmbedding`: anything with
    ``config`` and ``qins_weight_shape`` (``(rows, columns)`` of the codes; per-row logs are ``[rows]``).

    Checked, in order: the QINS keys come together (all of ``stored``, ``log_min``, ``log_max``,
    split only ``sign``, shared tables only ``row_table`` and ``row_scale`` — or none of them, which leaves
    the layer's codes alone, as a partial
    ``strict=False`` load of other modules expects); the format (recorded metadata, else keys and
    shapes) matches the layer's; dtypes (``stored`` uint8, ``sign`` int8, logs float32); shapes;
    ``sign`` values in {-1, +1}; finite logs with ``log_min <= log_max``; ``log_max <=
    LOG_FLOAT32_MAX`` and ``log_min >= LOG_FLOAT32_MIN`` (:mod:`qins.formats`), so that every level of
    the decode table is a finite, normal float32; ``row_table`` naming one of the tables and
    ``row_scale`` positive, finite and with a finite product by its table's top level. Nothing is
    modified.
    """
    cfg = layer.config
    where = prefix.rstrip(".") or type(layer).__name__
    present = [k for k in _QINS_KEYS if prefix + k in state_dict]
    if not present:
        return
    meta = local_metadata.get("qins") if isinstance(local_metadata, Mapping) else None
    has_sign = prefix + "sign" in state_dict
    if meta is not None:
        packed, per_row = bool(meta.get("packed")), bool(meta.get("per_row"))
        shared = meta.get("shared_tables", 0)
    else:
        log_min = state_dict.get(prefix + "log_min")
        packed = not has_sign
        shared = 0
        if prefix + "row_table" in state_dict and isinstance(log_min, torch.Tensor) and log_min.dim() == 1:
            shared = log_min.shape[0]
        per_row = bool(shared) or (isinstance(log_min, torch.Tensor) and log_min.dim() == 1)
    def mismatch() -> ValueError:
        hint = f"packed={packed}, per_row={per_row}" + (f", shared_tables={shared!r}" if per_row else "")
        return ValueError(
            f"{where}: the state is {_describe(packed, per_row, shared)} "
            f"but the layer is {_describe(cfg.packed, cfg.per_row, cfg.shared_tables)}; "
            f"build the layer with QinsConfig({hint}) to load it"
        )

    if (packed, per_row) != (cfg.packed, cfg.per_row):
        raise mismatch()
    # states written before the mulaw spacing record none: they are log-spaced; a state without any
    # metadata (a plain safetensors round trip) cannot tell, and the layer's spacing is trusted.
    # Checked before the shared tables: a log-spaced state needs a log layer, which has none.
    spacing = meta.get("spacing", "log") if meta is not None else cfg.spacing
    if spacing != cfg.spacing:
        raise ValueError(f"{where}: the state's level spacing is {spacing!r} but the layer's is {cfg.spacing!r}; "
                         f"build the layer with QinsConfig(spacing={spacing!r}, ...) to load it")
    if shared != cfg.shared_tables:
        raise mismatch()
    needed = ["stored", "log_min", "log_max"] + ([] if cfg.packed else ["sign"])
    needed += ["row_table", "row_scale"] if cfg.shared_tables else []
    missing = [prefix + k for k in needed if prefix + k not in state_dict]
    if missing:
        raise ValueError(f"{where}: incomplete QINS state, missing {missing} (codes, sign and logs load together)")
    if cfg.packed and has_sign:
        raise ValueError(f"{prefix}sign: unexpected in a packed state (the sign is bit 7 of 'stored')")
    for key in ("row_table", "row_scale"):
        if not cfg.shared_tables and prefix + key in state_dict:
            raise ValueError(f"{prefix}{key}: unexpected in a state without shared tables")
    out, inp = layer.qins_weight_shape
    log_shape = cfg.log_shape(out)
    expect = {
        "stored": (torch.uint8, (out, inp)),
        "log_min": (torch.float32, log_shape),
        "log_max": (torch.float32, log_shape),
    }
    if not cfg.packed:
        expect["sign"] = (torch.int8, (out, inp))
    if cfg.shared_tables:
        expect["row_table"] = (torch.uint8, (out,))
        expect["row_scale"] = (torch.float32, (out,))
    for key, (dtype, shape) in expect.items():
        t = state_dict[prefix + key]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{prefix}{key}: expected a tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise ValueError(f"{prefix}{key}: dtype must be {dtype}, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{prefix}{key}: shape must be {shape}, got {tuple(t.shape)}")
    if any(state_dict[prefix + k].is_meta for k in expect):
        return  # nothing to check on meta tensors (values unknown)
    if not cfg.packed:
        sign = state_dict[prefix + "sign"]
        bad = (sign != 1) & (sign != -1)
        if bool(bad.any()):
            idx = tuple(torch.nonzero(bad)[0].tolist())
            raise ValueError(f"{prefix}sign: values must be -1 or +1, got {int(sign[idx])} at index {idx}")
    lo, hi = state_dict[prefix + "log_min"], state_dict[prefix + "log_max"]
    for key, t in (("log_min", lo), ("log_max", hi)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{prefix}{key}: must be finite, got a NaN or ±Inf")
    bad = lo > hi
    if bool(bad.any()):
        where = "" if lo.dim() == 0 else f" at row {int(torch.nonzero(bad)[0])}"
        raise ValueError(
            f"{prefix}log_min > log_max{where} ({float(lo.max()):.6g} > {float(hi.min()):.6g}): "
            "swapped or corrupt range"
        )
    # Both bounds are float32 values (see qins.formats), so the edges themselves are exact: a log on
    # the bound is accepted, the next float32 past it refused.
    if bool((hi > LOG_FLOAT32_MAX).any()):
        raise ValueError(f"{prefix}log_max: above ln(float32 max) rounded down to float32, {LOG_FLOAT32_MAX!r}; "
                         "the largest decoded weights would overflow to inf")
    if bool((lo < LOG_FLOAT32_MIN).any()):
        raise ValueError(f"{prefix}log_min: below {LOG_FLOAT32_MIN!r} (ln of float32's smallest normal, plus the "
                         "table's rounding margin); the smallest decoded weights would be subnormal, 0 or NaN")
    if cfg.spacing == "mulaw":
        bad = ~valid_levels(lo, hi, cfg.packed, "mulaw")
        if bool(bad.any()):
            where = "" if lo.dim() == 0 else f" at row {int(torch.nonzero(bad)[0])}"
            raise ValueError(f"{prefix}log_min/log_max{where}: the mulaw levels of this range are not strictly "
                             "decreasing normal floats (span too small or offset subnormal); corrupt range")
    if cfg.shared_tables:
        _check_rows(state_dict[prefix + "row_table"], state_dict[prefix + "row_scale"], lo, hi, cfg, prefix)


def _check_rows(table: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, cfg: QinsConfig,
                prefix: str) -> None:
    """``row_table`` names one of the tables; ``row_scale`` positive and finite, and every row's
    largest decoded value finite."""
    bad = table.to(torch.int64) >= lo.shape[0]
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        raise ValueError(f"{prefix}row_table: row {row} names table {int(table[row])}, the layer has {lo.shape[0]}")
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        raise ValueError(f"{prefix}row_scale: must be positive and finite, got {float(scale[row])!r} at row {row}")
    top = level_table(lo, hi, cfg.packed, cfg.spacing)[table.to(torch.int64), 1]
    bad = ~torch.isfinite(scale * top)
    if bool(bad.any()):
        raise ValueError(f"{prefix}row_scale: row {int(torch.nonzero(bad)[0])}'s top level overflows float32")
