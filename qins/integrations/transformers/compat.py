"""Legacy ``transformers`` API for pre-4.49 "remote code" models (Phi-3 / Phi-3.5 ``modeling_phi3.py``).

Call :func:`patch_transformers` once, **before** loading a ``trust_remote_code=True`` model (on
5.x the remote module imports ``modeling_attn_mask_utils`` when it is loaded). The patch only
ever *adds* what the installed version lacks; whatever is native is left untouched.
:func:`unpatch_transformers` removes every addition and restores the one wrapped loader and any
remote class the patch adapted, exactly; models loaded while patched must not be used after
unpatching (until the next :func:`patch_transformers`, which adapts imported remote classes again).

What may be added, each only where missing:

* ``Cache.get_usable_length(new_seq_length, layer_idx=0)`` (gone in 4.54): tokens cached for
  ``layer_idx``; if a size limit ``max`` exists and ``cached + new > max``, ``max - new``.
* ``Cache.seen_tokens`` (gone in 4.54): tokens seen so far, ``get_seq_length(0)``.
* ``Cache.get_max_length()`` (gone in 4.49): the size limit, ``None`` when unbounded.
* ``DynamicCache.from_legacy_cache`` / ``to_legacy_cache`` (gone in 5.0): tuple conversions.
* ``DynamicCache.key_cache`` / ``value_cache`` (gone in 4.56): per-layer tuples, read-only.
* ``transformers.modeling_attn_mask_utils._prepare_4d_causal_attention_mask`` (gone in 5.0).
* 5.x only, by wrapping ``dynamic_module_utils.get_class_in_module`` (5.x ``generate`` offers no
  hook; nothing else native is wrapped), on legacy remote classes: ``prepare_inputs_for_generation
  (past_key_values=...)`` gets 5.x's ``cache`` kwarg under that name, sees ``get_max_length()``
  as ``None`` for an unbounded cache (the native -1 stays for everyone else) and has its
  ``position_ids`` cut to the new tokens; a config taking ``rope_scaling`` reads it back as
  ``None`` when unscaled, else a dict with ``"type"``.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

from ...hf_config import UnsupportedTransformersError

__all__ = ["UnsupportedTransformersError", "patch_transformers", "unpatch_transformers"]

log = logging.getLogger(__name__)

SUPPORTED = (">=4.44", "<6")  # the tested range (nox matrix); 6.x may drop the 5.x BC paths used here
_MASK_MODULE = "transformers.modeling_attn_mask_utils"
_MASK_FN = "_prepare_4d_causal_attention_mask"
_MISSING = object()

_undo: list[Callable[[], None]] | None = None  # None: not patched
_added: tuple[str, ...] = ()


def _check_version() -> None:
    import transformers
    from packaging.version import Version

    v = Version(transformers.__version__)
    if v < Version("4.44") or v.major >= 6:
        raise UnsupportedTransformersError(
            f"qins.patch_transformers() does not support transformers {transformers.__version__} "
            f"(supported: {','.join(SUPPORTED)}); legacy Phi-3 / Phi-3.5 remote code would generate without "
            "its KV cache. Load the native implementation instead: transformers.Phi3ForCausalLM, i.e. "
            "AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False)."
        )


# --- Legacy cache API ----------------------------------------------------------------------------


def _get_max_length(self: Any) -> int | None:
    """The cache's size limit from its native API, ``None`` when unbounded (legacy convention)."""
    layers = getattr(self, "layers", None)
    if layers is not None and len(layers) == 0:  # a lazily built DynamicCache: no limit known yet
        return None
    # Class-level lookups: never this function itself, nor its legacy-caller shadow on the instance.
    native = getattr(type(self), "get_max_cache_shape", None) or type(self).get_max_length
    limit = native(self)
    return None if limit is None or limit < 0 else int(limit)


def _get_usable_length(self: Any, new_seq_length: int, layer_idx: int | None = 0) -> int:
    """Tokens cached for ``layer_idx``, bounded so that cached + new fits the size limit, if any."""
    max_length = _get_max_length(self)
    cached = self.get_seq_length(layer_idx)
    if max_length is not None and cached + new_seq_length > max_length:
        return max_length - new_seq_length
    return cached


def _seen_tokens(self: Any) -> int:
    """Tokens seen so far (those cached for layer 0)."""
    return self.get_seq_length(0)


def _from_legacy_cache(cls: type, past_key_values: Any = None) -> Any:
    """A new cache holding the ``((key, value), ...)`` per-layer tuples, in layer order."""
    cache = cls()
    for layer_idx, (key, value) in enumerate(past_key_values or ()):
        cache.update(key, value, layer_idx)
    return cache


def _to_legacy_cache(self: Any) -> tuple:
    """The cache as ``((key, value), ...)`` per-layer tuples."""
    return tuple((layer.keys, layer.values) for layer in self.layers)


class _LayerView:
    """Per-layer tuple of ``layer.<attr>``; a non-data descriptor, so an instance attribute of the
    same name (a subclass assigning ``self.key_cache = [...]``) still takes precedence."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else tuple(getattr(layer, self.attr) for layer in obj.layers)


def _prepare_4d_causal_attention_mask(
    attention_mask: torch.Tensor | None,
    input_shape: Any,
    inputs_embeds: torch.Tensor,
    past_key_values_length: int,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Additive ``(batch, 1, q, past + q)`` mask: 0 where attended, dtype-min where blocked.

    Query ``i`` (absolute position ``past + i``) may attend key ``j`` iff ``j <= past + i``,
    ``past + i - j <= sliding_window`` (when given) and the 2D ``attention_mask[:, j]`` is 1. A 4D
    0/1 mask is inverted into the additive form. Returns ``None`` for a single-token query with
    no 2D mask and no window (nothing to block), as transformers 4.x does.
    """
    batch, q_len = input_shape[0], input_shape[-1]
    kv_len = q_len + past_key_values_length
    dtype, device = inputs_embeds.dtype, inputs_embeds.device
    lowest = torch.finfo(dtype).min
    if attention_mask is not None and attention_mask.dim() == 4:
        expected = (batch, 1, q_len, kv_len)
        if tuple(attention_mask.shape) != expected:
            raise ValueError(f"4D attention mask should be {expected}, got {tuple(attention_mask.shape)}")
        inverted = 1.0 - attention_mask
        return inverted.masked_fill(inverted.to(torch.bool), lowest)
    blocked = None
    if q_len > 1 or sliding_window is not None:
        q_pos = torch.arange(q_len, device=device)[:, None] + past_key_values_length
        k_pos = torch.arange(kv_len, device=device)[None, :]
        blocked = k_pos > q_pos
        if sliding_window is not None:
            blocked = blocked | (q_pos - k_pos > sliding_window)
        blocked = blocked[None, None].expand(batch, 1, q_len, kv_len)
    if attention_mask is not None:
        padding = (attention_mask[:, None, None, :] != 1).to(device).expand(batch, 1, q_len, kv_len)
        blocked = padding if blocked is None else blocked | padding
    if blocked is None:
        return None
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, lowest)


# --- 5.x: adapting legacy remote classes as they are loaded --------------------------------------


def _adapt_prepare_inputs(original: Callable) -> Callable:
    """Wrap a legacy ``prepare_inputs_for_generation(past_key_values=...)`` for 5.x ``generate``."""

    @functools.wraps(original)
    def prepare_inputs_for_generation(self: Any, input_ids: Any, *args: Any, **kwargs: Any) -> Any:
        cache = kwargs.pop("cache", None)
        if kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = cache
        shadowed = cache is not None and hasattr(cache, "__dict__") and "get_max_length" not in vars(cache)
        if shadowed:  # legacy callers expect None for "no limit"; native get_max_length says -1
            cache.get_max_length = types.MethodType(_get_max_length, cache)
        try:
            inputs = original(self, input_ids, *args, **kwargs)
        finally:
            if shadowed:
                del cache.get_max_length
        new = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
        position_ids = inputs.get("position_ids")  # 5.x generate keeps full-length ones in kwargs
        if new is not None and position_ids is not None and position_ids.shape[-1] > new.shape[1]:
            inputs["position_ids"] = position_ids[..., -new.shape[1]:]
        return inputs

    prepare_inputs_for_generation.__qins_adapted__ = True  # type: ignore[attr-defined]
    return prepare_inputs_for_generation


def _rope_scaling_property(native: property) -> property:
    def fget(self: Any) -> dict | None:
        params = native.fget(self) or {}
        rope_type = params.get("type", params.get("rope_type"))
        return None if rope_type in (None, "default") else {**params, "type": rope_type}

    return property(fget, native.fset, native.fdel, "Legacy view: None when unscaled, else a dict with 'type'.")


def _adapt_remote_class(cls: Any, undo: list[Callable[[], None]]) -> None:
    """Adapt a class loaded from remote code, if it is a legacy one; record how to undo it."""
    from transformers import GenerationMixin, PretrainedConfig

    if not isinstance(cls, type):
        return

    def replace(name: str, value: Any) -> None:
        previous = cls.__dict__.get(name, _MISSING)
        setattr(cls, name, value)
        undo.append(lambda: setattr(cls, name, previous) if previous is not _MISSING else delattr(cls, name))
        log.debug("%s: adapted remote %s.%s for transformers 5.x", __name__, cls.__qualname__, name)

    prepare = cls.__dict__.get("prepare_inputs_for_generation")
    if (
        issubclass(cls, torch.nn.Module) and inspect.isfunction(prepare)
        and not getattr(prepare, "__qins_adapted__", False)
        and "past_key_values" in inspect.signature(prepare).parameters
        and "cache" not in inspect.signature(prepare).parameters
        and "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    ):
        replace("prepare_inputs_for_generation", _adapt_prepare_inputs(prepare))
    native = inspect.getattr_static(PretrainedConfig, "rope_scaling", None)
    if (
        issubclass(cls, PretrainedConfig) and isinstance(native, property)
        and inspect.getattr_static(cls, "rope_scaling") is native
        and "rope_scaling" in inspect.signature(cls.__init__).parameters
    ):
        replace("rope_scaling", _rope_scaling_property(native))


# --- patch / unpatch -----------------------------------------------------------------------------


def patch_transformers() -> tuple[str, ...]:
    """Add the legacy API the installed transformers lacks; return the names of what was added.

    Idempotent: a second call changes nothing and returns the same names. Raises
    :class:`UnsupportedTransformersError` for versions outside ``SUPPORTED``; a failure part-way
    undoes what was already added.
    """
    global _undo, _added
    if _undo is None:
        _check_version()
        undo: list[Callable[[], None]] = []
        added: list[str] = []
        try:
            _apply(undo, added)
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        _undo, _added = undo, tuple(added)
    return _added


def _apply(undo: list[Callable[[], None]], added: list[str]) -> None:
    """Make every addition that the installed version needs, recording how to undo each."""
    from transformers import GenerationMixin, PretrainedConfig, dynamic_module_utils
    from transformers.cache_utils import Cache, DynamicCache

    def add(owner: Any, name: str, value: Any, label: str) -> None:
        setattr(owner, name, value)
        undo.append(lambda: delattr(owner, name))
        added.append(label)
        log.debug("%s: added %s", __name__, label)

    for name, value in (
        ("get_usable_length", _get_usable_length),
        ("seen_tokens", property(_seen_tokens)),
        ("get_max_length", _get_max_length),
    ):
        if not hasattr(Cache, name):
            add(Cache, name, value, f"Cache.{name}")
    if not hasattr(DynamicCache, "from_legacy_cache"):
        add(DynamicCache, "from_legacy_cache", classmethod(_from_legacy_cache), "DynamicCache.from_legacy_cache")
    if not hasattr(DynamicCache, "to_legacy_cache"):
        add(DynamicCache, "to_legacy_cache", _to_legacy_cache, "DynamicCache.to_legacy_cache")
    if not hasattr(DynamicCache(), "key_cache"):
        for name, attr in (("key_cache", "keys"), ("value_cache", "values")):
            add(DynamicCache, name, _LayerView(attr), f"DynamicCache.{name}")

    try:
        mask_module = importlib.import_module(_MASK_MODULE)
    except ImportError:
        mask_module = types.ModuleType(_MASK_MODULE, f"{__name__} stand-in for the module removed in 5.0.")
        setattr(mask_module, _MASK_FN, _prepare_4d_causal_attention_mask)
        sys.modules[_MASK_MODULE] = mask_module
        undo.append(lambda: sys.modules.pop(_MASK_MODULE) if sys.modules.get(_MASK_MODULE) is mask_module else None)
        added.append(_MASK_MODULE)
        log.debug("%s: added module %s", __name__, _MASK_MODULE)
    else:
        if not hasattr(mask_module, _MASK_FN):
            add(mask_module, _MASK_FN, _prepare_4d_causal_attention_mask, f"{_MASK_MODULE}.{_MASK_FN}")

    if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters or isinstance(
        inspect.getattr_static(PretrainedConfig, "rope_scaling", None), property
    ):
        loader = dynamic_module_utils.get_class_in_module

        @functools.wraps(loader)
        def get_class_in_module(*args: Any, **kwargs: Any) -> Any:
            cls = loader(*args, **kwargs)
            _adapt_remote_class(cls, undo)
            return cls

        dynamic_module_utils.get_class_in_module = get_class_in_module
        undo.append(lambda: setattr(dynamic_module_utils, "get_class_in_module", loader))
        added.append("dynamic_module_utils.get_class_in_module (legacy remote-class adapter)")
        log.debug("%s: wrapped dynamic_module_utils.get_class_in_module", __name__)
        # Remote classes already imported (e.g. under an earlier patch) are reused by the auto
        # classes without going through the loader again: adapt them now.
        prefix = getattr(dynamic_module_utils, "TRANSFORMERS_DYNAMIC_MODULE_NAME", "transformers_modules") + "."
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith(prefix) and module is not None:
                for obj in list(vars(module).values()):
                    if isinstance(obj, type) and obj.__module__ == module_name:
                        _adapt_remote_class(obj, undo)


def unpatch_transformers() -> None:
    """Undo :func:`patch_transformers` exactly (no-op when not patched), newest change first."""
    global _undo, _added
    undo, _undo, _added = _undo, None, ()
    for step in reversed(undo or ()):
        step()
    log.debug("%s: unpatched (%d changes undone)", __name__, len(undo or ()))
