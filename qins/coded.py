"""What :class:`qins.ProjectiveLinear` and :class:`qins.ProjectiveEmbedding` share: a weight held as QINS codes.

:class:`QinsCodedModule` is their base: the code buffers and how they are registered and filled,
the compute dtype, the decode of the whole weight, the validated load (:func:`qins.state.check_qins_state`),
the format recorded in the ``state_dict`` metadata (:func:`qins.state.format_metadata`) and ``_apply``
keeping the logs float32. What differs (the weight's meaning, the cache, ``forward``) stays in each.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .formats import QinsConfig, decode_codes
from .state import check_qins_state, format_metadata

__all__ = ["QinsCodedModule", "resolve_config"]


def resolve_config(config: QinsConfig | None) -> QinsConfig:
    """``config``, or the default ``QinsConfig()`` for None; ``TypeError`` for anything else."""
    config = config if config is not None else QinsConfig()
    if not isinstance(config, QinsConfig):
        raise TypeError(f"config must be a QinsConfig, got {type(config).__name__}")
    return config


class QinsCodedModule(nn.Module):
    """A module whose ``[rows, columns]`` weight is QINS codes in buffers (all in the ``state_dict``).

    ``stored`` (uint8 ``[rows, columns]``, sign in bit 7 when ``config.packed``), ``sign`` (int8, same
    shape, split format only), ``log_min``/``log_max`` (float32, ``()`` per tensor or ``[rows]`` per
    row, ``[n]`` with ``n`` shared tables), ``row_table`` (uint8 ``[rows]``) and ``row_scale`` (float32
    ``[rows]``) with shared tables only (else None) and the non-persistent 0-element ``_dtype_marker``
    whose dtype is the compute dtype. A subclass sets ``config`` and calls :meth:`_register_codes` in
    its ``__init__``, and defines
    ``qins_weight_shape`` (``(rows, columns)``, as :func:`qins.state.check_qins_state` checks it).
    """

    _version = 2

    config: QinsConfig
    stored: torch.Tensor
    sign: torch.Tensor | None
    log_min: torch.Tensor
    log_max: torch.Tensor
    row_table: torch.Tensor | None
    row_scale: torch.Tensor | None

    def _register_codes(self, rows: int, columns: int, log_shape: tuple[int, ...],
                        device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        """Register zero codes (``sign`` all +1 when split), zero logs of ``log_shape``, table 0 and
        unit scales for every row (shared tables only), the compute dtype marker (``dtype``, default float32)
        on ``device``, and the format's metadata hook."""
        shape = (rows, columns)
        self.register_buffer("stored", torch.zeros(shape, dtype=torch.uint8, device=device))
        self.register_buffer("sign", None if self.config.packed else torch.ones(shape, dtype=torch.int8, device=device))
        self.register_buffer("log_min", torch.zeros(log_shape, dtype=torch.float32, device=device))
        self.register_buffer("log_max", torch.zeros(log_shape, dtype=torch.float32, device=device))
        shared = bool(self.config.shared_tables)
        self.register_buffer("row_table", torch.zeros(rows, dtype=torch.uint8, device=device) if shared else None)
        self.register_buffer("row_scale", torch.ones(rows, dtype=torch.float32, device=device) if shared else None)
        # A 0-element tensor that only records the compute dtype; it follows .to()/.half().
        marker = torch.empty(0, dtype=dtype or torch.float32, device=device)
        self.register_buffer("_dtype_marker", marker, persistent=False)
        self.register_state_dict_post_hook(_record_format)

    def _set_codes(self, stored: torch.Tensor, sign: torch.Tensor | None, log_min: torch.Tensor,
                   log_max: torch.Tensor, row_table: torch.Tensor | None = None,
                   row_scale: torch.Tensor | None = None) -> None:
        """Copy an encoding (:func:`qins.encode.encode`'s tensors) into the buffers, in place."""
        if (row_scale is None) != (self.row_scale is None) or (row_table is None) != (self.row_table is None):
            raise ValueError("row_table and row_scale are given exactly for shared_tables formats")
        self.stored.copy_(stored)
        if sign is not None:
            self.sign.copy_(sign)
        self.log_min.copy_(log_min)
        self.log_max.copy_(log_max)
        if row_scale is not None:
            self.row_table.copy_(row_table)
            self.row_scale.copy_(row_scale)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the weight is decoded to (follows ``.to(dtype)``/``.half()``)."""
        return self._dtype_marker.dtype

    def decode_weight(self) -> torch.Tensor:
        """The whole weight decoded now, ``[rows, columns]`` in the compute dtype (a fresh tensor, never a cache)."""
        return decode_codes(self.stored, self.sign, self.log_min, self.log_max, dtype=self.compute_dtype,
                            spacing=self.config.spacing, row_table=self.row_table,
                            row_scale=self.row_scale)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        # Validate the whole QINS group first: a bad state raises before anything is changed.
        check_qins_state(self, state_dict, prefix, local_metadata)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn: Any, recurse: bool = True) -> QinsCodedModule:
        # nn.Module._apply would cast the float32 logs and row scales with .half()/.to(dtype) and lose
        # precision; they always stay float32 and only follow the device of the codes (meta and to_empty too).
        logs = {name: getattr(self, name) for name in ("log_min", "log_max", "row_scale")}
        logs = {name: t for name, t in logs.items() if t is not None}
        super()._apply(fn, recurse)
        device = self.stored.device
        for name, old in logs.items():
            if old.is_meta or device.type == "meta":
                setattr(self, name, torch.empty(old.shape, dtype=torch.float32, device=device))
            else:
                setattr(self, name, old.to(device=device, dtype=torch.float32))
        if self.row_table is not None and device.type != "meta" and logs["row_scale"].is_meta:
            # to_empty: the codes and logs are undefined until a load, but every row must name a
            # table that exists (table 0, scale 1), or decoding the empty layer would index out of range
            with torch.no_grad():
                self.row_table.zero_()
                self.row_scale.fill_(1.0)
        return self


def _record_format(module: QinsCodedModule, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    local_metadata["qins"] = format_metadata(module.config)
