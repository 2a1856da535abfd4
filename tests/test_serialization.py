"""qins.save / qins.load (plain safetensors) and torch.save/torch.load(weights_only=True) of QINS models."""
from __future__ import annotations

import io
import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import qins
from qins import ProjectiveLinear, QinsConfig, convert_model_to_projective
from tests.strategies import biased_mlp, tiny_phi3, tiny_phi3_config

IDS = torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(3))
CONFIGS = [QinsConfig(), QinsConfig.codec_compatible()]
CONFIG_IDS = ["default", "seed"]


def _converted(config: QinsConfig, seed: int = 0, cache_weight: bool = True, **kw) -> nn.Module:
    model = tiny_phi3(seed=seed, **kw)
    convert_model_to_projective(model, config, cache_weight=cache_weight)
    return model


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


def _snapshot(model: nn.Module) -> tuple[list, dict]:
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _unchanged(model: nn.Module, before: tuple[list, dict]) -> bool:
    types, state = _snapshot(model)
    return (
        types == before[0]
        and state.keys() == before[1].keys()
        and all(torch.equal(state[k], before[1][k]) for k in state)
    )


@pytest.mark.slow
@pytest.mark.parametrize("cache_weight", [True, False], ids=["cached", "memory_saving"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_save_then_load_into_a_converted_model_is_bit_identical(
    tmp_path: Path, config: QinsConfig, cache_weight: bool
) -> None:
    source = _converted(config, cache_weight=cache_weight)
    qins.save(source, tmp_path / "m.safetensors")
    target = _converted(config, seed=1, cache_weight=cache_weight)
    assert qins.load(target, tmp_path / "m.safetensors") is target
    assert torch.equal(_logits(target), _logits(source))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value) and target.state_dict()[key].dtype == value.dtype


@pytest.mark.parametrize("cache_weight", [True, False], ids=["cached", "memory_saving"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_load_into_a_plain_skeleton_converts_the_listed_layers_to_the_recorded_format(
    tmp_path: Path, config: QinsConfig, cache_weight: bool
) -> None:
    source = _converted(config, cache_weight=cache_weight)
    qins.save(source, tmp_path / "m.safetensors")
    skeleton = tiny_phi3(seed=7)
    qins.load(skeleton, tmp_path / "m.safetensors")
    kinds = {
        n: (type(m), getattr(m, "config", None), getattr(m, "cache_weight", None)) for n, m in skeleton.named_modules()
    }
    assert kinds == {
        n: (type(m), getattr(m, "config", None), getattr(m, "cache_weight", None)) for n, m in source.named_modules()
    }
    assert isinstance(skeleton.lm_head, nn.Linear) and not isinstance(skeleton.lm_head, ProjectiveLinear)
    assert torch.equal(_logits(skeleton), _logits(source))


@pytest.mark.slow
def test_tied_embeddings_are_written_once_and_stay_tied(tmp_path: Path) -> None:
    source = _converted(QinsConfig(), tie_word_embeddings=True)
    qins.save(source, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["qins.aliases"]) == {"lm_head.weight": "model.embed_tokens.weight"}
    target = tiny_phi3(seed=2, tie_word_embeddings=True)
    qins.load(target, tmp_path / "m.safetensors")
    assert target.lm_head.weight is target.model.embed_tokens.weight
    assert torch.equal(_logits(target), _logits(source))


def test_the_file_holds_only_tensors_and_string_metadata(tmp_path: Path) -> None:
    qins.save(_converted(QinsConfig.codec_compatible()), tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    meta = header.pop("__metadata__")
    assert meta["qins.format_version"] == "2" and all(isinstance(v, str) for v in meta.values())
    assert meta["format"] == "pt"  # what safetensors/transformers readers check for torch tensors
    layers = json.loads(meta["qins.layers"])
    assert layers["model.layers.0.mlp.down_proj"] == {
        "packed": False,
        "per_row": False,
        "log_range": "minmax",
        "spacing": "log",
        "cache_weight": True,
    }
    assert header["model.layers.0.mlp.down_proj.stored"]["dtype"] == "U8"
    assert header["model.layers.0.mlp.down_proj.sign"]["dtype"] == "I8"
    assert header["model.layers.0.mlp.down_proj.log_min"] == {
        **header["model.layers.0.mlp.down_proj.log_min"],
        "dtype": "F32",
        "shape": [],
    }


def _rewrite(
    src: Path,
    dst: Path,
    tensors: Callable[[dict], None] = lambda t: None,
    meta: Callable[[dict], None] = lambda m: None,
) -> Path:
    with safe_open(str(src), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = dict(f.metadata())
    tensors(t)
    meta(m)
    save_file(t, str(dst), metadata=m)
    return dst


LAST = "model.layers.1.mlp.down_proj"
# (id, tensor edit, metadata edit, expected message): every bad file leaves the model as it was.
BAD_FILES = [
    (
        "plain-safetensors",
        None,
        lambda m: m.clear(),
        r"not a qins file \(no 'qins.format_version' in the safetensors metadata\); for a plain state_dict use "
        r"model.load_state_dict",
    ),
    ("future-version", None, lambda m: m.update({"qins.format_version": "99"}), "format version '99' is not supported"),
    ("corrupt-layers-json", None, lambda m: m.update({"qins.layers": "{oops"}), "corrupt qins metadata"),
    ("layers-missing", None, lambda m: m.pop("qins.layers"), r"corrupt qins metadata \(Expecting value"),
    (
        "layers-a-list",
        None,
        lambda m: m.update({"qins.layers": "[]"}),
        r"corrupt qins metadata \('qins.layers'/'qins.aliases' must be JSON objects\)",
    ),
    (
        "aliases-a-list",
        None,
        lambda m: m.update({"qins.aliases": "[]"}),
        r"corrupt qins metadata \('qins.layers'/'qins.aliases' must be JSON objects\)",
    ),
    (
        "alias-to-nothing",
        None,
        lambda m: m.update({"qins.aliases": '{"x.weight": "nope"}'}),
        r"alias 'x.weight' points to missing tensor 'nope'",
    ),
    (
        "bad-log-range",
        None,
        lambda m: m.update({"qins.layers": m["qins.layers"].replace('"minmax"', '"median"', 1)}),
        r"layer 'model.layers.0.mlp.down_proj': bad format entry",
    ),
    (
        "cache-weight-a-string",
        None,
        lambda m: m.update(
            {"qins.layers": m["qins.layers"].replace('"cache_weight": true', '"cache_weight": "yes"', 1)}
        ),
        r"bad format entry .*\(cache_weight must be bool, got 'yes'\)",
    ),
    (
        "layer-is-a-norm",
        None,
        lambda m: m.update({"qins.layers": m["qins.layers"].replace("model.layers.0.mlp.down_proj", "model.norm", 1)}),
        r"layer 'model.norm' is a Phi3RMSNorm, not nn.Linear or ProjectiveLinear",
    ),
    (
        "unknown-layer",
        None,
        lambda m: m.update({"qins.layers": m["qins.layers"].replace("model.layers.0.mlp.down_proj", "model.nope", 1)}),
        "layer 'model.nope' is not in the model",
    ),
    (
        "sign-three-in-last-layer",
        lambda t: t[LAST + ".sign"].index_fill_(1, torch.tensor([0]), 3),
        None,
        r"down_proj.*sign: values must be -1 or \+1, got 3",
    ),
    (
        "swapped-logs-in-last-layer",
        lambda t: t.update({LAST + ".log_min": t[LAST + ".log_max"].clone() + 1}),
        None,
        "log_min > log_max",
    ),
    (
        "float-codes",
        lambda t: t.update({LAST + ".stored": t[LAST + ".stored"].float()}),
        None,
        "stored: dtype must be torch.uint8",
    ),
    ("missing-sign", lambda t: t.pop(LAST + ".sign"), None, r"missing \['model.layers.1.mlp.down_proj.sign'\]"),
    (
        "wrong-embedding-shape",
        lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:-1]}),
        None,
        r"model.embed_tokens.weight: shape must be \(1000, 64\)",
    ),
    ("unexpected-key", lambda t: t.update({"extra.weight": torch.zeros(2)}), None, r"unexpected \['extra.weight'\]"),
    ("missing-norm", lambda t: t.pop("model.norm.weight"), None, r"missing \['model.norm.weight'\]"),
]


@pytest.mark.parametrize("converted", [True, False], ids=["into-converted", "into-skeleton"])
@pytest.mark.parametrize("name, edit_tensors, edit_meta, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_raises_value_error_and_leaves_the_model_exactly_as_it_was(
    tmp_path: Path, name, edit_tensors, edit_meta, message, converted: bool
) -> None:
    qins.save(_converted(QinsConfig.codec_compatible()), tmp_path / "good.safetensors")
    bad = _rewrite(
        tmp_path / "good.safetensors",
        tmp_path / "bad.safetensors",
        edit_tensors or (lambda t: None),
        edit_meta or (lambda m: None),
    )
    model = _converted(QinsConfig.codec_compatible(), seed=4) if converted else tiny_phi3(seed=4)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        qins.load(model, bad)
    assert _unchanged(model, before)


def test_loading_another_format_into_a_converted_model_fails_before_anything_changes(tmp_path: Path) -> None:
    qins.save(_converted(QinsConfig()), tmp_path / "m.safetensors")
    model = _converted(QinsConfig.codec_compatible(), seed=4)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="state is packed.*layer is split"):
        qins.load(model, tmp_path / "m.safetensors")
    assert _unchanged(model, before)


def test_a_converted_layer_the_file_does_not_list_is_refused(tmp_path: Path) -> None:
    source = tiny_phi3()
    convert_model_to_projective(source, skip=("lm_head", "*.o_proj"))
    qins.save(source, tmp_path / "m.safetensors")
    model = _converted(QinsConfig(), seed=4)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"QINS layers \['model.layers.0.self_attn.o_proj'"):
        qins.load(model, tmp_path / "m.safetensors")
    assert _unchanged(model, before)


@pytest.mark.slow
def test_meta_skeleton_with_non_persistent_buffers_is_refused_before_anything_changes(tmp_path: Path) -> None:
    from transformers import Phi3ForCausalLM

    qins.save(_converted(QinsConfig()), tmp_path / "m.safetensors")
    with torch.device("meta"):
        model = Phi3ForCausalLM(tiny_phi3_config())
    types = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match="non-persistent buffers.*rotary_emb.inv_freq"):
        qins.load(model, tmp_path / "m.safetensors")
    assert [(n, type(m)) for n, m in model.named_modules()] == types


@pytest.mark.slow
@pytest.mark.parametrize("metadata", [True, False], ids=["with-metadata", "metadata-stripped"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_torch_save_state_dict_loads_with_weights_only(config: QinsConfig, metadata: bool) -> None:
    source = _converted(config)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    if not metadata:
        state = OrderedDict(state)  # a plain mapping: the format is read from the keys and shapes
        assert not hasattr(state, "_metadata")
    target = _converted(config, seed=9)
    target.load_state_dict(state)
    assert torch.equal(_logits(target), _logits(source))
    other = _converted(QinsConfig.codec_compatible() if config.packed else QinsConfig(), seed=9)
    codes = {
        n: {k: v.clone() for k, v in m.state_dict().items()}
        for n, m in other.named_modules()
        if isinstance(m, ProjectiveLinear)
    }
    with pytest.raises(ValueError, match="build the layer with QinsConfig"):
        other.load_state_dict(state)
    # Module.load_state_dict is atomic per QINS layer only (modules before the first QINS layer,
    # e.g. the embedding, are already loaded when it raises); qins.load is atomic for the model.
    for n, m in other.named_modules():
        if isinstance(m, ProjectiveLinear):
            assert all(torch.equal(v, codes[n][k]) for k, v in m.state_dict().items()), n


# ---- found by mutation testing: biased layers, meta skeletons that load, defaults ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("cache_weight", [True, False], ids=["cached", "memory_saving"])
def test_meta_skeleton_of_biased_linears_loads_exactly_on_the_cpu_in_its_dtype(
    tmp_path: Path, cache_weight: bool, dtype: torch.dtype
) -> None:
    source = biased_mlp(seed=1, dtype=dtype)
    convert_model_to_projective(source, QinsConfig(), skip=(), cache_weight=cache_weight)
    qins.save(source, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = biased_mlp(dtype=dtype)
    loaded = qins.load(skeleton, tmp_path / "m.safetensors")
    assert loaded is skeleton
    state, want = loaded.state_dict(), source.state_dict()
    assert state.keys() == want.keys()
    for k in want:
        assert state[k].device.type == "cpu" and state[k].dtype == want[k].dtype and torch.equal(state[k], want[k]), k
    for i in (0, 2):
        layer = loaded[i]
        assert isinstance(layer, ProjectiveLinear) and layer.bias is not None
        assert layer.compute_dtype == dtype and layer.cache_weight == cache_weight
        assert not any(t.is_meta for t in layer.buffers())
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(5)).to(dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    assert qins.model_memory(loaded) == qins.model_memory(source)


def test_a_layer_entry_without_cache_weight_loads_cached(tmp_path: Path) -> None:
    source = biased_mlp(seed=2)
    convert_model_to_projective(source, QinsConfig(), skip=(), cache_weight=False)
    qins.save(source, tmp_path / "m.safetensors")

    def drop_cache_weight(m: dict) -> None:
        layers = json.loads(m["qins.layers"])
        m["qins.layers"] = json.dumps(
            {k: {f: v for f, v in e.items() if f != "cache_weight"} for k, e in layers.items()}
        )

    older = _rewrite(tmp_path / "m.safetensors", tmp_path / "older.safetensors", meta=drop_cache_weight)
    model = qins.load(biased_mlp(), older)
    assert all(isinstance(model[i], ProjectiveLinear) and model[i].cache_weight for i in (0, 2))


def test_a_file_without_aliases_loads(tmp_path: Path) -> None:
    source = biased_mlp(seed=3)
    convert_model_to_projective(source, QinsConfig(), skip=())
    qins.save(source, tmp_path / "m.safetensors")
    bare = _rewrite(tmp_path / "m.safetensors", tmp_path / "bare.safetensors", meta=lambda m: m.pop("qins.aliases"))
    model = qins.load(biased_mlp(), bare)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_key_mismatch_names_the_first_five_missing_and_the_first_five_unexpected_keys(tmp_path: Path) -> None:
    qins.save(_converted(QinsConfig.codec_compatible()), tmp_path / "good.safetensors")
    plain = sorted(
        k for k in _converted(QinsConfig.codec_compatible()).state_dict()
        if "norm" in k or "embed" in k or "lm_head" in k
    )
    assert len(plain) >= 6
    extra = [f"extra.{i}" for i in range(7)]

    def edit(t: dict) -> None:
        for k in plain:
            t.pop(k)
        t.update({k: torch.zeros(1) for k in extra})

    bad = _rewrite(tmp_path / "good.safetensors", tmp_path / "bad.safetensors", tensors=edit)
    with pytest.raises(ValueError) as info:
        qins.load(_converted(QinsConfig.codec_compatible(), seed=4), bad)
    assert f"keys do not match the model: missing {plain[:5]}, unexpected {extra[:5]}" in str(info.value)


def test_aliases_anywhere_in_the_state_are_written_once_sorted_and_every_later_tensor_is_kept(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = nn.Sequential(OrderedDict(z=nn.Linear(4, 4), b=nn.Linear(4, 4), a=nn.Linear(4, 4)))
    model.b.weight = model.z.weight
    model.a.weight = model.z.weight  # state order: z, b (alias), a (alias): not sorted
    qins.save(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {"z.weight", "z.bias", "b.bias", "a.bias"}
    assert meta["qins.aliases"] == '{"a.weight": "z.weight", "b.weight": "z.weight"}'
    torch.manual_seed(7)
    other = nn.Sequential(OrderedDict(z=nn.Linear(4, 4), b=nn.Linear(4, 4), a=nn.Linear(4, 4)))
    qins.load(other, tmp_path / "m.safetensors")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in other.state_dict().items())


def test_saving_a_meta_tensor_is_refused_naming_it(tmp_path: Path) -> None:
    with torch.device("meta"):
        model = biased_mlp()
    with pytest.raises(ValueError, match=r"^cannot save '0.weight': it is on the meta device \(no data\)$"):
        qins.save(model, tmp_path / "m.safetensors")


def test_save_and_load_log_what_they_did_at_debug_level(tmp_path: Path, caplog) -> None:
    source = biased_mlp(seed=8)
    convert_model_to_projective(source, QinsConfig(shared_tables=0), skip=("2",))
    path = tmp_path / "m.safetensors"
    with caplog.at_level("DEBUG", logger="qins.serialization"):
        qins.save(source, path)
        qins.load(biased_mlp(), path)
    messages = [r.getMessage() for r in caplog.records if r.name == "qins.serialization"]
    assert len(source.state_dict()) == 8  # layer 0: stored, logs, bias; the norm; layer 2: weight, bias
    assert messages == [f"saved 8 tensors, 1 QINS layers to {path}", f"loaded {path}: 1 QINS layers (1 converted)"]


def test_meta_skeleton_refusal_lists_the_first_three_stuck_buffers(tmp_path: Path) -> None:
    class WithBuffer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.zeros(2), persistent=False)

    source = nn.Sequential(nn.Linear(4, 4), *[WithBuffer() for _ in range(4)])
    convert_model_to_projective(source, QinsConfig(), skip=())
    qins.save(source, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(4, 4), *[WithBuffer() for _ in range(4)])
    with pytest.raises(ValueError) as info:
        qins.load(skeleton, tmp_path / "m.safetensors")
    assert str(info.value) == (
        "cannot load into this meta-device model: non-persistent buffers ['1.table', '2.table', '3.table'] "
        "have no data and are not in any file; build the model on a real device"
    )


def test_a_version_1_file_loads_its_layers_as_log_spaced(tmp_path) -> None:
    """Files written before the mulaw spacing: format version "1", no "spacing" in the layer entries."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _converted(QinsConfig(spacing="log"))
    qins.save(model, tmp_path / "v2.safetensors")
    with safe_open(str(tmp_path / "v2.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(meta["qins.layers"])
    for entry in layers.values():
        del entry["spacing"]
    meta = meta | {"qins.format_version": "1", "qins.layers": json.dumps(layers)}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=meta)
    loaded = qins.load(tiny_phi3(seed=0), tmp_path / "v1.safetensors")  # a plain skeleton: converted on load
    name = next(iter(layers))
    assert loaded.get_submodule(name).config.spacing == "log"
    assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight)
