"""save_pretrained / from_pretrained of QINS models, loaded in a fresh process.

A tiny Phi-3 (native ``Phi3ForCausalLM`` and the legacy remote-code model) is converted, saved with
``save_pretrained`` and loaded with ``AutoModelForCausalLM.from_pretrained`` in a new Python process
(``HF_HUB_OFFLINE=1``): the QINS buffers must come back bit for bit (dtypes and shapes included),
the logits bit-identical and the greedy tokens identical — for the default format and the seed's,
in cached and memory-saving mode, and loaded with ``torch_dtype=torch.bfloat16`` (codes and logs
unchanged, compute in bf16: equal to the saved model cast with ``.to(torch.bfloat16)``).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version

import qins
from qins import ProjectiveLinear, QinsConfig, convert_model_to_projective
from qins.integrations.transformers import compat
from tests.mutmut_depth import child_environ
from tests.strategies import load_legacy_model, tiny_phi3

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 6
QINS_KEYS = ("stored", "sign", "log_min", "log_max")

# (id, model kind, QinsConfig, cache_weight, load dtype)
CASES = [
    ("native-default-cached", "native", QinsConfig(), True, None),
    ("native-seed-cached", "native", QinsConfig.codec_compatible(), True, None),
    ("native-default-memory_saving", "native", QinsConfig(), False, None),
    ("native-seed-memory_saving", "native", QinsConfig.codec_compatible(), False, None),
    ("native-default-bf16", "native", QinsConfig(), True, "bfloat16"),
    ("native-seed-bf16", "native", QinsConfig.codec_compatible(), False, "bfloat16"),
    ("legacy-default-cached", "legacy", QinsConfig(), True, None),
    ("legacy-seed-memory_saving", "legacy", QinsConfig.codec_compatible(), False, None),
]

CHILD = r"""
import sys, torch
import qins
from transformers import AutoModelForCausalLM
qins.patch_transformers()
qins.register_with_transformers()
jobs, out = eval(sys.argv[1]), sys.argv[2]
ids = torch.load(sys.argv[3], weights_only=True)
torch.set_num_threads(int(sys.argv[4]))
results = {}
for name, directory, kind, dtype in jobs:
    kwargs = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=(kind == "legacy"), local_files_only=True,
                                                 **kwargs).eval()
    with torch.no_grad():
        results[name + "/logits"] = model(ids, use_cache=False).logits
        results[name + "/tokens"] = model.generate(ids, max_new_tokens=%d, min_new_tokens=%d, do_sample=False,
                                                   pad_token_id=0)
    for key, value in model.state_dict().items():
        results[name + "/state/" + key] = value
    results[name + "/kinds"] = torch.tensor([isinstance(m, qins.ProjectiveLinear) and m.cache_weight
                                             for m in model.modules()] + [0])
    layer = next(m for m in model.modules() if isinstance(m, qins.ProjectiveLinear))
    want = getattr(torch, dtype) if dtype else torch.float32
    results[name + "/cached"] = torch.tensor([layer._cached_weight is not None, layer.compute_dtype == want])
torch.save(results, out)
""" % (NEW_TOKENS, NEW_TOKENS)  # noqa: UP031  (the child's code has braces; % keeps them plain)


def _loaded_as(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """What loading ``model``'s checkpoint in ``dtype`` means: every saved floating tensor cast (the QINS
    layers through ``.to``: codes and logs unchanged, cache in ``dtype``); non-persistent buffers such
    as the rotary ``inv_freq`` are computed at init and keep their dtype."""
    ref = copy.deepcopy(model)
    keep = {(id(m), n): b.clone() for m in ref.modules() if not isinstance(m, ProjectiveLinear)
            for n, b in m._buffers.items() if b is not None and n in m._non_persistent_buffers_set}
    ref.to(dtype)
    for m in ref.modules():
        for n in list(m._buffers):
            if (id(m), n) in keep:
                m._buffers[n] = keep[(id(m), n)]
    return ref


def _ids() -> torch.Tensor:
    return torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def patched():
    compat.patch_transformers()
    yield
    compat.unpatch_transformers()


@pytest.fixture(scope="module")
def round_trip(patched, tmp_path_factory: pytest.TempPathFactory):
    """Convert, save each case, load them all in one fresh process; returns (references, loaded results)."""
    base = tmp_path_factory.mktemp("persist")
    ids = _ids()
    torch.save(ids, base / "ids.pt")
    references, jobs = {}, []
    for name, kind, config, cache_weight, dtype in CASES:
        model = load_legacy_model(base / "src") if kind == "legacy" else tiny_phi3()
        convert_model_to_projective(model, config, cache_weight=cache_weight)
        model.save_pretrained(base / name)
        ref = _loaded_as(model, getattr(torch, dtype)) if dtype else model
        with torch.no_grad():
            logits = ref(ids, use_cache=False).logits
            tokens = ref.generate(
                ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )
        references[name] = (model, logits, tokens)
        jobs.append((name, str(base / name), kind, dtype))
    env = child_environ(dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT)))
    # The child computes at this process's thread count: an fp32 GEMM may sum in another order at another
    # count (on AMD EPYC family 26 the logits of 1 and 2 threads differ), so they are bit-comparable only
    # at equal counts (an xdist worker runs at its share of the cores, a fresh process at all of them).
    args = [repr(jobs), str(base / "out.pt"), str(base / "ids.pt"), str(torch.get_num_threads())]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return references, torch.load(base / "out.pt", weights_only=True), base


@pytest.mark.slow  # round_trip: save_pretrained, then loads in fresh processes
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_save_pretrained_writes_the_qins_quantization_config_and_safetensors(round_trip, case) -> None:
    name, _, config, cache_weight, _ = case
    _, _, base = round_trip
    saved = json.loads((base / name / "config.json").read_text())["quantization_config"]
    assert saved == {"quant_method": "qins", "packed": config.packed, "log_range": config.log_range,
                     "per_row": config.per_row, "spacing": config.spacing, "skip": ["lm_head"],
                     "cache_weight": cache_weight, "format_version": 4, "shared_tables": config.shared_tables}
    assert list((base / name).glob("*.safetensors")) and not list((base / name).glob("*.bin"))


@pytest.mark.slow  # round_trip
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_from_pretrained_in_a_fresh_process_restores_qins_buffers_bit_for_bit(round_trip, case) -> None:
    name = case[0]
    references, loaded, _ = round_trip
    model = references[name][0]
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ProjectiveLinear)]
    assert layers
    for layer_name, layer in layers:
        for key in QINS_KEYS:
            mine = getattr(layer, key)
            theirs = loaded.get(f"{name}/state/{layer_name}.{key}")
            if mine is None:
                assert theirs is None
                continue
            assert theirs is not None and theirs.dtype == mine.dtype and theirs.shape == mine.shape
            assert torch.equal(theirs, mine), f"{layer_name}.{key}"
    assert bool(loaded[f"{name}/cached"][1]), "compute dtype"
    assert bool(loaded[f"{name}/cached"][0]) == case[3], "cache mode"


@pytest.mark.slow  # round_trip
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_from_pretrained_in_a_fresh_process_gives_bit_identical_logits_and_greedy_tokens(round_trip, case) -> None:
    name = case[0]
    references, loaded, _ = round_trip
    _, logits, tokens = references[name]
    assert loaded[f"{name}/logits"].dtype == logits.dtype
    assert torch.equal(loaded[f"{name}/logits"], logits)
    assert loaded[f"{name}/tokens"].tolist() == tokens.tolist()


@pytest.mark.slow  # round_trip
def test_tampered_checkpoint_raises_naming_the_key(round_trip, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    _, _, base = round_trip
    src = base / "native-seed-cached"
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.1.mlp.down_proj.sign"][0, 0] = 3
    save_file(tensors, str(weights), metadata={"format": "pt"})
    from transformers import AutoModelForCausalLM

    qins.register_with_transformers()
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.*sign: values must be -1 or \+1, got 3"):
        AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)


def test_loading_in_a_dtype_casts_floats_and_persistent_buffers_only() -> None:
    """What ``from_pretrained(torch_dtype=...)`` applies after the QINS layers are rebuilt (in process)."""
    from qins.integrations.transformers.quantizer import _cast_saved_tensors

    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    convert_model_to_projective(model, skip=("1",))
    model[1].register_buffer("persistent", torch.ones(3))
    model[1].register_buffer("inv_freq", torch.ones(3), persistent=False)
    model[1].register_buffer("steps", torch.arange(3))
    model[1].register_parameter("index", torch.nn.Parameter(torch.arange(4), requires_grad=False))
    qins_layer = model[0]
    codes, log_max = qins_layer.stored.clone(), qins_layer.log_max.clone()
    _cast_saved_tensors(model, torch.bfloat16)
    assert model[1].weight.dtype == model[1].bias.dtype == model[1].persistent.dtype == torch.bfloat16
    assert model[1].inv_freq.dtype == torch.float32 and model[1].steps.dtype == torch.int64
    assert model[1].index.dtype == torch.int64  # integer parameters keep their dtype
    assert qins_layer.bias.dtype == qins_layer._cached_weight.dtype == torch.bfloat16  # cache re-decoded
    assert qins_layer.log_max.dtype == torch.float32 and torch.equal(qins_layer.log_max, log_max)
    assert torch.equal(qins_layer.stored, codes)
    assert torch.equal(qins_layer._cached_weight, qins_layer.decode_weight().to(torch.bfloat16))


@pytest.mark.parametrize("version, supported", [("4.43.9", False), ("4.44.0", True), ("4.44", True), ("5.99.1", True),
                                                ("6.0.0", False), ("7.1", False)])
def test_save_pretrained_support_is_transformers_4_44_up_to_6(monkeypatch, version: str, supported: bool) -> None:
    import transformers

    from qins.integrations.transformers.config import transformers_version

    monkeypatch.setattr(transformers, "__version__", version)
    if supported:
        assert str(transformers_version()) == str(Version(version))
        return
    with pytest.raises(qins.UnsupportedTransformersError) as info:
        transformers_version()
    assert str(info.value) == (f"qins cannot save/load QINS models with transformers {version} (supported: >=4.44,<6); "
                               "use qins.save/qins.load (plain safetensors) instead")
