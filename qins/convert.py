"""Model surgery (`convert_model_to_projective`) and memory accounting (`model_memory`)."""
from __future__ import annotations

import fnmatch
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from . import hf_config
from .calibration import Calibration
from .embedding import ProjectiveEmbedding, ProjectiveTiedHead
from .formats import QinsConfig
from .hf_config import UnsupportedTransformersError, quantization_config_dict
from .layer import ProjectiveLinear

__all__ = ["ConversionReport", "MemoryReport", "convert_model_to_projective", "model_memory", "select_linears"]

log = logging.getLogger(__name__)

_TQDM_MIN_LAYERS = 50
_TIED = "weight is tied to another parameter"


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held by a module's tensors, each storage counted once (tied/shared tensors too).

    * ``parameters``: storages of ``nn.Parameter`` s (embeddings included).
    * ``buffers``: storages of buffers, persistent or not, except decoded-weight caches.
    * ``caches``: storages of :class:`ProjectiveLinear` decoded-weight caches.
    * ``total``: the sum. A storage reachable both as a parameter and as a buffer is counted
      under ``parameters``. Units: bytes (``untyped_storage().nbytes()``).
    """

    parameters: int
    buffers: int
    caches: int

    @property
    def total(self) -> int:
        return self.parameters + self.buffers + self.caches

    @property
    def state(self) -> int:
        """Bytes of parameters and buffers: everything except the caches."""
        return self.parameters + self.buffers


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_model_to_projective` did.

    ``converted``: qualified names of the replaced ``nn.Linear`` s, in module order (a head tied to
    a converted embedding included). ``embeddings``: the replaced ``nn.Embedding`` s (``embeddings=True``).
    ``skipped``: name -> reason for every ``nn.Linear`` left alone (matched ``skip``, or tied).
    ``memory_before``/``memory_after``: :func:`model_memory` of the whole model around the
    conversion; ``param_bytes_before``/``param_bytes_after`` are their ``state`` (parameters plus
    buffers, caches excluded) in bytes.
    """

    converted: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    memory_before: MemoryReport = MemoryReport(0, 0, 0)
    memory_after: MemoryReport = MemoryReport(0, 0, 0)
    embeddings: list[str] = field(default_factory=list)

    @property
    def param_bytes_before(self) -> int:
        return self.memory_before.state

    @property
    def param_bytes_after(self) -> int:
        return self.memory_after.state


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    """(device, data pointer) of ``t``'s storage; None for meta tensors (they hold no bytes). Empty
    storages may share a key (a null pointer): they add 0 bytes however they are counted."""
    if t.device.type == "meta":
        return None
    return (str(t.device), t.untyped_storage().data_ptr())


def model_memory(model: nn.Module) -> MemoryReport:
    """Account the bytes of ``model``'s parameters, buffers and decoded-weight caches.

    Every storage is counted once by (device, data pointer), with its full ``nbytes`` — so tied
    embeddings, shared parameters and views are never double-counted. Meta tensors hold nothing.
    """
    seen: set[tuple[str, int]] = set()
    totals = {"parameters": 0, "buffers": 0, "caches": 0}
    cache_ids = {
        id(m._cached_weight)
        for m in model.modules()
        if isinstance(m, ProjectiveLinear) and m._cached_weight is not None
    }

    def add(kind: str, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            key = _storage_key(t)
            if key is None or key in seen:
                continue
            seen.add(key)
            totals[kind] += t.untyped_storage().nbytes()

    # parameters() and buffers() list a tensor shared by several modules once; the storage keys
    # would catch it anyway (and views of one storage, which they list separately).
    add("parameters", model.parameters())
    buffers = list(model.buffers())
    add("buffers", (b for b in buffers if id(b) not in cache_ids))
    add("caches", (b for b in buffers if id(b) in cache_ids))
    return MemoryReport(**totals)


SkipPatterns = str | Iterable[str]


def _matches(name: str, patterns: tuple[str, ...]) -> str | None:
    for pattern in patterns:
        if name == pattern or fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


def _shared_weight_ids(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one (module, name) — i.e. tied weights."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {pid for pid, n in counts.items() if n > 1}


def select_linears(
    model: nn.Module, skip: SkipPatterns = ("lm_head",)
) -> tuple[list[tuple[str, nn.Linear]], dict[str, str]]:
    """The ``nn.Linear`` s :func:`convert_model_to_projective` converts, in module order, and the
    ones it leaves alone (name -> reason): a name equal to or matching (``fnmatch``) an entry of
    ``skip``, a weight tied to another parameter, or the model itself. Changes nothing; works on a
    meta-device model (the quantize-on-load path of :mod:`qins.integrations.transformers.load` decides with it)."""
    patterns = (skip,) if isinstance(skip, str) else tuple(skip)
    shared = _shared_weight_ids(model)
    todo: list[tuple[str, nn.Linear]] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        pattern = _matches(name, patterns)
        if name == "":
            skipped[name] = "the model itself is an nn.Linear; use ProjectiveLinear.from_linear"
        elif pattern is not None:
            skipped[name] = f"matches skip pattern {pattern!r}"
        elif id(module.weight) in shared:
            skipped[name] = _TIED
        else:
            todo.append((name, module))
    return todo, skipped


def _progress(items: list[tuple[str, nn.Linear]]) -> Iterator[tuple[str, nn.Linear]]:
    if len(items) >= _TQDM_MIN_LAYERS and sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm ships with transformers, but qins does not require it
            return iter(items)
        return iter(tqdm(items, desc="QINS convert", unit="layer", leave=False))
    return iter(items)


def _record_hf_quantization_config(model: nn.Module, config: QinsConfig, skip: tuple[str, ...], cache_weight: bool,
                                   embeddings: bool = False) -> None:
    """On a transformers model, record the format in ``config.quantization_config`` (for save_pretrained).

    With ``embeddings`` it records ``"embeddings": true``: ``from_pretrained`` then rebuilds the QINS
    embeddings and the tied head before the weights load."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, getattr(transformers, "PreTrainedModel", ())):
        return
    current = getattr(model.config, "quantization_config", None)
    if current is not None and not isinstance(current, dict):
        return  # from_pretrained's own config object (it is rebuilding this model)
    model.config.quantization_config = quantization_config_dict(config, skip, cache_weight, embeddings)
    try:
        hf_config.register()
    except UnsupportedTransformersError as exc:
        log.warning("%s", exc)


def _shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a ProjectiveLinear/ProjectiveTiedHead, (num_embeddings, dim) of a ProjectiveEmbedding."""
    if isinstance(module, ProjectiveEmbedding):
        return module.qins_weight_shape
    return module.in_features, module.out_features


def _embedding_replacements(
    model: nn.Module, patterns: tuple[str, ...], config: QinsConfig | None, skipped: dict[str, str],
) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """``embeddings=True``: every ``nn.Embedding`` not matching ``patterns`` as a :class:`ProjectiveEmbedding`,
    and every ``nn.Linear`` of ``skipped`` whose weight is one of those embeddings' weights (a tied
    ``lm_head``) as a :class:`ProjectiveTiedHead` on it (removed from ``skipped``). Returns the
    replacements (embeddings first) and the tied heads' names. Builds, installs nothing."""
    out: list[tuple[str, nn.Module]] = []
    by_weight: dict[int, ProjectiveEmbedding] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding) or name == "":
            continue
        pattern = _matches(name, patterns)
        if pattern is not None:
            skipped[name] = f"matches skip pattern {pattern!r}"
            continue
        try:
            new = ProjectiveEmbedding.from_embedding(module, config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cannot convert embedding {name!r}: {exc}; the model was left unchanged") from exc
        out.append((name, new))
        by_weight[id(module.weight)] = new
    heads: list[str] = []
    for name in [n for n, why in skipped.items() if why == _TIED]:
        linear = model.get_submodule(name)
        emb = by_weight.get(id(linear.weight))
        if emb is not None and tuple(linear.weight.shape) == emb.qins_weight_shape:
            out.append((name, ProjectiveTiedHead(emb, linear.bias)))
            heads.append(name)
            del skipped[name]
    return out, heads


def convert_model_to_projective(
    model: nn.Module,
    config: QinsConfig | None = None,
    *,
    skip: SkipPatterns | None = None,
    cache_weight: bool = True,
    calibration: Calibration | None = None,
    embeddings: bool = False,
) -> ConversionReport:
    """Replace, in place, every ``nn.Linear`` of ``model`` with :class:`ProjectiveLinear`.

    Each layer is encoded in ``config``'s format (default ``QinsConfig()``: packed, mse, per row).
    On a meta-device model it builds meta QINS layers of that format, to be filled by
    ``to_empty`` and ``load_state_dict``.

    With ``calibration`` (from :func:`qins.calibrate` on real inputs of this model), every layer it
    has statistics for is encoded to minimise its output error instead of its weight error
    (:func:`qins.calibrated.encode_calibrated`: weighted range search and GPTQ-style error feedback;
    same format and decode); a layer it never reached raises ``ValueError`` (nothing is converted).

    A layer is left alone if its qualified name (as in ``model.named_modules()``) equals one of
    ``skip`` or matches it as a glob (``fnmatch``, e.g. ``"*.mlp.*"``), or if its weight is tied to
    another parameter (converting it would duplicate the storage and untie it). ``skip`` defaults to
    ``("lm_head",)``, or to ``()`` with ``embeddings=True``.

    ``embeddings=True`` (opt-in) also replaces every ``nn.Embedding`` (not matching ``skip``) with a
    :class:`~qins.ProjectiveEmbedding` (per-row config required; lookups decode only the rows read),
    and a ``Linear`` tied to one of them (``tie_word_embeddings``: the same Parameter) with a
    :class:`~qins.embedding.ProjectiveTiedHead` that reads the embedding's codes: one copy in memory and
    on disk. An untied ``lm_head`` is converted as any ``Linear``. ``cache_weight`` applies to the
    ``ProjectiveLinear`` s only: embeddings and tied heads never keep a decoded table.

    On a transformers ``PreTrainedModel`` it also records ``config.quantization_config`` (format,
    skip list, cache mode) so that ``save_pretrained`` / ``from_pretrained`` round-trip the QINS
    layers (:mod:`qins.integrations.transformers`).

    Atomic: every replacement is built before any is installed. If any layer fails (a NaN weight,
    say), the model is left exactly as it was and a ``ValueError`` names the layer.
    """
    with torch.no_grad():
        if config is not None and not isinstance(config, QinsConfig):
            raise TypeError(f"config must be a QinsConfig, got {type(config).__name__}")
        if skip is None:
            skip = () if embeddings else ("lm_head",)
        patterns = (skip,) if isinstance(skip, str) else tuple(skip)
        if embeddings and config is not None and not config.per_row:
            raise ValueError("embeddings=True needs a per-row config (one log range per token row); "
                             "pass QinsConfig(per_row=True, ...) or embeddings=False")
        before = model_memory(model)
        todo, skipped = select_linears(model, patterns)
        extra, heads = _embedding_replacements(model, patterns, config, skipped) if embeddings else ([], [])

        if calibration is not None:
            if not isinstance(calibration, Calibration):
                raise TypeError(f"calibration must be a qins.Calibration, got {type(calibration).__name__}")
            missing = [name for name, _ in todo if calibration.moment(name) is None]
            if missing:
                raise ValueError(f"the calibration has no input statistics for {missing[:3]}"
                                 f"{' …' if len(missing) > 3 else ''} ({len(missing)} layers); run qins.calibrate on "
                                 "this model with the same skip list; the model was left unchanged")
        replacements: list[tuple[str, nn.Module]] = []
        for name, linear in _progress(todo):
            moment = calibration.moment(name) if calibration is not None else None
            try:
                replacements.append((name, ProjectiveLinear.from_linear(linear, config, cache_weight=cache_weight,
                                                                        input_moment=moment)))
            except ValueError as exc:
                raise ValueError(f"cannot convert layer {name!r}: {exc}; the model was left unchanged") from exc

        for name, new in replacements + extra:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            log.debug("converted %s -> %s(%d, %d)", name, type(new).__name__, *_shape(new))
        for name, reason in skipped.items():
            log.debug("skipped %s: %s", name, reason)
        _record_hf_quantization_config(model, config or QinsConfig(), patterns, cache_weight, embeddings)
        return ConversionReport(
            converted=[name for name, _ in replacements] + heads,
            skipped=skipped,
            memory_before=before,
            memory_after=model_memory(model),
            embeddings=[name for name, _ in extra if name not in heads],
        )
