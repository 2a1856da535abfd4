"""Versioned state: old states load, wrong formats and corrupt states fail before anything changes."""
from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from qins import ProjectiveLinear, QinsConfig, convert_to_qins
from qins.formats import DEFAULT_SHARED_TABLES

SEED = QinsConfig.codec_compatible()
ROW = QinsConfig(shared_tables=0)  # a range per row: the corruptions of one row's logs
N = DEFAULT_SHARED_TABLES


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(12, 5)


def _snapshot(layer: ProjectiveLinear) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()} | {"_cache": layer.weight.clone()}


def _unchanged(layer: ProjectiveLinear, before: dict[str, torch.Tensor]) -> bool:
    after = _snapshot(layer)
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def seed_layout_state(linear: nn.Linear) -> OrderedDict[str, torch.Tensor]:
    """What the seed-era ProjectiveLinear saved (version 1): codes, sign, 0-d float32 logs, bias."""
    stored, sign, lo, hi = convert_to_qins(linear.weight)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict(
        stored=stored,
        sign=sign,
        log_min=torch.tensor(lo, dtype=torch.float32),
        log_max=torch.tensor(hi, dtype=torch.float32),
        bias=linear.bias.detach().clone(),
    )
    sd._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    return sd


@pytest.mark.parametrize("metadata", [True, False], ids=["version-1-metadata", "no-metadata"])
def test_seed_layout_state_dict_loads_into_a_seed_config_layer(metadata: bool) -> None:
    lin = _linear()
    sd = seed_layout_state(lin)
    if not metadata:
        del sd._metadata  # type: ignore[attr-defined]
    layer = ProjectiveLinear(12, 5, config=SEED)
    layer.load_state_dict(sd)
    reference = ProjectiveLinear.from_linear(lin, SEED)
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), reference(x))
    assert torch.equal(layer.stored, sd["stored"])


@pytest.mark.parametrize(
    "source, target, message",
    [
        (QinsConfig(), SEED, "state is packed.*layer is split"),
        (SEED, QinsConfig(), "state is split.*layer is packed"),
        (QinsConfig(packed=False, per_row=True), SEED, "per row.*per tensor"),
        (SEED, QinsConfig(packed=False, per_row=True), "per tensor.*per row"),
    ],
)
def test_loading_another_format_fails_clearly_before_anything_changes(
    source: QinsConfig, target: QinsConfig, message: str
) -> None:
    state = ProjectiveLinear.from_linear(_linear(1), source).state_dict()
    layer = ProjectiveLinear.from_linear(_linear(2), target)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match=message):
        layer.load_state_dict(state)
    state._metadata = OrderedDict()  # type: ignore[attr-defined]  # read from keys and shapes too
    with pytest.raises(ValueError, match=message):
        layer.load_state_dict(state)
    assert _unchanged(layer, before)


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def corrupt(sd: dict) -> None:
        sd[key] = value(sd[key])

    return corrupt


def _drop(key: str) -> Callable[[dict], None]:
    return lambda sd: sd.pop(key)


def _swap_logs(sd: dict) -> None:
    sd["log_min"], sd["log_max"] = sd["log_max"].clone(), sd["log_min"].clone()


def _swap_rows(*rows: int) -> Callable[[dict], None]:
    def swap(sd: dict) -> None:
        lo, hi = sd["log_min"].clone(), sd["log_max"].clone()
        for r in rows:
            lo[r], hi[r] = sd["log_max"][r], sd["log_min"][r]
        sd["log_min"], sd["log_max"] = lo, hi
    return swap


# (name, config, corruption, expected message): every bad state of the issue, on split and packed layers.
CORRUPTIONS = [
    (
        "sign-zero",
        SEED,
        _set("sign", lambda t: t.index_fill(1, torch.tensor([3]), 0)),
        r"sign: values must be -1 or \+1, got 0",
    ),
    (
        "sign-five",
        SEED,
        _set("sign", lambda t: t.index_fill(1, torch.tensor([0]), 5)),
        r"sign: values must be -1 or \+1, got 5",
    ),
    ("swapped-logs", SEED, _swap_logs, r"log_min > log_max \("),
    ("rows-2-and-4-swapped", ROW, _swap_rows(2, 4), r"log_min > log_max at row 2 \("),
    ("log-min-a-float", SEED, _set("log_min", lambda t: t.item()), "log_min: expected a tensor, got float"),
    ("swapped-row-logs", ROW, _swap_logs, "log_min > log_max at row"),
    ("nan-log-min", SEED, _set("log_min", lambda t: torch.full_like(t, float("nan"))), "log_min: must be finite"),
    (
        "inf-log-max",
        QinsConfig(),
        _set("log_max", lambda t: torch.full_like(t, float("inf"))),
        "log_max: must be finite",
    ),
    ("overflowing-log-max", SEED, _set("log_max", lambda t: torch.full_like(t, 95.0)), "above ln"),
    (
        "int64-codes",
        SEED,
        _set("stored", lambda t: t.long() + 255),
        "stored: dtype must be torch.uint8, got torch.int64",
    ),
    (
        "float-codes",
        QinsConfig(),
        _set("stored", lambda t: t.float() + 0.7),
        "stored: dtype must be torch.uint8, got torch.float32",
    ),
    ("float64-logs", QinsConfig(), _set("log_min", lambda t: t.double()), "log_min: dtype must be torch.float32"),
    ("wrong-shape-codes", SEED, _set("stored", lambda t: t[:, :-1].contiguous()), r"stored: shape must be \(5, 12\)"),
    ("wrong-shape-row-logs", ROW, _set("log_max", lambda t: t[:-1]), r"log_max: shape must be \(5,\)"),
    ("wrong-shape-table-logs", QinsConfig(), _set("log_max", lambda t: t[:-1]),
     rf"log_max: shape must be \({DEFAULT_SHARED_TABLES},\)"),
    ("row-table-past-the-tables", QinsConfig(), _set("row_table", lambda t: t.fill_(DEFAULT_SHARED_TABLES)),
     f"row_table: row 0 names table {DEFAULT_SHARED_TABLES}"),
    ("row-scale-zero", QinsConfig(), _set("row_scale", lambda t: t.index_fill(0, torch.tensor([2]), 0.0)),
     "row_scale: must be positive and finite, got 0.0 at row 2"),
    ("missing-row-scale", QinsConfig(), _drop("row_scale"), "incomplete QINS state, missing \\['row_scale'\\]"),
    ("row-table-in-a-per-row-state", ROW, lambda sd: sd.__setitem__("row_table", torch.zeros(5, dtype=torch.uint8)),
     "row_table: unexpected in a state without shared tables"),
    ("missing-sign", SEED, _drop("sign"), "ProjectiveLinear: incomplete QINS state, missing \\['sign'\\]"),
    ("missing-log-max", QinsConfig(), _drop("log_max"), "incomplete QINS state, missing \\['log_max'\\]"),
    ("missing-codes", SEED, _drop("stored"), "incomplete QINS state, missing \\['stored'\\]"),
    (
        "sign-in-packed",
        QinsConfig(),
        lambda sd: sd.__setitem__("sign", torch.ones(5, 12, dtype=torch.int8)),
        "sign: unexpected in a packed state",
    ),
]


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non_strict"])
@pytest.mark.parametrize("name, config, corrupt, message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_state_raises_value_error_naming_the_key_and_leaves_the_layer_as_it_was(
    name: str, config: QinsConfig, corrupt: Callable[[dict], None], message: str, strict: bool
) -> None:
    good = ProjectiveLinear.from_linear(_linear(1), config).state_dict()
    bad = OrderedDict((k, v.clone()) for k, v in good.items())
    bad._metadata = copy.deepcopy(good._metadata)  # type: ignore[attr-defined]
    corrupt(bad)
    layer = ProjectiveLinear.from_linear(_linear(2), config)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match=message):
        layer.load_state_dict(bad, strict=strict)
    assert _unchanged(layer, before)


@given(st.sampled_from(CORRUPTIONS), st.booleans(), st.integers(0, 2**16))
def test_random_corruptions_never_half_load(case: tuple, strict: bool, seed: int) -> None:
    _, config, corrupt, message = case
    good = ProjectiveLinear.from_linear(_linear(seed % 7), config).state_dict()
    bad = OrderedDict((k, v.clone()) for k, v in good.items())
    bad._metadata = copy.deepcopy(good._metadata)  # type: ignore[attr-defined]
    corrupt(bad)
    layer = ProjectiveLinear.from_linear(_linear(seed % 5 + 7), config)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match=message):
        layer.load_state_dict(bad, strict=strict)
    assert _unchanged(layer, before)


def test_non_strict_load_without_qins_keys_leaves_codes_alone_and_loads_the_bias() -> None:
    layer = ProjectiveLinear.from_linear(_linear(1))
    codes = layer.stored.clone()
    result = layer.load_state_dict({"bias": torch.zeros(5)}, strict=False)
    assert set(result.missing_keys) == {"stored", "log_min", "log_max", "row_table", "row_scale"}
    assert torch.equal(layer.stored, codes) and bool((layer.bias == 0).all())


def test_format_mismatch_message_names_the_layer_and_both_formats_in_full() -> None:
    from qins.state import check_qins_state

    src = ProjectiveLinear.from_linear(_linear(4), QinsConfig())
    dst = ProjectiveLinear.from_linear(_linear(4), SEED)
    state = {"block.proj." + k: v for k, v in src.state_dict().items()}
    with pytest.raises(ValueError) as info:
        check_qins_state(dst, state, "block.proj.", {})
    assert str(info.value) == (
        f"block.proj: the state is packed (1 byte/weight), {N} shared table(s) scaled per row but the layer is split "
        f"(2 bytes/weight), per tensor; build the layer with QinsConfig(packed=True, per_row=True, shared_tables={N}) "
        "to load it"
    )
    with pytest.raises(ValueError, match=r"^mlp\.X: the state is packed"):  # only the trailing dot goes
        check_qins_state(dst, {"mlp.X." + k: v for k, v in src.state_dict().items()}, "mlp.X.", {})
    # no prefix: the layer's class names it; metadata that is not a mapping is ignored
    with pytest.raises(ValueError, match=rf"^ProjectiveLinear: the state is packed \(1 byte/weight\), {N} shared"):
        check_qins_state(dst, src.state_dict(), "", None)


def test_unexpected_keys_are_reported_like_nn_linear_strict_and_not() -> None:
    layer = ProjectiveLinear.from_linear(_linear(2))
    state = dict(layer.state_dict()) | {"extra": torch.zeros(3)}
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "extra"'):
        layer.load_state_dict(state)
    result = layer.load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["extra"] and result.missing_keys == []


def test_a_bias_of_the_wrong_shape_is_reported_like_nn_linear() -> None:
    layer = ProjectiveLinear.from_linear(_linear(3))
    before = _snapshot(layer)
    state = dict(layer.state_dict()) | {"bias": torch.zeros(6)}
    with pytest.raises((RuntimeError, ValueError), match="bias"):
        layer.load_state_dict(state)
    assert _unchanged(layer, before)


@pytest.mark.parametrize("config", [QinsConfig(), SEED], ids=["packed-row", "split-tensor"])
@pytest.mark.parametrize("cache_weight", [True, False], ids=["cached", "memory_saving"])
def test_meta_init_then_to_empty_then_load_gives_a_working_layer(config: QinsConfig, cache_weight: bool) -> None:
    source = ProjectiveLinear.from_linear(_linear(3), config, cache_weight=cache_weight)
    layer = ProjectiveLinear(12, 5, config=config, cache_weight=cache_weight, device="meta")
    assert layer.stored.is_meta and layer.log_min.is_meta
    layer = layer.to_empty(device="cpu")
    layer.load_state_dict(source.state_dict())
    x = torch.randn(4, 12)
    assert torch.equal(layer(x), source(x)) and layer.log_min.dtype == torch.float32


def test_from_linear_on_a_meta_weight_builds_a_meta_layer() -> None:
    with torch.device("meta"):
        lin = nn.Linear(12, 5)
    layer = ProjectiveLinear.from_linear(lin)
    assert layer.stored.is_meta and layer.bias.is_meta and layer.config == QinsConfig()


def test_non_float_input_raises_type_error_like_nn_linear() -> None:
    layer = ProjectiveLinear.from_linear(_linear())
    with pytest.raises(TypeError, match="floating-point input"):
        layer(torch.ones(2, 12, dtype=torch.int64))
