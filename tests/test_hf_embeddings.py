"""``save_pretrained`` / ``from_pretrained`` of a model converted with ``embeddings=True``: the QINS
embeddings and the tied head are rebuilt before the weights load, the codes and logs come back bit
for bit, a tied head shares its embedding's codes (one copy in memory and on disk), and the loaded
model gives the same logits and generates with the KV cache."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import qins
from qins import ProjectiveEmbedding, ProjectiveLinear, ProjectiveTiedHead, QinsConfig
from qins.testing.models import tiny_llama, tiny_phi3

CONFIGS = [QinsConfig(), QinsConfig(packed=False, spacing="log")]
CONFIG_IDS = ["packed-mulaw", "split-log"]
MODELS = pytest.mark.parametrize("factory", [tiny_phi3, tiny_llama], ids=["phi3", "llama"])
TIED = pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
BUFFERS = ("stored", "sign", "log_min", "log_max")
IDS = torch.tensor([[5, 6, 7, 900, 3], [1, 2, 999, 4, 0]])


def _from_pretrained(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)


def saved(factory, tie: bool, tmp_path, config: QinsConfig | None = None, **kwargs):
    model = factory(tie_word_embeddings=tie)
    qins.convert_model_to_projective(model, config, embeddings=True, cache_weight=False, **kwargs)
    model.save_pretrained(tmp_path)
    return model


def coded(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (ProjectiveLinear, ProjectiveEmbedding))}


def assert_same_codes(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = coded(a), coded(b)
    assert sorted(left) == sorted(right) and any(isinstance(m, ProjectiveEmbedding) for m in left.values())
    for name, module in left.items():
        other = right[name]
        assert type(other) is type(module) and other.config == module.config, name
        for buf in BUFFERS:
            x, y = getattr(module, buf), getattr(other, buf)
            assert (x is None) == (y is None), (name, buf)
            if x is not None:
                assert x.dtype == y.dtype and torch.equal(x, y), (name, buf)


@MODELS
@TIED
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_round_trip_is_bit_exact_codes_logs_and_logits(factory, tie: bool, config: QinsConfig, tmp_path) -> None:
    model = saved(factory, tie, tmp_path, config)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["embeddings"] is True
    loaded = _from_pretrained(tmp_path)
    assert isinstance(loaded.model.embed_tokens, ProjectiveEmbedding)
    assert type(loaded.lm_head) is (ProjectiveTiedHead if tie else ProjectiveLinear)
    assert_same_codes(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert loaded.config.quantization_config.embeddings is True


@MODELS
def test_a_tied_head_shares_the_embedding_codes_after_reload_one_copy_in_memory_and_on_disk(factory, tmp_path) -> None:
    saved(factory, True, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("lm_head.")]
    loaded = _from_pretrained(tmp_path)
    emb, head = loaded.model.embed_tokens, loaded.lm_head
    assert head.embedding is emb and head.bias is None
    assert head.embedding.stored.data_ptr() == emb.stored.data_ptr()
    assert not [k for k in loaded.state_dict() if k.startswith("lm_head.")]
    storages = {t.untyped_storage().data_ptr() for t in loaded.state_dict().values()}
    assert len(storages) == len(loaded.state_dict())  # nothing stored twice
    again = tmp_path / "again"
    loaded.save_pretrained(again)  # the reloaded model saves the same single copy
    with safe_open(str(again / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("lm_head.")]
    twice = _from_pretrained(again)
    assert twice.lm_head.embedding is twice.model.embed_tokens
    assert_same_codes(loaded, twice)


@TIED
def test_the_loaded_model_generates_with_the_kv_cache_as_the_saved_one(tie: bool, tmp_path) -> None:
    model = saved(tiny_phi3, tie, tmp_path)
    loaded = _from_pretrained(tmp_path)
    ids = torch.randint(3, 1000, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        want = model.generate(ids, use_cache=True, **kw)
        cached = loaded.generate(ids, use_cache=True, **kw)
        uncached = loaded.generate(ids, use_cache=False, **kw)
    assert cached.shape == (2, 11) and torch.equal(cached, want) and torch.equal(cached, uncached)


def test_a_bfloat16_load_keeps_the_codes_and_float32_logs(tmp_path) -> None:
    model = saved(tiny_llama, True, tmp_path)
    loaded = _from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert_same_codes(model, loaded)
    emb = loaded.model.embed_tokens
    assert emb.compute_dtype == torch.bfloat16 and emb.log_min.dtype == torch.float32
    assert loaded.lm_head.embedding is emb
    with torch.no_grad():  # (4.44's Llama upcasts its logits: the hidden states show the compute dtype)
        assert loaded.model(IDS).last_hidden_state.dtype == torch.bfloat16


def test_a_skipped_embedding_stays_a_plain_embedding_and_the_head_a_linear(tmp_path) -> None:
    model = saved(tiny_phi3, False, tmp_path, skip=("model.embed_tokens", "lm_head"))
    loaded = _from_pretrained(tmp_path)
    assert type(loaded.model.embed_tokens) is torch.nn.Embedding and type(loaded.lm_head) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def _edit_config(path, **fields) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in fields.items():
        if value is None:
            config["quantization_config"].pop(key, None)
        else:
            config["quantization_config"][key] = value
    (path / "config.json").write_text(json.dumps(config))


def test_a_checkpoint_with_qins_embeddings_but_no_field_is_refused_naming_the_field(tmp_path) -> None:
    saved(tiny_phi3, True, tmp_path)
    _edit_config(tmp_path, embeddings=None)
    with pytest.raises(ValueError, match=r"stores the embedding 'model.embed_tokens' in QINS .*"
                                         r"set \"embeddings\": true in config.json"):
        _from_pretrained(tmp_path)


def test_a_config_claiming_qins_embeddings_for_plain_weights_is_refused(tmp_path) -> None:
    model = tiny_phi3(tie_word_embeddings=True)
    qins.convert_model_to_projective(model, cache_weight=False)
    model.save_pretrained(tmp_path)
    _edit_config(tmp_path, embeddings=True)
    with pytest.raises(ValueError, match=r"field 'embeddings' does not match the checkpoint: it holds no QINS codes "
                                         r"for the embedding 'model.embed_tokens'"):
        _from_pretrained(tmp_path)


@pytest.mark.parametrize(("fields", "match"), [
    ({"embeddings": "true"}, r"field 'embeddings' must be a JSON boolean"),
    ({"embeddings": True, "per_row": False}, r"field 'embeddings' true needs \"per_row\": true"),
])
def test_bad_embeddings_fields_are_refused_naming_the_field(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        qins.QinsHfConfig(**fields)


def test_the_config_class_records_embeddings_and_its_skip_default_follows_the_conversion() -> None:
    assert qins.QinsHfConfig().to_dict() == qins.hf_config.quantization_config_dict(QinsConfig(), ["lm_head"], True)
    assert "embeddings" not in qins.QinsHfConfig().to_dict()  # configs without the field stay as they were
    with_emb = qins.QinsHfConfig(embeddings=True)
    assert with_emb.skip == [] and with_emb.to_dict()["embeddings"] is True
    assert with_emb.to_dict() == qins.hf_config.quantization_config_dict(QinsConfig(), [], True, embeddings=True)
    assert qins.QinsHfConfig(embeddings=False, skip=["x"]).skip == ["x"]


@MODELS
@TIED
def test_quantize_on_load_with_embeddings_gives_the_codes_of_load_then_convert(factory, tie: bool, tmp_path) -> None:
    factory(tie_word_embeddings=tie).save_pretrained(tmp_path / "src")
    want = _from_pretrained(tmp_path / "src")
    qins.convert_model_to_projective(want, embeddings=True, cache_weight=False)
    got = _from_pretrained(tmp_path / "src", quantization_config=qins.QinsHfConfig(embeddings=True, cache_weight=False))
    assert type(got.lm_head) is (ProjectiveTiedHead if tie else ProjectiveLinear)
    if tie:
        assert got.lm_head.embedding is got.model.embed_tokens
    assert_same_codes(want, got)
    with torch.no_grad():
        assert torch.equal(got(IDS).logits, want(IDS).logits)
    got.save_pretrained(tmp_path / "dst")  # and it saves as a QINS checkpoint with its embeddings
    again = _from_pretrained(tmp_path / "dst")
    assert_same_codes(want, again)
    assert (again.lm_head.embedding is again.model.embed_tokens) if tie else type(again.lm_head) is ProjectiveLinear


def test_quantize_on_load_from_a_bfloat16_checkpoint_matches_load_then_convert(tmp_path) -> None:
    tiny_llama(tie_word_embeddings=True).to(torch.bfloat16).save_pretrained(tmp_path)
    want = _from_pretrained(tmp_path)
    qins.convert_model_to_projective(want, embeddings=True)
    got = _from_pretrained(tmp_path, quantization_config=qins.QinsHfConfig(embeddings=True))
    assert_same_codes(want, got)
    assert got.model.embed_tokens.compute_dtype == want.model.embed_tokens.compute_dtype


def test_quantize_on_load_refuses_a_tied_head_that_skip_would_keep_in_full_precision(tmp_path) -> None:
    tiny_phi3(tie_word_embeddings=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"layer 'lm_head' is tied to the embedding 'model.embed_tokens', which is "
                                         r"quantized, but 'skip' entry 'lm_head' leaves it in full precision"):
        _from_pretrained(tmp_path, quantization_config=qins.QinsHfConfig(embeddings=True, skip=["lm_head"]))
