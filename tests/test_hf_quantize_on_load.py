"""Quantize on load: ``from_pretrained(src, quantization_config=qins.QinsHfConfig(...))``
on a full-precision checkpoint, against load-then-convert, on the installed transformers (the nox
matrix runs this file under every supported version); and the checks of the checkpoint's tensor
names against the ``skip`` list, before any weight loads."""
from __future__ import annotations

import json

import pytest
import torch

import qins
import qins.hf_config
from qins import ProjectiveLinear, QinsConfig, convert_model_to_projective
from qins.integrations.transformers import load as hf_load
from qins.testing.models import tiny_llama, tiny_phi3

pytest.importorskip("transformers")


def _load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)


_DEFAULT_CONFIG = QinsConfig()


def _hf_config(config: QinsConfig = _DEFAULT_CONFIG, **kwargs):
    return qins.QinsHfConfig(packed=config.packed, log_range=config.log_range, per_row=config.per_row,
                             spacing=config.spacing, **kwargs)


def _assert_same_state(got, want) -> None:
    a, b = got.state_dict(), want.state_dict()
    assert sorted(a) == sorted(b)
    for key, value in b.items():
        assert a[key].dtype == value.dtype and torch.equal(a[key], value), key


def _checkpoint(tmp_path, dtype=torch.float32, shard: str | None = None, factory=tiny_llama, **kwargs):
    model = factory(hidden_size=32, num_hidden_layers=2, vocab_size=64, **kwargs).to(dtype)
    path = tmp_path / f"src-{str(dtype).removeprefix('torch.')}"
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


@pytest.mark.slow  # six loads of a checkpoint, each checked against a conversion
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_quantize_on_load_gives_the_codes_and_logs_of_load_then_convert(tmp_path, dtype, shard) -> None:
    path = _checkpoint(tmp_path, dtype, shard)
    if shard:
        assert (path / "model.safetensors.index.json").is_file()
    quantized = _load(path, quantization_config=_hf_config())
    reference = _load(path)
    convert_model_to_projective(reference, QinsConfig())
    assert isinstance(quantized.model.layers[1].mlp.down_proj, ProjectiveLinear)
    assert type(quantized.lm_head) is torch.nn.Linear  # skipped by default, as by the conversion
    _assert_same_state(quantized, reference)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("config", [QinsConfig(), QinsConfig(packed=False, per_row=False)],
                         ids=["packed-row", "split-tensor"])
@pytest.mark.parametrize("cache_weight", [True, False])
def test_quantize_on_load_follows_the_config_skip_list_and_cache_mode(tmp_path, config, cache_weight) -> None:
    path = _checkpoint(tmp_path, torch.bfloat16, factory=tiny_phi3)
    skip = ["lm_head", "*.o_proj"]
    quantized = _load(path, quantization_config=_hf_config(config, skip=skip, cache_weight=cache_weight))
    reference = _load(path)
    report = convert_model_to_projective(reference, config, skip=skip, cache_weight=cache_weight)
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, ProjectiveLinear)}
    assert sorted(layers) == sorted(report.converted)
    assert all(m.config == config and m.cache_weight is cache_weight for m in layers.values())
    _assert_same_state(quantized, reference)
    assert all((m._cached_weight is not None) is cache_weight for m in layers.values())


def test_a_model_quantized_on_load_saves_and_reloads_like_any_qins_model(tmp_path) -> None:
    path = _checkpoint(tmp_path, torch.bfloat16, "20KB")
    quantized = _load(path, quantization_config=_hf_config(cache_weight=False))
    quantized.save_pretrained(tmp_path / "qins")
    saved = json.loads((tmp_path / "qins" / "config.json").read_text())["quantization_config"]
    assert saved == qins.hf_config.quantization_config_dict(QinsConfig(), ["lm_head"], False)
    again = _load(tmp_path / "qins")
    _assert_same_state(again, quantized)


def test_the_config_class_is_exported_from_qins_with_the_qins_fields() -> None:
    config_cls, _ = qins.register_with_transformers()
    assert qins.QinsHfConfig is config_cls
    c = qins.QinsHfConfig(packed=False, per_row=False, skip=["lm_head", "*.o_proj"], cache_weight=False)
    assert c.qins_config == QinsConfig(packed=False, per_row=False)
    assert c.skip == ["lm_head", "*.o_proj"] and c.cache_weight is False
    with pytest.raises(AttributeError, match="no attribute 'NotThere'"):
        qins.NotThere  # noqa: B018


def test_a_non_finite_weight_is_refused_naming_the_layer(tmp_path) -> None:
    model = tiny_llama(hidden_size=32, num_hidden_layers=1, vocab_size=64)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[1, 2] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    with pytest.raises(ValueError, match=r"cannot quantize layer 'model\.layers\.0\.mlp\.up_proj' while loading: "):
        _load(tmp_path / "nan", quantization_config=_hf_config())


# --- the checkpoint against the skip list, before any weight loads ---------------------------------


def _edit_quantization_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture
def no_weight_loads(monkeypatch):
    """Fail the test if any QINS layer gets a tensor from the checkpoint, or any weight is quantized."""
    def refuse(*args, **kwargs):
        raise AssertionError("a weight was loaded before the checkpoint was checked")

    monkeypatch.setattr(hf_load, "install_encoded", refuse)
    return refuse


def test_a_skip_entry_naming_a_layer_the_checkpoint_stores_in_qins_is_refused(tmp_path) -> None:
    model = tiny_llama(hidden_size=32, num_hidden_layers=1, vocab_size=64)
    convert_model_to_projective(model, QinsConfig())
    model.save_pretrained(tmp_path / "q")
    _edit_quantization_config(tmp_path / "q", skip=["lm_head", "*.down_proj"])
    with pytest.raises(ValueError,
                       match=r"^quantization_config field 'skip' does not match the checkpoint: entry "
                             r"'\*\.down_proj' leaves layer 'model\.layers\.0\.mlp\.down_proj' unconverted, "
                             r"but the checkpoint stores it in QINS \('model\.layers\.0\.mlp\.down_proj\."
                             r"stored'\); remove '\*\.down_proj' from 'skip' in config\.json$"):
        _load(tmp_path / "q")


def test_a_layer_the_checkpoint_stores_plainly_but_skip_does_not_name_is_refused(tmp_path) -> None:
    model = tiny_llama(hidden_size=32, num_hidden_layers=1, vocab_size=64)
    convert_model_to_projective(model, QinsConfig(), skip=["lm_head", "*.o_proj"])
    model.save_pretrained(tmp_path / "q")
    _edit_quantization_config(tmp_path / "q", skip=["lm_head"])
    layer = "model.layers.0.self_attn.o_proj"
    with pytest.raises(ValueError, match=rf"^quantization_config field 'skip' does not match the checkpoint: layer "
                                         rf"'{layer}' is stored as a plain weight \('{layer}\.weight'\), not in QINS; "
                                         rf"add '{layer}' to 'skip' in config\.json$"):
        _load(tmp_path / "q")


def test_quantize_on_load_refuses_a_checkpoint_without_a_weight_to_quantize(tmp_path, no_weight_loads) -> None:
    from safetensors.torch import load_file, save_file

    path = _checkpoint(tmp_path, torch.bfloat16)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.gate_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^the checkpoint has no 'model\.layers\.1\.mlp\.gate_proj\.weight' to "
                                         r"quantize; add 'model\.layers\.1\.mlp\.gate_proj' to the QINS config's "
                                         r"'skip' list to leave that layer as it is$"):
        _load(path, quantization_config=_hf_config())


def test_the_checks_run_on_the_files_before_the_weights_load(tmp_path, no_weight_loads) -> None:
    """The quantizer's before-loading hook reads the safetensors headers itself (5.x hands it the
    files; 4.x, the local directory the config came from) and refuses there."""
    model = tiny_llama(hidden_size=32, num_hidden_layers=1, vocab_size=64)
    convert_model_to_projective(model, QinsConfig(), skip=["lm_head", "*.o_proj"])
    model.save_pretrained(tmp_path / "q")
    config_cls, quantizer_cls = qins.register_with_transformers()
    quantizer = quantizer_cls(config_cls(skip=["lm_head"]), pre_quantized=True)
    skeleton = tiny_llama(hidden_size=32, num_hidden_layers=1, vocab_size=64)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.o_proj' is stored as a plain weight"):
        quantizer._process_model_before_weight_loading(
            skeleton, checkpoint_files=[str(tmp_path / "q" / "model.safetensors")])
    on_load = quantizer_cls(config_cls(skip=["lm_head"]), pre_quantized=False)
    skeleton = tiny_llama(hidden_size=32, num_hidden_layers=1, vocab_size=64)
    with pytest.raises(ValueError,
                       match=r"^the checkpoint has no 'model\.layers\.0\.mlp\.down_proj\.weight' to quantize "
                             r"\(it holds QINS codes for it: give config\.json its quantization_config instead\)"):
        on_load._process_model_before_weight_loading(
            skeleton, checkpoint_files=[str(tmp_path / "q" / "model.safetensors")])


@pytest.mark.slow  # reads SmolLM2's GGUF metadata
def test_transformers_refuses_a_gguf_file_with_a_qins_config_so_gguf_goes_load_then_convert() -> None:
    """The documented boundary: transformers (every version in the matrix) refuses ``gguf_file=``
    together with any ``quantization_config``, before a weight loads; a GGUF model is loaded, then
    converted (the real-LM suites do exactly that)."""
    pytest.importorskip("gguf")
    from qins.testing.real_lm import MissingRealAsset, smollm2_path

    try:
        folder, name = smollm2_path()
    except MissingRealAsset as exc:
        pytest.skip(str(exc))
    with pytest.raises(ValueError, match="cannot combine Quantization and loading a model from a GGUF file"):
        _load(folder, gguf_file=name, quantization_config=qins.QinsHfConfig())
