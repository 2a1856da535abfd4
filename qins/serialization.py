"""Plain safetensors files of QINS models: :func:`save` and :func:`load` (tensors only, never pickle).

The file holds the model's ``state_dict`` tensors (a tensor shared by several names, e.g. tied
embeddings, is written once and the other names are listed under ``qins.aliases``; only names for the
same view count: identical storage, storage offset, shape, stride and dtype) and string
metadata: ``qins.format_version`` (``"2"``) and ``qins.layers``, a JSON object mapping every QINS
layer's qualified name to its format ``{"packed", "per_row", "log_range", "spacing", "cache_weight"}``
(and ``"shared_tables"`` when set).
A model with QINS embeddings (``convert_model_to_projective(..., embeddings=True)``) also has
``qins.embeddings`` (name -> format and ``padding_idx``) and, when a head is tied to one,
``qins.tied_heads`` (head name -> embedding name; the head has no codes of its own, so the codes are
written once); files without embeddings are unchanged, and a qins that does not know these entries
refuses such a file (its codes are unexpected keys).
Version ``"1"`` files (no ``spacing``: every layer log-spaced) still load; a qins that reads only
version 1 refuses version 2 files rather than decode mulaw codes on the log grid.

:func:`load` checks everything before it changes anything: the metadata, every listed layer (its
module exists and is a ``ProjectiveLinear`` of that format, or an ``nn.Linear`` of the right size
to convert), every QINS group with :func:`qins.state.check_qins_state`, and the keys and shapes of
all other tensors (a floating point tensor may be stored in another floating point dtype; any other
dtype must match). A bad file (empty, truncated, extended, random bytes, a corrupt header or
metadata, a state that does not fit the model) raises ``ValueError`` and leaves the model exactly as
it was; only a file that cannot be opened at all raises ``OSError``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Union

import torch
from torch import nn

from .embedding import ProjectiveEmbedding, ProjectiveTiedHead
from .formats import QinsConfig
from .layer import ProjectiveLinear
from .state import check_qins_state, format_metadata

__all__ = ["FORMAT_VERSION", "load", "save"]

log = logging.getLogger(__name__)

FORMAT_VERSION = "2"
_READABLE = ("1", "2")
PathLike = Union[str, "os.PathLike[str]"]


def _layer_entry(layer: ProjectiveLinear) -> dict[str, Any]:
    return format_metadata(layer.config) | {"cache_weight": layer.cache_weight}


def save(model: nn.Module, path: PathLike) -> None:
    """Write ``model``'s state and the format of each QINS layer to a safetensors file at ``path``."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owners: dict[tuple, str] = {}
    written: set[int] = set()  # storages of the tensors in `tensors`
    for name, t in model.state_dict().items():
        if t.is_meta:
            raise ValueError(f"cannot save {name!r}: it is on the meta device (no data)")
        # An alias reloads as the very tensor of its owner, so it is written only for the same view of
        # the same memory: same storage, offset, shape, stride and dtype. Any other sharing (a
        # transpose, a slice, a reinterpreting view) is saved as its own tensor.
        key = (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in owners:
            aliases[name] = owners[key]
            continue
        owners[key] = name
        out = t.detach().to("cpu").contiguous()
        if out.numel() and out.untyped_storage().data_ptr() in written:
            out = out.clone()  # another view of memory already written: safetensors refuses shared memory
        written.add(out.untyped_storage().data_ptr())
        tensors[name] = out
    layers = {name: _layer_entry(m) for name, m in model.named_modules() if isinstance(m, ProjectiveLinear)}
    metadata = {
        "format": "pt",
        "qins.format_version": FORMAT_VERSION,
        "qins.layers": json.dumps(layers, sort_keys=True),
        "qins.aliases": json.dumps(aliases, sort_keys=True),
    }
    metadata.update(_embedding_metadata(model))
    save_file(tensors, os.fspath(path), metadata=metadata)
    log.debug("saved %d tensors, %d QINS layers to %s", len(tensors), len(layers), path)


def _read(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str], dict[str, dict]]:
    """The file's tensors (aliases resolved), its ``qins.layers``, ``qins.aliases`` and embedding
    entries (``{"embeddings": ..., "tied_heads": ...}``, each ``{}`` when absent); ``ValueError``
    for anything but a well-formed qins file (``OSError`` when it cannot be opened at all)."""
    from safetensors import SafetensorError

    try:
        return _read_file(path)
    except SafetensorError as exc:  # empty, truncated, extended or random bytes, a corrupt header
        raise ValueError(f"{path}: not a valid safetensors file ({exc})") from exc


def _read_file(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str], dict[str, dict]]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        version = meta.get("qins.format_version")
        if version is None:
            raise ValueError(f"{path}: not a qins file (no 'qins.format_version' in the safetensors metadata); "
                             "for a plain state_dict use model.load_state_dict")
        if version not in _READABLE:
            raise ValueError(f"{path}: qins file format version {version!r} is not supported (this qins reads "
                             f"{' and '.join(map(repr, _READABLE))})")
        try:
            layers = json.loads(meta.get("qins.layers", ""))
            aliases = json.loads(meta.get("qins.aliases", "{}"))
            extra = {k: json.loads(meta.get(f"qins.{k}", "{}")) for k in ("embeddings", "tied_heads")}
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: corrupt qins metadata ({exc})") from None
        if not isinstance(layers, dict) or not isinstance(aliases, dict):
            raise ValueError(f"{path}: corrupt qins metadata ('qins.layers'/'qins.aliases' must be JSON objects)")
        if not all(isinstance(d, dict) for d in extra.values()):
            raise ValueError(f"{path}: corrupt qins metadata "
                             "('qins.embeddings'/'qins.tied_heads' must be JSON objects)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    stored = set(tensors)
    for alias, owner in aliases.items():
        # JSON may hold any value: check the type before using it as a key (a list is unhashable).
        if not isinstance(owner, str):
            raise ValueError(f"{path}: corrupt qins metadata (alias {alias!r} must name a tensor, got {owner!r})")
        if owner not in stored:
            raise ValueError(f"{path}: alias {alias!r} points to missing tensor {owner!r}")
        if alias in stored:
            raise ValueError(f"{path}: {alias!r} is both a stored tensor and an alias of {owner!r}")
        tensors[alias] = tensors[owner]
    return tensors, layers, aliases, extra


def _config(name: str, entry: Any) -> tuple[QinsConfig, bool]:
    try:
        # files written before the mulaw spacing have no "spacing": their layers are log-spaced
        # version 1 entries have no "spacing": every layer of those files is log-spaced
        cfg = QinsConfig(packed=entry["packed"], log_range=entry["log_range"], per_row=entry["per_row"],
                         spacing=entry.get("spacing", "log"), shared_tables=entry.get("shared_tables", 0))
        cache = entry.get("cache_weight", True)
        if not isinstance(cache, bool):
            raise TypeError(f"cache_weight must be bool, got {cache!r}")
        return cfg, cache
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"layer {name!r}: bad format entry {entry!r} in 'qins.layers' ({exc})") from None


def load(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a file written by :func:`save` into ``model`` (converted, or a plain skeleton); returns it.

    Every layer listed in the file must be a ``ProjectiveLinear`` of the recorded format or an
    ``nn.Linear`` of the same size, which is replaced by a QINS layer of that format (and cache
    mode) before the load. The key sets must match exactly. Raises ``ValueError`` naming the file,
    layer or key before anything is changed. A meta-device skeleton works when all its
    non-persistent buffers are outside the converted layers' reach (they cannot be filled from a file).
    """
    tensors, layers, _, extra = _read(path)
    replacements: list[tuple[str, nn.Module]] = []
    targets: dict[str, ProjectiveLinear] = {}
    for name, entry in sorted(layers.items()):
        cfg, cache = _config(name, entry)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: layer {name!r} is not in the model") from None
        if isinstance(module, ProjectiveLinear):
            targets[name] = module
        elif isinstance(module, nn.Linear):
            w = module.weight
            new = ProjectiveLinear(module.in_features, module.out_features, bias=module.bias is not None, config=cfg,
                                   cache_weight=cache, device="cpu" if w.is_meta else w.device, dtype=w.dtype)
            replacements.append((name, new))
            targets[name] = new
        else:
            raise ValueError(f"{path}: layer {name!r} is a {type(module).__name__}, not nn.Linear or ProjectiveLinear")
    unlisted = [n for n, m in model.named_modules() if isinstance(m, ProjectiveLinear) and n not in layers]
    if unlisted:
        raise ValueError(f"{path}: the model's QINS layers {unlisted} are not in the file")
    for name, layer in targets.items():
        try:
            check_qins_state(layer, tensors, name + ".", {"qins": format_metadata(_config(name, layers[name])[0])})
        except ValueError as exc:
            raise ValueError(f"{path}: layer {name!r}: {exc}") from None
    replacements += _embedding_replacements(model, extra, tensors, path)  # checks them; changes nothing
    expected = _expected_state(model, replacements)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: keys do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, ref in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise ValueError(f"{path}: {key}: shape must be {tuple(ref.shape)}, got {tuple(got.shape)}")
        # load_state_dict would cast silently: between floating point dtypes that is a precision
        # choice (a float32 file into a bfloat16 model), but integers read as floats (or the reverse)
        # are other values altogether.
        if got.dtype != ref.dtype and not (got.dtype.is_floating_point and ref.dtype.is_floating_point):
            raise ValueError(f"{path}: {key}: dtype must be {ref.dtype}, got {got.dtype}")
    stuck = [f"{n}.{b}" for n, m in model.named_modules() if not isinstance(m, (ProjectiveLinear, ProjectiveEmbedding))
             for b, t in m._buffers.items() if t is not None and t.is_meta and b in m._non_persistent_buffers_set]
    if stuck:
        raise ValueError(f"cannot load into this meta-device model: non-persistent buffers {stuck[:3]} have no data "
                         "and are not in any file; build the model on a real device")

    # Everything is checked: install the new layers, then load (assigning where the model is meta).
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    meta = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(tensors, strict=True, assign=meta)
    if meta:
        for layer in targets.values():
            layer._dtype_marker = torch.empty(0, dtype=layer.compute_dtype, device=layer.stored.device)
            layer._cached_weight = None
            layer.invalidate_cache()
        for emb in (m for m in model.modules() if isinstance(m, ProjectiveEmbedding)):
            emb._dtype_marker = torch.empty(0, dtype=emb.compute_dtype, device=emb.stored.device)
    log.debug("loaded %s: %d QINS layers (%d converted)", path, len(targets), len(replacements))
    return model


def _embedding_metadata(model: nn.Module) -> dict[str, str]:
    """``qins.embeddings``/``qins.tied_heads`` entries of :func:`save` (none without QINS embeddings)."""
    named = dict(model.named_modules())
    names = {id(m): n for n, m in named.items() if isinstance(m, ProjectiveEmbedding)}
    embs = {n: format_metadata(named[n].config) | {"padding_idx": named[n].padding_idx} for n in names.values()}
    heads = {}
    for n, m in named.items():
        if isinstance(m, ProjectiveTiedHead):
            if id(m.embedding) not in names:
                raise ValueError(f"cannot save: head {n!r} is tied to an embedding that is not part of the model")
            heads[n] = names[id(m.embedding)]
    out = {"qins.embeddings": json.dumps(embs, sort_keys=True)} if embs else {}
    return out | ({"qins.tied_heads": json.dumps(heads, sort_keys=True)} if heads else {})


def _embedding_replacements(model: nn.Module, extra: dict[str, dict], tensors: dict[str, torch.Tensor],
                            path: PathLike) -> list[tuple[str, nn.Module]]:
    """Check the file's embeddings and tied heads against ``model`` (each a QINS module of that format,
    or an ``nn.Embedding``/``nn.Linear`` of the same size, replaced) and their states; changes nothing.
    Returns the replacements, embeddings first."""
    embs, heads = extra["embeddings"], extra["tied_heads"]
    out: list[tuple[str, nn.Module]] = []
    targets: dict[str, ProjectiveEmbedding] = {}
    for name, entry in sorted(embs.items()):
        cfg, _ = _config(name, entry)
        module = _module(model, name, path)
        if isinstance(module, ProjectiveEmbedding):
            if module.config != cfg:
                raise ValueError(f"{path}: embedding {name!r} is {module.config} in the model but {cfg} in the file")
            targets[name] = module
        elif isinstance(module, nn.Embedding):
            w = module.weight
            try:
                new = ProjectiveEmbedding(module.num_embeddings, module.embedding_dim, module.padding_idx, config=cfg,
                                          device="cpu" if w.is_meta else w.device, dtype=w.dtype)
            except ValueError as exc:
                raise ValueError(f"{path}: embedding {name!r}: {exc}") from None
            out.append((name, new))
            targets[name] = new
        else:
            raise ValueError(f"{path}: embedding {name!r} is a {type(module).__name__}, not nn.Embedding or "
                             "ProjectiveEmbedding")
        try:
            check_qins_state(targets[name], tensors, name + ".", {"qins": format_metadata(cfg)})
        except ValueError as exc:
            raise ValueError(f"{path}: embedding {name!r}: {exc}") from None
    for name, owner in sorted(heads.items()):
        if not isinstance(owner, str) or owner not in targets:
            raise ValueError(f"{path}: head {name!r} is tied to {owner!r}, which is not a QINS embedding of the file")
        module, emb = _module(model, name, path), targets[owner]
        if isinstance(module, ProjectiveTiedHead) and module.embedding is emb:
            continue
        if not isinstance(module, nn.Linear) or tuple(module.weight.shape) != emb.qins_weight_shape:
            raise ValueError(f"{path}: head {name!r} must be an nn.Linear {emb.qins_weight_shape} (or a head tied to "
                             f"{owner!r}), got {module!r}")
        out.append((name, ProjectiveTiedHead(emb, module.bias)))
    unlisted = [n for n, m in model.named_modules() if isinstance(m, (ProjectiveEmbedding, ProjectiveTiedHead))
                and n not in embs and n not in heads]
    if unlisted:
        raise ValueError(f"{path}: the model's QINS embeddings or tied heads {unlisted} are not in the file")
    return out


def _module(model: nn.Module, name: str, path: PathLike) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{path}: module {name!r} is not in the model") from None


def _expected_state(model: nn.Module, replacements: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """The model's state_dict keys (and tensors, for shapes) as they will be after the replacements."""
    state = dict(model.state_dict(keep_vars=True))
    for name, new in replacements:
        for key in [k for k in state if k.startswith(name + ".") and k.count(".") == name.count(".") + 1]:
            del state[key]
        state.update({f"{name}.{k}": v for k, v in new.state_dict(keep_vars=True).items()})
    return state
