"""The QINS quantizer's hooks, called directly as transformers calls them, for the 4.x and the 5.x
loader (``qins.integrations.transformers.quantizer.build_classes(major)``), on this transformers.

``tests/test_persistence.py`` runs whole ``from_pretrained`` loads on the installed transformers
(and the version matrix on 4.44-4.57); these pin each hook's contract, including the 4.x-only ones
(dtype handling, ``create_quantized_param``), without a 4.x install.
"""
from __future__ import annotations

import logging

import pytest
import torch

from qins import ProjectiveLinear, QinsConfig, convert_model_to_projective
from qins.integrations.transformers import quantizer as hf_quantizer
from qins.integrations.transformers import registration
from qins.state import CODE_BUFFERS
from tests.strategies import tiny_phi3

_DEFAULT_CONFIG = QinsConfig()


def _quantizer(major: int, *, skip=("lm_head",), cache_weight: bool = True, config: QinsConfig = _DEFAULT_CONFIG):
    config_cls, quantizer_cls = hf_quantizer.build_classes(major)
    hf_config = config_cls(packed=config.packed, log_range=config.log_range, per_row=config.per_row,
                           spacing=config.spacing, skip=list(skip), cache_weight=cache_weight)
    return quantizer_cls(hf_config, pre_quantized=True)


def _model(**kwargs):
    return tiny_phi3(hidden_size=16, num_hidden_layers=1, vocab_size=40, num_attention_heads=2, **kwargs)


def _converted(**kwargs):
    model = _model()
    convert_model_to_projective(model, QinsConfig(), **kwargs)
    return model


LAYER = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("name", ["update_dtype", "update_torch_dtype"])
@pytest.mark.parametrize("given, loads_in, cast_after", [
    (torch.bfloat16, torch.float32, torch.bfloat16),
    ("bfloat16", torch.float32, torch.bfloat16),
    (torch.float16, torch.float32, torch.float16),
    (torch.float32, torch.float32, None),
    ("float32", torch.float32, None),
    ("auto", "auto", None),
    (None, None, None),
])
def test_transformers_4_loads_in_float32_and_casts_after_so_the_logs_are_never_cast(
        name, given, loads_in, cast_after) -> None:
    quantizer = _quantizer(4)
    assert getattr(quantizer, name)(given) == loads_in
    assert quantizer._target_dtype == cast_after


@pytest.mark.parametrize("given, expected", [(torch.bfloat16, torch.bfloat16), ("bfloat16", torch.bfloat16),
                                             (torch.float32, torch.float32), ("auto", "auto"), (None, None)])
def test_transformers_5_loads_in_the_dtype_asked_for(given, expected) -> None:
    quantizer = _quantizer(5)
    assert quantizer.update_dtype(given) == expected and quantizer.update_torch_dtype(given) == expected
    assert quantizer._target_dtype is None


@pytest.mark.parametrize("major", [4, 5])
def test_only_the_qins_buffers_of_qins_layers_are_the_quantizers_to_load(major: int) -> None:
    model = _converted()
    quantizer = _quantizer(major)
    qins_names = [f"{LAYER}.{n}" for n in ("stored", "sign", "log_min", "log_max")]
    others = ["model.norm.weight", "lm_head.weight", f"{LAYER}.bias", "model.layers.0.input_layernorm.weight",
              "model.nowhere.stored", "stored"]
    for name in qins_names:
        assert quantizer.check_quantized_param(model, None, name) is True
        assert quantizer.param_needs_quantization(model, name) is (major < 5)  # 5.x loads them itself
    for name in others:
        assert quantizer.check_quantized_param(model, None, name) is False
        assert quantizer.param_needs_quantization(model, name) is False


def test_create_quantized_param_installs_the_tensor_as_it_is_in_the_file() -> None:
    model = _converted()
    quantizer = _quantizer(4)
    layer = model.get_submodule(LAYER)
    codes = torch.randint(0, 256, layer.stored.shape, dtype=torch.uint8)
    quantizer.create_quantized_param(model, codes, f"{LAYER}.stored")  # the device defaults to the CPU
    assert layer.stored is not codes and torch.equal(layer.stored, codes) and layer.stored.dtype == torch.uint8
    log_max = torch.full_like(layer.log_max, 0.25)
    quantizer.create_quantized_param(model, log_max, f"{LAYER}.log_max", torch.device("meta"))
    assert layer.log_max.is_meta and layer.log_max.dtype == torch.float32 and layer.log_max.shape == log_max.shape


def test_a_log_cast_by_the_loader_is_refused_naming_the_key_and_the_fix() -> None:
    model = _converted()
    quantizer = _quantizer(4)
    layer = model.get_submodule(LAYER)
    before = layer.log_min
    with pytest.raises(ValueError,
                       match=rf"^{LAYER}\.log_min: transformers cast the float32 QINS log to torch\.bfloat16 "
                             r"while loading; pass torch_dtype=<a torch\.dtype> \(not 'auto'\) to from_pretrained$"):
        quantizer.create_quantized_param(model, layer.log_min.to(torch.bfloat16), f"{LAYER}.log_min", "cpu")
    assert layer.log_min is before
    stored = layer.stored.to(torch.int64)  # only the logs are checked for a cast
    quantizer.create_quantized_param(model, stored, f"{LAYER}.stored", "cpu")
    assert layer.stored.dtype == torch.int64


@pytest.mark.parametrize("prefix", ["", "model"])
def test_a_checkpoint_missing_qins_buffers_is_refused_others_pass_through(prefix: str) -> None:
    """With a prefix, transformers loads into the base model (``model.model``) keys named with it."""
    model = _converted()
    target = model.model if prefix else model
    quantizer = _quantizer(5)
    plain = ["model.norm.weight", "lm_head.weight"]
    assert quantizer.update_missing_keys(target, list(plain), prefix) == plain
    key = f"{LAYER}.log_max"
    with pytest.raises(ValueError, match=rf"^QINS checkpoint is missing \['{key}'\]: the quantization_config's skip "
                                         r"list does not match the saved layers$"):
        quantizer.update_missing_keys(target, [key, *plain], prefix)


def test_missing_keys_named_with_the_prefix_are_found_in_the_whole_model_too() -> None:
    """transformers may pass the full model with a prefix its keys carry: the key as it is names the layer."""
    model = _converted()
    key = f"{LAYER}.log_max"
    with pytest.raises(ValueError, match=rf"^QINS checkpoint is missing \['{key}'\]"):
        _quantizer(5).update_missing_keys(model, [key], "model")


def test_only_the_dot_after_the_prefix_is_stripped() -> None:
    """A module whose name starts with a capital X (or any letter) keeps it once the prefix is removed."""
    model = torch.nn.Module()
    model.base = torch.nn.Module()
    model.base.Xproj = ProjectiveLinear.from_linear(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"^QINS checkpoint is missing \['base\.Xproj\.stored'\]"):
        _quantizer(5).update_missing_keys(model.base, ["base.Xproj.stored"], "base")


def test_a_long_list_of_missing_buffers_names_four_and_says_there_are_more() -> None:
    model = _converted()
    quantizer = _quantizer(5)
    names = [f"{LAYER}.{n}" for n in ("stored", "sign", "log_min", "log_max")]
    with pytest.raises(ValueError, match=r"^QINS checkpoint is missing \[[^]]*\]: "):
        quantizer.update_missing_keys(model, names, "")
    q_proj = "model.layers.0.self_attn.qkv_proj.stored"
    with pytest.raises(ValueError) as info:
        quantizer.update_missing_keys(model, [*names, q_proj], "")
    assert str(info.value).startswith(f"QINS checkpoint is missing {names!r} ...: ")


@pytest.mark.parametrize("cache_weight", [True, False])
def test_before_loading_the_model_gets_qins_layers_of_the_configs_format(cache_weight: bool, caplog) -> None:
    model = _model()
    config = QinsConfig(packed=False, log_range="minmax", per_row=False, spacing="log")
    quantizer = _quantizer(5, skip=("lm_head", "*.o_proj"), cache_weight=cache_weight, config=config)
    registration.register_with_transformers()  # the first registration in a process logs a record of its own
    with caplog.at_level(logging.DEBUG, logger="qins.integrations.transformers.quantizer"):
        quantizer._process_model_before_weight_loading(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ProjectiveLinear)}
    assert sorted(layers) == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_up_proj",
                              "model.layers.0.self_attn.qkv_proj"]
    assert all(m.config == config and m.cache_weight is cache_weight for m in layers.values())
    assert [r.getMessage() for r in caplog.records if r.name == "qins.integrations.transformers.quantizer"] == [
        "qins: rebuilt 3 QINS layers before loading"]


def _loaded(major: int):
    """A converted model as the loader leaves it: buffers marked loaded (5.x), caches stale."""
    model = _converted(cache_weight=True)
    for layer in model.modules():
        if isinstance(layer, ProjectiveLinear):
            for n in CODE_BUFFERS:
                if getattr(layer, n) is not None:  # packed: no separate sign; per-row ranges: no row table
                    getattr(layer, n)._is_hf_initialized = True
            layer._cached_weight = torch.zeros_like(layer._cached_weight)
    return model


@pytest.mark.parametrize("major", [4, 5])
def test_after_loading_every_layer_is_checked_and_its_cache_decoded_again(major: int) -> None:
    model = _loaded(major)
    quantizer = _quantizer(major)
    assert quantizer._process_model_after_weight_loading(model) is model
    for layer in model.modules():
        if isinstance(layer, ProjectiveLinear):
            assert layer._cached_weight is not None and layer._cached_weight.abs().sum() > 0
            torch.testing.assert_close(layer._cached_weight, layer.decode_weight(), rtol=0, atol=0)
    assert model.config.torch_dtype in (None, torch.float32, "float32")


@pytest.mark.parametrize("major", [4, 5])
def test_after_loading_a_buffer_still_on_meta_is_named_as_missing(major: int) -> None:
    model = _loaded(major)
    layer = model.get_submodule(LAYER)
    layer._buffers["stored"] = torch.empty_like(layer.stored, device="meta")
    with pytest.raises(ValueError,
                       match=rf"^QINS checkpoint is missing \['{LAYER}\.stored'\]: the quantization_config's "
                             r"skip list does not match the saved layers$"):
        _quantizer(major)._process_model_after_weight_loading(model)


def test_after_a_5x_load_a_buffer_the_loader_did_not_mark_is_named_as_missing() -> None:
    model = _loaded(5)
    del model.get_submodule(LAYER).log_min._is_hf_initialized
    with pytest.raises(ValueError, match=rf"^QINS checkpoint is missing \['{LAYER}\.log_min'\]"):
        _quantizer(5)._process_model_after_weight_loading(model)
    model = _loaded(4)
    del model.get_submodule(LAYER).log_min._is_hf_initialized
    _quantizer(4)._process_model_after_weight_loading(model)  # 4.x does not mark them


@pytest.mark.parametrize("major", [4, 5])
def test_after_loading_a_bad_layer_is_refused_naming_it(major: int) -> None:
    model = _loaded(major)
    layer = model.get_submodule(LAYER)
    layer._buffers["log_max"] = layer.log_min - 1.0  # log_max below log_min
    layer.log_max._is_hf_initialized = True
    with pytest.raises(ValueError, match=rf"^QINS checkpoint, layer {LAYER}: "):
        _quantizer(major)._process_model_after_weight_loading(model)


def test_after_loading_a_dtype_marker_left_on_meta_is_rebuilt_beside_the_codes() -> None:
    model = _loaded(5)
    layer = model.get_submodule(LAYER)
    layer._dtype_marker = torch.empty(0, dtype=torch.bfloat16, device="meta")  # a 5.x load in bfloat16
    _quantizer(5)._process_model_after_weight_loading(model)
    assert not layer._dtype_marker.is_meta and layer._dtype_marker.device == layer.stored.device
    assert layer._dtype_marker.dtype == torch.bfloat16 and layer._dtype_marker.numel() == 0
    assert layer.compute_dtype == torch.bfloat16 and layer._cached_weight.dtype == torch.bfloat16


def test_a_4x_load_in_bfloat16_is_cast_after_loading_with_the_logs_kept_in_float32() -> None:
    model = _loaded(4)
    quantizer = _quantizer(4)
    assert quantizer.update_dtype(torch.bfloat16) == torch.float32
    quantizer._process_model_after_weight_loading(model)
    layer = model.get_submodule(LAYER)
    assert layer.compute_dtype == torch.bfloat16 and layer._cached_weight.dtype == torch.bfloat16
    assert layer.log_min.dtype == torch.float32 and layer.log_max.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    dtype_attrs = [a for a in ("torch_dtype", "dtype") if a in vars(model.config) or hasattr(type(model.config), a)]
    assert dtype_attrs and all(getattr(model.config, a) == torch.bfloat16 for a in dtype_attrs)


@pytest.mark.parametrize("major", [4, 5])
def test_after_loading_a_log_of_the_wrong_shape_is_named_as_a_shape_error(major: int) -> None:
    """The layers' own format is the reference: a per-tensor log in a per-row layer is a shape error
    of that key, not a guess at another format from the shapes."""
    model = _loaded(major)
    layer = model.get_submodule(LAYER)
    layer._buffers["log_min"] = layer.log_min.min().reshape(())
    layer.log_min._is_hf_initialized = True
    rows = layer.config.shared_tables or layer.out_features  # the layer's log shape: its tables, or its rows
    with pytest.raises(ValueError,
                       match=rf"^QINS checkpoint, layer {LAYER}: log_min: shape must be \({rows},\), got \(\)$"):
        _quantizer(major)._process_model_after_weight_loading(model)


@pytest.mark.parametrize("major", [4, 5])
def test_the_quantizer_says_serializable_compileable_and_not_trainable(major: int) -> None:
    """What ``save_pretrained``, ``torch.compile`` and the trainer ask the quantizer, asked directly
    (``is_serializable`` is a method, with or without ``safe_serialization``)."""
    quantizer = _quantizer(major)
    assert quantizer.is_serializable() is True and quantizer.is_serializable(safe_serialization=True) is True
    assert quantizer.is_compileable is True and quantizer.is_trainable is False


def test_a_model_loaded_from_a_qins_checkpoint_saves_again_unchanged(tmp_path) -> None:
    """``from_pretrained`` attaches the quantizer to the model; ``save_pretrained`` asks it whether
    the model can be saved (``is_serializable``): a loaded QINS model re-saves, buffers unchanged."""
    from transformers import AutoModelForCausalLM

    model = _converted()
    model.save_pretrained(tmp_path / "first")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "first", local_files_only=True)
    assert getattr(loaded, "hf_quantizer", None) is not None
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", local_files_only=True)
    want, got = model.state_dict(), again.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
