"""The weight formats of the real-LM accuracy suites, applied to a causal LM's decoder Linears.

Every format quantizes the same layers: every ``nn.Linear`` except ``lm_head`` (the token
embedding is not a Linear, and SmolLM2's ``lm_head`` is tied to it), so the figures compare weight
formats, not coverage. The references are written here, in the run, not taken from a library:

* ``fp32``: the model as loaded (the reference of every perplexity increase);
* ``bf16``: each weight rounded to bfloat16 (2 bytes/weight);
* ``int8-row``: int8 absmax per output row, ``q = round(w/s)·s`` with ``s = max|w|/127``
  (1 byte/weight plus 4 bytes per row).

The QINS formats go through the public API (``qins.convert_model_to_projective`` on a deep copy,
decoded caches kept, so a forward computes with exactly the decoded weights): ``qins-packed``
and ``qins-split`` are the data-free defaults (``QinsConfig()``, ``QinsConfig(packed=False)``);
``-calibrated`` adds :func:`qins.calibrate` statistics from the calibration batches.

One format covers more: ``qins-packed-emb`` is ``qins-packed`` with the token embedding and the tied
``lm_head`` in QINS too (``embeddings=True``), the whole model at about a quarter of its fp32 bytes;
it is reported beside ``qins-packed`` as the cost of that coverage, not compared as a weight format.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from torch import nn

from ..calibration import Calibration, calibrate
from ..convert import convert_model_to_projective
from ..formats import QinsConfig

__all__ = ["FORMATS", "BYTES_PER_WEIGHT", "SKIP", "int8_per_row", "quantized_copy", "calibration_for", "token_batches",
           "FormatRun"]

SKIP = ("lm_head",)
FORMATS = ("fp32", "bf16", "int8-row", "qins-packed", "qins-packed-calibrated", "qins-split", "qins-split-calibrated",
           "qins-packed-emb")
BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "int8-row": 1, "qins-packed": 1, "qins-packed-calibrated": 1,
                    "qins-split": 2, "qins-split-calibrated": 2, "qins-packed-emb": 1}
_QINS = {"qins-packed": QinsConfig(), "qins-split": QinsConfig(packed=False), "qins-packed-emb": QinsConfig()}


def int8_per_row(w: torch.Tensor) -> torch.Tensor:
    """int8 absmax per output row, dequantized: ``round(w/s).clamp(±127)·s``, ``s = max|w|/127``."""
    s = w.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    return (w / s).round().clamp(-127, 127) * s


def _decoder_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in SKIP]


def token_batches(ids: torch.Tensor, count: int, ctx: int, batch: int = 8) -> list[torch.Tensor]:
    """``count`` sequences of ``ctx`` tokens from the start of 1-d ``ids``, in batches of ``batch``."""
    if ids.numel() < count * ctx:
        raise ValueError(f"need {count * ctx} tokens, got {ids.numel()}")
    seqs = ids[: count * ctx].reshape(count, ctx)
    return [seqs[i : i + batch] for i in range(0, count, batch)]


def calibration_for(model: nn.Module, batches: list[torch.Tensor]) -> Calibration:
    """:func:`qins.calibrate` over ``batches`` with the suite's skip list."""
    return calibrate(model, batches, skip=SKIP)


@torch.no_grad()
def quantized_copy(model: nn.Module, fmt: str, calibration: Calibration | None = None) -> nn.Module:
    """A deep copy of ``model`` with its decoder Linears in format ``fmt`` (see :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")
    out = copy.deepcopy(model)
    if fmt in ("fp32", "bf16", "int8-row"):
        for lin in _decoder_linears(out):
            if fmt == "bf16":
                lin.weight.copy_(lin.weight.to(torch.bfloat16).to(lin.weight.dtype))
            elif fmt == "int8-row":
                lin.weight.copy_(int8_per_row(lin.weight.float()).to(lin.weight.dtype))
        return out
    calibrated = fmt.endswith("-calibrated")
    if calibrated and calibration is None:
        raise ValueError(f"format {fmt!r} needs a calibration (qins.calibrate)")
    config = _QINS[fmt.removesuffix("-calibrated")]
    embeddings = fmt.endswith("-emb")  # skip nothing: the tied lm_head becomes a head on the embedding's codes
    convert_model_to_projective(out, config, skip=() if embeddings else SKIP, cache_weight=True,
                                calibration=calibration if calibrated else None, embeddings=embeddings)
    return out


class FormatRun:
    """Per-token NLLs of ``model`` in each format on the windows ``wins``, each format measured once.

    The calibration (on ``calibration_batches``) runs once, at the first calibrated format.
    ``convert_s[fmt]``: CPU seconds of the conversion, the calibration included for the calibrated
    formats. ``bos``: as :func:`qins.testing.perplexity.token_nll`."""

    def __init__(self, model: nn.Module, wins: Sequence[torch.Tensor], calibration_batches: list[torch.Tensor],
                 bos: int | None = None):
        self.model, self.wins, self.batches, self.bos = model, wins, calibration_batches, bos
        self.calibration: Calibration | None = None
        self.calibrate_s = 0.0
        self.nll: dict[str, torch.Tensor] = {}
        self.convert_s: dict[str, float] = {}

    def measure(self, fmt: str) -> torch.Tensor:
        from .perplexity import token_nll

        if fmt not in self.nll:
            calibrated = fmt.endswith("-calibrated")
            if calibrated and self.calibration is None:
                t = time.process_time()
                self.calibration = calibration_for(self.model, self.batches)
                self.calibrate_s = time.process_time() - t
            t = time.process_time()
            q = quantized_copy(self.model, fmt, self.calibration)
            self.convert_s[fmt] = time.process_time() - t + (self.calibrate_s if calibrated else 0.0)
            self.nll[fmt] = token_nll(q, self.wins, bos=self.bos)
        return self.nll[fmt]
