"""Codec properties: the log-error invariant and everything else the format promises.

Hypothesis draws float32 tensors of varied shapes and scales (1e-30..1e30, zeros, subnormals,
single elements); see `tests/strategies.py`.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from qins import (
    SMALLEST_NORMAL,
    convert_to_qins,
    qins_error_bound,
    qins_levels,
    qins_log_slack,
    reconstruct_from_qins,
)
from tests.strategies import EXTREME_SPANS, default_dtype, extreme_span_examples, float32_weights

F64 = torch.float64


def _roundtrip(w: torch.Tensor, dtype: torch.dtype = torch.float32):
    stored, sign, lo, hi = convert_to_qins(w)
    return stored, sign, lo, hi, reconstruct_from_qins(stored, sign, lo, hi, dtype=dtype)


def _boundary_distance(w: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Distance (nats, float64) of log|w| from the nearest rounding boundary between two levels."""
    levels = qins_levels(lo, hi)[1:].flip(0).to(F64)
    log_levels = levels.log()
    mids = (log_levels[:-1] + log_levels[1:]) / 2
    lw = w.to(F64).abs().clamp_min(1e-300).log().reshape(-1, 1)
    return (lw - mids.reshape(1, -1)).abs().min(dim=1).values.reshape(w.shape)


# ------------------------------------------------------------------------------------------------
# The invariant
# ------------------------------------------------------------------------------------------------


@given(float32_weights())
@extreme_span_examples
def test_log_error_within_half_step_plus_float32_slack(w: torch.Tensor) -> None:
    stored, sign, lo, hi, w_hat = _roundtrip(w)
    in_range = w.abs() >= SMALLEST_NORMAL
    assume(bool(in_range.any()))
    bound = qins_error_bound(lo, hi) + qins_log_slack(lo, hi)
    err = (w_hat.to(F64).abs().log() - w.to(F64).abs().log())[in_range].abs()
    assert float(err.max()) <= bound, (float(err.max()), bound)


@given(float32_weights())
def test_exact_signs_and_exact_zeros(w: torch.Tensor) -> None:
    stored, sign, lo, hi, w_hat = _roundtrip(w)
    assert torch.equal(sign, torch.where(torch.signbit(w), -1, 1).to(torch.int8))
    zero = w == 0
    normal = w.abs() >= SMALLEST_NORMAL
    assert bool((stored[zero] == 0).all()) and bool((w_hat[zero] == 0).all())
    assert bool((stored[normal] != 0).all()) and bool((w_hat[normal] != 0).all())
    # Every decoded value, zeros included, carries the input's sign bit.
    assert torch.equal(torch.signbit(w_hat), torch.signbit(w))


@given(float32_weights())
def test_codes_in_range_and_dtypes(w: torch.Tensor) -> None:
    stored, sign, lo, hi, _ = _roundtrip(w)
    assert stored.dtype == torch.uint8 and sign.dtype == torch.int8
    assert stored.shape == w.shape == sign.shape
    assert isinstance(lo, float) and isinstance(hi, float) and lo <= hi
    normal = w.abs() >= SMALLEST_NORMAL
    assert bool((stored[normal] >= 1).all())
    assert set(sign.unique().tolist()) <= {-1, 1}
    if normal.any():
        # The largest |w| gets code 1; the smallest normal |w| code 255 (unless all are equal).
        assert int(stored[w.abs() == w.abs().max()][0]) == 1
        mags = w.abs()[normal]
        if float(mags.min()) != float(mags.max()):
            assert int(stored[w.abs() == mags.min()][0]) == 255


@given(float32_weights())
def test_codes_are_monotone_in_magnitude(w: torch.Tensor) -> None:
    stored, *_ = _roundtrip(w)
    mags = w.abs().reshape(-1)
    codes = stored.reshape(-1).to(torch.int32)
    order = torch.argsort(mags, stable=True)
    nz = mags[order] > 0
    c = codes[order][nz]
    # Sorted by increasing |w|, the non-zero codes never increase (sub-normals may be 0 or 255).
    normal_sorted = mags[order][nz] >= SMALLEST_NORMAL
    c_normal = c[normal_sorted]
    assert bool((c_normal[1:] <= c_normal[:-1]).all())


@given(float32_weights())
def test_encode_decode_encode_is_idempotent(w: torch.Tensor) -> None:
    """Holds whenever a quantisation step is resolvable in float32 (Δ/2 > 4ε) or all |w| are equal;
    below that, neighbouring levels round to the same float32 value."""
    stored, sign, lo, hi, w_hat = _roundtrip(w)
    assume(lo == hi or qins_error_bound(lo, hi) > 4 * qins_log_slack(lo, hi))
    stored2, sign2, lo2, hi2 = convert_to_qins(w_hat)
    assert torch.equal(stored2, stored)
    assert torch.equal(sign2, sign)
    assert math.isclose(lo2, lo, rel_tol=1e-6, abs_tol=1e-6) and math.isclose(hi2, hi, rel_tol=1e-6, abs_tol=1e-6)


@given(float32_weights(min_log10=-20, max_log10=20, allow_subnormal=False), st.integers(-30, 30))
def test_scaling_by_power_of_two_keeps_codes_and_shifts_logs(w: torch.Tensor, k: int) -> None:
    """Multiplying by c = 2**k (exact in float32 here) keeps every code not within float32 slack of a
    rounding boundary, and shifts log_min/log_max by log(c)."""
    c = 2.0**k
    stored, sign, lo, hi = convert_to_qins(w)
    assume(bool((w != 0).any()))
    stored_c, sign_c, lo_c, hi_c = convert_to_qins(w * c)
    assert torch.equal(sign_c, sign)
    shift = k * math.log(2.0)
    tol = qins_log_slack(lo_c, hi_c)
    assert abs(lo_c - (lo + shift)) <= tol and abs(hi_c - (hi + shift)) <= tol
    if lo == hi:  # all-equal: every code is 1 by definition
        assert torch.equal(stored_c, stored)
        return
    away = _boundary_distance(w, lo, hi) > 4 * (qins_log_slack(lo, hi) + qins_log_slack(lo_c, hi_c))
    assert torch.equal(stored_c[away], stored[away])


@given(float32_weights(min_log10=-20, max_log10=20, allow_subnormal=False), st.floats(1e-3, 1e3))
def test_scaling_by_any_positive_constant_moves_codes_at_most_one_step(w: torch.Tensor, c: float) -> None:
    """w·c is rounded to float32, so this needs a step resolvable in float32 (Δ/2 > 4ε)."""
    stored, _, lo, hi = convert_to_qins(w)
    assume(lo < hi and qins_error_bound(lo, hi) > 4 * qins_log_slack(lo, hi))
    stored_c, *_ = convert_to_qins(w * c)
    diff = (stored_c.to(torch.int32) - stored.to(torch.int32)).abs()
    assert int(diff.max()) <= 1


# ------------------------------------------------------------------------------------------------
# Specific cases
# ------------------------------------------------------------------------------------------------


def test_exact_zero_encodes_to_zero_and_decodes_to_zero() -> None:
    w = torch.tensor([0.0, -0.0, 1.0, -2.0])
    stored, sign, lo, hi, w_hat = _roundtrip(w)
    assert stored.tolist()[:2] == [0, 0]
    assert w_hat[0].item() == 0.0 and w_hat[1].item() == 0.0
    assert torch.signbit(w_hat[1]) and not torch.signbit(w_hat[0])


def test_all_zero_tensor_gives_all_zero_codes() -> None:
    w = torch.zeros(3, 4)
    stored, sign, lo, hi, w_hat = _roundtrip(w)
    assert int(stored.max()) == 0 and (lo, hi) == (0.0, 0.0)
    assert torch.equal(w_hat, w)


@given(st.floats(SMALLEST_NORMAL, 3.4028234663852886e38, width=32), st.integers(1, 20), st.booleans())
def test_all_equal_magnitudes_decode_to_exactly_that_magnitude(x: float, n: int, mixed_signs: bool) -> None:
    signs = torch.tensor([(-1.0) ** i if mixed_signs else 1.0 for i in range(n)])
    w = (signs * x).to(torch.float32)
    stored, sign, lo, hi, w_hat = _roundtrip(w)
    assert bool((stored == 1).all())
    assert torch.equal(w_hat, w)


def test_all_equal_decodes_exactly_for_5000_random_magnitudes() -> None:
    g = torch.Generator().manual_seed(0)
    xs = (torch.rand(5000, generator=g, dtype=F64) * 170 - 85).exp().to(torch.float32)
    bad = [x for x in xs.tolist() if not torch.equal(_roundtrip(torch.full((2,), x))[4], torch.full((2,), x))]
    assert bad == []


def test_single_element_tensor_roundtrips_exactly() -> None:
    for x in (1.0, -3.5e-20, 7.25e25):
        w = torch.tensor([x])
        assert torch.equal(_roundtrip(w)[4], w)


def test_subnormal_weight_goes_to_the_nearer_of_zero_and_smallest_level() -> None:
    tiny = SMALLEST_NORMAL
    # Smallest level is 2**-126 (the smallest normal), so 0.6*tiny is nearer to it, 0.4*tiny to 0.
    w = torch.tensor([tiny, 1.0, 0.6 * tiny, 0.4 * tiny, -0.6 * tiny], dtype=torch.float32)
    stored, sign, lo, hi, w_hat = _roundtrip(w)
    smallest = qins_levels(lo, hi)[255]
    assert stored.tolist() == [255, 1, 255, 0, 255]
    assert w_hat[2].item() == smallest.item() and w_hat[3].item() == 0.0 and w_hat[4].item() == -smallest.item()


def test_a_subnormal_exactly_halfway_to_the_smallest_level_goes_to_the_level() -> None:
    tiny = SMALLEST_NORMAL
    w = torch.tensor([tiny, 1.0, tiny / 2, -tiny / 2], dtype=torch.float32)  # 2**-127 is a subnormal
    stored, sign, lo, hi, w_hat = _roundtrip(w)
    assert float(qins_levels(lo, hi)[255]) == tiny  # so tiny / 2 is exactly halfway to 0
    assert stored.tolist() == [255, 1, 255, 255]
    assert w_hat[2:].tolist() == [tiny, -tiny]


def test_only_subnormal_weights_encode_to_zero() -> None:
    w = torch.tensor([1e-40, -3e-42], dtype=torch.float32)
    stored, sign, lo, hi, w_hat = _roundtrip(w)
    assert stored.tolist() == [0, 0] and (lo, hi) == (0.0, 0.0)
    assert sign.tolist() == [1, -1]


def test_seed_mapping_code_formula_matches_for_typical_weights() -> None:
    """code = round(255 - 254 n), n = (log|w| - log_min)/(log_max - log_min), checked in float64
    away from rounding boundaries."""
    w = torch.randn(64, 64)
    stored, sign, lo, hi = convert_to_qins(w)
    n = (w.to(F64).abs().log() - lo) / (hi - lo)
    ideal = 255 - 254 * n
    away = (ideal - ideal.floor() - 0.5).abs() > 1e-3
    assert torch.equal(stored.to(F64)[away], ideal.round()[away])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_encoding_computes_in_float32_for_every_input_dtype(dtype: torch.dtype) -> None:
    w = torch.randn(16, 8, dtype=F64).to(dtype)  # in float64, most values lie between two float32s
    stored, sign, lo, hi = convert_to_qins(w)
    ref = convert_to_qins(w.to(torch.float32))
    assert torch.equal(stored, ref[0]) and torch.equal(sign, ref[1]) and (lo, hi) == ref[2:]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_decode_dtype_is_the_requested_dtype_and_rounds_the_float32_decode(dtype: torch.dtype) -> None:
    w = torch.randn(8, 8)
    stored, sign, lo, hi = convert_to_qins(w)
    out = reconstruct_from_qins(stored, sign, lo, hi, dtype=dtype)
    assert out.dtype == dtype
    assert torch.equal(out, reconstruct_from_qins(stored, sign, lo, hi).to(dtype))


def test_decode_accepts_0d_tensors_and_writes_into_out() -> None:
    w = torch.randn(4, 5)
    stored, sign, lo, hi = convert_to_qins(w)
    ref = reconstruct_from_qins(stored, sign, lo, hi)
    out = torch.empty(4, 5)
    as64 = [torch.tensor(v, dtype=F64) for v in (lo, hi)]
    res = reconstruct_from_qins(stored, sign, *as64, out=out)
    assert res is out and torch.equal(out, ref)


@given(float32_weights(allow_subnormal=False))
@extreme_span_examples
def test_float32_log_buffers_decode_within_the_same_bound(w: torch.Tensor) -> None:
    """The layer path (0-d float32 logs, float32 table on device) also meets Δ/2 + ε."""
    stored, sign, lo, hi = convert_to_qins(w)
    nz = w != 0
    assume(bool(nz.any()))
    w_hat = reconstruct_from_qins(
        stored, sign, torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
    )
    lo32, hi32 = float(torch.tensor(lo, dtype=torch.float32)), float(torch.tensor(hi, dtype=torch.float32))
    bound = qins_error_bound(lo, hi) + qins_log_slack(lo32, hi32)
    err = (w_hat.to(F64).abs().log() - w.to(F64).abs().log())[nz].abs()
    assert float(err.max()) <= bound


@pytest.mark.parametrize("w", EXTREME_SPANS, ids=["whole-range", "mixed", "2d", "near-top", "2d-max"])
def test_extreme_log_spans_decode_finite_nonzero_with_the_extremes_exact_in_order(w: torch.Tensor) -> None:
    stored, sign, lo, hi, w_hat = _roundtrip(w)
    nonzero = w != 0
    assert bool(torch.isfinite(w_hat).all()) and bool((w_hat[nonzero] != 0).all())
    big, small = w.abs()[nonzero].max(), w.abs()[nonzero].min()
    assert int(stored[w.abs() == big][0]) == 1 and int(stored[w.abs() == small][0]) == 255
    assert math.isclose(hi - lo, math.log(float(big)) - math.log(float(small)), rel_tol=1e-6)
    assert torch.equal(torch.signbit(w_hat), torch.signbit(w))


@pytest.mark.parametrize("x", [1.1754943508222875e-38, 1e-20, 1.0, 3.0, 1e20, 3.4028232635611926e38])
def test_two_adjacent_float32_magnitudes_get_codes_1_and_255(x: float) -> None:
    small = torch.tensor(x, dtype=torch.float32)
    big = torch.nextafter(small, torch.tensor(math.inf))
    w = torch.stack([small, -big, big, -small])
    stored, sign, lo, hi, w_hat = _roundtrip(w)
    assert stored.tolist() == [255, 1, 1, 255]
    assert torch.equal(w_hat.abs().to(torch.float32), w.abs())  # both decode exactly
    assert sign.tolist() == [1, -1, 1, -1]


def _float32_band(x: float, count: int = 64) -> torch.Tensor:
    """``count`` consecutive float32 values from the float32 nearest ``x`` upwards."""
    first = int(torch.tensor(x, dtype=torch.float32).view(torch.int32))
    return torch.arange(first, first + count, dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize("x", [1e-30, 1e-20, 1e-3, 3.0, 1e20, 1e30, 1e38])
def test_a_band_of_consecutive_float32_magnitudes_gets_monotone_codes_from_1_to_255(x: float) -> None:
    # 64 neighbours span far less than one float32 rounding step of their logs, so the element-wise
    # float32 logs of the interior jump past [log_min, log_max] (float64, from the extremes); their
    # codes must be clamped to the ends of 1..255, not wrapped through uint8.
    w = _float32_band(x)
    stored, *_ = _roundtrip(w)
    codes = stored.to(torch.int32)
    assert bool((codes >= 1).all()) and int(codes[0]) == 255 and int(codes[-1]) == 1
    assert bool((codes[1:] <= codes[:-1]).all())


def test_codes_of_magnitudes_whose_logs_fall_outside_the_range_are_clamped_not_wrapped() -> None:
    # What float32 rounding of the logs does to interior magnitudes, exaggerated: a range narrower
    # than the interior puts 2.0 below log_min (ideal code > 255) and 3.0 above log_max (< 1).
    from qins.codec import _codes

    mag = torch.tensor([1.0, 2.0, 3.0, 4.0])
    lo, hi = math.log(2.5), math.log(2.6)
    codes = _codes(mag, mag[0], mag[-1], lo, hi, qins_levels(lo, hi)[255])
    assert codes.dtype == torch.uint8 and codes.tolist() == [255, 255, 1, 1]


def test_log_slack_is_2_pow_minus_20_times_one_plus_both_magnitudes() -> None:
    assert qins_log_slack(0.0, 0.0) == 2.0**-20
    assert qins_log_slack(-3.0, 2.5) == 2.0**-20 * 6.5
    assert qins_log_slack(-87.0, 88.0) == 2.0**-20 * 176.0
    assert qins_log_slack(4.0, -4.0) == qins_log_slack(-4.0, 4.0)


def test_error_bound_is_half_a_log_step() -> None:
    assert qins_error_bound(-2.0, 0.54) == pytest.approx((0.54 + 2.0) / 254 / 2, rel=1e-15)
    assert qins_error_bound(-127.0, 127.0) == 0.5
    assert qins_error_bound(1.0, 1.0) == 0.0
    with pytest.raises(ValueError, match=r"^need finite log_min <= log_max, got 1.0, 0.0$"):
        qins_error_bound(1.0, 0.0)
    for lo, hi in [(math.nan, 0.0), (0.0, math.nan), (-math.inf, 0.0), (0.0, math.inf)]:  # either one not finite
        with pytest.raises(ValueError, match="need finite"):
            qins_error_bound(lo, hi)


def test_encoding_never_modifies_its_input() -> None:
    w = torch.randn(10, 3)
    w[0, 0] = 0.0
    copy = w.clone()
    convert_to_qins(w)
    assert torch.equal(w, copy)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_raises_with_count_and_first_index(bad: float) -> None:
    w = torch.ones(3, 4)
    w[1, 2] = bad
    w[2, 0] = bad
    copy = w.clone()
    with pytest.raises(
        ValueError, match=rf"^weight has 2 non-finite value\(s\) \(NaN or ±Inf\); first at index \(1, 2\) = {bad}$"
    ):
        convert_to_qins(w)
    assert torch.equal(w.isnan(), copy.isnan()) and torch.equal(w.nan_to_num(), copy.nan_to_num())


@pytest.mark.parametrize(
    "w, message",
    [
        (torch.ones(3, dtype=torch.int32), r"^expected a floating-point tensor, got dtype torch\.int32$"),
        (torch.ones(3, dtype=torch.bool), r"^expected a floating-point tensor, got dtype torch\.bool$"),
        (torch.tensor(1.0), r"^expected a tensor with at least one dimension, got a 0-d tensor$"),
        (torch.empty(0, 4), r"^expected a non-empty tensor, got shape \(0, 4\)$"),
        ([1.0, 2.0], r"^expected a torch\.Tensor, got list$"),
    ],
    ids=["int", "bool", "0-d", "empty", "list"],
)
def test_bad_tensor_raises_value_error_naming_the_problem(w: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        convert_to_qins(w)


def test_float64_weight_that_overflows_float32_is_rejected_like_nan() -> None:
    """1e300 is finite in float64 but inf in float32; it must not turn 0.5 and 0.25 into NaN."""
    w = torch.tensor([0.5, 0.25, 1e300], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"1 value\(s\) that overflow float32.*index \(2,\) = 1e\+300"):
        convert_to_qins(w)


def test_decode_rejects_non_uint8_codes_and_mismatched_sign() -> None:
    with pytest.raises(ValueError, match="uint8"):
        reconstruct_from_qins(torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.int8), 0.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        reconstruct_from_qins(torch.ones(3, dtype=torch.uint8), torch.ones(2, dtype=torch.int8), 0.0, 1.0)


# ---- the float32 table from 0-d tensors (found by mutation testing) ----


def test_mixed_tensor_and_float_logs_give_the_float32_table_of_the_tensor_path() -> None:
    lo, hi = torch.tensor(-3.25), torch.tensor(0.5)
    both = qins_levels(lo, hi)
    assert torch.equal(qins_levels(lo, 0.5), both) and torch.equal(qins_levels(-3.25, hi), both)
    assert both.dtype == torch.float32


def test_half_precision_0d_logs_are_widened_to_float32_before_the_table_is_computed() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        lo, hi = torch.tensor(-3.1, dtype=dtype), torch.tensor(0.3, dtype=dtype)
        table = qins_levels(lo, hi)
        assert table.dtype == torch.float32 and torch.equal(table, qins_levels(lo.float(), hi.float()))


def test_a_float_beside_a_float32_log_is_rounded_to_float32_whatever_the_default_dtype() -> None:
    lo = torch.tensor(-2.462, dtype=torch.float32)  # inexact values whose float64 difference rounds differently
    want = qins_levels(lo, torch.tensor(1.226, dtype=torch.float32))
    with default_dtype(torch.float64):
        mixed = qins_levels(lo, 1.226)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, want)


def test_logs_must_be_0d_tensors() -> None:
    with pytest.raises(ValueError, match=r"^log_min/log_max must be 0-d, got shape \(2,\)$"):
        qins_levels(torch.tensor([-3.0, -2.0]), torch.tensor(0.5))
    stored, sign = torch.ones(3, dtype=torch.uint8), torch.ones(3, dtype=torch.int8)
    with pytest.raises(ValueError, match="0-d"):
        reconstruct_from_qins(stored, sign, torch.tensor(-1.0), torch.zeros(1, 1))


@pytest.mark.parametrize("lo, hi", [(-87.3365, 88.7228), (-87.0, 80.0), (-60.0, 88.0), (-3.0, 0.5)])
def test_the_float32_table_is_the_float64_table_within_the_log_slack(lo: float, hi: float) -> None:
    # The float32 path (0-d float32 logs) over float32's whole normal range: no level saturates.
    lo32, hi32 = torch.tensor(lo), torch.tensor(hi)
    narrow, wide = qins_levels(lo32, hi32), qins_levels(float(lo32), float(hi32))
    err = (narrow[1:].to(F64).log() - wide[1:].to(F64).log()).abs().max()
    assert float(err) <= qins_log_slack(float(lo32), float(hi32))


def test_the_table_is_made_on_the_logs_device_when_no_device_is_asked() -> None:
    lo, hi = torch.tensor(-3.0, device="meta"), torch.tensor(0.5, device="meta")
    assert qins_levels(lo, hi).is_meta and qins_levels(lo, 0.5).is_meta


@pytest.mark.parametrize("dtype", [None, torch.float32, F64])  # None: Python floats
def test_the_table_has_256_float32_levels_zero_then_exp_log_max_down_to_exp_log_min(dtype) -> None:
    lo, hi = (-3.0, 0.5) if dtype is None else (torch.tensor(-3.0, dtype=dtype), torch.tensor(0.5, dtype=dtype))
    table = qins_levels(lo, hi)
    assert table.shape == (256,) and table.dtype == torch.float32 and float(table[0]) == 0.0
    assert math.isclose(float(table[1]), math.exp(0.5), rel_tol=1e-6)
    assert math.isclose(float(table[255]), math.exp(-3.0), rel_tol=1e-6)
    assert bool((table[1:-1] >= table[2:]).all())


def test_the_table_and_the_decode_land_on_the_requested_device() -> None:
    assert qins_levels(torch.tensor(-3.0), torch.tensor(0.5), device=torch.device("meta")).is_meta
    assert qins_levels(torch.tensor(-3.0), 0.5, device=torch.device("meta")).is_meta
    stored, sign = torch.ones(2, 3, dtype=torch.uint8, device="meta"), torch.ones(2, 3, dtype=torch.int8, device="meta")
    assert reconstruct_from_qins(stored, sign, -3.0, 0.5).is_meta
    assert reconstruct_from_qins(stored, sign, torch.tensor(-3.0), torch.tensor(0.5)).is_meta


# ---- the blocked CPU decode (no temporaries of the tensor's size) ----


def _decode_formula(stored: torch.Tensor, sign: torch.Tensor, lo, hi, dtype=torch.float32) -> torch.Tensor:
    """The format's definition in one expression: ``sign · levels[stored]`` in ``dtype``."""
    return qins_levels(lo, hi).to(dtype)[stored.long()] * sign


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).view(torch.int32)  # compares -0.0 and 0.0 as different


@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 13)),
    block=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_blocked_decode_equals_the_formula_bit_for_bit_at_every_block_boundary(
    shape, block: int, seed: int, dtype: torch.dtype
) -> None:
    import qins.codec

    g = torch.Generator().manual_seed(seed)
    stored = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1, 1).to(torch.int8)
    lo, hi = torch.tensor(-4.5), torch.tensor(0.25)
    want = _decode_formula(stored, sign, lo, hi, dtype)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(qins.codec, "_CPU_BLOCK", block)
        got = reconstruct_from_qins(stored, sign, lo, hi, dtype=dtype)
        into = torch.full(shape, 7.0, dtype=dtype)
        res = reconstruct_from_qins(stored, sign, lo, hi, dtype=dtype, out=into)
    assert got.dtype == dtype and torch.equal(_bits(got), _bits(want))
    assert res is into and torch.equal(_bits(into), _bits(want))


def test_decode_into_a_strided_or_other_dtype_out_writes_every_element() -> None:
    stored, sign, lo, hi = convert_to_qins(torch.randn(6, 10))
    want = _decode_formula(stored, sign, lo, hi)
    strided = torch.full((10, 6), 3.0).t()  # non-contiguous
    assert reconstruct_from_qins(stored, sign, lo, hi, out=strided) is strided
    assert torch.equal(_bits(strided), _bits(want))
    wide = torch.full((6, 10), 3.0, dtype=torch.float64)
    assert reconstruct_from_qins(stored, sign, lo, hi, out=wide) is wide
    assert torch.equal(wide, want.to(torch.float64))


def test_decode_of_a_non_contiguous_code_tensor_follows_its_logical_layout() -> None:
    stored, sign, lo, hi = convert_to_qins(torch.randn(7, 5))
    got = reconstruct_from_qins(stored.t(), sign.t(), lo, hi)
    assert torch.equal(_bits(got), _bits(_decode_formula(stored, sign, lo, hi).t()))


def test_decode_rejects_an_out_of_another_shape_and_leaves_it_untouched() -> None:
    stored, sign, lo, hi = convert_to_qins(torch.randn(4, 5))
    out = torch.full((5, 4), 3.0)
    with pytest.raises(ValueError, match=r"^out shape \(5, 4\) != stored shape \(4, 5\)$"):
        reconstruct_from_qins(stored, sign, lo, hi, out=out)
    assert bool((out == 3.0).all())


@given(w=float32_weights(), block=st.sampled_from([64, 128]))
@example(w=EXTREME_SPANS[1], block=64)
def test_blocked_encode_equals_the_one_block_encode(w: torch.Tensor, block: int) -> None:
    """The range comes from every block, not the first, and codes match bit for bit.

    ``w`` follows 130 copies of its first element, so the first block or two hold one value and
    the extremes sit in later blocks. Blocks are multiples of 64 elements, so the SIMD kernels
    split the data as unblocked ones do.
    """
    import qins.codec

    flat = w.reshape(-1)
    x = torch.cat([flat[:1].expand(130), flat])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(qins.codec, "_CPU_BLOCK", 1 << 30)
        whole = convert_to_qins(x)
        m.setattr(qins.codec, "_CPU_BLOCK", block)
        blocked = convert_to_qins(x)
    assert torch.equal(blocked[0], whole[0]) and torch.equal(blocked[1], whole[1])
    assert blocked[2:] == whole[2:]


def _largest_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) torch's profiler sees while ``fn`` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events()] + [0])


@pytest.mark.slow  # profiles the memory of a large encode and decode
def test_cpu_decode_into_a_contiguous_out_and_encode_make_no_tensor_sized_temporary() -> None:
    n = 1536  # 9 MiB of fp32; a block's largest temporary is 2 MiB (2**18 int64 indices)
    stored, sign, lo, hi = convert_to_qins(torch.randn(n, n))
    out = torch.empty(n, n)
    fp32_bytes = n * n * 4
    assert _largest_allocation(lambda: reconstruct_from_qins(stored, sign, lo, hi, out=out)) < fp32_bytes // 4
    # the check sees a tensor-sized buffer: a fresh result is one
    assert _largest_allocation(lambda: reconstruct_from_qins(stored, sign, lo, hi)) >= fp32_bytes
    w = torch.randn(n, n)
    assert _largest_allocation(lambda: convert_to_qins(w)) <= n * n  # its two uint8 outputs, nothing larger
