"""``qins.kernels.rounding_deviation`` (the mse range search's score): every native CPU ISA path
against the pure-torch reference, within a derived bound, on odd shapes.

Both backends compute every element's ``a·d²`` with the same float32 operations (no FMA), so they
differ only in how the sums are ordered. A float32 sum of ``n`` non-negative terms is within
``n·u·Σ`` of the exact sum (``u = 2⁻²⁴``); ``a·d² <= a/4``, so each backend's ``Σa·d² - Σa/12`` is
within ``n·u·Σa·(1/4 + 1/12)`` of the exact value and two backends within ``(2/3)·n·u·Σa``,
``n`` = columns per row. The test allows ``n·u·Σa``.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qins.kernels as qk
from qins.kernels import reference
from tests.test_kernels import U, env, native, native_isas


def _case(seed: int, rows: int, cols: int, cands: int, zero_frac: float):
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(torch.randn(rows, cols, generator=g) * 2.0)
    mag[torch.rand(rows, cols, generator=g) < zero_frac] = 0.0
    hi = torch.log(mag.amax(1, keepdim=True).clamp_min(1e-30))
    gap = hi - torch.log(mag)  # +inf for zeros
    spans = torch.rand(rows, cands, generator=g, dtype=torch.float64) * 8 + 0.5
    tau = spans.min(1, keepdim=True).values.to(torch.float32)
    inv = (126 / spans).to(torch.float32)
    unit = torch.exp(-hi)
    floor2 = torch.exp(-2.0 * tau)
    return mag, gap, inv, unit, floor2, tau


def _weight_sum(mag, unit, floor2) -> torch.Tensor:
    return mag.double().mul(unit.double()).square().sub(floor2.double()).clamp_min(0).sum(1, keepdim=True)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 4),
    cols=st.integers(1, 2200),  # crosses the 1024-column blocks and the 8/16-lane tails
    cands=st.integers(1, 17),  # crosses the 8-candidate groups
    zero_frac=st.sampled_from([0.0, 0.3]),
)
def test_every_isa_matches_the_reference_within_the_summation_bound(seed, rows, cols, cands, zero_frac):
    mod = native()
    args = _case(seed, rows, cols, cands, zero_frac)
    ref = reference.rounding_deviation(*args)
    assert ref.shape == (rows, cands) and ref.dtype == torch.float64
    allowed = cols * U * _weight_sum(args[0], args[3], args[4]) + 1e-300
    for isa in native_isas():
        got = mod.rounding_deviation(*args, qk.ISAS[isa])
        excess = ((got - ref).abs() - allowed).max().item()
        assert excess <= 0, f"{isa}: off by {excess:.3g} beyond the bound"


def test_dispatch_runs_native_on_cpu_and_the_reference_when_asked(monkeypatch):
    native()
    args = _case(3, 2, 300, 5, 0.1)
    calls = []
    real = reference.rounding_deviation
    monkeypatch.setattr(reference, "rounding_deviation", lambda *a: calls.append(1) or real(*a))
    qk.rounding_deviation(*args)
    assert calls == []
    with env(QINS_KERNEL="reference"):
        want = qk.rounding_deviation(*args)
    assert calls == [1] and torch.equal(want, real(*args))


def test_native_score_takes_other_float_dtypes_as_their_float32_values():
    """Found by mutation testing: the wrapper's float32 cast was never exercised (float64 inputs
    reached the native kernel unconverted)."""
    native()
    args = _case(5, 3, 200, 4, 0.1)
    want = qk.rounding_deviation(*args)
    assert torch.equal(qk.rounding_deviation(*(t.double() for t in args)), want)


def test_a_row_of_zeros_scores_zero_for_every_candidate():
    mod = native()
    mag, gap, inv, unit, floor2, tau = _case(5, 2, 70, 9, 0.0)
    mag[1] = 0.0
    gap[1] = float("inf")
    for isa in native_isas():
        got = mod.rounding_deviation(mag, gap, inv, unit, floor2, tau, qk.ISAS[isa])
        assert torch.equal(got[1], torch.zeros(9, dtype=torch.float64)), isa


def test_native_rejects_mismatched_shapes():
    mod = native()
    mag, gap, inv, unit, floor2, tau = _case(1, 2, 10, 3, 0.0)
    with pytest.raises(RuntimeError, match="mag and gap must be"):
        mod.rounding_deviation(mag, gap[:, :5].contiguous(), inv, unit, floor2, tau, 0)
    with pytest.raises(RuntimeError, match="inv must be"):
        mod.rounding_deviation(mag, gap, inv[:1].contiguous(), unit, floor2, tau, 0)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        mod.rounding_deviation(mag.double(), gap, inv, unit, floor2, tau, 0)


# ---- the final comparison: codes and exact squared errors of each candidate range ----


def _ranges_case(seed: int, rows: int, cols: int, ranges: int, packed: bool, zero_frac: float):
    from qins.formats import level_table

    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(torch.randn(rows, cols, generator=g) * 2.0)
    mag[torch.rand(rows, cols, generator=g) < zero_frac] = 0.0
    hi = torch.log(mag.amax(1, keepdim=True).clamp_min(1e-30))
    gap = hi - torch.log(mag)  # +inf for zeros
    gap[:, :1] -= 1e-3  # a capped log_max leaves some gaps below 0
    lo = hi - torch.rand(rows, ranges, generator=g) * 10
    lo[:, -1:] = hi  # a degenerate range (delta = 0)
    tables = torch.stack([level_table(lo[:, s], hi.reshape(-1), packed, spacing="log") for s in range(ranges)])
    return mag, gap, lo, hi, tables


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 4),
    cols=st.integers(1, 300),  # crosses the 8- and 16-lane tails
    ranges=st.integers(1, 3),
    packed=st.booleans(),
    zero_frac=st.sampled_from([0.0, 0.3]),
    write=st.integers(-1, 2),
)
def test_range_codes_match_the_reference_codes_exactly_and_errors_within_float64_summation(
    seed, rows, cols, ranges, packed, zero_frac, write
):
    native()
    from qins.formats import num_levels

    write = min(write, ranges - 1)
    mag, gap, lo, hi, tables = _ranges_case(seed, rows, cols, ranges, packed, zero_frac)
    err_ref, codes_ref = reference.range_codes(mag, gap, lo, hi, tables, packed, write)
    assert err_ref.shape == (rows, ranges) and err_ref.dtype == torch.float64
    assert (codes_ref is None) == (write < 0) and (codes_ref is None or codes_ref.dtype == torch.uint8)
    # Σ of n exact float64 squares in two orders: within 2·n·2⁻⁵³·Σ of each other.
    allowed = 2 * cols * 2.0**-53 * err_ref + 1e-300
    for isa in native_isas():
        with env(QINS_CPU_ISA=isa):
            err, codes = qk.range_codes(mag, gap, lo, hi, tables, packed, write)
        assert bool(((err - err_ref).abs() <= allowed).all()), f"{isa}: errors differ beyond the bound"
        if write >= 0:
            assert torch.equal(codes, codes_ref), f"{isa}: {(codes != codes_ref).sum().item()} codes differ"
            assert int(codes.max()) <= num_levels(packed)
        else:
            assert codes is None


def test_range_codes_dispatch_runs_native_on_cpu_and_the_reference_when_asked(monkeypatch):
    native()
    mag, gap, lo, hi, tables = _ranges_case(7, 3, 90, 2, False, 0.2)
    calls = []
    real = reference.range_codes
    monkeypatch.setattr(reference, "range_codes", lambda *a: calls.append(1) or real(*a))
    err, codes = qk.range_codes(mag, gap, lo, hi, tables, False, 0)
    assert calls == [] and codes.dtype == torch.uint8 and err.dtype == torch.float64
    with env(QINS_KERNEL="reference"):
        err_ref, codes_ref = qk.range_codes(mag, gap, lo, hi, tables, False, 0)
    assert calls == [1] and torch.equal(codes, codes_ref)
    want_err, want_codes = real(mag, gap, lo, hi, tables, False, 0)
    assert torch.equal(err_ref, want_err) and torch.equal(codes_ref, want_codes)


def test_range_codes_take_float64_magnitudes_as_their_float32_values_and_pass_the_format_on():
    """Found by mutation testing: the native wrapper's float32 cast, and the format flag on the
    reference path (only split cases went through the dispatcher)."""
    native()
    mag, gap, lo, hi, tables = _ranges_case(11, 3, 150, 2, True, 0.2)
    err, codes = qk.range_codes(mag, gap, lo, hi, tables, True, 1)
    err64, codes64 = qk.range_codes(mag.double(), gap.double(), lo, hi, tables, True, 1)
    assert torch.equal(codes64, codes) and torch.equal(err64, err)
    with env(QINS_KERNEL="reference"):
        got = qk.range_codes(mag, gap, lo, hi, tables, True, 1)
    want = reference.range_codes(mag, gap, lo, hi, tables, True, 1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[1], codes)


def test_a_row_longer_than_one_block_sums_every_block():
    """One row of more than 2**16 elements (a per-tensor range) spans several of the reference's
    blocks; its error is the sum over all of them, as the native kernel's."""
    mag, gap, lo, hi, tables = _ranges_case(11, 1, 70_001, 1, True, 0.0)
    err_ref, _ = reference.range_codes(mag, gap, lo, hi, tables, True, -1)
    _, codes = reference.range_codes(mag, gap, lo, hi, tables, True, 0)
    # the direct formula: Σ(|w| - |ŵ|)² over the whole row
    direct = (mag - tables[0][0][codes.long()]).double().square().sum()
    assert abs(float(err_ref[0, 0]) - float(direct)) <= 2 * 70_001 * 2.0**-53 * float(direct)
    if qk.native_module() is not None:
        err, _ = qk.range_codes(mag, gap, lo, hi, tables, True, -1)
        assert abs(float(err[0, 0]) - float(direct)) <= 2 * 70_001 * 2.0**-53 * float(direct)


def test_native_range_codes_rejects_bad_arguments():
    mod = native()
    mag, gap, lo, hi, tables = _ranges_case(0, 2, 20, 2, True, 0.0)
    delta = (hi - lo).contiguous()
    with pytest.raises(RuntimeError, match=r"tables must be \[S, R, 256\]"):
        mod.range_codes(mag, gap, delta, delta, tables[:1].contiguous(), 127, 0, 0)
    with pytest.raises(RuntimeError, match="write must name a range"):
        mod.range_codes(mag, gap, delta, delta, tables, 127, 2, 0)
    with pytest.raises(RuntimeError, match="K must be in 1..255"):
        mod.range_codes(mag, gap, delta, delta, tables, 256, 0, 0)


@pytest.mark.parametrize("packed", [True, False])
def test_a_magnitude_of_exactly_half_the_smallest_level_goes_to_it_on_every_path(packed: bool) -> None:
    """The nearer of 0 and level K, a tie (2|w| == level K exactly) going to level K."""
    import importlib

    from qins.formats import level_table, num_levels

    enc = importlib.import_module("qins.encode")
    k = num_levels(packed)
    lo, hi = torch.tensor([[-4.0]]), torch.tensor([[0.0]])
    table = level_table(lo.reshape(-1), hi.reshape(-1), packed, spacing="log")
    mag = table[:, k : k + 1] * 0.5  # exact: a power-of-two scaling
    gap = hi - torch.log(mag)  # beyond the range: ln 2 past level K, more than half a step
    assert enc._mag_codes(mag, gap, lo, hi, packed, table).item() == k
    err, codes = qk.range_codes(mag, gap, lo, hi, table.unsqueeze(0), packed, 0)
    assert codes.item() == k and err.item() == float(mag.double().item()) ** 2
    for isa in native_isas():
        with env(QINS_CPU_ISA=isa):
            assert qk.range_codes(mag, gap, lo, hi, table.unsqueeze(0), packed, 0)[1].item() == k, isa
