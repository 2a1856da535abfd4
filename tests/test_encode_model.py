"""The error model behind the ``mse`` range search (``qins.encode._model_errors``), against its
definition evaluated by hand in float64.

A bin's weights are taken at its centre ``c = lo0 + (k + ½)/B·(hi - lo0)``. For a candidate span
``s`` (``lo = hi - s``, ``steps`` level gaps): a centre in range costs ``e^{2c}·E[(e^r - 1)²]``,
``r ~ U(-x, x)``, ``x = s/steps/2``, i.e. ``e^{2c}·(sinhc(2x) - 2·sinhc(x) + 1)``; one below ``lo``
but within ``ln 2`` of it goes to the smallest level, ``(e^lo - e^c)²``; one further below goes to
zero, ``e^{2c}``.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

from qins.codec import SMALLEST_NORMAL
from qins.encode import _log_histogram, _model_errors
from qins.rounding import _level_step

ENCODE = sys.modules["qins.encode"]  # the module: ``qins.encode`` is also the name of the function
ROUNDING = sys.modules["qins.rounding"]  # the blocks (_CHUNK, _chunks) of the encoder and the kernels' reference


REGIMES: set[str] = set()


def _by_hand(counts: dict[int, int], nbins: int, lo0: float, hi: float, span0: float, span: float, steps: int) -> float:
    x = span / steps / 2
    sinhc = lambda a: math.sinh(a) / a  # noqa: E731
    rel = sinhc(2 * x) - 2 * sinhc(x) + 1
    lo, total = hi - span, 0.0
    for k, n in counts.items():
        c = lo0 + (k + 0.5) / nbins * span0
        if c >= lo:
            total += n * math.exp(2 * c) * rel
            REGIMES.add("in range")
        elif c >= lo - math.log(2.0):
            total += n * (math.exp(lo) - math.exp(c)) ** 2
            REGIMES.add("smallest level")
        else:
            total += n * math.exp(2 * c)
            REGIMES.add("zero")
    return total


# (lo0, hi, spans per row): spans reaching past every centre, down to a level band, and above most
# of the weights; once with a minmax span of 4 nats, once under 1 nat (bin positions divide by it)
# (with every bin filled in the second, so a bin boundary off by a little shows)
_MODEL_CASES = [
    (-3.3, 0.7, [[4.5, 1.6, 0.1], [3.9, 2.2, 0.3]], [{1: 3, 6: 1, 12: 2}, {0: 1, 4: 5, 9: 2}]),
    (-0.6, 0.35, [[0.97, 0.5, 0.1], [0.9, 0.45, 0.12]],
     [{k: 1 + k % 3 for k in range(13)}, {k: 2 + k % 2 for k in range(13)}]),
]


@pytest.mark.parametrize("lo0, hi, spans, counts", _MODEL_CASES, ids=["span0=4", "span0=0.95"])
@pytest.mark.parametrize("hist_dtype", [torch.float32, torch.int64])
def test_model_errors_are_the_binned_squared_error_of_in_range_level_and_zero_weights(
    hist_dtype, lo0, hi, spans, counts
) -> None:
    nbins, steps = 13, 126  # 13 bins: the centres are not binary fractions
    hist = torch.zeros(2, nbins, dtype=hist_dtype)
    for r, row in enumerate(counts):
        for k, n in row.items():
            hist[r, k] = n
    spans = torch.tensor(spans, dtype=torch.float64)
    got = _model_errors(hist, torch.full((2, 1), lo0), torch.full((2, 1), hi), spans, steps)
    assert got.dtype == torch.float64 and got.shape == (2, 3)
    # lo0 and hi arrive as float32 and their difference is taken in float32: the model's bin width
    lo0_32, hi_32 = torch.tensor(lo0), torch.tensor(hi)
    span0 = float(hi_32 - lo0_32)
    REGIMES.clear()
    want = torch.tensor([[_by_hand(counts[r], nbins, float(lo0_32), float(hi_32), span0, float(s), steps)
                          for s in spans[r]] for r in range(2)], dtype=torch.float64)
    assert REGIMES == {"in range", "smallest level", "zero"}  # every branch of the model is exercised
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)


def test_log_histogram_bins_log_magnitudes_over_lo0_to_hi_and_drops_those_below() -> None:
    """Bin ``k`` holds ``lo0 + k·w <= log|w| < lo0 + (k+1)·w``, ``w = (hi - lo0)/B``; the top value goes
    to the last bin; zeros and magnitudes below ``lo0`` are not counted. A span under 1 nat too."""
    nbins, hi = 8, 0.3
    for span in (0.5, 3.0):
        lo0 = hi - span
        bins = [0, 0, 3, 5, 7, 7, 2]
        logs = torch.tensor([lo0 + (k + 0.5) * span / nbins for k in bins] + [hi], dtype=torch.float64)
        mag = torch.cat([logs.exp(), torch.tensor([0.0, math.exp(lo0 - 0.2)], dtype=torch.float64)]).float()
        mag = mag.reshape(1, -1)
        gap = torch.tensor([[hi]]) - mag.log()  # +inf for the zero
        hist = _log_histogram(mag, gap, torch.tensor([[span]], dtype=torch.float64), nbins)
        want = torch.zeros(1, nbins, dtype=torch.int64)
        for k in bins + [nbins - 1]:
            want[0, k] += 1
        assert hist.dtype == torch.int64 and torch.equal(hist, want), (span, hist)


def test_log_histogram_bins_in_float32_as_documented() -> None:
    """``floor((span0 - gap)·(B/span0))`` in float32: values on a bin edge land where float32 puts them."""
    g = torch.Generator().manual_seed(3)
    nbins, rows = 512, 3
    span0 = torch.tensor([[7.3], [0.61], [19.9]], dtype=torch.float64)
    # gaps on and next to bin edges: k·span0/B, nudged by an ulp either way
    k = torch.randint(0, nbins, (rows, 400), generator=g).double()
    edge = (k * span0 / nbins).float()
    gap = torch.cat([edge, torch.nextafter(edge, torch.tensor(math.inf)), torch.nextafter(edge, torch.tensor(0.0))], 1)
    top, scale = span0.float(), (nbins / span0).float()
    pos32 = ((top - gap) * scale).floor().clamp(-1, nbins - 1)
    pos64 = ((top.double() - gap.double()) * (nbins / span0)).floor().clamp(-1, nbins - 1)
    assert bool((pos32 != pos64).any())  # the edge cases really tell float32 from float64
    want = torch.stack([torch.bincount(p[p >= 0].long(), minlength=nbins) for p in pos32])
    hist = _log_histogram(torch.ones_like(gap), gap, span0, nbins)
    assert torch.equal(hist, want)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_rounding_deviation_is_the_in_range_weights_squared_offsets_from_their_levels(monkeypatch, backend) -> None:
    """``Σ a·(d² - 1/12)·e^{2·hi}`` per row and span, ``a = max(w² - θ², 0)/e^{2·hi}``, ``θ = e^{hi - τ}``
    (``τ`` the row's smallest span), ``d = t - round(t)``, ``t = min(gap, τ)·steps/span``; spans under
    and over 1 nat. Within 1e-4·Σa·e^{2·hi}: float32 element work (``t`` up to ``steps``), any sum order."""
    from qins.encode import _rounding_deviation

    if backend == "reference":
        monkeypatch.setenv("QINS_KERNEL", "reference")
    g = torch.Generator().manual_seed(5)
    steps, rows, cols = 126, 2, 37
    mag = torch.exp(torch.randn(rows, cols, generator=g) * 0.4)
    hi = mag.amax(1, keepdim=True).log()
    gap = hi - mag.log()
    spans = torch.tensor([[0.3, 0.7, 2.5], [0.55, 1.0, 4.0]], dtype=torch.float64)
    got = _rounding_deviation(mag, gap, hi, spans, steps)
    assert got.dtype == torch.float64 and got.shape == (rows, 3)
    tau = spans.min(1, keepdim=True).values.float().double()
    inv = (steps / spans).float().double()
    w, h, gp = mag.double(), hi.double(), gap.double()
    a = ((w * torch.exp(-h)).square() - torch.exp(-2 * tau)).clamp_min(0)
    t = gp.clamp_max(tau).unsqueeze(1) * inv.unsqueeze(2)  # [R, C, cols]
    d2 = (t - torch.round(t)).square()
    want = ((a.unsqueeze(1) * d2).sum(2) - a.sum(1, keepdim=True) / 12) * torch.exp(2 * h)
    scale = a.sum(1, keepdim=True) * torch.exp(2 * h)
    assert bool((a > 0).sum() > 10)  # most weights are in every candidate's range
    assert bool(((got - want).abs() <= 1e-4 * scale).all()), (got, want)


@pytest.mark.parametrize("shape, per_row, nbins", [((5, 7), True, 128), ((5, 1), True, 128), ((1, 9), True, 4096),
                                                    ((5, 7), False, 4096), ((3, 1), False, 4096)])
def test_the_mse_search_histogram_has_128_bins_a_row_and_4096_for_a_single_row(
    monkeypatch, shape, per_row, nbins
) -> None:
    """A row of a per-row encode is short, so 128 bins; a whole tensor searched as one row gets 4096."""
    from qins import QinsConfig, encode

    enc = ENCODE

    seen = []
    real = enc._log_histogram
    monkeypatch.setattr(
        enc, "_log_histogram", lambda mag, gap, span0, n: seen.append((tuple(mag.shape), n)) or real(mag, gap, span0, n)
    )
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) + 0.01
    encode(weight, QinsConfig(packed=True, log_range="mse", per_row=per_row, spacing="log"))
    assert seen and {n for _, n in seen} == {nbins}, seen


def test_the_mse_search_first_tries_c_over_48_of_the_minmax_span_in_float64(monkeypatch) -> None:
    """The coarse pass's candidates are exactly ``span0·c/48``, ``c = 1..48`` (float64 fractions)."""
    from qins import QinsConfig, encode

    enc = ENCODE
    calls = []
    real = enc._model_errors
    monkeypatch.setattr(
        enc, "_model_errors",
        lambda hist, lo0, hi, spans, steps: calls.append((lo0, hi, spans)) or real(hist, lo0, hi, spans, steps),
    )
    weight = torch.randn(3, 40, generator=torch.Generator().manual_seed(2)) + 0.01
    encode(weight, QinsConfig(packed=True, log_range="mse", per_row=True, spacing="log"))
    lo0, hi, spans = calls[0]
    assert spans.dtype == torch.float64 and spans.shape == (3, 48)
    want = (hi - lo0).double() * (torch.arange(1, 49, dtype=torch.float64) / 48)
    assert torch.equal(spans, want)


_CHUNK_SHAPES = [(1, 5), (1, 64), (1, 200), (2, 10), (3, 64), (3, 130), (5, 40), (9, 10), (50, 7), (70, 1), (8, 8)]


@pytest.mark.parametrize("shape", _CHUNK_SHAPES, ids=str)
def test_encode_blocks_are_column_blocks_of_one_row_or_as_many_whole_rows_as_fit(monkeypatch, shape) -> None:
    """With ``_CHUNK = 64``: one row goes in column blocks of 64 elements; rows of 64 or more
    elements one row a block; shorter rows ``64 // cols`` a block. Every element is in exactly one
    block."""
    monkeypatch.setattr(ROUNDING, "_CHUNK", 64)
    rows, cols = shape
    seen = torch.zeros(shape, dtype=torch.int64)
    blocks = ROUNDING._chunks(torch.empty(shape))
    for r, c in blocks:
        seen[r, c] += 1
    assert bool((seen == 1).all()), seen
    sizes = [(len(range(*r.indices(rows))), len(range(*c.indices(cols)))) for r, c in blocks]
    if rows == 1:
        want = [(1, min(64, cols - start)) for start in range(0, cols, 64)]
    else:
        per = 1 if cols >= 64 else 64 // cols
        want = [(min(per, rows - start), cols) for start in range(0, rows, per)]
    assert sizes == want


@pytest.mark.parametrize("shape", [(1, 300), (3, 150), (40, 9)], ids=str)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
def test_histogram_codes_errors_and_the_search_do_not_depend_on_the_block_size(monkeypatch, shape, packed) -> None:
    """The encode passes blocked by 64 elements give what one block gives: the same histogram and
    codes, errors equal up to float64 summation order, and the same ``mse`` encode."""
    from qins import QinsConfig, encode
    from qins.formats import level_table
    from qins.kernels import reference

    g = torch.Generator().manual_seed(5)
    w = torch.randn(*shape, generator=g) * torch.logspace(-2, 1, shape[0]).unsqueeze(1)
    w[0, 3] = 0.0
    mag = w.abs()
    hi = mag.log().amax(1, keepdim=True)
    lo0 = mag.log().where(mag > 0, math.inf).amin(1, keepdim=True)
    gap = hi - mag.log()
    ranges = torch.cat([lo0, lo0 + 0.25 * (hi - lo0)], 1)
    tables = torch.stack([level_table(ranges[:, s], hi.reshape(-1), packed, spacing="log") for s in range(2)])

    def passes():
        return (_log_histogram(mag, gap, (hi - lo0).double(), 128),
                ENCODE._encode_blocks(mag, gap, lo0, hi, packed),
                reference.range_codes(mag, gap, ranges, hi, tables, packed, 1),
                encode(w, QinsConfig(packed=packed, log_range="mse", per_row=True, spacing="log")))

    monkeypatch.setattr(ROUNDING, "_CHUNK", 1 << 30)
    hist1, codes1, (err1, rcodes1), enc1 = passes()
    monkeypatch.setattr(ROUNDING, "_CHUNK", 64)
    hist, codes, (err, rcodes), enc = passes()
    assert int(hist1.sum()) == w.numel() - 1  # the zero is dropped
    assert torch.equal(hist, hist1) and torch.equal(codes, codes1) and torch.equal(rcodes, rcodes1)
    assert torch.allclose(err, err1, rtol=1e-12, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(enc, enc1) if a is not None)


def test_level_step_is_the_span_over_k_minus_1_and_the_smallest_normal_for_an_empty_span() -> None:
    """``δ = (hi - lo)/(K - 1)`` in float32, steps under 1 nat included; ``SMALLEST_NORMAL`` where the
    span is 0 (every backend of the final codes divides by exactly this)."""
    lo = torch.tensor([[-3.0], [-0.5], [2.0], [-40.0]])
    hi = torch.tensor([[1.0], [0.25], [2.0], [-1.0]])
    for k in (128, 256):
        got = _level_step(lo, hi, k)
        want = (hi - lo) / float(k - 1)
        want[2] = SMALLEST_NORMAL
        assert got.dtype == torch.float32 and torch.equal(got, want), (k, got, want)
    assert 0 < _level_step(lo, hi, 128)[1].item() < 1e-2  # a step far under 1 nat is kept as it is
