"""Shared pytest configuration for `tests/` and `perf/`: Hypothesis profiles and device fixtures."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis: "ci" is derandomized (a fixed seed per test, no example database) so that CI is
# reproducible; "dev" explores with fresh randomness locally. CI=true selects "ci".
settings.register_profile(
    "ci",
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def available_devices() -> list[str]:
    """CPU always; CUDA when a GPU is visible (tests are parametrised over these)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=available_devices())
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)
