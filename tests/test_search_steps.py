"""The ``mse`` range search (``qins.encode._search``) follows the steps its docstring states.

The search's sub-steps are recorded (``_model_errors``, ``_rounding_deviation``,
``kernels.range_codes`` and the search's own result, each wrapped around the real function) and
every step is checked against the rule for it, computed from what the step before returned:

1. coarse: spans ``span0·c/48``, ``c = 1..48``;
2. fine: 17 spans from the coarse best's lower to its upper neighbour (``(b - 1 + 2k/16)/48`` of
   ``span0``, at least ``span0/768``); the model's best of these is the first ``log_min``;
3. two local rounds: the incumbent ``log_min`` first, then 14 spans over ±7.5% of its span, then
   6 over ±0.5% (clamped at ``span0``), each scored by the model plus ``(span/steps)²`` times the
   weight-by-weight rounding deviation; the first minimum wins;
4. the winner's exact error against minmax's: minmax is kept on a tie or when it is better, and
   the codes returned are exactly the codes of the range returned.

A row with ``span0 = 0`` (one magnitude, or none) keeps ``lo0`` throughout.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import pytest
import torch

from qins import QinsConfig, encode

ENCODE = sys.modules["qins.encode"]  # the module: ``qins.encode`` is also the name of the function


@dataclass
class _Trace:
    model: list = field(default_factory=list)  # (lo0, hi, spans, steps, errors)
    deviation: list = field(default_factory=list)  # (spans, steps, deviation)
    final: list = field(default_factory=list)  # (lo, err, codes)
    search: list = field(default_factory=list)  # (mag, gap, lo0, hi, packed, lo, codes)


def _record(monkeypatch: pytest.MonkeyPatch, *, tie: bool = False) -> _Trace:
    """Wrap the search's steps; ``tie=True`` makes the final errors of both ranges equal (minmax's)."""
    trace = _Trace()
    model, deviation, codes_of, search = (ENCODE._model_errors, ENCODE._rounding_deviation,
                                          ENCODE.kernels.range_codes, ENCODE._search)

    def model_errors(hist, lo0, hi, spans, steps):
        out = model(hist, lo0, hi, spans, steps)
        trace.model.append((lo0.clone(), hi.clone(), spans.clone(), steps, out.clone()))
        return out

    def rounding_deviation(mag, gap, hi, spans, steps):
        out = deviation(mag, gap, hi, spans, steps)
        trace.deviation.append((spans.clone(), steps, out.clone()))
        return out

    def range_codes(mag, gap, lo, hi, tables, packed, write):
        err, codes = codes_of(mag, gap, lo, hi, tables, packed, write)
        if tie:
            err = err[:, :1].expand(-1, err.shape[1]).clone()
        trace.final.append((lo.clone(), err.clone(), codes.clone(), write))
        return err, codes

    def searched(mag, gap, lo0, hi, packed):
        lo, codes = search(mag, gap, lo0, hi, packed)
        trace.search.append((mag, gap, lo0, hi, packed, lo.clone(), codes.clone()))
        return lo, codes

    monkeypatch.setattr(ENCODE, "_model_errors", model_errors)
    monkeypatch.setattr(ENCODE, "_rounding_deviation", rounding_deviation)
    monkeypatch.setattr(ENCODE.kernels, "range_codes", range_codes)
    monkeypatch.setattr(ENCODE, "_search", searched)
    return trace


def _weight(per_row: bool) -> torch.Tensor:
    """Rows of every kind: Gaussian (wide span), magnitudes in [1, 1.5] (span under 1 nat), one
    repeated magnitude (span 0), all zeros, a heavy-tailed row, and magnitudes in [0.9, 1] with one
    of 1e-6 (the coarse best is the smallest span, 1/48)."""
    g = torch.Generator().manual_seed(11)
    rows = [
        torch.randn(96, generator=g),
        (1 + 0.5 * torch.rand(96, generator=g)) * torch.where(torch.rand(96, generator=g) < 0.5, -1.0, 1.0),
        torch.full((96,), -0.75),
        torch.zeros(96),
        torch.randn(96, generator=g) ** 3,
        (0.9 + 0.1 * torch.rand(96, generator=g)).index_fill(0, torch.tensor([5]), 1e-6),
    ]
    return torch.stack(rows) if per_row else torch.randn(6, 40, generator=g)


def _expected_fine(span0: torch.Tensor, coarse_errors: torch.Tensor) -> torch.Tensor:
    b = coarse_errors.argmin(1, keepdim=True).double() + 1  # the coarse best, as c of c/48
    k = torch.arange(17, dtype=torch.float64)
    return span0 * ((b - 1 + k * 2 / 16).clamp(1 / 16, 48) / 48)


def _expected_round(hi, lo_best, span0, lo0, count, width) -> torch.Tensor:
    offsets = torch.linspace(1 - width, 1 + width, count, dtype=torch.float64)
    los = hi.double() - ((hi - lo_best).double() * offsets).clamp(max=span0)
    los = torch.where(span0 > 0, los, lo0.double()).to(torch.float32)
    return torch.cat([lo_best, los], 1)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
@pytest.mark.parametrize("per_row", [True, False], ids=["per_row", "per_tensor"])
def test_the_mse_search_runs_coarse_fine_and_two_local_rounds_then_keeps_the_better_of_it_and_minmax(
    monkeypatch, packed: bool, per_row: bool
) -> None:
    trace = _record(monkeypatch)
    encode(_weight(per_row), QinsConfig(packed=packed, log_range="mse", per_row=per_row, spacing="log"))
    steps = 126 if packed else 254
    assert len(trace.search) == 1 and len(trace.model) == 4 and len(trace.deviation) == 2 and len(trace.final) == 1
    mag, gap, lo0, hi, _, lo_out, codes_out = trace.search[0]
    rows = mag.shape[0]
    assert {t[3] for t in trace.model} == {steps} and {t[1] for t in trace.deviation} == {steps}
    span0 = (hi - lo0).double()
    if per_row:
        assert bool((span0[2:4] == 0).all()) and 0 < float(span0[1]) < 1 < float(span0[0])

    coarse, fine = trace.model[0], trace.model[1]
    if per_row:
        assert int(coarse[4][5].argmin()) == 0  # the smallest coarse span wins: the fine spans' clamp
    assert torch.equal(coarse[2], span0 * (torch.arange(1, 49, dtype=torch.float64) / 48))
    assert fine[2].shape == (rows, 17)
    assert torch.allclose(fine[2], _expected_fine(span0, coarse[4]), rtol=1e-14, atol=0)
    span_best = fine[2].gather(1, fine[4].argmin(1, keepdim=True))
    lo_best = torch.where(span0 > 0, hi.double() - span_best, lo0.double()).to(torch.float32)

    for (count, width), (lo0_m, hi_m, spans, _, errors), (dev_spans, _, dev) in zip(
        ((14, 0.075), (6, 0.005)), trace.model[2:], trace.deviation
    ):
        los = _expected_round(hi, lo_best, span0, lo0, count, width)
        assert torch.equal(lo0_m, lo0) and torch.equal(hi_m, hi)
        assert spans.shape == (rows, count + 1) and torch.equal(spans, (hi - los).double())
        assert torch.equal(dev_spans, spans)
        score = errors + (spans / steps).square() * dev
        lo_best = los.gather(1, score.argmin(1, keepdim=True))
    assert bool((lo_best[span0 == 0] == lo0[span0 == 0]).all())

    ranges, err, codes, write = trace.final[0]
    assert write == 1 and torch.equal(ranges, torch.cat([lo0, lo_best], 1))
    keep = err[:, :1] <= err[:, 1:]
    assert torch.equal(lo_out, torch.where(keep, lo0, lo_best))
    # The codes returned are exactly those of the range returned, row by row.
    assert torch.equal(codes_out, ENCODE._encode_blocks(mag, gap, lo_out, hi, packed))
    assert bool((~keep).any()), "the search should beat minmax on at least one row here"


def test_on_a_tie_of_the_exact_errors_the_search_keeps_minmax(monkeypatch) -> None:
    trace = _record(monkeypatch, tie=True)
    weight = _weight(per_row=True)
    codes, _, lo, hi = encode(weight, QinsConfig(packed=True, log_range="mse", per_row=True, spacing="log"))
    minmax = encode(weight, QinsConfig(packed=True, log_range="minmax", per_row=True, spacing="log"))
    ranges = trace.final[0][0]
    assert bool((ranges[:, 1] != ranges[:, 0]).any())  # the search found other ranges, and lost the tie
    assert torch.equal(lo, minmax[2]) and torch.equal(hi, minmax[3]) and torch.equal(codes, minmax[0])

