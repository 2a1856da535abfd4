"""``qins.register_with_transformers``: which transformers API it uses, reuse of an earlier
registration, and the 4.44 path without a registration API (simulated on this transformers)."""
from __future__ import annotations

import logging

import pytest

from qins import QinsConfig
from qins.integrations.transformers import (
    QUANT_METHOD,
    quantization_config_dict,
    register_with_transformers,
    registration,
)
from qins.integrations.transformers import config as hf_qconfig
from qins.integrations.transformers import quantizer as hf_quantizer


@pytest.fixture
def auto(monkeypatch: pytest.MonkeyPatch):
    """transformers' quantizer registry with "qins" removed (restored afterwards) and the
    process-wide registration forgotten."""
    from transformers.quantizers import auto as registry

    for mapping in (registry.AUTO_QUANTIZATION_CONFIG_MAPPING, registry.AUTO_QUANTIZER_MAPPING):
        if QUANT_METHOD in mapping:
            monkeypatch.delitem(mapping, QUANT_METHOD)
    monkeypatch.setattr(registration, "_registered", None)
    return registry


def test_registers_through_transformers_api_when_it_has_one(auto, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    if not hasattr(auto, "register_quantizer"):
        pytest.skip("this transformers has no registration API (4.44)")
    calls = []
    for name in ("register_quantizer", "register_quantization_config"):
        real = getattr(auto, name)
        monkeypatch.setattr(
            auto, name, lambda method, _real=real, _name=name: calls.append((_name, method)) or _real(method)
        )
    with caplog.at_level(logging.DEBUG, logger="qins.integrations.transformers.registration"):
        config_cls, quantizer_cls = register_with_transformers()
    version = hf_qconfig.transformers_version()
    assert [r.getMessage() for r in caplog.records] == [f"registered quant_method 'qins' with transformers {version}"]
    assert sorted(calls) == [("register_quantization_config", QUANT_METHOD), ("register_quantizer", QUANT_METHOD)]
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is config_cls
    assert auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is quantizer_cls


def test_without_a_registration_api_the_two_mappings_get_the_classes(auto, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("register_quantizer", "register_quantization_config"):
        if hasattr(auto, name):
            monkeypatch.delattr(auto, name)
    config_cls, quantizer_cls = register_with_transformers()
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is config_cls
    assert auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is quantizer_cls
    assert config_cls.__name__ and quantizer_cls.__name__  # classes, not None


def test_an_earlier_registration_is_reused_and_returned(auto, monkeypatch: pytest.MonkeyPatch) -> None:
    first = register_with_transformers()
    monkeypatch.setattr(registration, "_registered", None)  # as a reloaded copy of the module would be
    again = register_with_transformers()
    assert again == first and all(cls is not None for cls in again)
    assert register_with_transformers() is again  # cached for the process


@pytest.mark.parametrize("present", ["config", "quantizer"])
def test_a_half_registration_is_completed_not_a_key_error(auto, monkeypatch: pytest.MonkeyPatch, present: str) -> None:
    class Elsewhere:  # a class registered under "qins" by someone else
        pass

    mapping = auto.AUTO_QUANTIZATION_CONFIG_MAPPING if present == "config" else auto.AUTO_QUANTIZER_MAPPING
    monkeypatch.setitem(mapping, QUANT_METHOD, Elsewhere)
    config_cls, quantizer_cls = register_with_transformers()
    assert (config_cls if present == "config" else quantizer_cls) is Elsewhere
    ours = quantizer_cls if present == "config" else config_cls
    assert ours is not None and ours is not Elsewhere and isinstance(ours, type)
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is config_cls
    assert auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is quantizer_cls


def test_the_config_class_defaults_are_the_library_defaults() -> None:
    """``QinsHfConfig()`` (what transformers builds before ``from_dict`` fills it) describes
    ``QinsConfig()`` in the cached mode with ``lm_head`` skipped, format version 4."""
    from qins import QinsConfig
    from qins.integrations.transformers import quantization_config_dict

    config_cls, _ = register_with_transformers()
    config = config_cls()
    assert config.qins_config == QinsConfig()
    assert (config.packed, config.log_range, config.per_row) == (True, "mse", True)
    assert config.skip == ["lm_head"] and config.cache_weight is True and config.format_version == 4
    assert config.spacing == "mulaw" and config.shared_tables == QinsConfig().shared_tables
    assert config.to_dict() == quantization_config_dict(QinsConfig(), ["lm_head"], True)


def test_a_format_version_other_than_2_3_or_4_is_refused_by_name() -> None:
    config_cls, _ = register_with_transformers()
    for bad in (5, 1, "2", 2.0, True):
        with pytest.raises(
            ValueError,
            match=r"^quantization_config: QINS format_version .* is not supported \(this qins reads 2, 3 and 4\)",
        ):
            config_cls(format_version=bad)
    assert config_cls(format_version=2).format_version == 4  # read as version 2, written as the current one


def test_a_version_3_config_has_a_range_per_row_and_version_4_records_its_shared_tables() -> None:
    from qins import QinsConfig

    config_cls, _ = register_with_transformers()
    assert config_cls(format_version=3).qins_config == QinsConfig(shared_tables=0)  # written before the field
    with pytest.raises(ValueError, match="'shared_tables' 4 needs format_version 4"):
        config_cls(format_version=3, shared_tables=4)
    four = config_cls(shared_tables=4)
    assert four.qins_config == QinsConfig(shared_tables=4) and four.to_dict()["shared_tables"] == 4
    assert config_cls(**config_cls(shared_tables=0).to_dict()).qins_config == QinsConfig(shared_tables=0)
    assert config_cls(per_row=False).qins_config == QinsConfig(per_row=False)  # no shared tables per tensor
    for bad in (17, -1, True, "4"):
        with pytest.raises(ValueError, match="'shared_tables' must be an integer in 0..16"):
            config_cls(shared_tables=bad)


def test_a_version_2_config_without_spacing_is_log_spaced_and_version_3_names_its_spacing() -> None:
    from qins import QinsConfig

    config_cls, _ = register_with_transformers()
    assert config_cls(format_version=2).qins_config == QinsConfig(spacing="log")
    assert config_cls(format_version=2, log_range="minmax").qins_config == QinsConfig(log_range="minmax", spacing="log")
    assert config_cls(spacing="log").qins_config == QinsConfig(spacing="log")
    assert config_cls().to_dict()["spacing"] == "mulaw"
    with pytest.raises(ValueError, match=r"field 'spacing' 'mulaw' needs format_version 3; fix config.json"):
        config_cls(format_version=2, spacing="mulaw")
    with pytest.raises(ValueError, match=r"field 'spacing' must be one of \['log', 'mulaw'\], got 'linear'"):
        config_cls(spacing="linear")
    with pytest.raises(ValueError, match=r"field 'log_range' 'minmax' is a rule of the log spacing"):
        config_cls(log_range="minmax")


@pytest.mark.parametrize(
    "field, value",
    [
        ("packed", "false"),
        ("packed", 0),
        ("per_row", "true"),
        ("cache_weight", None),
        ("log_range", "max"),
        ("skip", "lm_head"),
        ("skip", ["lm_head", 3]),
    ],
)
def test_a_config_field_of_the_wrong_type_or_value_is_refused_naming_the_field(field: str, value) -> None:
    config_cls, _ = register_with_transformers()
    with pytest.raises(ValueError, match=rf"quantization_config field '{field}' must be .*fix config.json"):
        config_cls(**{field: value})


def test_unknown_config_fields_and_another_quant_method_are_refused() -> None:
    config_cls, _ = register_with_transformers()
    with pytest.raises(ValueError, match=r"unknown fields \['bits', 'group_size'\].*remove them"):
        config_cls(bits=8, group_size=128)
    with pytest.raises(ValueError, match="'quant_method' must be 'qins'"):
        config_cls(quant_method="gptq")
    saved = quantization_config_dict(QinsConfig(packed=False), ["lm_head"], False)
    assert config_cls(**saved).to_dict() == saved  # what a conversion writes reads back


@pytest.mark.parametrize("pre_quantized", [True, False])
def test_a_qins_quantization_config_loads_qins_and_full_precision_checkpoints(pre_quantized: bool) -> None:
    """A QINS checkpoint (pre-quantized) loads as saved; a full-precision one is quantized while it
    loads: ``validate_environment``
    passes both."""
    config_cls, quantizer_cls = register_with_transformers()
    quantizer = quantizer_cls(config_cls(), pre_quantized=pre_quantized)
    assert quantizer.pre_quantized is pre_quantized
    assert quantizer.validate_environment() is None


@pytest.mark.parametrize("major", [4, 5])
@pytest.mark.parametrize("accelerate", [True, False])
def test_transformers_4_loads_through_accelerate_and_says_so_when_it_is_missing(
        monkeypatch: pytest.MonkeyPatch, major: int, accelerate: bool) -> None:
    """The quantizer built for transformers 4.x refuses to load without accelerate (4.x loads
    quantized checkpoints through it); the one for 5.x does not need it."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (real("torch") if accelerate else None) if name == "accelerate" else real(name, *a),
    )
    config_cls, quantizer_cls = hf_quantizer.build_classes(major)
    quantizer = quantizer_cls(config_cls(), pre_quantized=True)
    if major == 4 and not accelerate:
        version = hf_qconfig.transformers_version()
        with pytest.raises(ImportError, match=rf"^transformers {version} loads quantized \(QINS\) checkpoints "
                                               r"through accelerate: pip install accelerate$"):
            quantizer.validate_environment()
    else:
        assert quantizer.validate_environment() is None
