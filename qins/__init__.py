"""qins: QINS 8-bit inverse log-magnitude weight storage for PyTorch.

Public API:

* codec — :func:`convert_to_qins`, :func:`reconstruct_from_qins`, :func:`qins_error_bound`,
  :func:`qins_log_slack`, :func:`qins_levels`
* formats — :class:`QinsConfig`, :func:`level_table`, :func:`decode_codes`, :func:`qins_exp`
* layer — :class:`ProjectiveLinear`; embeddings — :class:`ProjectiveEmbedding`, :class:`ProjectiveTiedHead`
  (``convert_model_to_projective(..., embeddings=True)``)
* calibration — :func:`calibrate`, :class:`Calibration` (input statistics for the activation-aware
  encoder, :mod:`qins.calibrated`)
* model surgery and accounting — :func:`convert_model_to_projective`, :class:`ConversionReport`,
  :func:`model_memory`, :class:`MemoryReport`
* transformers compatibility — :func:`patch_transformers` (``patch_dynamic_cache`` is its deprecated name),
  :func:`unpatch_transformers`, :class:`UnsupportedTransformersError`
* persistence — :func:`save`/:func:`load` (plain safetensors), :func:`register_with_transformers`
  (``save_pretrained``/``from_pretrained``), ``QinsHfConfig`` (``from_pretrained(src,
  quantization_config=qins.QinsHfConfig(...))`` quantizes a full-precision checkpoint while it loads)
* command line — ``python -m qins quantize SRC DST`` / ``qins quantize`` (:mod:`qins.cli`)
"""
from .calibration import Calibration, calibrate
from .codec import (
    SMALLEST_NORMAL,
    convert_to_qins,
    qins_error_bound,
    qins_levels,
    qins_log_slack,
    reconstruct_from_qins,
)
from .convert import ConversionReport, MemoryReport, convert_model_to_projective, model_memory
from .embedding import ProjectiveEmbedding, ProjectiveTiedHead
from .encode import encode
from .formats import QinsConfig, decode_codes, level_table, qins_exp
from .hf_config import UnsupportedTransformersError
from .integrations.transformers import register_on_import, register_with_transformers
from .integrations.transformers.compat import patch_transformers, unpatch_transformers
from .layer import ProjectiveLinear
from .serialization import load, save

__version__ = "0.1.0"

# transformers users need nothing more than `import qins` to load a QINS checkpoint (nothing is
# imported here: the registration runs when transformers' model loader is first imported)
register_on_import()


def __getattr__(name: str):
    """``qins.QinsHfConfig``: the transformers ``quantization_config`` class of QINS (fields: the
    :class:`QinsConfig` ones, ``skip``, ``cache_weight``, ``embeddings``), built on first use (imports
    transformers). ``qins.patch_dynamic_cache``: the deprecated name of :func:`patch_transformers`."""
    if name == "QinsHfConfig":
        return register_with_transformers()[0]
    if name == "patch_dynamic_cache":
        import warnings

        warnings.warn("qins.patch_dynamic_cache is renamed qins.patch_transformers", FutureWarning, stacklevel=2)
        return patch_transformers
    raise AttributeError(f"module 'qins' has no attribute {name!r}")


__all__ = [
    "SMALLEST_NORMAL",
    "QinsHfConfig",
    "Calibration",
    "ConversionReport",
    "UnsupportedTransformersError",
    "MemoryReport",
    "ProjectiveEmbedding",
    "ProjectiveLinear",
    "ProjectiveTiedHead",
    "QinsConfig",
    "decode_codes",
    "encode",
    "level_table",
    "qins_exp",
    "calibrate",
    "convert_model_to_projective",
    "convert_to_qins",
    "model_memory",
    "patch_transformers",
    "qins_error_bound",
    "qins_levels",
    "qins_log_slack",
    "reconstruct_from_qins",
    "register_with_transformers",
    "load",
    "save",
    "unpatch_transformers",
]
