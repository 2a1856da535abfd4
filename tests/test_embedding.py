"""QINS embeddings and tied lm_heads: lookups decode only the rows they read, a tied
head reads the embedding's codes (one copy in memory, in the state_dict and on disk), opt-in conversion,
save/load, generation with the KV cache, torch.compile."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

import qins
from qins import ProjectiveEmbedding, ProjectiveLinear, ProjectiveTiedHead, QinsConfig
from qins.testing.models import tiny_llama, tiny_phi3

CONFIGS = [QinsConfig(), QinsConfig(packed=False), QinsConfig(spacing="log", log_range="minmax"),
           QinsConfig(packed=False, spacing="log")]
IDS = [f"{'packed' if c.packed else 'split'}-{c.spacing}" for c in CONFIGS]
MODELS = pytest.mark.parametrize("factory", [tiny_phi3, tiny_llama], ids=["phi3", "llama"])
TIED = pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])


def source_embedding(num: int = 50, dim: int = 24, padding_idx: int | None = 3, seed: int = 0) -> nn.Embedding:
    torch.manual_seed(seed)
    emb = nn.Embedding(num, dim, padding_idx=padding_idx)
    with torch.no_grad():  # rows of very different scales: each has its own range
        emb.weight.mul_(torch.logspace(-3, 1, num).unsqueeze(1))
    return emb


def converted(factory, tie: bool, **kw):
    model = factory(tie_word_embeddings=tie)
    report = qins.convert_model_to_projective(model, embeddings=True, cache_weight=False, **kw)
    return model, report


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_lookup_equals_the_same_rows_of_the_full_decode_bit_for_bit(config: QinsConfig) -> None:
    emb = ProjectiveEmbedding.from_embedding(source_embedding(), config)
    full = emb.decode_weight()
    for ids in (torch.tensor([[3, 0, 49, 7], [7, 7, 1, 0]]), torch.tensor(11), torch.arange(50, dtype=torch.int32)):
        out = emb(ids)
        assert out.shape == (*ids.shape, 24) and out.dtype == torch.float32
        assert torch.equal(out, full[ids.long()])


def test_lookup_builds_decode_tables_only_for_the_rows_it_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    import qins.formats as module  # the lookup decodes the read rows with qins.formats.decode_codes

    emb = ProjectiveEmbedding.from_embedding(source_embedding(num=1000), QinsConfig(shared_tables=0))
    rows: list[int] = []
    real = module.level_table

    def spy(lo, hi, packed, spacing):
        rows.append(lo.numel())
        return real(lo, hi, packed, spacing)

    monkeypatch.setattr(module, "level_table", spy)
    emb(torch.tensor([[5, 9, 5]]))
    assert rows == [3]
    shared = ProjectiveEmbedding.from_embedding(source_embedding(num=1000), QinsConfig(shared_tables=4))
    rows.clear()
    shared(torch.tensor([[5, 9, 5]]))
    assert rows == [4]  # the layer's shared tables, however many rows are read


def test_padding_idx_is_kept_normalised_and_its_zero_row_decodes_to_zeros() -> None:
    src = source_embedding(padding_idx=-2)
    emb = ProjectiveEmbedding.from_embedding(src)
    assert emb.padding_idx == src.padding_idx == 48
    assert torch.equal(emb(torch.tensor([48])).abs(), torch.zeros(1, 24))
    assert ProjectiveEmbedding.from_embedding(source_embedding(padding_idx=None)).padding_idx is None
    assert "padding_idx=48" in repr(emb)


def test_output_dtype_is_the_source_dtype_and_follows_half_while_logs_stay_float32() -> None:
    src = source_embedding().to(torch.bfloat16)
    emb = ProjectiveEmbedding.from_embedding(src)
    assert emb(torch.tensor([1, 2])).dtype == torch.bfloat16
    emb.half()
    assert emb(torch.tensor([1, 2])).dtype == torch.float16
    assert emb.log_min.dtype == emb.log_max.dtype == torch.float32 and emb.stored.dtype == torch.uint8


@MODELS
@TIED
def test_converted_model_logits_match_the_model_with_decoded_weights(factory, tie: bool) -> None:
    model = factory(tie_word_embeddings=tie)
    reference = copy.deepcopy(model)
    report = qins.convert_model_to_projective(model, embeddings=True, cache_weight=False)
    assert report.embeddings == ["model.embed_tokens"] and "lm_head" in report.converted
    with torch.no_grad():
        for name in report.converted + report.embeddings:
            if not (tie and name == "lm_head"):  # the tied reference head is the embedding's Parameter
                reference.get_submodule(name).weight.copy_(model.get_submodule(name).decode_weight())
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert type(model.lm_head) is (ProjectiveTiedHead if tie else ProjectiveLinear)


@TIED
def test_embeddings_off_converts_exactly_what_it_did_before(tie: bool) -> None:
    model = tiny_phi3(tie_word_embeddings=tie)
    report = qins.convert_model_to_projective(model)
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert report.embeddings == [] and "lm_head" not in report.converted
    assert report.skipped["lm_head"] == "matches skip pattern 'lm_head'"  # the default skip list
    assert "embeddings" not in model.config.quantization_config


def test_tied_head_reads_the_embedding_codes_one_copy_in_memory_state_dict_and_file(tmp_path) -> None:
    model, report = converted(tiny_phi3, tie=True)
    emb, head = model.model.embed_tokens, model.lm_head
    assert head.embedding is emb and "lm_head" not in report.skipped
    assert not [k for k in model.state_dict() if k.startswith("lm_head.")]
    assert report.memory_after.state < 0.3 * report.memory_before.state
    path = tmp_path / "m.safetensors"
    qins.save(model, path)
    with safe_open(str(path), "pt") as f:
        assert sorted(k for k in f.keys() if "embed" in k or "lm_head" in k) == [
            "model.embed_tokens.log_max", "model.embed_tokens.log_min", "model.embed_tokens.row_scale",
            "model.embed_tokens.row_table", "model.embed_tokens.stored"]
    fresh = qins.load(tiny_phi3(seed=3, tie_word_embeddings=True), path)
    assert type(fresh.lm_head) is ProjectiveTiedHead and fresh.lm_head.embedding is fresh.model.embed_tokens
    assert fresh.lm_head.embedding.stored.data_ptr() == fresh.model.embed_tokens.stored.data_ptr()
    assert not [k for k in fresh.state_dict() if k.startswith("lm_head.")]
    moved = copy.deepcopy(fresh).to(torch.float64)  # the head follows its embedding through copies and moves
    assert moved.lm_head.embedding is moved.model.embed_tokens
    assert moved.model.embed_tokens.log_min.dtype == torch.float32


@MODELS
@TIED
def test_save_load_round_trip_is_bit_exact_into_a_plain_or_converted_model(factory, tie: bool, tmp_path) -> None:
    model, _ = converted(factory, tie)
    path = tmp_path / "m.safetensors"
    qins.save(model, path)
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    for target in (factory(seed=9, tie_word_embeddings=tie), converted(factory, tie)[0]):
        qins.load(target, path)
        for key, value in model.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key
        with torch.no_grad():
            assert torch.equal(target(ids).logits, want)


@TIED
def test_generation_with_the_kv_cache_equals_generation_without(tie: bool) -> None:
    model, _ = converted(tiny_phi3, tie)
    ids = torch.randint(3, 1000, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.shape == (2, 11) and torch.equal(cached, uncached)


def test_converted_model_forward_compiles_to_one_frame_without_graph_breaks() -> None:
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, _ = converted(tiny_llama, tie=True)
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(3))
    cnt = CompileCounter()
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(lambda i: model(input_ids=i, use_cache=False).logits, backend=cnt, fullgraph=True)
        for _ in range(3):
            got = compiled(ids)
    assert cnt.frame_count == 1 and sum(counters["graph_break"].values()) == 0
    assert torch.equal(got, want)
    torch._dynamo.reset()


def test_refusals_name_the_problem() -> None:
    per_tensor = QinsConfig(per_row=False)
    with pytest.raises(ValueError, match="per-row"):
        ProjectiveEmbedding.from_embedding(source_embedding(), per_tensor)
    model = tiny_phi3()
    with pytest.raises(ValueError, match="per-row"):
        qins.convert_model_to_projective(model, per_tensor, embeddings=True)
    assert type(model.model.embed_tokens) is nn.Embedding  # left unchanged
    with pytest.raises(ValueError, match="max_norm"):
        ProjectiveEmbedding.from_embedding(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(TypeError, match="nn.Embedding"):
        ProjectiveEmbedding.from_embedding(nn.Linear(4, 10))
    with pytest.raises(ValueError, match="padding_idx"):
        ProjectiveEmbedding(10, 4, padding_idx=10)
    emb = ProjectiveEmbedding.from_embedding(source_embedding())
    with pytest.raises(TypeError, match="int64 or int32"):
        emb(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="ProjectiveEmbedding"):
        ProjectiveTiedHead(nn.Embedding(10, 4))
    model = tiny_phi3(tie_word_embeddings=True)
    model.model.embed_tokens.weight.data[4, 2] = float("nan")
    with pytest.raises(ValueError, match="embedding 'model.embed_tokens'"):
        qins.convert_model_to_projective(model, embeddings=True)
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear


@pytest.mark.parametrize("corrupt, match", [
    (lambda s: s.pop("log_max"), "incomplete QINS state"),
    (lambda s: s.__setitem__("stored", s["stored"][:-1]), "shape must be"),
    (lambda s: s.__setitem__("log_min", s["log_max"] + 1), "log_min > log_max"),
    (lambda s: s["log_max"].__setitem__(-1, float("nan")), "must be finite"),
    (lambda s: s.__setitem__("stored", s["stored"].to(torch.int16)), "dtype must be torch.uint8"),
], ids=["missing", "shape", "swapped", "nan", "dtype"])
def test_a_bad_state_is_refused_before_anything_changes(corrupt, match: str) -> None:
    emb = ProjectiveEmbedding.from_embedding(source_embedding())
    state = dict(ProjectiveEmbedding.from_embedding(source_embedding(seed=1)).state_dict())
    corrupt(state)
    before = {k: v.clone() for k, v in emb.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        emb.load_state_dict(state)
    assert all(torch.equal(emb.state_dict()[k], v) for k, v in before.items())


def test_a_split_state_does_not_load_into_a_packed_embedding() -> None:
    split = ProjectiveEmbedding.from_embedding(source_embedding(), QinsConfig(packed=False))
    with pytest.raises(ValueError, match="packed=False"):
        ProjectiveEmbedding.from_embedding(source_embedding()).load_state_dict(split.state_dict())


def test_load_refuses_files_and_models_that_disagree_on_embeddings(tmp_path) -> None:
    plain = tmp_path / "plain.safetensors"
    model = tiny_phi3(tie_word_embeddings=True)
    qins.convert_model_to_projective(model)
    qins.save(model, plain)
    with pytest.raises(ValueError, match=r"QINS embeddings or tied heads \['model.embed_tokens', 'lm_head'\]"):
        qins.load(converted(tiny_phi3, tie=True)[0], plain)
    with pytest.raises(ValueError, match=r"QINS layers \['lm_head'\] are not in the file"):
        qins.load(converted(tiny_phi3, tie=False)[0], plain)
    with_emb = tmp_path / "emb.safetensors"
    qins.save(converted(tiny_phi3, tie=True)[0], with_emb)
    split, _ = converted(tiny_phi3, tie=True)  # the file's format everywhere but the embedding
    split.model.embed_tokens = ProjectiveEmbedding.from_embedding(nn.Embedding(1000, 64), QinsConfig(packed=False))
    split.lm_head = ProjectiveTiedHead(split.model.embed_tokens)
    with pytest.raises(ValueError, match="embedding 'model.embed_tokens' is"):
        qins.load(split, with_emb)


def test_hf_quantization_config_marks_embeddings_so_from_pretrained_rebuilds_them() -> None:
    """``from_pretrained`` reads the field (tests/test_hf_embeddings.py); without it, it would load
    random rows into plain embeddings."""
    model, _ = converted(tiny_phi3, tie=True)
    assert model.config.quantization_config["embeddings"] is True
    assert model.config.quantization_config["skip"] == []
