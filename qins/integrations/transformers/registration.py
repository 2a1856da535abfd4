"""Registration of the ``"qins"`` quantization method with transformers, and the import hook.

:func:`register_with_transformers` (idempotent; called by the conversion of a transformers model
through :func:`qins.hf_config.register`) registers the method with transformers' quantizer registry
(``register_quantization_config``/``register_quantizer``, or the mapping itself on 4.44, which has
no registration API). ``AutoModelForCausalLM.from_pretrained(dir)`` then loads QINS checkpoints.

:func:`register_on_import` is what ``import qins`` calls: it imports nothing, and registers as soon as
transformers' model loader module is imported (a ``sys.meta_path`` finder that wraps that module's
loader), or at once when it already is.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from types import ModuleType
from typing import Any

from ... import hf_config
from ...hf_config import QUANT_METHOD, UnsupportedTransformersError
from .config import transformers_version
from .quantizer import build_classes

__all__ = ["register_on_import", "register_with_transformers"]

log = logging.getLogger(__name__)

_registered: tuple[type, type] | None = None


def register_with_transformers() -> tuple[type, type]:
    """Register the ``"qins"`` quantization method with transformers; returns (config class, quantizer class).

    Idempotent. Raises :class:`qins.UnsupportedTransformersError` on a transformers version outside
    ``>=4.44,<6``. After it, ``from_pretrained`` of a directory saved from a converted model
    rebuilds and loads the QINS layers.
    """
    global _registered
    if _registered is not None:
        return _registered
    version = transformers_version()
    from transformers.quantizers import auto

    config_cls, quantizer_cls = build_classes(version.major)
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

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        """The spec of :data:`_LOADER_MODULE` with its loader wrapped (the first time only), else None."""
        if self.fired or fullname != _LOADER_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        self.fired = True
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
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
