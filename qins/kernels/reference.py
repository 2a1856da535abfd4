"""The pure-torch oracle and fallback of ``qins::linear`` (any device, fp32 compute)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..formats import decode_codes

__all__ = ["linear"]


def linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    sign: Optional[torch.Tensor],
    log_min: torch.Tensor,
    log_max: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``y = x @ ŵᵀ + bias`` with ``ŵ = decode_codes(codes, sign, log_min, log_max)``.

    x is converted to float32, the product and the bias are computed in float32 and the result is
    cast back to ``x.dtype``. Materialises the full fp32 weight (this is the slow, simple path).
    """
    w = decode_codes(codes, sign, log_min, log_max, dtype=torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    return F.linear(x.to(torch.float32), w, b).to(x.dtype)
