"""Hardening: every accepted state decodes to finite, normal levels; the native code never casts out of
range.

The log bounds are float32 values (:data:`qins.formats.LOG_FLOAT32_MIN`,
:data:`qins.formats.LOG_FLOAT32_MAX`), so each edge is pinned exactly: the bound itself is accepted
and decodes to finite, normal levels, and the next float32 past it (``torch.nextafter``) is refused.
"""
from __future__ import annotations

import copy
import math
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import qins.kernels as qk
from qins import ProjectiveLinear, QinsConfig, encode
from qins.formats import LOG_FLOAT32_MAX, LOG_FLOAT32_MIN, SPACINGS, decode_codes, level_table, num_levels, qins_exp
from tests.test_kernels import TUNING_FIELDS

TINY = torch.finfo(torch.float32).tiny
CONFIGS = [
    QinsConfig(), QinsConfig.codec_compatible(), QinsConfig(packed=False, per_row=True),
    QinsConfig(packed=True, per_row=False), QinsConfig(shared_tables=0), QinsConfig(packed=False, shared_tables=0),
]
#: log-spaced formats: their smallest level is exp(log_min), so log_min's floor alone keeps it normal
LOG_SPACED = [QinsConfig(spacing="log"), QinsConfig.codec_compatible(), QinsConfig(packed=False, spacing="log"),
              QinsConfig(per_row=False, spacing="log")]


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _next(x: float, toward: float) -> float:
    return float(torch.nextafter(_f32(x), _f32(toward)))


def _state_with_logs(
    config: QinsConfig, lo: float, hi: float
) -> tuple[ProjectiveLinear, OrderedDict[str, torch.Tensor]]:
    """A layer and a valid state of another layer whose logs are all set to ``(lo, hi)``."""
    torch.manual_seed(0)
    layer = ProjectiveLinear.from_linear(nn.Linear(8, 4), config)
    good = ProjectiveLinear.from_linear(nn.Linear(8, 4), config).state_dict()
    state = OrderedDict((k, v.clone()) for k, v in good.items())
    state._metadata = copy.deepcopy(good._metadata)  # type: ignore[attr-defined]
    state["log_min"] = torch.full_like(state["log_min"], lo)
    state["log_max"] = torch.full_like(state["log_max"], hi)
    return layer, state


def _levels(lo: float, hi: float, packed: bool) -> torch.Tensor:
    k = num_levels(packed)
    return level_table(_f32(lo), _f32(hi), packed, spacing="log")[0, 1 : k + 1]


def _float32_run(start: float, count: int, step: int) -> torch.Tensor:
    """``count`` consecutive float32 values from ``start``, walking the bit pattern by ``step`` (±1)."""
    bits = np.int64(np.float32(start).view(np.int32))
    return torch.from_numpy(
        np.arange(bits, bits + step * count, step, dtype=np.int64).astype(np.int32).view(np.float32).copy()
    )


# ------------------------------------------------------------------------------------------------
# The bounds themselves
# ------------------------------------------------------------------------------------------------


def test_the_log_bounds_are_float32_values() -> None:
    assert float(_f32(LOG_FLOAT32_MAX)) == LOG_FLOAT32_MAX and float(_f32(LOG_FLOAT32_MIN)) == LOG_FLOAT32_MIN
    # ln(float32 max) rounds up in float32: the float32 above the cap is that rounding, and overflows.
    assert _next(LOG_FLOAT32_MAX, 100.0) == 88.72283935546875 == float(_f32(math.log(torch.finfo(torch.float32).max)))
    assert LOG_FLOAT32_MIN > math.log(TINY)


def test_every_float32_log_in_the_top_nat_below_the_cap_decodes_finite() -> None:
    t = _float32_run(LOG_FLOAT32_MAX, 140_000, -1)  # 88.72 down to below 87.7 (ulp 2**-17)
    assert float(t.min()) < LOG_FLOAT32_MAX - 1.0
    assert bool(torch.isfinite(qins_exp(t)).all())
    assert not bool(torch.isfinite(qins_exp(_f32(_next(LOG_FLOAT32_MAX, 100.0)).reshape(1))).all())


def test_every_float32_log_in_the_bottom_nat_above_the_floor_decodes_normal() -> None:
    t = _float32_run(LOG_FLOAT32_MIN, 140_000, -1)  # negative floats: smaller bits, larger values
    assert float(t.max()) > LOG_FLOAT32_MIN + 1.0
    assert bool((qins_exp(t) >= TINY).all())
    # float32's own rounding of ln(2**-126) decodes to a subnormal: the reason for the margin
    assert float(qins_exp(_f32(math.log(TINY)).reshape(1))) < TINY


@pytest.mark.slow
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
def test_every_level_of_a_table_inside_the_bounds_is_finite_and_normal(packed: bool) -> None:
    # The floor with spans from 0 to the whole range: the rounding of log_max - j·δ lands at most
    # a few ulp below log_min, which the floor's margin absorbs.
    gen = torch.Generator().manual_seed(3)
    span = LOG_FLOAT32_MAX - LOG_FLOAT32_MIN
    his = torch.cat([
        torch.rand(100_000, generator=gen, dtype=torch.float64) * span + LOG_FLOAT32_MIN,
        LOG_FLOAT32_MIN + torch.logspace(-7, math.log10(span), 20_000, dtype=torch.float64),
        torch.tensor([LOG_FLOAT32_MIN, LOG_FLOAT32_MAX], dtype=torch.float64),
    ]).float().clamp(LOG_FLOAT32_MIN, LOG_FLOAT32_MAX)
    for lo, hi in ((torch.full_like(his, LOG_FLOAT32_MIN), his), (his, torch.full_like(his, LOG_FLOAT32_MAX))):
        k = num_levels(packed)
        levels = level_table(lo, hi, packed, spacing="log")[:, 1 : k + 1]
        assert bool(torch.isfinite(levels).all()) and float(levels.min()) >= TINY


# ------------------------------------------------------------------------------------------------
# Validation at the exact edges
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_the_largest_accepted_log_max_loads_and_decodes_finite(config: QinsConfig) -> None:
    layer, state = _state_with_logs(config, 0.0, LOG_FLOAT32_MAX)
    layer.load_state_dict(state)
    assert bool(torch.isfinite(layer.weight).all())
    assert bool(torch.isfinite(_levels(0.0, LOG_FLOAT32_MAX, config.packed)).all())


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_the_float32_above_the_largest_log_max_is_refused_and_leaves_the_layer_unchanged(config: QinsConfig) -> None:
    above = _next(LOG_FLOAT32_MAX, 100.0)
    assert not bool(torch.isfinite(_levels(0.0, above, config.packed)).all())  # what the check prevents
    layer, state = _state_with_logs(config, 0.0, above)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"log_max: above ln\(float32 max\)"):
        layer.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("config", LOG_SPACED, ids=str)
@pytest.mark.parametrize(
    "hi", [LOG_FLOAT32_MIN, -80.0, 0.0, LOG_FLOAT32_MAX], ids=["single-level", "narrow", "to-1", "whole-range"]
)
def test_the_smallest_accepted_log_min_loads_and_every_level_is_normal(config: QinsConfig, hi: float) -> None:
    layer, state = _state_with_logs(config, LOG_FLOAT32_MIN, hi)
    layer.load_state_dict(state)
    levels = _levels(LOG_FLOAT32_MIN, hi, config.packed)
    assert bool(torch.isfinite(levels).all()) and float(levels.min()) >= TINY
    mags = layer.weight.abs()
    assert bool(torch.isfinite(mags).all()) and bool(((mags == 0) | (mags >= TINY)).all())


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize(
    "lo", [_next(LOG_FLOAT32_MIN, -100.0), -200.0, -1000.0], ids=["next-float32-down", "-200", "-1000"]
)
def test_a_log_min_below_the_floor_is_refused_and_leaves_the_layer_unchanged(config: QinsConfig, lo: float) -> None:
    layer, state = _state_with_logs(config, lo, 0.0)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="log_min: below"):
        layer.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_a_per_row_state_with_one_row_past_a_bound_is_refused() -> None:
    layer, state = _state_with_logs(QinsConfig(), -5.0, 1.0)
    state["log_min"][2] = _next(LOG_FLOAT32_MIN, -100.0)
    with pytest.raises(ValueError, match="log_min: below"):
        layer.load_state_dict(state)
    layer, state = _state_with_logs(QinsConfig(), -5.0, 1.0)
    state["log_max"][3] = _next(LOG_FLOAT32_MAX, 100.0)
    with pytest.raises(ValueError, match="log_max: above"):
        layer.load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# Encoders stay inside the bounds (so everything they produce loads)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_weights_at_float32_extremes_encode_inside_the_bounds_and_reload(config: QinsConfig) -> None:
    fmax = torch.finfo(torch.float32).max
    w = torch.tensor([
        [TINY, -fmax, 0.5, TINY / 4], [TINY * 1.00001, TINY, -TINY, 0.0], [1.0, 2.0, -3.0, 4.0],
        [fmax, fmax, -TINY, 1e-30],
    ])
    codes, sign, lo, hi, *rows = encode(w, config)
    assert float(lo.min()) >= LOG_FLOAT32_MIN and float(hi.max()) <= LOG_FLOAT32_MAX and bool((lo <= hi).all())
    src = nn.Linear(4, 4)
    with torch.no_grad():
        src.weight.copy_(w)
    layer = ProjectiveLinear.from_linear(src, config)
    fresh = ProjectiveLinear.from_linear(nn.Linear(4, 4), config)
    fresh.load_state_dict(layer.state_dict())
    decoded = fresh.weight
    assert bool(torch.isfinite(decoded).all())
    if config.spacing == "log":
        # 2**-126 sits 4.3e-5 nats below the floor: it rounds to the smallest level (within 5e-5), never 0
        normal = w.abs() >= TINY
        assert bool((decoded.abs()[normal] > 0).all())
    elif config.shared_tables:
        # each row scales its table to its largest weight: 2**-126 beside float32's max is 0, a row of
        # magnitudes near 2**-126 keeps them (its values are the products, subnormal or not), and an
        # ordinary row keeps every weight
        assert bool((decoded[0, [0, 2, 3]] == 0).all()) and float(decoded[0, 1]) < -3.3e38
        assert torch.allclose(decoded[1], w[1], rtol=1e-4, atol=0) and bool((decoded[2] != 0).all())
        assert bool((rows[1] > 0).all())
    else:
        # mulaw rounds to the nearest level: 2**-126 beside float32's max is 0; a row of magnitudes all
        # below K·2**-126 flushes (its levels would be subnormal); an ordinary row keeps every weight
        assert bool((decoded[1] == 0).all()) and float(decoded[0, 1]) < -3.3e38
        if config.per_row:
            assert bool((decoded[2] != 0).all())


# ------------------------------------------------------------------------------------------------
# Native kernels: no out-of-range cast, the same table on every ISA for any logs
# ------------------------------------------------------------------------------------------------


def _native():
    mod = qk.native_module()
    if mod is None:
        pytest.skip("native CPU kernels unavailable")
    return mod


@pytest.mark.parametrize("spacing", [0, 1], ids=["log", "mulaw"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
def test_native_tables_agree_on_every_isa_for_logs_past_the_bounds(packed: bool, spacing: int) -> None:
    mod = _native()
    # n = rint(t·log2e) far outside [-252, 254]: the scalar path used to cast these to int unchecked
    lo = torch.tensor([-1000.0, -200.0, -175.0, LOG_FLOAT32_MIN, -3e38, 0.0, float("nan")])
    hi = torch.tensor([0.0, 100.0, 200.0, 1000.0, 3e38, float("inf"), 1.0])
    isas = [i for name, i in qk.ISAS.items() if mod.supported(i)]
    tables = [mod.table(lo, hi, packed, spacing, isa) for isa in isas]
    for t in tables[1:]:
        assert torch.equal(t.view(torch.int32), tables[0].view(torch.int32))


@pytest.mark.parametrize("spacing", ["log", "mulaw"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
def test_native_tables_match_the_reference_at_the_bounds(packed: bool, spacing: str) -> None:
    mod = _native()
    lo = torch.tensor([LOG_FLOAT32_MIN, LOG_FLOAT32_MIN, 0.0, LOG_FLOAT32_MIN])
    hi = torch.tensor([LOG_FLOAT32_MIN, 0.0, LOG_FLOAT32_MAX, LOG_FLOAT32_MAX])
    ref = level_table(lo, hi, packed, spacing)
    for name, isa in qk.ISAS.items():
        if mod.supported(isa):
            got = mod.table(lo, hi, packed, SPACINGS.index(spacing), isa)
            assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), name


# ------------------------------------------------------------------------------------------------
# qins.save: aliases only for the same view of the same memory
# ------------------------------------------------------------------------------------------------


class _Views(nn.Module):
    """A square parameter ``a`` and buffers sharing its storage: ``t = a.t()`` (other stride),
    ``bits = a.view(int32)`` (other dtype), ``row = a[1]`` (other offset and shape) and ``same = a``."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)))
        self.register_buffer("t", self.a.detach().t())
        self.register_buffer("bits", self.a.detach().view(torch.int32))
        self.register_buffer("row", self.a.detach()[1])
        self.register_buffer("same", self.a.detach())


def test_a_transposed_buffer_of_a_square_parameter_is_saved_as_its_own_tensor_and_reloads_transposed(tmp_path) -> None:
    import json

    from safetensors import safe_open

    import qins

    source = _Views(0)
    qins.save(source, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["qins.aliases"]) == {"same": "a"}
        assert set(f.keys()) == {"a", "t", "bits", "row"}
        assert torch.equal(f.get_tensor("t"), source.a.detach().t())
    target = _Views(1)
    qins.load(target, tmp_path / "m.safetensors")
    for key, value in source.state_dict().items():
        got = target.state_dict()[key]
        assert got.dtype == value.dtype and torch.equal(got, value), key
    assert torch.equal(target.t, target.a.detach().t())  # still a view of the reloaded parameter


def test_tensors_sharing_storage_with_another_dtype_are_not_aliased(tmp_path) -> None:
    import qins

    class Bits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("f", torch.tensor([1.0, -2.0, 0.5]))
            self.register_buffer("i", self.f.view(torch.int32))

    source = Bits()
    qins.save(source, tmp_path / "m.safetensors")
    target = Bits()
    target.f.zero_()
    qins.load(target, tmp_path / "m.safetensors")
    assert torch.equal(target.i, source.i) and torch.equal(target.f, source.f)


# ------------------------------------------------------------------------------------------------
# qins.load: every bad file raises the documented ValueError and leaves the model unchanged
# ------------------------------------------------------------------------------------------------


class _Small(nn.Module):
    """A few hundred bytes of state covering every kind of tensor a qins file holds: packed per-row
    and split per-tensor QINS layers (with a bias), a plain Linear, a LayerNorm, an int64 buffer
    and a tied alias."""

    def __init__(self, seed: int, converted: bool) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.packed, self.split, self.plain, self.norm = (
            nn.Linear(6, 5, bias=False), nn.Linear(5, 4), nn.Linear(4, 3), nn.LayerNorm(3)
        )
        self.register_buffer("ids", torch.arange(4) * (seed + 1))
        # the same view as plain.weight: written once (buffers come first, so "tied" is the owner)
        self.register_buffer("tied", self.plain.weight.detach())
        if converted:
            self.packed = ProjectiveLinear.from_linear(self.packed, QinsConfig())
            self.split = ProjectiveLinear.from_linear(self.split, QinsConfig.codec_compatible(), cache_weight=False)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> bytes:
    import qins

    path = tmp_path_factory.mktemp("small") / "small.safetensors"
    qins.save(_Small(0, converted=True), path)
    return path.read_bytes()


def _load_into_fresh(data: bytes, converted: bool, tmp_dir) -> tuple[nn.Module, dict, Exception | None]:
    import qins

    path = tmp_dir / "bad.safetensors"
    path.write_bytes(data)
    model = _Small(1, converted)
    before = _state(model)
    try:
        qins.load(model, path)
    except Exception as exc:  # noqa: BLE001 - the test asserts which
        return model, before, exc
    return model, before, None


@pytest.mark.parametrize("converted", [True, False], ids=["into-converted", "into-skeleton"])
@pytest.mark.parametrize("edit", [
    lambda d: b"", lambda d: d[:7], lambda d: d[:8], lambda d: d[: len(d) // 2], lambda d: d[:-1], lambda d: d + b"\0",
    lambda d: bytes(np.random.default_rng(0).integers(0, 256, len(d), dtype=np.uint8)),
    lambda d: bytes(np.random.default_rng(1).integers(0, 256, 64, dtype=np.uint8)),
], ids=["empty", "7-bytes", "header-length-only", "half", "last-byte-cut", "one-byte-more", "random-same-length",
        "random-64"])
def test_an_empty_truncated_extended_or_random_file_raises_value_error_and_leaves_the_model_unchanged(
    small_file, edit, converted, tmp_path
) -> None:
    model, before, exc = _load_into_fresh(edit(small_file), converted, tmp_path)
    assert isinstance(exc, ValueError), repr(exc)
    assert "not a valid safetensors file" in str(exc)
    assert _same(_state(model), before)


def _with_metadata(data: bytes, tmp_path, **meta: str) -> bytes:
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = tmp_path / "src.safetensors"
    src.write_bytes(data)
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        m = dict(f.metadata()) | meta
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=m)
    return (tmp_path / "edited.safetensors").read_bytes()


@pytest.mark.parametrize("aliases, message", [
    ('{"plain.weight": ["tied"]}', r"alias 'plain.weight' must name a tensor, got \['tied'\]"),
    ('{"plain.weight": {"a": 1}}', "alias 'plain.weight' must name a tensor"),
    ('{"plain.weight": 3}', "alias 'plain.weight' must name a tensor"),
    ('{"plain.weight": "tied", "plain.bias": "tied"}', "'plain.bias' is both a stored tensor and an alias"),
], ids=["owner-a-list", "owner-an-object", "owner-a-number", "alias-shadows-a-stored-tensor"])
def test_a_malformed_alias_raises_value_error_and_leaves_the_model_unchanged(
    small_file, tmp_path, aliases: str, message: str
) -> None:
    model, before, exc = _load_into_fresh(
        _with_metadata(small_file, tmp_path, **{"qins.aliases": aliases}), True, tmp_path
    )
    assert isinstance(exc, ValueError), repr(exc)
    assert re.search(message, str(exc)), str(exc)
    assert _same(_state(model), before)


def test_an_integer_tensor_stored_as_float_is_refused_not_cast(small_file, tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = tmp_path / "src.safetensors"
    src.write_bytes(small_file)
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["ids"] = tensors["ids"].view(torch.float64)  # same bytes, read as floats
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=meta)
    model, before, exc = _load_into_fresh((tmp_path / "edited.safetensors").read_bytes(), True, tmp_path)
    assert isinstance(exc, ValueError) and "ids: dtype must be torch.int64, got torch.float64" in str(exc), repr(exc)
    assert _same(_state(model), before)


def _file_state(data: bytes, tmp_dir) -> dict[str, torch.Tensor]:
    """What the file says, read independently of qins.load: its tensors, aliases resolved."""
    import json

    from safetensors import safe_open

    path = tmp_dir / "oracle.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        out = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads(f.metadata().get("qins.aliases", "{}"))
    return out | {a: out[o] for a, o in aliases.items()}


_FUZZ_EXAMPLES = 500  # about 5 s; 3000 found nothing more (all refused or loaded exactly)


def _mutations(size: int):
    """1-4 byte flips (position, xor mask), then at most one cut (keep the first n bytes) or extension
    (n copies of a byte): any cut or extension is refused, so most examples only flip."""
    from hypothesis import strategies as st

    flip = st.tuples(st.integers(0, size - 1), st.integers(1, 255))
    cut = st.tuples(st.just("truncate"), st.integers(0, size - 1), st.just(0))
    extend = st.tuples(st.just("extend"), st.integers(1, 64), st.integers(0, 255))
    return st.tuples(st.lists(flip, min_size=1, max_size=4), st.one_of(st.none(), st.none(), st.none(), cut, extend))


def _apply(data: bytes, mutation) -> bytes:
    flips, end = mutation
    buf = bytearray(data)
    for pos, mask in flips:
        buf[pos] ^= mask
    if end is not None:
        op, n, byte = end
        buf = buf[:n] if op == "truncate" else buf + bytes([byte]) * n
    return bytes(buf)


@pytest.mark.slow
def test_fuzzed_files_either_raise_value_error_leaving_the_model_unchanged_or_load_exactly_what_they_hold(
    small_file, tmp_path_factory
) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    tmp_dir = tmp_path_factory.mktemp("fuzz")
    outcomes = {"refused": 0, "loaded": 0}

    @settings(max_examples=_FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_mutations(len(small_file)), st.booleans())
    def check(ops, converted: bool) -> None:
        data = _apply(small_file, ops)
        model, before, exc = _load_into_fresh(data, converted, tmp_dir)
        if exc is not None:
            assert isinstance(exc, ValueError), f"{type(exc).__name__}: {exc}"
            assert _same(_state(model), before)
            outcomes["refused"] += 1
            return
        expected, got = _file_state(data, tmp_dir), _state(model)
        assert got.keys() == expected.keys()
        for key, value in got.items():
            assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
        outcomes["loaded"] += 1

    check()
    # Both outcomes occur: flips in the tensor data load (the format has no checksum), flips in the
    # header or metadata and any truncation or extension are refused.
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0, outcomes


# ------------------------------------------------------------------------------------------------
# Native entry points check every tensor argument and every tuning value
# ------------------------------------------------------------------------------------------------

_OUT, _IN = 16, 24


def _linear_args(packed: bool = False, per_row: bool = True) -> dict:
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, (_OUT, _IN), generator=gen, dtype=torch.uint8)
    sign = None if packed else torch.where(torch.rand(_OUT, _IN, generator=gen) < 0.5, -1, 1).to(torch.int8)
    shape = (_OUT,) if per_row else ()
    lo = torch.full(shape, -6.0)
    return {"x": torch.randn(3, _IN, generator=gen), "codes": codes, "sign": sign, "log_min": lo, "log_max": lo + 5,
            "bias": torch.randn(_OUT, generator=gen)}


def _call_linear(mod, args: dict) -> torch.Tensor:
    return mod.linear(args["x"], args["codes"], args["sign"], args["log_min"], args["log_max"], args["bias"], 0, 0)


def _meta(t: torch.Tensor) -> torch.Tensor:
    return t.to("meta")  # another device without a GPU: its data pointer is no host memory


# (argument, replacement, message): each must raise before any pointer is read
_BAD_LINEAR_ARGS = [
    ("x", _meta, "x is on meta"),
    ("codes", _meta, "codes is on meta"),
    ("sign", _meta, "sign is on meta"),
    ("log_min", _meta, "log_min/log_max are on meta/cpu"),
    ("log_max", _meta, "log_min/log_max are on cpu/meta"),
    ("bias", _meta, "bias is on meta"),
    ("x", lambda t: t.to(torch.int32), "x must be floating point"),
    ("x", lambda t: t[:, :-1], r"x.shape\[-1\] must equal in_features"),
    ("x", lambda t: t[0, 0], r"x.shape\[-1\] must equal in_features"),
    ("codes", lambda t: t.to(torch.int8), "codes must be a contiguous uint8"),
    ("codes", lambda t: t.reshape(-1), "codes must be a contiguous uint8"),
    ("codes", lambda t: torch.cat([t, t], 1)[:, ::2], "codes must be a contiguous uint8"),
    ("sign", lambda t: t.to(torch.int16), "sign must be a contiguous int8"),
    ("sign", lambda t: t[:1], "sign must be a contiguous int8"),
    ("sign", lambda t: torch.cat([t, t], 1)[:, ::2], "sign must be a contiguous int8"),
    ("log_min", lambda t: t.double(), "log_min/log_max must be float32"),
    ("log_max", lambda t: t.half(), "log_min/log_max must be float32"),
    ("log_min", lambda t: t[:1], "log_min and log_max must have the same shape"),
    ("log_max", lambda t: t[:1], "log_min and log_max must have the same shape"),
    ("bias", lambda t: t[:-1], r"bias must be a \[out_features\] tensor"),
    ("bias", lambda t: t.reshape(_OUT, 1), r"bias must be a \[out_features\] tensor"),
    ("bias", lambda t: t.to(torch.int64), "bias must be floating point"),
]


@pytest.mark.parametrize("arg, edit, message", _BAD_LINEAR_ARGS,
                         ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(_BAD_LINEAR_ARGS)])
def test_native_linear_refuses_each_bad_tensor_argument(arg: str, edit, message: str) -> None:
    mod = _native()
    args = _linear_args()
    args[arg] = edit(args[arg])
    with pytest.raises(RuntimeError, match=message):
        _call_linear(mod, args)


def test_native_linear_refuses_row_logs_of_another_length_in_both() -> None:
    mod = _native()
    args = _linear_args()
    args["log_min"], args["log_max"] = args["log_min"][:1], args["log_max"][:1]
    with pytest.raises(RuntimeError, match=r"log_min/log_max must be 0-d or \[out\]"):
        _call_linear(mod, args)


def test_native_linear_copies_strided_x_logs_and_bias_instead_of_reading_them_raw() -> None:
    mod = _native()
    args = _linear_args()
    expected = _call_linear(mod, args)
    strided = dict(args)
    strided["x"] = torch.stack([args["x"], args["x"]], 2)[:, :, 0]  # the same values, every other float
    strided["log_min"] = torch.stack([args["log_min"], args["log_min"]], 1)[:, 0]
    strided["log_max"] = torch.stack([args["log_max"], args["log_max"]], 1)[:, 0]
    strided["bias"] = torch.stack([args["bias"], args["bias"]], 1)[:, 0]
    assert not any(strided[k].is_contiguous() for k in ("x", "log_min", "log_max", "bias"))
    assert torch.equal(_call_linear(mod, strided), expected)


@pytest.mark.parametrize(
    "arg, rows", [("sign", 1), ("log_min", 1), ("log_max", 1), ("codes", None)],
    ids=["sign", "log_min", "log_max", "x-width"],
)
def test_native_decode_debug_refuses_buffers_shorter_than_the_layer(arg: str, rows: int | None) -> None:
    mod = _native()
    args = _linear_args()
    if arg == "codes":
        args["x"] = args["x"][:, :-1]
    elif arg == "sign":
        args["sign"] = args["sign"][:rows]
    else:
        args["log_min"], args["log_max"] = args["log_min"][:rows], args["log_max"][:rows]
    with pytest.raises(RuntimeError, match="qins"):
        mod.decode_debug(args["codes"], args["sign"], args["log_min"], args["log_max"], args["x"], 0, 0)


def test_native_decode_debug_refuses_a_one_row_sign_and_logs_for_a_sixteen_row_layer() -> None:
    mod = _native()
    args = _linear_args()
    with pytest.raises(RuntimeError, match="sign must be a contiguous int8 tensor shaped like codes"):
        mod.decode_debug(args["codes"], args["sign"][:1], args["log_min"][:1], args["log_max"][:1], args["x"], 0, 0)


@pytest.mark.parametrize("lo, hi, message", [
    (torch.zeros(4), torch.ones(3), "as many values"),
    (torch.zeros(4, device="meta"), torch.ones(4), "CPU tensors"),
    (torch.zeros(4, dtype=torch.int32), torch.ones(4, dtype=torch.int32), "floating point"),
], ids=["fewer-log-max", "meta", "integer"])
def test_native_table_refuses_mismatched_or_foreign_logs(lo: torch.Tensor, hi: torch.Tensor, message: str) -> None:
    mod = _native()
    with pytest.raises(RuntimeError, match=message):
        mod.table(lo, hi, True, 0, 0)


_TUNING_BAD = [(f, v) for f in TUNING_FIELDS for v in (2**63 - 1, -1)] + [
    ("col_block", 0), ("gemm_rows", 0), ("gemm_cols", 0), ("pipeline", 3), ("own_gemm", 3), ("row_chunk", 0),
    ("row_chunk", 17), ("gather", 2)]


@pytest.mark.parametrize("field, value", _TUNING_BAD, ids=[f"{f}={v}" for f, v in _TUNING_BAD])
def test_native_set_tuning_refuses_a_value_out_of_range_and_changes_nothing(field: str, value: int) -> None:
    mod = _native()
    before = list(mod.get_tuning())
    new = dict(zip(TUNING_FIELDS, before), **{field: value})
    with pytest.raises(RuntimeError, match=rf"{field} must be in \["):
        mod.set_tuning(*(new[f] for f in TUNING_FIELDS))
    assert list(mod.get_tuning()) == before


def test_native_set_tuning_accepts_the_edges_of_each_range_and_linear_runs_with_them() -> None:
    mod = _native()
    before = list(mod.get_tuning())
    args = _linear_args()
    w = decode_codes(args["codes"], args["sign"], args["log_min"], args["log_max"], spacing="log")
    try:
        for values in ((1, 1, 1, 0, 0, 0, 1, 0), (2**40, 2**20, 2**24, 2**20, 2, 2, 16, 1)):
            mod.set_tuning(*values)
            assert list(mod.get_tuning()) == list(values)
            for batch in (3, 40, 70):  # gemv, decoded blocks, decoded blocks of twice the rows
                args["x"] = torch.randn(batch, _IN, generator=torch.Generator().manual_seed(batch))
                expected = args["x"] @ w.t() + args["bias"]
                torch.testing.assert_close(_call_linear(mod, args), expected, rtol=1e-4, atol=1e-4)
    finally:
        mod.set_tuning(*before)


# ------------------------------------------------------------------------------------------------
# A killed build never blocks a later process
# ------------------------------------------------------------------------------------------------

_LOAD = "import qins.kernels as k; m = k.native_module(); assert m is not None; print('loaded', m.__name__)"


def _build_env(tmp_path, name: str, case: str) -> dict:
    """The environment of a first build in ``tmp_path / "ext"`` whose CXX is a shell wrapper: ``case``
    (a ``case "$*" in ... esac`` body) runs first, then the real compiler."""
    import os
    import shutil

    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    wrapper = tmp_path / name
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in {case} esac\nexec "{cxx}" "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), QINS_KERNEL="native", CXX=str(wrapper))
    env.pop("MAX_JOBS", None)
    return env


@pytest.mark.slow
def test_a_build_killed_while_compiling_ops_does_not_block_the_next_process(tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "compiling-ops"
    stall = tmp_path / "stall"  # while it exists, the wrapper stalls on ops.cpp
    # Compiles the ISA units at once; when torch's ninja build reaches ops.cpp (torch's lock file
    # held by then), it leaves a marker and sleeps, to be killed there. Both processes use the same
    # CXX (it is part of the build directory's identity); only the first one stalls.
    # ninja runs each command in a process group of its own, so the kill below does not reach the
    # stalled compiler: it waits for the stall file to go, then exits without compiling anything.
    env = _build_env(tmp_path, "slow-c++", f'*ops.cpp*) if [ -e "{stall}" ]; then touch "{marker}"; '
                     f'while [ -e "{stall}" ]; do sleep 0.2; done; exit 1; fi;;')
    stall.touch()
    first = subprocess.Popen([sys.executable, "-c", _LOAD], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert first.poll() is None, "the first build ended before reaching ops.cpp"
            assert time.monotonic() < deadline, "the first build never reached ops.cpp"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the process, ninja and the sleeping compiler
        first.wait()
    (build_dir,) = (tmp_path / "ext").iterdir()
    assert (build_dir / "lock").exists()  # what used to block every later process forever
    stall.unlink()
    start = time.monotonic()
    second = subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "loaded" in second.stdout
    assert time.monotonic() - start < 400
    assert not (build_dir / "lock").exists()
    assert [p.name for p in (tmp_path / "ext").iterdir()] == [build_dir.name]  # the same build directory


@pytest.mark.slow
def test_two_processes_using_the_kernels_first_at_once_build_once_and_both_load(tmp_path) -> None:
    import subprocess
    import sys

    log = tmp_path / "compiles"
    env = _build_env(tmp_path, "counting-c++", f'*" -c "*) echo "$$" >> "{log}";;')
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "loaded" in out, err[-3000:]
    # every translation unit compiled once: the ISA units and ops.cpp (ninja's compile of ops.cpp
    # goes through CXX too), not once per process
    compiles = log.read_text().split()
    from qins.kernels.cpu import build

    assert len(compiles) == len(build.ISA_UNITS) + 1, compiles


def test_one_meta_input_among_cpu_inputs_is_refused_not_answered_with_uninitialised_memory():
    import qins.kernels  # noqa: F401 - registers qins::linear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, generator=gen)
    codes = torch.randint(0, 256, (4, 8), dtype=torch.uint8, generator=gen)
    lo, hi = torch.full((4,), -3.0), torch.zeros(4)
    y = torch.ops.qins.linear(x, codes, None, lo, hi, None)  # all on CPU: fine
    assert y.shape == (2, 4) and torch.isfinite(y).all()
    for i, meta in enumerate([x, codes, lo, hi]):
        args = [x, codes, None, lo, hi, None]
        args[[0, 1, 3, 4][i]] = meta.to("meta")
        with pytest.raises(RuntimeError, match="every tensor must be on one device"):
            torch.ops.qins.linear(*args)
    all_meta = torch.ops.qins.linear(x.to("meta"), codes.to("meta"), None, lo.to("meta"), hi.to("meta"), None)
    assert all_meta.device.type == "meta" and all_meta.shape == (2, 4)
