"""QINS embeddings and tied heads under transformers' weight tying.

transformers ties a model's output Linear to its input embedding (``tie_word_embeddings``) by
sharing the Parameter, and ties them again after every load. A QINS tied head
(:class:`qins.ProjectiveTiedHead`) is tied through the codes instead: it reads its embedding's
``stored``/``logs`` and has no ``weight`` to assign. :func:`tie_input_and_output_embeddings` ties
the meta model before the conversion (which recognises a tied head by the shared Parameter);
:func:`stop_transformers_tying` keeps transformers' own tying off the QINS pairs afterwards.
:func:`embedding_targets` and :func:`install_embedding` are quantize on load's part for embeddings.
"""
from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ...convert import _matches
from ...embedding import ProjectiveEmbedding, ProjectiveTiedHead
from ...formats import QinsConfig
from ...state import CODE_BUFFERS
from ...streaming import encode_rows

__all__ = ["embedding_targets", "install_embedding", "stop_transformers_tying", "tie_input_and_output_embeddings"]


def _tied_pairs(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(output module, input module) names that transformers ties for ``model``: 5.x's
    ``all_tied_weights_keys`` (target -> source parameter names), else 4.x's output and input
    embeddings when the (text) config has ``tie_word_embeddings``."""
    mapping = getattr(model, "all_tied_weights_keys", None)
    if isinstance(mapping, dict):
        return [(t.rpartition(".")[0], s.rpartition(".")[0]) for t, s in mapping.items()
                if t.endswith(".weight") and s.endswith(".weight")]
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if not getattr(text, "tie_word_embeddings", False):
        return []
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(out)], names[id(inp)])] if id(out) in names and id(inp) in names else []


def tie_input_and_output_embeddings(model: torch.nn.Module) -> None:
    """Tie the (meta) model's output Linear to its input embedding as transformers would, before the
    QINS conversion: the conversion recognises a tied head by the shared Parameter, and transformers
    only ties once the weights are loaded (its ``tie_weights`` is a no-op while the model is built)."""
    for out_name, in_name in _tied_pairs(model):
        out, inp = model.get_submodule(out_name), model.get_submodule(in_name)
        if isinstance(out, torch.nn.Linear) and isinstance(inp, torch.nn.Embedding) \
                and out.weight.shape == inp.weight.shape:
            out.weight = inp.weight


def _tie_or_clone_weights(self: Any, output_embeddings: Any, input_embeddings: Any) -> None:
    """4.x ``PreTrainedModel._tie_or_clone_weights`` that leaves a QINS tied head as it is: it already
    computes from its embedding's codes (and has no ``weight`` to assign)."""
    if isinstance(output_embeddings, ProjectiveTiedHead) and output_embeddings.embedding is input_embeddings:
        return
    type(self)._tie_or_clone_weights(self, output_embeddings, input_embeddings)


def stop_transformers_tying(model: torch.nn.Module, heads: Iterable[str] | None = None) -> None:
    """After the conversion: keep transformers from tying a QINS tied head to its embedding again (it
    would assign a ``weight`` the head does not have). 5.x ties from ``all_tied_weights_keys``: the
    entries whose target is a QINS tied head are dropped. 4.x ties through ``_tie_or_clone_weights``:
    the model gets one that skips a QINS tied head (every other pair is tied as before). ``heads``:
    the names of the tied heads, the QINS ones in ``model`` by default (quantize on load names the
    ones it will install)."""
    if heads is None:
        heads = {name for name, m in model.named_modules() if isinstance(m, ProjectiveTiedHead)}
    heads = set(heads)
    if not heads:
        return
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        model.all_tied_weights_keys = {k: v for k, v in tied.items() if k.rpartition(".")[0] not in heads}
    if hasattr(type(model), "_tie_or_clone_weights"):
        model._tie_or_clone_weights = types.MethodType(_tie_or_clone_weights, model)


def _tied_to(model: nn.Module, weight: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """(name, module) of the ``nn.Linear`` s whose weight is the Parameter ``weight``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is weight]


def embedding_targets(model: nn.Module, skip: Iterable[str]) -> tuple[set[str], set[str]]:
    """Quantize on load with ``embeddings``: the ``nn.Embedding`` s that
    ``convert_model_to_projective(model, skip=skip, embeddings=True)`` would convert, and the Linears
    tied to them (to become :class:`qins.ProjectiveTiedHead` s). Call after
    :func:`tie_input_and_output_embeddings`. Raises ``ValueError`` for a tied head this path cannot
    build: one with a bias, or one that ``skip`` would leave in full precision."""
    patterns = tuple(skip)
    embeddings: set[str] = set()
    heads: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding) or name == "" or _matches(name, patterns) is not None:
            continue
        if module.max_norm is not None:
            raise ValueError(f"cannot quantize embedding {name!r} while loading: nn.Embedding with max_norm rewrites "
                             "its weight at lookup; add it to the QINS config's 'skip' list")
        embeddings.add(name)
        for head, linear in _tied_to(model, module.weight):
            pattern = _matches(head, patterns)
            if pattern is not None:
                raise ValueError(f"layer {head!r} is tied to the embedding {name!r}, which is quantized, but 'skip' "
                                 f"entry {pattern!r} leaves it in full precision: quantize on load cannot keep a "
                                 f"separate copy; skip both, or neither")
            if linear.bias is not None:
                raise ValueError(f"layer {head!r} is tied to the embedding {name!r} and has a bias: quantize on load "
                                 "builds tied heads without one; load the model, then "
                                 "qins.convert_model_to_projective(model, embeddings=True)")
            heads.add(head)
    return embeddings, heads


def install_embedding(model: nn.Module, param_name: str, value: torch.Tensor, config: QinsConfig,
                      device: Any = None) -> ProjectiveEmbedding:
    """Encode ``value`` (the checkpoint's ``<embedding>.weight``) into a :class:`qins.ProjectiveEmbedding`
    of ``config`` in place of the ``nn.Embedding`` ``<embedding>``, and every Linear tied to it into a
    :class:`qins.ProjectiveTiedHead` on it. ``value`` is encoded as cast to the (meta) weight's dtype,
    so the codes equal those of load-then-convert. Raises ``ValueError`` naming the embedding (shape,
    a NaN/±Inf weight); the model is then unchanged."""
    module_name = param_name.rpartition(".")[0]
    emb = model.get_submodule(module_name)
    expected = (emb.num_embeddings, emb.embedding_dim)
    if tuple(value.shape) != expected:
        raise ValueError(f"{param_name}: the checkpoint's weight has shape {tuple(value.shape)}, the embedding "
                         f"{module_name!r} needs {expected}; the checkpoint does not match this model's config")
    device = value.device if device is None else torch.device(device)
    dtype = emb.weight.dtype
    try:
        with torch.no_grad():
            codes = encode_rows(value.detach().to(device), config, dtype)
    except ValueError as exc:
        raise ValueError(f"cannot quantize embedding {module_name!r} while loading: {exc}") from exc
    new = ProjectiveEmbedding(*expected, emb.padding_idx, config=config, device=device, dtype=dtype)
    for name, code in zip(CODE_BUFFERS, codes):
        if code is not None:
            buf = code.to(device)
            buf._is_hf_initialized = True  # 5.x: loaded, not to be initialised
            new._buffers[name] = buf
    replacements = [(module_name, new)] + [(head, ProjectiveTiedHead(new)) for head, _ in _tied_to(model, emb.weight)]
    for name, module in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    return new
