"""transformers integration: ``save_pretrained`` / ``from_pretrained`` of QINS models.

:func:`convert_model_to_projective` on a transformers model records ``config.quantization_config``
(:func:`quantization_config_dict`: ``quant_method: "qins"``, the :class:`QinsConfig` fields, the
skip list and ``cache_weight``), so ``save_pretrained`` writes it to config.json next to the
safetensors weights (``stored``/``sign``/``log_min``/``log_max`` as saved by the layers).

:func:`register_with_transformers` (idempotent; called by the conversion of a transformers model)
registers the ``"qins"`` method with transformers' quantizer registry
(``register_quantization_config``/``register_quantizer``, or the mapping itself on 4.44, which has
no registration API). ``AutoModelForCausalLM.from_pretrained(dir)`` then rebuilds the QINS layers
on the meta model before the weights load, loads the codes and logs as they are in the file (the
float32 logs are never cast), validates every layer, and decodes the caches.

Quantize on load: ``from_pretrained(src, quantization_config=qins.QinsHfConfig(...))`` on a
full-precision checkpoint encodes each Linear as its weight arrives (:mod:`qins.hf_load`), with the
codes and logs of load-then-convert. Before any weight loads, the checkpoint's tensor names are
checked against the ``skip`` list (:func:`qins.hf_load.check_against_checkpoint`). transformers
refuses ``gguf_file=`` together with any ``quantization_config`` (every version in the matrix):
load the GGUF, then :func:`qins.convert_model_to_projective` (the GGUF loader dequantizes every
tensor in memory first anyway).

With ``torch_dtype`` other than float32 on 4.x, the model loads in float32 and is cast after the
load (transformers 4.x casts every floating checkpoint tensor, the logs included, to that dtype);
on 5.x the loader keeps the meta model's float32 logs. Tested: transformers 4.44.2, 4.53.3,
4.57.6, 5.24.0 (``noxfile.py``). Other versions raise :class:`UnsupportedTransformersError`.
"""
from __future__ import annotations

import enum
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from typing import Any, Iterable, Optional

import torch

from . import hf_config, hf_load
from .convert import convert_model_to_projective
from .formats import SPACINGS, QinsConfig
from .hf_config import (
    _READABLE_VERSIONS,
    FORMAT_VERSION,
    QUANT_METHOD,
    UnsupportedTransformersError,
    quantization_config_dict,
)
from .layer import ProjectiveLinear
from .state import check_qins_state, format_metadata

__all__ = ["QUANT_METHOD", "quantization_config_dict", "register_with_transformers", "register_on_import"]

log = logging.getLogger(__name__)

SUPPORTED = (">=4.44", "<6")
_QINS_BUFFERS = ("stored", "sign", "log_min", "log_max")
_registered: Optional[tuple[type, type]] = None


def _spacing_for(spacing: Any, format_version: Any) -> str:
    """The level spacing of a ``quantization_config``: a version 2 config (written before the mulaw
    spacing) has none and is log-spaced; version 3 names it. Errors name the field and the fix."""
    if format_version == 2:
        if spacing not in (None, "log"):
            raise ValueError(f"quantization_config field 'spacing' {spacing!r} needs format_version 3; fix config.json")
        return "log"
    if spacing is None:
        return "mulaw"
    if spacing not in SPACINGS:
        raise ValueError(f"quantization_config field 'spacing' must be one of {list(SPACINGS)}, got {spacing!r}; "
                         "fix config.json")
    return spacing


def _transformers_version():
    import transformers
    from packaging.version import Version

    v = Version(transformers.__version__)
    if v < Version("4.44") or v.major >= 6:
        raise UnsupportedTransformersError(
            f"qins cannot save/load QINS models with transformers {transformers.__version__} (supported: "
            f"{','.join(SUPPORTED)}); use qins.save/qins.load (plain safetensors) instead"
        )
    return v


def register_with_transformers() -> tuple[type, type]:
    """Register the ``"qins"`` quantization method with transformers; returns (config class, quantizer class).

    Idempotent. Raises :class:`UnsupportedTransformersError` on a transformers version outside
    ``>=4.44,<6``. After it, ``from_pretrained`` of a directory saved from a converted model
    rebuilds and loads the QINS layers.
    """
    global _registered
    if _registered is not None:
        return _registered
    version = _transformers_version()
    from transformers.quantizers import auto

    config_cls, quantizer_cls = _build_classes(version.major)
    config_map, quantizer_map = auto.AUTO_QUANTIZATION_CONFIG_MAPPING, auto.AUTO_QUANTIZER_MAPPING
    if QUANT_METHOD in config_map or QUANT_METHOD in quantizer_map:
        # registered by another copy of this module (e.g. reloaded): reuse it, completing a half
        # registration with this module's class
        config_map.setdefault(QUANT_METHOD, config_cls)
        quantizer_map.setdefault(QUANT_METHOD, quantizer_cls)
        _registered = (config_map[QUANT_METHOD], quantizer_map[QUANT_METHOD])
        return _registered
    if hasattr(auto, "register_quantizer"):
        auto.register_quantization_config(QUANT_METHOD)(config_cls)
        auto.register_quantizer(QUANT_METHOD)(quantizer_cls)
    else:  # 4.44: no registration API; the two mappings are what it would write
        config_map[QUANT_METHOD] = config_cls
        quantizer_map[QUANT_METHOD] = quantizer_cls
    log.debug("registered quant_method %r with transformers %s", QUANT_METHOD, version)
    _registered = (config_cls, quantizer_cls)
    return _registered


#: registration happens once this transformers module (the one ``from_pretrained`` lives in) exists
_LOADER_MODULE = "transformers.modeling_utils"


def _register_quietly() -> None:
    """Register, logging (not raising) why it could not: a transformers outside the supported
    range keeps its own behaviour, as it does for a process that never imports qins."""
    try:
        register_with_transformers()
    except UnsupportedTransformersError as exc:
        log.debug("qins not registered with transformers: %s", exc)
    except Exception as exc:  # never break the user's import of transformers
        log.warning("qins could not register its quantization method with transformers: %r", exc)


class _RegisterWhenLoaded(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that only watches for :data:`_LOADER_MODULE`: it finds that module
    with the regular path finder and wraps its loader so that the ``"qins"`` method is registered
    right after the module has executed. It stays in ``sys.meta_path`` (removing a finder while the
    import system iterates the list would skip the next one) and does nothing after it fired."""

    def __init__(self) -> None:
        self.fired = False

    def find_spec(self, fullname, path, target=None):
        if self.fired or fullname != _LOADER_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        self.fired = True
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register_quietly()

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def register_on_import() -> None:
    """Make ``from_pretrained`` of QINS checkpoints work after a bare ``import qins``: register now
    when transformers' model loader is already imported, else as soon as it is. Imports nothing
    (transformers is not loaded by it); idempotent; a no-op where transformers is not installed."""
    if _registered is not None:
        return
    if _LOADER_MODULE in sys.modules:
        _register_quietly()
        return
    if any(isinstance(f, _RegisterWhenLoaded) for f in sys.meta_path):
        return
    if importlib.util.find_spec("transformers") is None:
        return
    sys.meta_path.insert(0, _RegisterWhenLoaded())


# the core (qins.convert) registers through qins.hf_config: the name is looked up when called
hf_config.set_registrar(lambda: register_with_transformers())


def _check_config_fields(*, packed: Any, log_range: Any, per_row: Any, skip: Any, cache_weight: Any,
                         format_version: Any, extra: dict, spacing: Any = "log") -> None:
    """Refuse a ``quantization_config`` that is not exactly what :func:`quantization_config_dict`
    writes, before any weight loads: each error names the field and the fix (a JSON ``"false"`` is a
    string, and ``bool("false")`` would be True)."""
    for name, value in (("packed", packed), ("per_row", per_row), ("cache_weight", cache_weight)):
        if not isinstance(value, bool):
            raise ValueError(f"quantization_config field {name!r} must be a JSON boolean (true or false), "
                             f"got {value!r} ({type(value).__name__}); fix config.json")
    if log_range not in ("minmax", "mse"):
        raise ValueError(f"quantization_config field 'log_range' must be \"minmax\" or \"mse\", got {log_range!r}; fix config.json")
    if isinstance(skip, str) or not isinstance(skip, (list, tuple)) or not all(isinstance(p, str) for p in skip):
        raise ValueError(f"quantization_config field 'skip' must be a list of layer names or globs, got {skip!r}; fix config.json")
    if isinstance(format_version, bool) or format_version not in _READABLE_VERSIONS or not isinstance(format_version, int):
        raise ValueError(f"quantization_config: QINS format_version {format_version!r} is not supported (this qins "
                         "reads 2 and 3); upgrade qins or re-convert the checkpoint")
    if spacing == "mulaw" and log_range != "mse":
        raise ValueError(f"quantization_config field 'log_range' {log_range!r} is a rule of the log spacing; "
                         "set \"spacing\": \"log\" with it, or \"log_range\": \"mse\"; fix config.json")
    method = extra.pop("quant_method", QUANT_METHOD)
    if getattr(method, "value", method) != QUANT_METHOD:
        raise ValueError(f"quantization_config field 'quant_method' must be {QUANT_METHOD!r}, got {method!r}")
    if extra:
        raise ValueError(f"quantization_config has unknown fields {sorted(extra)} (QINS knows packed, log_range, "
                         "per_row, spacing, skip, cache_weight, format_version); remove them from config.json")


def _qins_layers(model: torch.nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ProjectiveLinear)]


def _cast_saved_tensors(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast what a load in ``dtype`` casts: floating parameters and persistent buffers (QINS layers
    via their ``.to``: float32 logs kept, cache re-decoded); non-persistent buffers such as rotary
    ``inv_freq`` keep their dtype, as in a direct load."""
    for module in model.modules():
        if isinstance(module, ProjectiveLinear):
            module.to(dtype)
            continue
        for param in module._parameters.values():
            if param is not None and param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buf.to(dtype)


def _build_classes(major: int) -> tuple[type, type]:
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class QinsMethod(str, enum.Enum):  # 4.x reads ``quant_method.value`` (telemetry); json writes "qins"
        QINS = QUANT_METHOD

    class QinsHfConfig(QuantizationConfigMixin):
        """``quantization_config`` of a QINS model: the :class:`QinsConfig` fields, skip list, cache mode."""

        def __init__(self, packed: bool = True, log_range: str = "mse", per_row: bool = True,
                     skip: Iterable[str] = ("lm_head",), cache_weight: bool = True, format_version: int = FORMAT_VERSION,
                     spacing: Optional[str] = None, **kwargs: Any) -> None:
            spacing = _spacing_for(spacing, format_version)
            _check_config_fields(packed=packed, log_range=log_range, per_row=per_row, skip=skip,
                                 cache_weight=cache_weight, format_version=format_version, extra=kwargs, spacing=spacing)
            self.quant_method = QinsMethod.QINS
            self.qins_config = QinsConfig(packed, log_range, per_row, spacing=spacing)
            self.packed, self.log_range, self.per_row, self.spacing = packed, log_range, per_row, spacing
            self.skip, self.cache_weight = list(skip), cache_weight
            self.format_version = FORMAT_VERSION

        def to_dict(self) -> dict[str, Any]:
            return quantization_config_dict(self.qins_config, self.skip, self.cache_weight)

    class QinsHfQuantizer(HfQuantizer):
        """Rebuilds QINS layers on the meta model and loads their buffers exactly."""

        requires_calibration = False
        requires_parameters_quantization = True  # 4.x: our buffers go through create_quantized_param

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            self._target_dtype: Optional[torch.dtype] = None
            self._seen: set[str] = set()
            self._targets: set[str] = set()  # quantize on load: the Linears to encode as they arrive
            self._load_errors: list[ValueError] = []

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            version = _transformers_version()
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
                report = convert_model_to_projective(model, qc.qins_config, skip=tuple(qc.skip), cache_weight=qc.cache_weight)
                log.debug("qins: rebuilt %d QINS layers before loading", len(report.converted))
            else:
                self._targets = hf_load.conversion_targets(model, qc.skip)
                log.debug("qins: %d layers to quantize while loading", len(self._targets))
            keys = hf_load.checkpoint_keys(kwargs.get("checkpoint_files") or hf_load.local_checkpoint_files(model))
            if keys is not None:
                self.update_expected_keys(model, [], keys)

        def update_expected_keys(self, model: Any, expected_keys: list, loaded_keys: Iterable[str]) -> list:
            """4.53+ (and the files' headers on other versions): the checkpoint's names against ``skip``."""
            hf_load.check_against_checkpoint(model, self.quantization_config.skip, set(loaded_keys),
                                             pre_quantized=self.pre_quantized, targets=self._targets)
            return expected_keys

        def _qins_buffer(self, model: Any, param_name: str) -> bool:
            module_name, _, tensor_name = param_name.rpartition(".")
            if tensor_name not in _QINS_BUFFERS:
                return False
            try:
                return isinstance(model.get_submodule(module_name), ProjectiveLinear)
            except AttributeError:
                return False

        def check_quantized_param(self, model: Any, param_value: Any = None, param_name: str = "", *args: Any, **kwargs: Any) -> bool:
            if not self.pre_quantized:
                return hf_load.weight_target(model, self._targets, param_name)
            return self._qins_buffer(model, param_name)

        def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
            if not self.pre_quantized:
                return hf_load.weight_target(model, self._targets, param_name)
            return major < 5 and self._qins_buffer(model, param_name)

        def get_quantize_ops(self) -> Any:  # 5.x: the op that encodes a target weight as it arrives
            return hf_load.quantize_op(self)

        def create_quantized_param(self, model: Any, param_value: torch.Tensor, param_name: str, target_device: Any = "cpu", *args: Any, **kwargs: Any) -> None:
            if not self.pre_quantized:  # 4.x quantize on load: the weight, cast to the load dtype
                qc = self.quantization_config
                hf_load.install_encoded(model, param_name, param_value, qc.qins_config, qc.cache_weight, target_device)
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
                hf_load.check_against_checkpoint(model, (), {f"{t}.weight" for t in self._targets} - weights,
                                                 pre_quantized=False, targets=self._targets)
                return missing_keys
            missing = [k for k in missing_keys if self._qins_buffer(model, k.removeprefix(prefix).lstrip("."))
                       or self._qins_buffer(model, k)]
            if missing:
                raise ValueError(f"QINS checkpoint is missing {missing[:4]}{' ...' if len(missing) > 4 else ''}: "
                                 "the quantization_config's skip list does not match the saved layers")
            return missing_keys

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            if self._load_errors:
                raise self._load_errors[0]
            left = sorted(t for t in self._targets if not isinstance(model.get_submodule(t), ProjectiveLinear))
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

    return QinsHfConfig, QinsHfQuantizer
