"""transformers integration: ``save_pretrained`` / ``from_pretrained`` of QINS models.

:func:`qins.convert_model_to_projective` on a transformers model records ``config.quantization_config``
(:func:`qins.hf_config.quantization_config_dict`: ``quant_method: "qins"``, the :class:`qins.QinsConfig`
fields, the skip list, ``cache_weight`` and ``embeddings``), so ``save_pretrained`` writes it to
config.json next to the safetensors weights (``stored``/``sign``/``log_min``/``log_max`` as saved by
the layers).

Modules:

* :mod:`.registration`: :func:`register_with_transformers` (registers the ``"qins"`` method with
  transformers' quantizer registry) and :func:`register_on_import` (the cheap import hook that
  ``import qins`` installs; it imports nothing).
* :mod:`.config`: the ``quantization_config`` class (``qins.QinsHfConfig``) and the validation of
  every field of config.json.
* :mod:`.quantizer`: the ``HfQuantizer`` that rebuilds QINS layers (and QINS embeddings with their
  tied head) on the meta model before the weights load, loads the codes and logs as they are in the
  file (the float32 logs are never cast), validates every layer and decodes the caches.
* :mod:`.load`: quantize on load (``from_pretrained(src, quantization_config=qins.QinsHfConfig(...))``
  encodes each Linear, and with ``embeddings=True`` each embedding, as its weight arrives) and the
  checks of a checkpoint's tensor names against the ``skip`` list.
* :mod:`.tying`: QINS embeddings and tied heads under transformers' weight tying.
* :mod:`.checkpoint`: ``qins quantize SRC DST`` on a safetensors checkpoint, one tensor at a time.
* :mod:`.compat`: the legacy API patch for pre-4.49 remote-code models (:func:`qins.patch_transformers`).

transformers refuses ``gguf_file=`` together with any ``quantization_config`` (every version in the
matrix): load the GGUF, then :func:`qins.convert_model_to_projective` (the GGUF loader dequantizes
every tensor in memory first anyway).

With ``torch_dtype`` other than float32 on 4.x, the model loads in float32 and is cast after the
load (transformers 4.x casts every floating checkpoint tensor, the logs included, to that dtype); on
5.x the loader keeps the meta model's float32 logs. Tested: transformers 4.44.2, 4.53.3, 4.57.6,
5.24.0 (``noxfile.py``). Other versions raise :class:`qins.UnsupportedTransformersError`.

Importing this package does not import transformers: every transformers import is inside a function.
"""
from __future__ import annotations

from ...hf_config import QUANT_METHOD, quantization_config_dict
from .registration import register_on_import, register_with_transformers

__all__ = ["QUANT_METHOD", "quantization_config_dict", "register_on_import", "register_with_transformers"]
