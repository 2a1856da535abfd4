"""Calibration: the input statistics of every ``nn.Linear`` of a model, collected on real data.

:func:`calibrate` runs the model on calibration batches and records, for each ``nn.Linear`` it
reaches, the second moment of its input rows ``H = E[x xᵀ]`` (``[in, in]``, float64). The
calibrated encoder (:func:`qins.calibrated.encode_calibrated`) uses ``H`` to choose ranges and codes
that minimise the layer's expected output error ``E‖(W - Ŵ)x‖² = tr((W - Ŵ) H (W - Ŵ)ᵀ)`` instead
of the weight error ``‖W - Ŵ‖²``. Only torch is needed.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Calibration", "calibrate"]


@dataclass
class Calibration:
    """Per-layer input second moments from :func:`calibrate`.

    Attributes:
        moments: qualified layer name (as in ``model.named_modules()``) → ``H = E[x xᵀ]``,
            float64 ``[in_features, in_features]``, symmetric positive semi-definite.
        rows: name → number of input rows (tokens) averaged into ``H``.
    """

    moments: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def moment(self, name: str) -> torch.Tensor | None:
        """``H`` of layer ``name``, or ``None`` when the calibration never reached it."""
        return self.moments.get(name)


Batch = torch.Tensor | Mapping[str, torch.Tensor]


def calibrate(model: nn.Module, batches: Iterable[Batch], *, skip: Iterable[str] = ("lm_head",)) -> Calibration:
    """Run ``model`` on ``batches`` (``model(batch)``, or ``model(**batch)`` for a mapping) without
    gradients and return the input second moment of every ``nn.Linear`` not named in ``skip``
    (exact names or ``fnmatch`` globs, as :func:`qins.convert_model_to_projective`).

    The model is not modified: the forward pre-hooks are removed even when a batch fails. Products
    ``xᵀx`` are formed in float32 and summed in float64. Raises ``ValueError`` when no batch
    reached any layer.
    """
    patterns = tuple(skip) if not isinstance(skip, str) else (skip,)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    # Layers that read the same input tensor (an attention's q/k/v, an MLP's gate/up) share its
    # product: the last input seen (unchanged since: same object, same version) and its xᵀx, the
    # very same sum for each of them.
    last: list = [None, -1, None]

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            src = args[0]
            version = -1 if src.is_inference() else src._version  # inference tensors have no version: never shared
            if last[0] is src and version >= 0 and last[1] == version:
                prod = last[2]
            else:
                x = src.detach().reshape(-1, src.shape[-1]).to(torch.float32)
                prod = (x.T @ x).double()
                last[:] = [src, version, prod]
            if name not in sums:
                sums[name] = torch.zeros(prod.shape, dtype=torch.float64, device=prod.device)
                rows[name] = 0
            sums[name] += prod
            rows[name] += src.reshape(-1, src.shape[-1]).shape[0]
        return hook

    handles = [
        module.register_forward_pre_hook(hook_for(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch) if isinstance(batch, Mapping) else model(batch)
    finally:
        last.clear()
        for h in handles:
            h.remove()
    if not sums:
        raise ValueError("calibrate: no nn.Linear saw an input (empty batches, or every layer skipped)")
    return Calibration({n: s / rows[n] for n, s in sums.items()}, rows)
