"""Model surgery and memory accounting on a tiny Phi-3 built from a config (no download).

Every expected byte count is computed by hand from the config, not from the model.
"""
from __future__ import annotations

import importlib
import io
import sys

import pytest
import torch
from torch import nn

from qins import ProjectiveLinear, QinsConfig, convert_model_to_projective, model_memory
from tests.strategies import tiny_phi3

H, INTER, V, L = 64, 128, 1000, 2  # hidden, intermediate (2H), vocab, layers: tiny_phi3's defaults
HEAD_DIM = H // 4
F32 = 4

# (out, in) of every nn.Linear in one Phi-3 decoder layer, in module registration order.
LAYER_LINEARS = {
    "self_attn.o_proj": (H, H), "self_attn.qkv_proj": (3 * H, H), "mlp.gate_up_proj": (2 * INTER, H),
    "mlp.down_proj": (H, INTER),
}
LINEAR_WEIGHTS = L * sum(o * i for o, i in LAYER_LINEARS.values())  # elements in the decoder linears
NORMS = L * 2 * H + H  # two RMSNorms per layer and the final one
EMBED = V * H


def _rope_buffer_bytes() -> int:
    """Rotary frequencies: HEAD_DIM/2 float32 each. transformers 4.x registers one buffer
    (inv_freq), 5.x two with separate storage (inv_freq, original_inv_freq)."""
    names = {n for n, _ in tiny_phi3().named_buffers() if "rotary_emb" in n}
    assert names in (
        {"model.rotary_emb.inv_freq"}, {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}
    ), names
    return len(names) * (HEAD_DIM // 2) * F32


ROPE_BUFFER = _rope_buffer_bytes()


def decoder_linear_names() -> list[str]:
    return [f"model.layers.{n}.{name}" for n in range(L) for name in LAYER_LINEARS]


def test_fp32_model_memory_matches_hand_count_with_untied_head() -> None:
    report = model_memory(tiny_phi3())
    assert report.parameters == (EMBED + LINEAR_WEIGHTS + NORMS + V * H) * F32
    assert report.buffers == ROPE_BUFFER and report.caches == 0
    assert report.total == report.parameters + report.buffers


def test_tied_embeddings_are_counted_once() -> None:
    model = tiny_phi3(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model_memory(model).parameters == (EMBED + LINEAR_WEIGHTS + NORMS) * F32


def test_shared_storage_and_views_are_counted_once() -> None:
    base = nn.Linear(8, 8, bias=False)
    model = nn.Sequential(base, base)  # the same module twice
    model.register_buffer("view", base.weight.detach()[:2])  # a view into the weight's storage
    assert model_memory(model).total == 64 * F32


def test_a_view_at_an_offset_and_a_larger_storage_count_the_whole_storage_once() -> None:
    storage_owner = torch.zeros(100)  # 400 bytes of storage
    model = nn.Module()
    model.tail = nn.Parameter(storage_owner[60:], requires_grad=False)  # a view at element offset 60
    model.register_buffer("middle", storage_owner[10:20])  # another view, other offset, same storage
    model.register_buffer("own", torch.zeros(3, dtype=torch.float64))
    report = model_memory(model)
    assert report.parameters == 100 * F32  # the whole storage, not the view's 40 elements
    assert report.buffers == 3 * 8  # the middle view shares the parameter's storage: counted there
    assert report.total == 100 * F32 + 24


def test_meta_tensors_hold_no_bytes() -> None:
    model = nn.Linear(16, 8, device="meta")
    model.register_buffer("real", torch.zeros(5))
    assert model_memory(model) == model_memory(nn.Module()).__class__(0, 5 * F32, 0)


def test_storages_are_told_apart_by_device_and_address() -> None:
    """The key model_memory deduplicates on: two devices could hold the same address (no CPU-only
    model can show a collision, so the key itself is pinned); meta tensors have none."""
    from qins.convert import _storage_key

    t = torch.zeros(4)
    assert _storage_key(t[1:]) == _storage_key(t) == ("cpu", t.untyped_storage().data_ptr())
    assert _storage_key(torch.zeros(4, device="meta")) is None


@pytest.mark.slow
def test_skip_given_as_one_string_is_one_pattern_not_its_characters() -> None:
    model = tiny_phi3()
    report = convert_model_to_projective(model, skip="model.layers.1.mlp.down_proj")
    assert list(report.skipped) == ["model.layers.1.mlp.down_proj"]
    assert "model.layers.0.mlp.down_proj" in report.converted and "lm_head" in report.converted
    model = tiny_phi3()
    converted = convert_model_to_projective(model, skip="l*").converted  # a glob, not 'l' and '*'
    assert converted == decoder_linear_names()


@pytest.mark.parametrize("config", [QinsConfig.codec_compatible(), QinsConfig(shared_tables=0), QinsConfig()],
                         ids=["split-tensor", "packed-row", "packed-shared"])
@pytest.mark.parametrize("cache_weight", [True, False], ids=["cached", "memory_saving"])
def test_conversion_report_and_memory_match_hand_count(cache_weight: bool, config: QinsConfig) -> None:
    model = tiny_phi3()
    report = convert_model_to_projective(model, config, cache_weight=cache_weight)
    assert report.converted == decoder_linear_names()
    assert report.skipped == {"lm_head": "matches skip pattern 'lm_head'"}
    assert all(isinstance(model.get_submodule(n), ProjectiveLinear) for n in report.converted)
    assert type(model.lm_head) is nn.Linear

    params = (EMBED + NORMS + V * H) * F32
    rows = L * sum(o for o, _ in LAYER_LINEARS.values())
    if config.shared_tables:  # one byte per weight, a table index and a float32 scale per row, n tables' logs
        codes = LINEAR_WEIGHTS + (1 + F32) * rows + len(report.converted) * config.shared_tables * 2 * F32
    elif config.packed:  # one byte per weight, two float32 logs per output row
        codes = LINEAR_WEIGHTS + 2 * F32 * rows
    else:  # uint8 code + int8 sign, two 0-d logs
        codes = LINEAR_WEIGHTS * 2 + len(report.converted) * 2 * F32
    caches = LINEAR_WEIGHTS * F32 if cache_weight else 0
    assert report.memory_before == model_memory(tiny_phi3())
    assert report.param_bytes_before == (EMBED + LINEAR_WEIGHTS + NORMS + V * H) * F32 + ROPE_BUFFER
    assert report.memory_after.parameters == params
    assert report.memory_after.buffers == codes + ROPE_BUFFER
    assert report.memory_after.caches == caches
    assert report.param_bytes_after == params + codes + ROPE_BUFFER
    assert model_memory(model) == report.memory_after


def test_cached_mode_costs_more_than_fp32_and_memory_saving_mode_less() -> None:
    """The seed's fp32 cache erased the saving: code+sign (2 B) plus a 4 B cache > 4 B fp32."""
    fp32 = model_memory(tiny_phi3()).total
    cached, saving = tiny_phi3(), tiny_phi3()
    convert_model_to_projective(cached, QinsConfig.codec_compatible(), cache_weight=True)
    convert_model_to_projective(saving, QinsConfig.codec_compatible(), cache_weight=False)
    assert model_memory(cached).total - fp32 == LINEAR_WEIGHTS * 2 + 8 * 8
    assert fp32 - model_memory(saving).total == LINEAR_WEIGHTS * 2 - 8 * 8


def test_packed_memory_saving_decoder_linears_cost_a_quarter_of_fp32_plus_row_logs() -> None:
    fp32 = model_memory(tiny_phi3()).total
    packed = tiny_phi3()
    convert_model_to_projective(packed, QinsConfig(shared_tables=0), cache_weight=False)
    rows = L * sum(o for o, _ in LAYER_LINEARS.values())
    assert fp32 - model_memory(packed).total == LINEAR_WEIGHTS * 3 - rows * 2 * F32


def test_the_default_memory_saving_decoder_linears_cost_a_quarter_of_fp32_plus_five_bytes_a_row() -> None:
    fp32 = model_memory(tiny_phi3()).total
    packed = tiny_phi3()
    report = convert_model_to_projective(packed, QinsConfig(), cache_weight=False)
    rows = L * sum(o for o, _ in LAYER_LINEARS.values())
    tables = len(report.converted) * QinsConfig().shared_tables * 2 * F32
    assert fp32 - model_memory(packed).total == LINEAR_WEIGHTS * 3 - rows * (1 + F32) - tables


def test_tied_head_is_skipped_not_duplicated() -> None:
    model = tiny_phi3(tie_word_embeddings=True)
    report = convert_model_to_projective(model, skip=())
    assert report.skipped == {"lm_head": "weight is tied to another parameter"}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert report.memory_after.parameters == (EMBED + NORMS) * F32


@pytest.mark.slow
def test_skip_accepts_exact_names_and_globs() -> None:
    model = tiny_phi3()
    report = convert_model_to_projective(model, skip=("*.mlp.*", "model.layers.0.self_attn.o_proj"))
    assert report.converted == [
        "model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.self_attn.qkv_proj",
        "lm_head",
    ]
    assert set(report.skipped) == {
        "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.gate_up_proj",
        "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj",
    }
    assert report.skipped["model.layers.0.self_attn.o_proj"] == "matches skip pattern 'model.layers.0.self_attn.o_proj'"


def test_failed_conversion_names_the_layer_and_leaves_the_model_unchanged() -> None:
    model = tiny_phi3()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*non-finite.*unchanged"):
        convert_model_to_projective(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)


def test_converted_model_logits_stay_close_to_fp32() -> None:
    """A sanity check on the whole model, not a bound: greedy next tokens mostly agree."""
    fp32, qins_model = tiny_phi3(), tiny_phi3()
    convert_model_to_projective(qins_model)
    ids = torch.randint(3, V, (2, 12))
    with torch.no_grad():
        a, b = fp32(ids).logits, qins_model(ids).logits
    rel = (a - b).norm() / a.norm()
    assert float(rel) < 0.05
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) > 0.8


def test_converting_a_bare_linear_is_reported_not_attempted() -> None:
    lin = nn.Linear(4, 4)
    report = convert_model_to_projective(lin)
    assert report.converted == [] and "ProjectiveLinear.from_linear" in report.skipped[""]


# ---- the quantization_config recorded on a transformers model (for save_pretrained) ----


def test_conversion_records_the_format_replacing_an_earlier_dict() -> None:
    from qins.hf_config import quantization_config_dict

    model = tiny_phi3(seed=1)
    model.config.quantization_config = {"quant_method": "qins", "packed": False}  # e.g. an earlier record
    config = QinsConfig(packed=True, log_range="minmax", per_row=False, spacing="log")
    convert_model_to_projective(model, config, skip=("lm_head",), cache_weight=False)
    assert model.config.quantization_config == quantization_config_dict(config, ("lm_head",), False)


def test_conversion_keeps_the_config_object_from_pretrained_is_loading_with() -> None:
    model = tiny_phi3(seed=1)
    loading = object()  # from_pretrained's QuantizationConfig object (it is rebuilding this model)
    model.config.quantization_config = loading
    convert_model_to_projective(model)
    assert model.config.quantization_config is loading


def test_an_unsupported_transformers_is_one_warning_with_its_message(monkeypatch, caplog) -> None:
    from qins import UnsupportedTransformersError
    from qins.integrations.transformers import registration

    def unsupported():
        raise UnsupportedTransformersError("transformers 9.0 is not supported (>=4.44,<6)")

    monkeypatch.setattr(registration, "register_with_transformers", unsupported)
    model = tiny_phi3(seed=1)
    with caplog.at_level("WARNING", logger="qins.convert"):
        convert_model_to_projective(model)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "transformers 9.0 is not supported (>=4.44,<6)")
    ]
    assert model.config.quantization_config["quant_method"] == "qins"  # recorded all the same


# ---- the progress bar (tqdm, on a terminal, from 50 layers) ----


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _convert_module():
    return importlib.import_module("qins.convert")


@pytest.mark.parametrize("layers, bar", [(49, False), (50, True)])
def test_a_progress_bar_on_a_terminal_from_50_layers(monkeypatch, layers: int, bar: bool) -> None:
    tty = _Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    items = [(f"l{i}", None) for i in range(layers)]
    assert list(_convert_module()._progress(items)) == items
    text = tty.getvalue()
    assert ("QINS convert" in text) is bar
    if bar:  # its label and unit, and leave=False: the bar is erased at the end, no line left behind
        assert text.startswith("\rQINS convert:   0%|") and f"| 0/{layers} [" in text and "?layer/s]" in text
        assert text.endswith("\r") and "\n" not in text


def test_no_progress_bar_when_stderr_is_not_a_terminal(monkeypatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    items = [(f"l{i}", None) for i in range(60)]
    assert list(_convert_module()._progress(items)) == items and err.getvalue() == ""


def test_without_tqdm_the_layers_come_without_a_bar(monkeypatch) -> None:
    tty = _Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails
    items = [(f"l{i}", None) for i in range(60)]
    assert list(_convert_module()._progress(items)) == items and tty.getvalue() == ""


# ---- arguments, the report's reasons and the debug log ----


def test_a_config_that_is_not_a_qins_config_is_a_type_error_naming_its_type() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"^config must be a QinsConfig, got str$"):
        convert_model_to_projective(model, "packed")  # type: ignore[arg-type]
    assert isinstance(model[0], nn.Linear)


def test_a_bare_linear_is_skipped_with_the_way_to_convert_it() -> None:
    layer = nn.Linear(4, 4)
    report = convert_model_to_projective(layer)
    assert report.converted == [] and report.skipped == {
        "": "the model itself is an nn.Linear; use ProjectiveLinear.from_linear"
    }


def test_each_conversion_and_skip_is_logged_at_debug_level(caplog) -> None:
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    with caplog.at_level("DEBUG", logger="qins.convert"):
        convert_model_to_projective(model, skip=("1",))
    assert [r.getMessage() for r in caplog.records if r.name == "qins.convert"] == [
        "converted 0 -> ProjectiveLinear(8, 6)",
        "skipped 1: matches skip pattern '1'",
    ]
