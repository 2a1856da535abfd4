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

import pytest
import torch

from qins.encode import _model_errors


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


@pytest.mark.parametrize("hist_dtype", [torch.float32, torch.int64])
def test_model_errors_are_the_binned_squared_error_of_in_range_level_and_zero_weights(hist_dtype) -> None:
    nbins, lo0, hi, steps = 13, -3.3, 0.7, 126  # 13 bins: the centres are not binary fractions
    counts = [{1: 3, 6: 1, 12: 2}, {0: 1, 4: 5, 9: 2}]
    hist = torch.zeros(2, nbins, dtype=hist_dtype)
    for r, row in enumerate(counts):
        for k, n in row.items():
            hist[r, k] = n
    # spans reaching past every centre, down to a level band, and above most of the weights
    spans = torch.tensor([[4.5, 1.6, 0.1], [3.9, 2.2, 0.3]], dtype=torch.float64)
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
