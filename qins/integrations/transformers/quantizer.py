"""The ``HfQuantizer`` of QINS: rebuilds QINS layers on the meta model and loads their buffers exactly.

For a QINS checkpoint (``pre_quantized``) the quantizer converts the meta model with the recorded
format before any weight loads (:func:`qins.convert_model_to_projective`; with ``embeddings`` also
the embeddings and a head tied to one, :mod:`.tying`), hands the saved codes and logs to the layers
as they are in the file (the float32 logs are never cast), then validates every layer and decodes
the caches. For a full-precision checkpoint with a ``quantization_config`` (quantize on load) it
encodes each target Linear (and embedding) as its weight arrives (:mod:`.load`).

:func:`build_classes` makes both classes for a transformers major version (transformers is imported
then, not when this module is).
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable
from typing import Any

import torch

from ...convert import convert_model_to_projective
from ...embedding import ProjectiveEmbedding
from ...layer import ProjectiveLinear
from ...state import CODE_BUFFERS, check_qins_state, format_metadata
from . import load
from .config import build_config_class, transformers_version
from .tying import embedding_targets, stop_transformers_tying, tie_input_and_output_embeddings

__all__ = ["build_classes", "build_quantizer_class"]

log = logging.getLogger(__name__)

_QINS_BUFFERS = CODE_BUFFERS
#: the modules that hold QINS codes of their own (a tied head reads its embedding's)
_CODED = (ProjectiveLinear, ProjectiveEmbedding)


def _qins_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every module holding QINS codes, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _CODED)]


def _cast_saved_tensors(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast what a load in ``dtype`` casts: floating parameters and persistent buffers (QINS layers
    via their ``.to``: float32 logs kept, cache re-decoded); non-persistent buffers such as rotary
    ``inv_freq`` keep their dtype, as in a direct load."""
    for module in model.modules():
        if isinstance(module, _CODED):
            module.to(dtype)
            continue
        for param in module._parameters.values():
            if param is not None and param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buf.to(dtype)


def build_classes(major: int) -> tuple[type, type]:
    """(``QinsHfConfig``, ``QinsHfQuantizer``) for transformers major version ``major``."""
    return build_config_class(), build_quantizer_class(major)


def build_quantizer_class(major: int) -> type:
    """The ``HfQuantizer`` subclass for transformers major version ``major`` (imports transformers)."""
    from transformers.quantizers.base import HfQuantizer

    class QinsHfQuantizer(HfQuantizer):
        """Rebuilds QINS layers (and embeddings) on the meta model and loads their buffers exactly."""

        requires_calibration = False
        requires_parameters_quantization = True  # 4.x: our buffers go through create_quantized_param

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            self._target_dtype: torch.dtype | None = None
            self._seen: set[str] = set()
            self._targets: set[str] = set()  # quantize on load: the Linears (and embeddings) to encode
            self._heads: set[str] = set()  # quantize on load: the Linears tied to a target embedding
            self._load_errors: list[ValueError] = []

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            version = transformers_version()
            if major < 5 and importlib.util.find_spec("accelerate") is None:
                raise ImportError(f"transformers {version} loads quantized (QINS) checkpoints through accelerate: "
                                  "pip install accelerate")

        def update_torch_dtype(self, dtype: Any) -> Any:  # 4.44-4.53 name
            return self.update_dtype(dtype)

        def update_dtype(self, dtype: Any) -> Any:
            if isinstance(dtype, str) and dtype != "auto" and isinstance(getattr(torch, dtype, None), torch.dtype):
                dtype = getattr(torch, dtype)
            if major < 5 and self.pre_quantized and isinstance(dtype, torch.dtype) and dtype != torch.float32:
                self._target_dtype = dtype  # 4.x would cast the float32 logs: load in float32, cast after
                return torch.float32
            return dtype

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
            qc = self.quantization_config
            if self.pre_quantized:
                if qc.embeddings:
                    tie_input_and_output_embeddings(model)
                report = convert_model_to_projective(model, qc.qins_config, skip=tuple(qc.skip),
                                                     cache_weight=qc.cache_weight, embeddings=qc.embeddings)
                if qc.embeddings:
                    stop_transformers_tying(model)
                log.debug("qins: rebuilt %d QINS layers before loading", len(report.converted))
            else:
                embeddings: set[str] = set()
                if qc.embeddings:
                    tie_input_and_output_embeddings(model)
                    embeddings, self._heads = embedding_targets(model, qc.skip)
                    stop_transformers_tying(model, self._heads)
                self._targets = load.conversion_targets(model, qc.skip) | embeddings
                log.debug("qins: %d layers to quantize while loading", len(self._targets))
            keys = load.checkpoint_keys(kwargs.get("checkpoint_files") or load.local_checkpoint_files(model))
            if keys is not None:
                self.update_expected_keys(model, [], keys)

        def update_expected_keys(self, model: Any, expected_keys: list, loaded_keys: Iterable[str]) -> list:
            """4.53+ (and the files' headers on other versions): the checkpoint's names against ``skip``."""
            load.check_against_checkpoint(model, self.quantization_config.skip, set(loaded_keys),
                                             pre_quantized=self.pre_quantized, targets=self._targets)
            return expected_keys

        def _qins_buffer(self, model: Any, param_name: str) -> bool:
            module_name, _, tensor_name = param_name.rpartition(".")
            if tensor_name not in _QINS_BUFFERS:
                return False
            try:
                return isinstance(model.get_submodule(module_name), _CODED)
            except AttributeError:
                return False

        def check_quantized_param(self, model: Any, param_value: Any = None, param_name: str = "", *args: Any,
                                  **kwargs: Any) -> bool:
            if not self.pre_quantized:
                return load.weight_target(model, self._targets, param_name)
            return self._qins_buffer(model, param_name)

        def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
            if not self.pre_quantized:
                return load.weight_target(model, self._targets, param_name)
            return major < 5 and self._qins_buffer(model, param_name)

        def get_quantize_ops(self) -> Any:  # 5.x: the op that encodes a target weight as it arrives
            return load.quantize_op(self)

        def create_quantized_param(self, model: Any, param_value: torch.Tensor, param_name: str,
                                   target_device: Any = "cpu", *args: Any, **kwargs: Any) -> None:
            if not self.pre_quantized:  # 4.x quantize on load: the weight, cast to the load dtype
                qc = self.quantization_config
                load.install_encoded(model, param_name, param_value, qc.qins_config, qc.cache_weight, target_device)
                return
            module_name, _, tensor_name = param_name.rpartition(".")
            module = model.get_submodule(module_name)
            if tensor_name.startswith("log_") and param_value.dtype != torch.float32:
                raise ValueError(f"{param_name}: transformers cast the float32 QINS log to {param_value.dtype} while "
                                 "loading; pass torch_dtype=<a torch.dtype> (not 'auto') to from_pretrained")
            module._buffers[tensor_name] = param_value.detach().to(target_device)
            self._seen.add(param_name)

        def update_missing_keys(self, model: Any, missing_keys: list, prefix: str = "") -> list:
            if not self.pre_quantized:
                weights = {k.removeprefix(prefix).lstrip(".") for k in missing_keys} | set(missing_keys)
                load.check_against_checkpoint(model, (), {f"{t}.weight" for t in self._targets} - weights,
                                                 pre_quantized=False, targets=self._targets)
                # a tied head's weight is its embedding's codes, never in the checkpoint
                return [k for k in missing_keys if k.removeprefix(prefix).lstrip(".").removesuffix(".weight")
                        not in self._heads]
            missing = [k for k in missing_keys if self._qins_buffer(model, k.removeprefix(prefix).lstrip("."))
                       or self._qins_buffer(model, k)]
            if missing:
                raise ValueError(f"QINS checkpoint is missing {missing[:4]}{' ...' if len(missing) > 4 else ''}: "
                                 "the quantization_config's skip list does not match the saved layers")
            return missing_keys

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            if self._load_errors:
                raise self._load_errors[0]
            left = sorted(t for t in self._targets if not isinstance(model.get_submodule(t), _CODED))
            if left:
                raise ValueError(f"layers {left[:4]} were not quantized while loading: their weights never arrived "
                                 "(add them to the QINS config's 'skip' list to leave them as they are)")
            for name, layer in _qins_layers(model):
                names = [n for n in _QINS_BUFFERS if getattr(layer, n) is not None]
                device = layer.stored.device
                unloaded = [f"{name}.{n}" for n in names if getattr(layer, n).is_meta
                            or (major >= 5 and not getattr(getattr(layer, n), "_is_hf_initialized", False))]
                if unloaded:
                    raise ValueError(f"QINS checkpoint is missing {unloaded}: the quantization_config's skip "
                                     "list does not match the saved layers")
                if layer._dtype_marker.is_meta or layer._dtype_marker.device != device:
                    layer._dtype_marker = torch.empty(0, dtype=layer._dtype_marker.dtype, device=device)
                state = {n: getattr(layer, n) for n in names}
                try:
                    check_qins_state(layer, state, "", {"qins": format_metadata(layer.config)})
                except ValueError as exc:
                    raise ValueError(f"QINS checkpoint, layer {name}: {exc}") from exc
                if isinstance(layer, ProjectiveLinear):
                    layer._cached_weight = None
                    layer.invalidate_cache()
            if self._target_dtype is not None:
                _cast_saved_tensors(model, self._target_dtype)
                for attr in ("torch_dtype", "dtype"):
                    if hasattr(model.config, attr):
                        setattr(model.config, attr, self._target_dtype)
            return model

        def is_serializable(self, safe_serialization: Any = None) -> bool:  # a method; 4.44 reads it as truthy
            return True

        @property
        def is_trainable(self) -> bool:
            return False

        @property
        def is_compileable(self) -> bool:
            return True

    return QinsHfQuantizer
