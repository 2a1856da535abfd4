"""Quantize on load, and the checkpoint checks, of the transformers integration (:mod:`.quantizer`).

**Quantize on load.** ``from_pretrained(src, quantization_config=QinsHfConfig(...))`` on a
full-precision checkpoint (fp32, bf16 or fp16 safetensors, sharded or not): before the weights
load, :func:`conversion_targets` picks the ``nn.Linear`` s that :func:`qins.convert_model_to_projective`
would convert (same ``skip`` list, tied weights left alone); the meta model keeps them as
``nn.Linear``. When a target's ``weight`` arrives, :func:`install_encoded` casts it to the dtype the
plain load gives that weight (the meta weight's dtype), encodes it (:func:`qins.streaming.encoded_layer`:
block by block of rows for a per-row format) and swaps the layer in; the full-precision tensor is
dropped at once. With ``embeddings=True`` the ``nn.Embedding`` s are targets too
(:func:`.tying.embedding_targets`; a Linear tied to one becomes a :class:`qins.ProjectiveTiedHead` on
it when the embedding's weight arrives). Codes and logs are therefore those of load-then-convert,
bit for bit. Peak memory:
the model built so far plus about one weight as the loader hands it over, in the load dtype, and
one block's encoding temporaries (on transformers 4.44, which reads a whole shard at a time, plus
that shard).

Hooks, by transformers version: 5.x asks ``param_needs_quantization`` for every checkpoint tensor
and runs the op of ``get_quantize_ops()`` (:func:`quantize_op`) on those it claims; 4.44-4.53 ask
``check_quantized_param`` and 4.57 ``param_needs_quantization``, then call
``create_quantized_param`` with the tensor (cast to the load dtype).

**Checkpoint checks** (:func:`check_against_checkpoint`), before any weight loads: the tensor
names of the checkpoint (safetensors headers only, :func:`checkpoint_keys`) must agree with the
``skip`` list. A QINS checkpoint must hold ``stored`` for every layer the list leaves converted,
and a layer the list skips must not be stored in QINS; a full-precision one must hold the
``weight`` of every layer to quantize. Each error names the layer, the field and the fix.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...convert import _matches, select_linears
from ...embedding import ProjectiveEmbedding
from ...formats import QinsConfig
from ...layer import ProjectiveLinear
from ...state import CODE_BUFFERS
from ...streaming import encoded_layer
from .tying import install_embedding

__all__ = ["check_against_checkpoint", "checkpoint_keys", "conversion_targets", "install_encoded",
           "local_checkpoint_files", "quantize_op"]

_QINS_BUFFERS = CODE_BUFFERS


def conversion_targets(model: nn.Module, skip: Iterable[str]) -> set[str]:
    """Qualified names of the ``nn.Linear`` s that ``convert_model_to_projective(model, skip=skip)``
    would convert (works on the meta model transformers builds before loading)."""
    todo, _ = select_linears(model, tuple(skip))
    return {name for name, _ in todo}


def weight_target(model: nn.Module, targets: set[str], param_name: str) -> bool:
    """True when ``param_name`` is the ``weight`` of a target layer not yet encoded."""
    module_name, _, tensor_name = param_name.rpartition(".")
    if tensor_name != "weight" or module_name not in targets:
        return False
    try:
        return not isinstance(model.get_submodule(module_name), (ProjectiveLinear, ProjectiveEmbedding))
    except AttributeError:
        return False


def install_encoded(model: nn.Module, param_name: str, value: torch.Tensor, config: QinsConfig,
                    cache_weight: bool, device: Any = None) -> nn.Module:
    """Encode ``value`` (the checkpoint's ``<layer>.weight``, ``[out, in]``, any float dtype) into a
    :class:`ProjectiveLinear` of ``config`` and put it in place of the ``nn.Linear`` ``<layer>`` (an
    ``nn.Embedding`` target: :func:`.tying.install_embedding`, its tied heads included).

    ``value`` is encoded as cast to the layer's (meta) weight dtype, which is what a plain load
    would give that weight, so the codes equal those of load-then-convert. The layer keeps the
    ``nn.Linear``'s bias Parameter (loaded already, or still meta and loaded next). On ``device``
    (default: ``value``'s). Raises ``ValueError`` naming the layer (shape, or a NaN/±Inf weight);
    the model is then unchanged.
    """
    module_name, _, _ = param_name.rpartition(".")
    linear = model.get_submodule(module_name)
    if type(linear) is nn.Embedding:  # a target only with QinsHfConfig(embeddings=True)
        return install_embedding(model, param_name, value, config, device)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{param_name}: {module_name!r} is a {type(linear).__name__}, not the nn.Linear to quantize")
    expected = (linear.out_features, linear.in_features)
    if tuple(value.shape) != expected:
        raise ValueError(f"{param_name}: the checkpoint's weight has shape {tuple(value.shape)}, the layer "
                         f"{module_name!r} needs {expected}; the checkpoint does not match this model's config")
    try:
        layer = encoded_layer(value.detach(), config, cache_weight=cache_weight, dtype=linear.weight.dtype,
                              device=device)
    except ValueError as exc:
        raise ValueError(f"cannot quantize layer {module_name!r} while loading: {exc}") from exc
    if linear.bias is not None:
        layer.bias = linear.bias
    for name in _QINS_BUFFERS:
        buf = getattr(layer, name)
        if buf is not None:
            buf._is_hf_initialized = True  # 5.x: loaded, not to be initialised
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return layer


def quantize_op(quantizer: Any) -> Any:
    """The transformers 5.x ``ConversionOps`` that encodes a target weight as it arrives: it installs
    the QINS layer (:func:`install_encoded`) and returns no tensor for the loader to set. An
    encoding error is kept on ``quantizer._load_errors`` and raised as it is once the load ends
    (the 5.x loader would turn an exception raised here into a report line and a RuntimeError)."""
    from transformers.core_model_loading import ConversionOps

    class QinsQuantize(ConversionOps):
        def __init__(self, hf_quantizer: Any) -> None:
            self.hf_quantizer = hf_quantizer

        def convert(self, input_dict: dict, source_patterns: Any = None, target_patterns: Any = None,
                    full_layer_name: str | None = None, model: Any = None, missing_keys: Any = None,
                    **kwargs: Any) -> dict:
            (key, value), = input_dict.items()
            value = value[0] if isinstance(value, (list, tuple)) else value
            name = full_layer_name or key
            qc = self.hf_quantizer.quantization_config
            try:
                install_encoded(model, name, value, qc.qins_config, qc.cache_weight)
            except ValueError as exc:  # raised by the quantizer once the load ends, as on 4.x
                self.hf_quantizer._load_errors.append(exc)
            if missing_keys is not None:
                missing_keys.discard(name)
                for head in getattr(self.hf_quantizer, "_heads", ()):  # tied heads: their embedding's codes
                    missing_keys.discard(f"{head}.weight")
            return {}

    return QinsQuantize(quantizer)


def checkpoint_keys(files: Iterable[Any] | None) -> set[str] | None:
    """Tensor names in safetensors ``files`` (headers only, no tensor is read); None when there are
    none or one is not a safetensors file (the checks then fall back to the loader's own)."""
    files = [os.fspath(f) for f in files or () if f is not None]
    if not files or not all(f.endswith(".safetensors") for f in files):
        return None
    from safetensors import safe_open

    keys: set[str] = set()
    for f in files:
        with safe_open(f, framework="pt") as fh:
            keys.update(fh.keys())
    return keys


def local_checkpoint_files(model: nn.Module) -> list[str] | None:
    """The safetensors files of the local directory ``model.config`` was read from (transformers
    4.x does not hand the files to the quantizer); None for a Hub id or any other layout."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not path or not Path(path).is_dir():
        return None
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as fh:
            return sorted({str(root / f) for f in json.load(fh).get("weight_map", {}).values()})
    single = root / "model.safetensors"
    return [str(single)] if single.is_file() else None


def _present(keys: set[str], prefix: str) -> Callable[[str], bool]:
    def present(key: str) -> bool:
        if key in keys:
            return True
        if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in keys:
            return True
        return bool(prefix) and f"{prefix}.{key}" in keys
    return present


def check_against_checkpoint(model: nn.Module, skip: Iterable[str], keys: set[str], *, pre_quantized: bool,
                             targets: Iterable[str] = ()) -> None:
    """Raise ``ValueError`` when the checkpoint's tensor names ``keys`` contradict the ``skip`` list.

    ``pre_quantized`` (a QINS checkpoint, the model's QINS layers rebuilt): every QINS layer and QINS
    embedding needs ``<layer>.stored``, and a skipped ``nn.Linear`` or a plain ``nn.Embedding`` must
    not be stored in QINS. Otherwise (quantize
    on load) every layer of ``targets`` needs ``<layer>.weight``. Names are matched with and without
    the model's ``base_model_prefix``. Changes nothing.
    """
    patterns = tuple(skip)
    present = _present(keys, getattr(model, "base_model_prefix", "") or "")
    if not pre_quantized:
        for name in sorted(targets):
            if not present(f"{name}.weight"):
                stored = " (it holds QINS codes for it: give config.json its quantization_config instead)" \
                    if present(f"{name}.stored") else ""
                raise ValueError(f"the checkpoint has no '{name}.weight' to quantize{stored}; add {name!r} to the "
                                 "QINS config's 'skip' list to leave that layer as it is")
        return
    for name, module in model.named_modules():
        if isinstance(module, ProjectiveEmbedding) and not present(f"{name}.stored"):
            raise ValueError(f"quantization_config field 'embeddings' does not match the checkpoint: it holds no QINS "
                             f"codes for the embedding {name!r} ('{name}.stored'); set \"embeddings\": false in "
                             f"config.json, or add {name!r} to 'skip' if only that embedding is stored as a weight")
        if type(module) is nn.Embedding and present(f"{name}.stored") and not present(f"{name}.weight"):
            raise ValueError(f"the checkpoint stores the embedding {name!r} in QINS ('{name}.stored'), but its "
                             "quantization_config does not say so: set \"embeddings\": true in config.json")
        if isinstance(module, ProjectiveLinear) and not present(f"{name}.stored"):
            if present(f"{name}.weight"):
                raise ValueError(f"quantization_config field 'skip' does not match the checkpoint: layer {name!r} is "
                                 f"stored as a plain weight ('{name}.weight'), not in QINS; add {name!r} to 'skip' "
                                 "in config.json")
            raise ValueError(f"QINS checkpoint has no tensors for layer {name!r} ('{name}.stored' missing): the "
                             "checkpoint is incomplete or its quantization_config does not describe it")
        if type(module) is nn.Linear and name and present(f"{name}.stored") and not present(f"{name}.weight"):
            pattern = _matches(name, patterns)
            why = f"entry {pattern!r} leaves layer {name!r} unconverted" if pattern else \
                f"layer {name!r} is left unconverted (its weight is tied to another)"
            fix = f"remove {pattern!r} from 'skip' in config.json" if pattern else "re-convert the checkpoint"
            raise ValueError(f"quantization_config field 'skip' does not match the checkpoint: {why}, but the "
                             f"checkpoint stores it in QINS ('{name}.stored'); {fix}")
