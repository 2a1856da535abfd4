"""What the core writes for the transformers integration, without importing it (nor transformers).

* :func:`quantization_config_dict`: the ``quantization_config`` entry of config.json, written by
  :func:`qins.convert_model_to_projective` on a transformers model and by ``qins quantize``
  (:mod:`qins.integrations.transformers.checkpoint`); :mod:`qins.integrations.transformers` reads it
  back.
* :func:`register`: registers the ``"qins"`` method with transformers through
  :mod:`qins.integrations.transformers.registration`, which installs itself here (:func:`set_registrar`)
  when it is imported (``import qins`` does).
* :class:`UnsupportedTransformersError` (also ``qins.UnsupportedTransformersError``).

This module is core: :mod:`qins.convert` imports it, and it never imports the integration.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .formats import QinsConfig

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "UnsupportedTransformersError", "quantization_config_dict", "register",
           "set_registrar"]

QUANT_METHOD = "qins"

#: ``format_version`` written: 4 records ``shared_tables`` (3 has none: a range per row), 3 the level
#: ``spacing`` (2 has none: log-spaced); all three are read
FORMAT_VERSION = 4
_READABLE_VERSIONS = (2, 3, 4)


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers cannot run legacy remote code with a working KV cache."""


def quantization_config_dict(config: QinsConfig, skip: Iterable[str], cache_weight: bool,
                             embeddings: bool = False) -> dict[str, Any]:
    """The ``quantization_config`` entry written to config.json (plain JSON values).

    ``embeddings``: the ``nn.Embedding`` s (and a head tied to one) are stored in QINS too
    (``convert_model_to_projective(..., embeddings=True)``). The field is written only when true, so
    the config of a model without QINS embeddings is exactly what it was before the field existed
    (and a reader that predates it still loads such a model)."""
    out = {
        "quant_method": QUANT_METHOD,
        "packed": config.packed,
        "log_range": config.log_range,
        "per_row": config.per_row,
        "spacing": config.spacing,
        "skip": list(skip),
        "cache_weight": bool(cache_weight),
        "format_version": FORMAT_VERSION,
    }
    if embeddings:
        out["embeddings"] = True
    out["shared_tables"] = config.shared_tables
    return out


_registrar: Callable[[], object] | None = None


def set_registrar(registrar: Callable[[], object]) -> None:
    """Install the function :func:`register` calls (:mod:`qins.integrations.transformers.registration` does, when
    it is imported)."""
    global _registrar
    _registrar = registrar


def register() -> None:
    """Register the ``"qins"`` method with transformers (:func:`qins.register_with_transformers`); a
    no-op before :mod:`qins.integrations.transformers` is imported. Raises what the registration raises
    (:class:`UnsupportedTransformersError` outside the supported versions)."""
    if _registrar is not None:
        _registrar()
