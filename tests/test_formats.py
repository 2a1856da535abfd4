"""Formats: QinsConfig, the deterministic exp and level tables, and `encode`'s guarantees.

Hypothesis draws float32 tensors (1e-30..1e30, zeros, sub-normals, single elements) and every
(packed, log_range, per_row) combination; see `tests/strategies.py`.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from qins import QinsConfig, convert_to_qins, decode_codes, encode, level_table, qins_exp, qins_log_slack
from qins.formats import num_levels
from tests.strategies import EXTREME_SPANS, LOG_CONFIGS, config_id, float32_weights, log_configs

F64 = torch.float64


def _as_rows(w: torch.Tensor, config: QinsConfig) -> torch.Tensor:
    """The 2-d view encode works on: ``[out, in]`` per row (1-d inputs become one row)."""
    return w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)


def _encode_rows(w: torch.Tensor, config: QinsConfig):
    w2 = _as_rows(w, config) if config.per_row else w
    codes, sign, lo, hi = encode(w2, config)
    w_hat = decode_codes(codes, sign, lo, hi, spacing="log")
    rows = w2.shape[0] if config.per_row else 1
    return (
        w2.reshape(rows, -1), w_hat.reshape(rows, -1), lo.reshape(rows, 1).to(F64), hi.reshape(rows, 1).to(F64), codes,
        sign,
    )


# ------------------------------------------------------------------------------------------------
# The deterministic exp and the tables
# ------------------------------------------------------------------------------------------------


def test_qins_exp_is_within_one_ulp_of_exp_over_the_whole_weight_range() -> None:
    t = torch.linspace(-87.4, 88.72, 1_000_001)
    y = qins_exp(t)
    ulp = (torch.nextafter(y, torch.tensor(math.inf)) - y).to(F64)
    assert bool(torch.isfinite(y).all())
    assert float(((y.to(F64) - torch.exp(t.to(F64))).abs() / ulp).max()) <= 1.0


@given(st.floats(-87.0, 88.0, width=32), st.floats(0.0, 60.0, width=32), st.booleans())
def test_table_levels_are_decreasing_from_exp_log_max_to_exp_log_min(hi: float, span: float, packed: bool) -> None:
    lo = max(hi - span, -87.0)
    table = level_table(torch.tensor(lo), torch.tensor(hi), packed, spacing="log")[0].to(F64)
    k = 127 if packed else 255
    mags = table[1 : k + 1]
    assert table[0] == 0 and bool((mags[1:] <= mags[:-1]).all()) and bool((mags > 0).all())
    eps = qins_log_slack(lo, hi)
    assert abs(math.log(mags[0]) - hi) <= eps and abs(math.log(mags[-1]) - lo) <= eps
    step = (hi - lo) / (k - 1)
    assert float((mags[:-1].log() - mags[1:].log() - step).abs().max()) <= 2 * eps


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_table_and_exp_compute_in_float32_whatever_dtype_they_are_given(dtype: torch.dtype) -> None:
    """Found by mutation testing: the float32 casts of the logs and of ``t`` were never exercised.
    The logs are chosen to need every bit of float32 (so float64 math would round differently)."""
    lo32 = torch.tensor([-9.123456789, -3.3333333, -0.1]).float()
    hi32 = torch.tensor([1.2345678, -1.0000001, 0.7777777]).float()
    lo, hi = lo32.to(dtype), hi32.to(dtype)
    for packed in (True, False):
        got = level_table(lo, hi, packed, spacing="log")
        assert got.dtype == torch.float32
        assert torch.equal(
            got.view(torch.int32), level_table(lo.float(), hi.float(), packed, spacing="log").view(torch.int32)
        )
    t = torch.linspace(-80.0, 80.0, 4097, dtype=torch.float64) + 1e-9  # not float32-representable
    y = qins_exp(t.to(dtype))
    assert y.dtype == torch.float32
    assert torch.equal(y.view(torch.int32), qins_exp(t.to(dtype).float()).view(torch.int32))


def test_packed_table_upper_half_is_the_exact_negation_of_the_lower_half() -> None:
    table = level_table(torch.tensor([-9.0, -3.5]), torch.tensor([-1.0, 2.0]), packed=True, spacing="log")
    assert table.shape == (2, 256)
    lower, upper = table[:, :128], table[:, 128:]
    assert torch.equal(upper.view(torch.int32), (lower.view(torch.int32) ^ torch.tensor(-(2**31), dtype=torch.int32)))
    assert torch.signbit(table[:, 128]).all() and bool((table[:, 128] == 0).all())


@pytest.mark.parametrize("packed", [True, False])
def test_the_level_table_is_made_on_the_logs_device(packed: bool) -> None:
    for lo, hi in [(torch.tensor(-3.0), torch.tensor(0.5)), (torch.tensor([-9.0, -3.5]), torch.tensor([-1.0, 2.0]))]:
        table = level_table(lo.to("meta"), hi.to("meta"), packed, spacing="log")
        assert table.is_meta and table.shape == (lo.numel(), 256)


def test_the_old_name_seed_warns_and_returns_the_codec_compatible_config() -> None:
    with pytest.warns(FutureWarning, match="codec_compatible"):
        assert QinsConfig.seed() == QinsConfig.codec_compatible()


def test_config_validates_and_codec_compatible_is_split_minmax_per_tensor() -> None:
    assert QinsConfig.codec_compatible() == QinsConfig(packed=False, log_range="minmax", per_row=False, spacing="log")
    assert QinsConfig(spacing="log").levels == 127 and QinsConfig.codec_compatible().levels == 255
    assert QinsConfig(spacing="log").bytes_per_weight == 1 and QinsConfig.codec_compatible().bytes_per_weight == 2
    with pytest.raises(ValueError, match="log_range"):
        QinsConfig(log_range="absmax", spacing="log")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bool"):
        QinsConfig(packed=1, spacing="log")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# encode's guarantees, for every config
# ------------------------------------------------------------------------------------------------


EXTREME = EXTREME_SPANS[-1]  # 2-d: a log span near float32's whole range (~175 nats)


@given(float32_weights(), log_configs)
@example(EXTREME, QinsConfig(spacing="log"))
@example(EXTREME, QinsConfig.codec_compatible())
@example(EXTREME, QinsConfig(False, "mse", False, spacing="log"))
@example(EXTREME, QinsConfig(True, "minmax", True, spacing="log"))
def test_in_range_weights_decode_within_half_a_log_step_with_their_sign(w: torch.Tensor, config: QinsConfig) -> None:
    w2, w_hat, lo, hi, _, _ = _encode_rows(w, config)
    mag = w2.to(F64).abs()
    inside = (mag > 0) & (mag.log() >= lo) & (mag.log() <= hi)
    steps = config.levels - 1
    bound = (hi - lo) / steps / 2 + 2.0**-20 * (1 + lo.abs() + hi.abs())
    err = (w_hat.to(F64).abs().log() - mag.clamp_min(1e-300).log()).abs()
    assert bool((err <= bound)[inside].all()), float((err - bound)[inside].max())
    assert bool((torch.signbit(w_hat) == torch.signbit(w2))[inside | (w2 == 0)].all())


# sub-normals that round past the range
_NEAR_TINY = torch.tensor([[1.1754944e-38, 0.7e-38, 1.0], [-0.65e-38, 1.1754944e-38, 2.0]])


@given(float32_weights(), log_configs)
# past the range, 2|w| >= the smallest level
@example(w=_NEAR_TINY[0], config=QinsConfig(True, "minmax", False, spacing="log"))
@example(w=_NEAR_TINY, config=QinsConfig(True, "minmax", True, spacing="log"))
@example(w=_NEAR_TINY, config=QinsConfig(False, "minmax", True, spacing="log"))
def test_weights_below_the_range_go_to_the_nearer_of_zero_and_the_smallest_level(
    w: torch.Tensor, config: QinsConfig
) -> None:
    w2, w_hat, lo, hi, _, _ = _encode_rows(w, config)
    k = config.levels
    smallest = level_table(lo.reshape(-1).float(), hi.reshape(-1).float(), config.packed, spacing="log")[:, k : k + 1]
    mag = w2.abs()
    below = (mag > 0) & (mag.to(F64).log() < lo)
    expected = torch.where(mag * 2 >= smallest, smallest, torch.zeros_like(mag))
    assert torch.equal(w_hat.abs()[below], expected.expand_as(mag)[below])
    nonzero = below & (w_hat != 0)
    assert bool((torch.signbit(w_hat) == torch.signbit(w2))[nonzero].all())


@given(float32_weights(), log_configs)
def test_exact_zeros_stay_exact_with_their_sign_in_every_format(w: torch.Tensor, config: QinsConfig) -> None:
    w = torch.cat([w.reshape(-1), torch.tensor([0.0, -0.0])]).reshape(1, -1)
    _, w_hat, _, _, _, _ = _encode_rows(w, config)
    zero = w == 0
    assert bool((w_hat[zero] == 0).all()) and torch.equal(torch.signbit(w_hat[zero]), torch.signbit(w[zero]))


@given(float32_weights(), st.booleans(), st.booleans())
@example(EXTREME, True, True)
@example(EXTREME, False, False)
def test_mse_range_never_has_a_larger_squared_error_than_minmax(w: torch.Tensor, packed: bool, per_row: bool) -> None:
    mse = _encode_rows(w, QinsConfig(packed, "mse", per_row, spacing="log"))
    minmax = _encode_rows(w, QinsConfig(packed, "minmax", per_row, spacing="log"))

    def sq_err(res) -> torch.Tensor:  # noqa: ANN001
        w2, w_hat = res[0].to(F64), res[1].to(F64)
        return (w2 - w_hat).square().sum(dim=1)

    assert bool((sq_err(mse) <= sq_err(minmax)).all())


def _sq(w: torch.Tensor, enc) -> float:  # noqa: ANN001
    return float((w.to(F64) - decode_codes(*enc, spacing="log").to(F64)).square().sum())


SPLIT_TENSOR_MSE = QinsConfig(packed=False, log_range="mse", per_row=False, spacing="log")


def test_split_per_tensor_mse_beats_the_seed_codec_on_gaussian_weights() -> None:
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(4))
    mse, seed = encode(w, SPLIT_TENSOR_MSE), encode(w, QinsConfig.codec_compatible())
    assert float(mse[2]) > float(seed[2]) and _sq(w, mse) < 0.9 * _sq(w, seed)


def test_split_per_tensor_mse_returns_the_seed_codec_when_the_search_does_worse(monkeypatch) -> None:
    """The split per-tensor format's minmax is the seed codec: a search result a little worse than
    it (forced: the float32 minmax codes with the largest weight moved down one level) gives way to
    exactly the seed's encoding."""
    import sys

    enc = sys.modules["qins.encode"]

    def bad_search(mag, gap, lo0, hi, packed):  # noqa: ANN001, ANN202
        codes = enc._encode_blocks(mag, gap, lo0, hi, packed)
        codes.view(-1)[mag.argmax()] += 1
        return lo0, codes

    monkeypatch.setattr(enc, "_search", bad_search)
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(5))
    got, seed = encode(w, SPLIT_TENSOR_MSE), encode(w, QinsConfig.codec_compatible())
    assert all(torch.equal(a, b) for a, b in zip(got, seed))


def test_split_per_tensor_mse_keeps_the_seed_codec_on_a_tie_of_the_exact_errors(monkeypatch) -> None:
    import sys

    enc = sys.modules["qins.encode"]
    monkeypatch.setattr(enc, "_sq_error", lambda mag, codes, table: torch.zeros(mag.shape[0], dtype=F64))
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(6))
    got, seed = encode(w, SPLIT_TENSOR_MSE), encode(w, QinsConfig.codec_compatible())
    assert all(torch.equal(a, b) for a, b in zip(got, seed))


@pytest.mark.parametrize("config", LOG_CONFIGS, ids=config_id)
def test_the_smallest_normal_float32_is_in_range_and_sets_log_min(config: QinsConfig) -> None:
    tiny = torch.finfo(torch.float32).tiny
    w = torch.tensor([[tiny, -1.0, 0.5, tiny / 4]])  # tiny / 4 is sub-normal: below every range
    codes, _, lo, hi = encode(w, config)
    if config.log_range == "minmax":
        assert float(lo.reshape(-1)[0]) == pytest.approx(math.log(tiny), rel=1e-6)
        assert int(codes[0, 0]) & (0x7F if config.packed else 0xFF) == num_levels(config.packed)  # the smallest level
    else:
        assert float(lo.reshape(-1)[0]) >= float(torch.tensor(tiny).log())


@pytest.mark.parametrize("config", LOG_CONFIGS, ids=config_id)
def test_logs_are_float32_under_a_float64_default_dtype(config: QinsConfig) -> None:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        codes, _, lo, hi = encode(torch.randn(4, 5, dtype=torch.float32), config)
    finally:
        torch.set_default_dtype(before)
    assert lo.dtype == hi.dtype == torch.float32 and codes.dtype == torch.uint8


@given(float32_weights(), log_configs)
def test_largest_magnitude_of_each_row_gets_code_one_and_log_max_is_its_log(
    w: torch.Tensor, config: QinsConfig
) -> None:
    w2, _, lo, hi, codes, _ = _encode_rows(w, config)
    mag_codes = codes.reshape(w2.shape[0], -1) & 0x7F if config.packed else codes.reshape(w2.shape[0], -1)
    top = w2.abs().amax(dim=1, keepdim=True)
    normal = top >= torch.finfo(torch.float32).tiny
    hit = (w2.abs() == top) & normal
    assert bool((mag_codes[hit] == 1).all())
    # float32 log of the largest |w| (the seed computes it in float64 and rounds: within 1 ulp)
    expected = top[normal].to(F64).log()
    got = hi[normal.reshape(-1)].reshape(-1)
    assert bool(((got - expected).abs() <= expected.abs() * 2.0**-23 + 1e-30).all())
    assert bool((lo <= hi).all())


@given(float32_weights())
def test_seed_config_reproduces_convert_to_qins_codes_exactly(w: torch.Tensor) -> None:
    codes, sign, lo, hi = encode(w, QinsConfig.codec_compatible())
    c0, s0, lo0, hi0 = convert_to_qins(w)
    assert torch.equal(codes, c0) and torch.equal(sign, s0)
    assert (
        float(lo) == torch.tensor(lo0, dtype=torch.float32).item()
        and float(hi) == torch.tensor(hi0, dtype=torch.float32).item()
    )


@given(float32_weights(), st.booleans(), st.sampled_from(["mse", "minmax"]))
def test_packed_byte_is_sign_bit_7_and_a_seven_bit_magnitude_code(
    w: torch.Tensor, per_row: bool, log_range: str
) -> None:
    config = QinsConfig(True, log_range, per_row, spacing="log")  # type: ignore[arg-type]
    w2, w_hat, _, _, codes, sign = _encode_rows(w, config)
    codes = codes.reshape(w2.shape)
    assert sign is None and codes.dtype == torch.uint8
    assert torch.equal((codes >> 7).bool(), torch.signbit(w2))
    assert int((codes & 0x7F).max()) <= 127
    assert torch.equal((codes & 0x7F) == 0, w_hat == 0)


@pytest.mark.parametrize("config", LOG_CONFIGS, ids=config_id)
def test_encode_shapes_dtypes_and_bad_input(config: QinsConfig) -> None:
    w = torch.randn(6, 10)
    codes, sign, lo, hi = encode(w, config)
    assert codes.shape == (6, 10) and codes.dtype == torch.uint8
    assert (sign is None) == config.packed and (sign is None or sign.dtype == torch.int8)
    assert lo.dtype == hi.dtype == torch.float32 and lo.shape == hi.shape == ((6,) if config.per_row else ())
    with pytest.raises(ValueError, match="non-finite"):
        encode(torch.tensor([[1.0, float("nan")]]), config)
    if config.per_row:
        with pytest.raises(ValueError, match="2-d"):
            encode(torch.randn(2, 3, 4), config)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", LOG_CONFIGS, ids=config_id)
def test_encode_of_any_float_dtype_is_the_encode_of_its_float32_values(config: QinsConfig, dtype: torch.dtype) -> None:
    w = (torch.randn(6, 10, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    got, want = encode(w, config), encode(w.to(torch.float32), config)
    for a, b in zip(got, want):
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))


def test_all_zero_rows_flush_and_other_rows_keep_their_own_range() -> None:
    w = torch.tensor([[0.0, 0.0, -0.0], [1.0, 0.5, -0.25], [1e-3, 2e-3, 4e-3]])
    codes, _, lo, hi = encode(w, QinsConfig(packed=True, log_range="minmax", per_row=True, spacing="log"))
    assert torch.equal(codes[0] & 0x7F, torch.zeros(3, dtype=torch.uint8))
    assert torch.allclose(hi, torch.tensor([0.0, 0.0, math.log(4e-3)]))
    assert torch.allclose(lo, torch.tensor([0.0, math.log(0.25), math.log(1e-3)]))


@pytest.mark.parametrize("config", LOG_CONFIGS, ids=config_id)
def test_float32_maximum_weight_decodes_finite_and_its_state_loads(config: QinsConfig) -> None:
    from qins import ProjectiveLinear
    from qins.formats import LOG_FLOAT32_MAX

    w = torch.tensor([[3.4028234663852886e38, -2.5, 1e-3], [-3.4028234663852886e38, 3.4028234663852886e38, 0.0]])
    codes, sign, lo, hi = encode(w, config)
    assert float(hi.max()) == LOG_FLOAT32_MAX and bool((lo <= hi).all())
    w_hat = decode_codes(codes, sign, lo, hi, spacing="log")
    assert bool(torch.isfinite(w_hat).all())
    top = w.abs() == w.abs().max()
    assert bool(((w_hat[top].to(F64) / w[top].to(F64) - 1).abs() <= 1e-5).all())  # 7.3e-6 below, same sign
    lin = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    for cache_weight in (True, False):
        layer = ProjectiveLinear.from_linear(lin, config, cache_weight=cache_weight)
        fresh = ProjectiveLinear(3, 2, bias=False, config=config, cache_weight=cache_weight)
        fresh.load_state_dict(layer.state_dict())  # its own state passes validation (log_max is finite-safe)
        assert bool(torch.isfinite(fresh(torch.tensor([[1e-30, 0.0, 0.0]]))).all())
    assert LOG_FLOAT32_MAX <= math.log(torch.finfo(torch.float32).max)
    nxt = torch.nextafter(torch.tensor(LOG_FLOAT32_MAX), torch.tensor(math.inf))
    assert bool(torch.isfinite(qins_exp(torch.tensor(LOG_FLOAT32_MAX)))) and not bool(torch.isfinite(qins_exp(nxt)))


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("log_range", ["minmax", "mse"])
def test_per_row_encode_of_a_weight_larger_than_one_block_equals_encoding_each_row_alone(
    packed: bool, log_range: str
) -> None:
    """300 rows of 300 (90,000 elements): the encoder's cache-sized blocks split the rows, and
    each row still gets its own range and table. (Pairs of rows, not single rows: a one-row
    weight is searched with the finer per-tensor histogram.)"""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(300, 300, generator=g) * torch.logspace(-3, 1, 300).unsqueeze(1)
    config = QinsConfig(packed, log_range, True, spacing="log")
    codes, sign, lo, hi = encode(w, config)
    for i in (0, 216, 217, 218, 298):  # both sides of the block boundary (218 rows a block)
        c, s, lo_i, h = encode(w[i : i + 2], config)
        assert torch.equal(codes[i : i + 2], c) and (sign is None or torch.equal(sign[i : i + 2], s))
        assert torch.equal(lo[i : i + 2], lo_i) and torch.equal(hi[i : i + 2], h)
