"""Shared end-to-end fixtures: the seeded tiny Phi-3 in its three modes, and the prompt.

Session-scoped (imported into perf/conftest.py) so the generation and memory benchmarks share
one FP32 model and its two QINS conversions.
"""
from __future__ import annotations

import copy

import pytest
import torch

from perf.timing import slow_down_modules

#: The end-to-end model: hidden 256, 4 layers, a ~32k vocabulary so that the lm_head matters.
MODEL_CONFIG = dict(hidden_size=256, num_hidden_layers=4, vocab_size=32000)
MODES = ["fp32", "qins-cached", "qins-memsave"]
PROMPT_LEN = 32


@pytest.fixture(scope="session")
def e2e_models(device, inject_factor):
    """{"fp32", "qins-cached", "qins-memsave"} -> model (eval), plus "_reports" -> ConversionReport.

    QINS models are deep copies of the FP32 one converted with the library default (lm_head stays
    fp32). With an injected slowdown, every ProjectiveLinear forward is slowed by that factor.
    """
    from qins import ProjectiveLinear, convert_model_to_projective
    from tests.strategies import tiny_phi3

    fp32 = tiny_phi3(**MODEL_CONFIG).to(device).eval()
    out = {"fp32": fp32, "_reports": {}}
    for name, cache_weight in (("qins-cached", True), ("qins-memsave", False)):
        m = copy.deepcopy(fp32)
        out["_reports"][name] = convert_model_to_projective(m, cache_weight=cache_weight)
        slow_down_modules(m, ProjectiveLinear, inject_factor)
        out[name] = m.eval()
    return out


@pytest.fixture(scope="session")
def e2e_prompt(device):
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, MODEL_CONFIG["vocab_size"], (1, PROMPT_LEN), generator=g).to(device)
