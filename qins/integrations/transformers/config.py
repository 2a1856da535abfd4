"""The ``quantization_config`` class of QINS (``qins.QinsHfConfig``) and the checks of its fields.

:func:`build_config_class` makes the ``QuantizationConfigMixin`` subclass (transformers is imported
then, not when this module is). Every field of a config.json ``quantization_config`` is validated
before any weight loads (:func:`check_config_fields`): each error names the field and the fix.
:func:`transformers_version` refuses a transformers outside the tested range.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from ...formats import DEFAULT_SHARED_TABLES, MAX_SHARED_TABLES, SPACINGS, QinsConfig
from ...hf_config import (
    _READABLE_VERSIONS,
    FORMAT_VERSION,
    QUANT_METHOD,
    UnsupportedTransformersError,
    quantization_config_dict,
)

__all__ = ["SUPPORTED", "build_config_class", "check_config_fields", "transformers_version"]

SUPPORTED = (">=4.44", "<6")


def transformers_version() -> Any:
    """The installed transformers' ``packaging.version.Version``; raises
    :class:`qins.UnsupportedTransformersError` outside :data:`SUPPORTED`."""
    import transformers
    from packaging.version import Version

    v = Version(transformers.__version__)
    if v < Version("4.44") or v.major >= 6:
        raise UnsupportedTransformersError(
            f"qins cannot save/load QINS models with transformers {transformers.__version__} (supported: "
            f"{','.join(SUPPORTED)}); use qins.save/qins.load (plain safetensors) instead"
        )
    return v


def spacing_for(spacing: Any, format_version: Any) -> str:
    """The level spacing of a ``quantization_config``: a version 2 config (written before the mulaw
    spacing) has none and is log-spaced; version 3 names it. Errors name the field and the fix."""
    if format_version == 2:
        if spacing not in (None, "log"):
            raise ValueError(f"quantization_config field 'spacing' {spacing!r} needs format_version 3; fix config.json")
        return "log"
    if spacing is None:
        return "mulaw"
    if spacing not in SPACINGS:
        raise ValueError(f"quantization_config field 'spacing' must be one of {list(SPACINGS)}, got {spacing!r}; "
                         "fix config.json")
    return spacing


def shared_tables_for(shared_tables: Any, format_version: Any, per_row: Any, spacing: str) -> Any:
    """The ``shared_tables`` of a ``quantization_config``: configs before version 4 have none (a range
    per row: 0); from version 4 a missing field is the library default for the format
    (``QinsConfig(per_row=..., spacing=...).shared_tables``). Other values go to the checks as given."""
    if format_version in (2, 3):
        if shared_tables not in (None, 0):
            raise ValueError(f"quantization_config field 'shared_tables' {shared_tables!r} needs format_version 4; "
                             "fix config.json")
        return 0
    if shared_tables is None:
        return DEFAULT_SHARED_TABLES if per_row is True and spacing == "mulaw" else 0
    return shared_tables


def check_config_fields(*, packed: Any, log_range: Any, per_row: Any, skip: Any, cache_weight: Any,
                        format_version: Any, extra: dict, spacing: Any = "log", embeddings: Any = False,
                        shared_tables: Any = 0) -> None:
    """Refuse a ``quantization_config`` that is not exactly what :func:`quantization_config_dict`
    writes, before any weight loads: each error names the field and the fix (a JSON ``"false"`` is a
    string, and ``bool("false")`` would be True). Pops ``quant_method`` from ``extra``."""
    for name, value in (("packed", packed), ("per_row", per_row), ("cache_weight", cache_weight),
                        ("embeddings", embeddings)):
        if not isinstance(value, bool):
            raise ValueError(f"quantization_config field {name!r} must be a JSON boolean (true or false), "
                             f"got {value!r} ({type(value).__name__}); fix config.json")
    if log_range not in ("minmax", "mse"):
        raise ValueError(f"quantization_config field 'log_range' must be \"minmax\" or \"mse\", got {log_range!r}; "
                         "fix config.json")
    if isinstance(skip, str) or not isinstance(skip, (list, tuple)) or not all(isinstance(p, str) for p in skip):
        raise ValueError(f"quantization_config field 'skip' must be a list of layer names or globs, got {skip!r}; "
                         "fix config.json")
    if isinstance(format_version, bool) or format_version not in _READABLE_VERSIONS \
            or not isinstance(format_version, int):
        raise ValueError(f"quantization_config: QINS format_version {format_version!r} is not supported (this qins "
                         "reads 2, 3 and 4); upgrade qins or re-convert the checkpoint")
    if spacing == "mulaw" and log_range != "mse":
        raise ValueError(f"quantization_config field 'log_range' {log_range!r} is a rule of the log spacing; "
                         "set \"spacing\": \"log\" with it, or \"log_range\": \"mse\"; fix config.json")
    if isinstance(shared_tables, bool) or not isinstance(shared_tables, int) \
            or not 0 <= shared_tables <= MAX_SHARED_TABLES:
        raise ValueError(f"quantization_config field 'shared_tables' must be an integer in 0..{MAX_SHARED_TABLES}, "
                         f"got {shared_tables!r}; fix config.json")
    if shared_tables and (not per_row or spacing != "mulaw"):
        raise ValueError("quantization_config field 'shared_tables' needs \"per_row\": true and \"spacing\": "
                         "\"mulaw\"; fix config.json")
    if embeddings and not per_row:
        raise ValueError("quantization_config field 'embeddings' true needs \"per_row\": true (QINS embeddings keep "
                         "one log range per token row); fix config.json")
    method = extra.pop("quant_method", QUANT_METHOD)
    if getattr(method, "value", method) != QUANT_METHOD:
        raise ValueError(f"quantization_config field 'quant_method' must be {QUANT_METHOD!r}, got {method!r}")
    if extra:
        raise ValueError(f"quantization_config has unknown fields {sorted(extra)} (QINS knows packed, log_range, "
                         "per_row, spacing, shared_tables, skip, cache_weight, embeddings, format_version); remove "
                         "them from config.json")


class QinsMethod(str, enum.Enum):
    """The ``quant_method`` value: 4.x reads ``quant_method.value`` (telemetry); json writes ``"qins"``."""

    QINS = QUANT_METHOD


def build_config_class() -> type:
    """The ``QuantizationConfigMixin`` subclass ``QinsHfConfig`` (imports transformers)."""
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class QinsHfConfig(QuantizationConfigMixin):
        """``quantization_config`` of a QINS model: the :class:`QinsConfig` fields, skip list, cache mode,
        and ``embeddings`` (the ``nn.Embedding`` s and a head tied to one in QINS too; default false, as
        in configs written before the field existed). ``skip`` defaults to ``["lm_head"]``, or to ``[]``
        with ``embeddings`` (as :func:`qins.convert_model_to_projective` does)."""

        def __init__(self, packed: bool = True, log_range: str = "mse", per_row: bool = True,
                     skip: Iterable[str] | None = None, cache_weight: bool = True,
                     format_version: int = FORMAT_VERSION, spacing: str | None = None, embeddings: bool = False,
                     shared_tables: int | None = None, **kwargs: Any) -> None:
            spacing = spacing_for(spacing, format_version)
            shared_tables = shared_tables_for(shared_tables, format_version, per_row, spacing)
            if skip is None:
                skip = [] if embeddings is True else ["lm_head"]
            check_config_fields(packed=packed, log_range=log_range, per_row=per_row, skip=skip,
                                cache_weight=cache_weight, format_version=format_version, extra=kwargs,
                                spacing=spacing, embeddings=embeddings, shared_tables=shared_tables)
            self.quant_method = QinsMethod.QINS
            self.qins_config = QinsConfig(packed, log_range, per_row, spacing=spacing, shared_tables=shared_tables)
            self.shared_tables = shared_tables
            self.packed, self.log_range, self.per_row, self.spacing = packed, log_range, per_row, spacing
            self.skip, self.cache_weight, self.embeddings = list(skip), cache_weight, embeddings
            self.format_version = FORMAT_VERSION

        def to_dict(self) -> dict[str, Any]:
            """The config.json entry (:func:`qins.hf_config.quantization_config_dict`)."""
            return quantization_config_dict(self.qins_config, self.skip, self.cache_weight, self.embeddings)

    return QinsHfConfig
