"""`ProjectiveLinear`: an `nn.Linear` replacement whose weight is stored as QINS codes."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .codec import convert_to_qins, reconstruct_from_qins

__all__ = ["ProjectiveLinear"]


class ProjectiveLinear(nn.Module):
    """Linear layer with QINS-coded weights: ``y = x @ ŵᵀ + b``.

    State (all in the ``state_dict``): ``stored`` (uint8, ``[out, in]``), ``sign`` (int8,
    ``[out, in]``), ``log_min``/``log_max`` (0-d float32) and the ``bias`` Parameter (or None).
    Weight storage is 2 bytes per weight (code + sign) instead of 4 for fp32.

    ``cache_weight=True`` decodes once, at construction, into a non-persistent buffer in the
    module's compute dtype; ``.to()``/``.half()`` convert it, ``load_state_dict`` and
    :meth:`invalidate_cache` refresh it in place; it is never saved in the ``state_dict``. ``cache_weight=False`` decodes on every forward (the
    memory-saving mode: no decoded copy is kept between calls).

    ``forward`` reads ``log_min``/``log_max`` as 0-d tensors (never ``.item()``), so
    ``torch.compile(layer, fullgraph=True)`` neither breaks the graph nor recompiles when the log
    range changes. The output dtype equals the input dtype (the decoded weight is cast to it).
    """

    stored: torch.Tensor
    sign: torch.Tensor
    log_min: torch.Tensor
    log_max: torch.Tensor
    _cached_weight: Optional[torch.Tensor]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        cache_weight: bool = True,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.cache_weight = bool(cache_weight)
        self.register_buffer("stored", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("sign", torch.ones(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("log_min", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("log_max", torch.zeros((), dtype=torch.float32, device=device))
        # A 0-element float tensor that only records the compute dtype; it follows .to()/.half().
        self.register_buffer("_dtype_marker", torch.empty(0, dtype=dtype or torch.float32, device=device), persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("_cached_weight", None, persistent=False)
        self.register_load_state_dict_post_hook(self._refresh_after_load)
        self.invalidate_cache()

    # ------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, cache_weight: bool = True) -> "ProjectiveLinear":
        """Encode an ``nn.Linear`` (any float dtype, any device). The source module is not modified.

        The new layer is on ``linear``'s device, computes in ``linear.weight.dtype`` and copies the
        bias. Raises ``ValueError`` (from :func:`convert_to_qins`) for NaN/±Inf weights.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        stored, sign, log_min, log_max = convert_to_qins(weight)
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            cache_weight=cache_weight,
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.stored.copy_(stored)
        layer.sign.copy_(sign)
        layer.log_min.fill_(log_min)
        layer.log_max.fill_(log_max)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        layer.invalidate_cache()
        return layer

    # ------------------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the weight is decoded to (follows ``.to(dtype)``/``.half()``)."""
        return self._dtype_marker.dtype

    def decode_weight(self) -> torch.Tensor:
        """Decode the weight now (ignoring the cache), ``[out, in]`` in the compute dtype."""
        return reconstruct_from_qins(self.stored, self.sign, self.log_min, self.log_max, dtype=self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight ``[out, in]``: the cache in cached mode, else a fresh decode."""
        if self._cached_weight is not None:
            return self._cached_weight
        return self.decode_weight()

    @torch.no_grad()
    def invalidate_cache(self) -> None:
        """Re-decode the cache from the current codes (no-op in memory-saving mode).

        Call it after changing ``stored``/``sign``/``log_min``/``log_max`` by hand;
        ``load_state_dict`` calls it for you. The cache is refreshed *in place*, so compiled
        graphs that captured it see the new values without recompiling.
        """
        if not self.cache_weight:
            self._cached_weight = None
            return
        fresh = self.decode_weight()
        cache = self._cached_weight
        if cache is None or cache.shape != fresh.shape or cache.dtype != fresh.dtype or cache.device != fresh.device:
            self._cached_weight = fresh
        else:
            cache.copy_(fresh)

    @staticmethod
    def _refresh_after_load(module: "ProjectiveLinear", incompatible_keys: Any) -> None:
        module.invalidate_cache()

    def _apply(self, fn: Any, recurse: bool = True) -> "ProjectiveLinear":
        # nn.Module._apply would cast the 0-d float32 logs with .half()/.to(dtype) and lose
        # precision; they always stay float32 and only follow the device of the codes.
        log_min, log_max = self.log_min, self.log_max
        super()._apply(fn, recurse)
        device = self.stored.device
        self.log_min = log_min.to(device=device, dtype=torch.float32)
        self.log_max = log_max.to(device=device, dtype=torch.float32)
        if self._cached_weight is not None:
            # Re-decode rather than keep a cast copy: float16 -> float32 must not keep fp16 rounding.
            with torch.no_grad():
                self._cached_weight.copy_(self.decode_weight())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, ŵ, bias)`` for any leading dimensions; the output dtype is ``x.dtype``."""
        w = self._cached_weight
        if w is None:
            w = self.decode_weight()
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, cache_weight={self.cache_weight}"
        )
