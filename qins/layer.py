"""`ProjectiveLinear`: an `nn.Linear` replacement whose weight is stored as QINS codes."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .calibrated import encode_calibrated
from .coded import QinsCodedModule, resolve_config
from .encode import encode
from .formats import QinsConfig

__all__ = ["ProjectiveLinear"]


class ProjectiveLinear(QinsCodedModule):
    """Linear layer with QINS-coded weights: ``y = x @ ŵᵀ + b``.

    State (all in the ``state_dict``): ``stored`` (uint8 ``[out, in]``: codes, with the sign in bit 7
    when ``config.packed``), ``sign`` (int8 ``[out, in]``, split format only), ``log_min``/``log_max``
    (float32, 0-d per tensor, ``[out]`` per row, ``[n]`` with ``n`` shared tables), ``row_table``
    (uint8 ``[out]``) and ``row_scale`` (float32 ``[out]``) with shared tables only, and the ``bias``
    Parameter (or None). Weight storage: 1 byte per weight packed, 2 split (plus 8 bytes per row
    with per-row ranges, 5 with shared tables).

    ``cache_weight=True`` decodes once, at construction, into a non-persistent buffer in the
    module's compute dtype (4 more bytes per weight in fp32); ``.to()``/``.half()`` convert it,
    ``load_state_dict`` and :meth:`invalidate_cache` refresh it in place; it is never saved.
    ``cache_weight=False`` (the memory-saving mode) runs the fused ``qins::linear`` op on the codes
    at every call (:mod:`qins.kernels`: native C++ on CPU, else the reference): no decoded weight
    is kept, or made. It accumulates in float32 whatever the input dtype.

    The state_dict records its format in the module's metadata (``_version`` 2 and a ``"qins"``
    entry) and a load checks keys, dtypes, shapes, values and format before changing anything; a
    seed-layout state (version 1: split, per tensor) loads into a ``QinsConfig.codec_compatible()`` layer.

    ``forward`` never calls ``.item()``, so ``torch.compile(fullgraph=True)`` neither breaks the
    graph nor recompiles when the log range changes. The output dtype equals the input dtype.
    """

    _cached_weight: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        config: QinsConfig | None = None,
        cache_weight: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.config = resolve_config(config)
        self.cache_weight = bool(cache_weight)
        self._register_codes(out_features, in_features, self.config.log_shape(out_features), device, dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("_cached_weight", None, persistent=False)
        self.register_load_state_dict_post_hook(self._refresh_after_load)
        self.invalidate_cache()

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls, linear: nn.Linear, config: QinsConfig | None = None, *, cache_weight: bool = True,
        input_moment: torch.Tensor | None = None,
    ) -> ProjectiveLinear:
        """Encode an ``nn.Linear`` (any float dtype, any device) in ``config``'s format.

        ``config`` defaults to ``QinsConfig()`` (packed, mse, per row). With ``input_moment`` (the
        layer's ``E[x xᵀ]``, ``[in, in]``, from :func:`qins.calibrate`) the ranges and codes are
        chosen to minimise the output error (:func:`qins.calibrated.encode_calibrated`; per-row
        configs only); the format is the same. The source module is not
        modified. The new layer is on ``linear``'s device, computes in ``linear.weight.dtype`` and
        copies the bias. A weight on the meta device gives a meta layer (to be filled by a load).
        Raises ``ValueError`` for NaN/±Inf weights or values that overflow float32.
        """
        with torch.no_grad():
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
            weight = linear.weight
            layer = cls(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                config=config,
                cache_weight=cache_weight,
                device=weight.device,
                dtype=weight.dtype,
            )
            if weight.is_meta:
                return layer
            if input_moment is None:
                encoded = encode(weight, layer.config)
            else:
                encoded = encode_calibrated(weight, input_moment, layer.config)
            layer._set_codes(*encoded)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            layer.invalidate_cache()
            return layer

    # ------------------------------------------------------------------------------------------
    @property
    def qins_weight_shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``: the codes' shape, as :func:`qins.state.check_qins_state` checks it."""
        return self.out_features, self.in_features

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight ``[out, in]``: the cache itself in cached mode, else a fresh decode."""
        if self._cached_weight is not None:
            return self._cached_weight
        return self.decode_weight()

    def invalidate_cache(self) -> None:
        """Re-decode the cache from the current codes (no-op in memory-saving mode).

        Call it after changing ``stored``/``sign``/``log_min``/``log_max`` by hand;
        ``load_state_dict`` calls it for you. The cache is refreshed *in place*, so compiled
        graphs that captured it see the new values without recompiling.
        """
        with torch.no_grad():
            if not self.cache_weight:
                self._cached_weight = None
                return
            fresh = self.decode_weight()
            cache = self._cached_weight
            if (
                cache is None or cache.shape != fresh.shape or cache.dtype != fresh.dtype
                or cache.device != fresh.device
            ):
                self._cached_weight = fresh
            else:
                cache.copy_(fresh)

    @staticmethod
    def _refresh_after_load(module: ProjectiveLinear, incompatible_keys: Any) -> None:
        module.invalidate_cache()

    def _apply(self, fn: Any, recurse: bool = True) -> ProjectiveLinear:
        # QinsCodedModule._apply keeps the logs float32; the cache, cast by it, is re-decoded below
        super()._apply(fn, recurse)
        if self._cached_weight is not None:
            # Re-decode rather than keep a cast copy: float16 -> float32 must not keep fp16 rounding.
            with torch.no_grad():
                self._cached_weight.copy_(self.decode_weight())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, ŵ, bias)`` for any leading dimensions; the output dtype is ``x.dtype``."""
        if not x.dtype.is_floating_point:
            raise TypeError(f"ProjectiveLinear expects a floating-point input, got {x.dtype}")
        bias = self.bias
        w = self._cached_weight
        if w is None:
            # Memory-saving mode: one fused op on the codes (no decoded weight is made); it
            # accumulates in float32 and returns x.dtype. Gradients flow through its reference
            # formula, so training code works too. Eager no-grad CPU calls skip the dispatcher.
            return kernels.fused_linear(
                x, self.stored, self.sign, self.log_min, self.log_max, bias, self.config.spacing_id, self.row_table,
                self.row_scale
            )
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={'packed' if c.packed else 'split'}, spacing={c.spacing}"
            + (f", log_range={c.log_range}" if c.spacing == "log" else "")
            + f", per_row={c.per_row}" + (f", shared_tables={c.shared_tables}" if c.shared_tables else "") + ", "
            f"cache_weight={self.cache_weight}"
            + ("" if self.cache_weight else f", kernel={kernels.backend_name(self.stored.device)}")
        )
