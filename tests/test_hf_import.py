"""`import qins` is enough: the "qins" method registers itself with transformers, without importing it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qins
from qins.integrations.transformers import registration
from tests.mutmut_depth import child_environ
from tests.strategies import tiny_phi3

ROOT = Path(__file__).resolve().parents[1]

LOAD = r"""
import sys, torch
order = sys.argv[2]
if order == "transformers-first":
    import transformers.modeling_utils
import qins
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True)
torch.save({k: v for k, v in model.state_dict().items()}, sys.argv[3])
print(sum(isinstance(m, qins.ProjectiveLinear) for m in model.modules()))
"""


def _child(*args: str) -> subprocess.CompletedProcess:
    env = child_environ(dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT)))
    return subprocess.run([sys.executable, "-c", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_importing_qins_does_not_import_transformers():
    proc = _child("import sys, qins; print('transformers' in sys.modules, 'torch' in sys.modules)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "True"]


@pytest.mark.slow  # a fresh interpreter loads a checkpoint
@pytest.mark.parametrize("order", ["qins-first", "transformers-first"])
def test_a_bare_import_of_qins_is_enough_to_load_a_qins_checkpoint(tmp_path, order):
    model = tiny_phi3(seed=3)
    qins.convert_model_to_projective(model, cache_weight=False)
    model.save_pretrained(tmp_path / "ckpt")
    proc = _child(LOAD, str(tmp_path / "ckpt"), order, str(tmp_path / "state.pt"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    converted = sum(isinstance(m, qins.ProjectiveLinear) for m in model.modules())
    assert int(proc.stdout.split()[-1]) == converted > 0
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_registering_on_import_is_idempotent_and_adds_at_most_one_finder(monkeypatch):
    monkeypatch.setattr(registration, "_registered", None)
    finders = [f for f in sys.meta_path if not isinstance(f, registration._RegisterWhenLoaded)]
    monkeypatch.setattr(sys, "meta_path", finders)
    monkeypatch.delitem(sys.modules, registration._LOADER_MODULE, raising=False)
    registration.register_on_import()
    registration.register_on_import()
    assert sum(isinstance(f, registration._RegisterWhenLoaded) for f in sys.meta_path) == 1
    finder = next(f for f in sys.meta_path if isinstance(f, registration._RegisterWhenLoaded))
    assert finder.find_spec("transformers.something_else", None) is None and not finder.fired
