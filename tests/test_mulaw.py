"""The mulaw spacing (the default format): its table, the encoder's nearest-level guarantee and its
bound, exact zeros, extreme magnitudes, state validation, and old log-spaced states.

The log spacing's guarantees are pinned in ``tests/test_formats.py``; the kernels' bit-identity to
``level_table`` for both spacings in ``tests/test_kernels.py``.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings

from qins import ProjectiveLinear, QinsConfig, decode_codes, encode, level_table
from qins.formats import LOG_FLOAT32_MAX, num_levels, qins_exp, spacing_steps, valid_levels
from qins.mulaw import SPANS, mulaw_range
from tests.strategies import MULAW_CONFIGS, config_id, float32_weights, mulaw_configs

F64 = torch.float64


def _rows(w: torch.Tensor, config: QinsConfig) -> torch.Tensor:
    """``[rows, N]``: one row per range (per row: 1-d weights count as one row)."""
    return w.reshape(-1, w.shape[-1]) if config.per_row else w.reshape(1, -1)


def _encoded(w: torch.Tensor, config: QinsConfig):
    if config.per_row:
        w = _rows(w, config)
    codes, sign, lo, hi = encode(w, config)
    w_hat = decode_codes(codes, sign, lo, hi, spacing="mulaw")
    rows = _rows(w, config).shape[0]
    table = level_table(lo.reshape(-1), hi.reshape(-1), config.packed, "mulaw")  # [rows, 256]
    return codes, sign, lo.reshape(rows, 1), hi.reshape(rows, 1), w_hat, table


def test_mulaw_is_the_default_and_refuses_the_log_spacings_range_rule() -> None:
    assert (
        QinsConfig().spacing == "mulaw" and QinsConfig().spacing_id == 1
        and QinsConfig.codec_compatible().spacing == "log"
    )
    assert QinsConfig(spacing="log").spacing_id == 0
    with pytest.raises(ValueError, match=r"log_range='minmax' is a rule of the log spacing; pass spacing='log'"):
        QinsConfig(log_range="minmax")
    with pytest.raises(ValueError, match="spacing must be one of"):
        QinsConfig(spacing="linear")  # type: ignore[arg-type]


@pytest.mark.parametrize("packed", [True, False])
def test_mulaw_table_is_the_log_table_of_one_more_step_minus_the_offset(packed: bool) -> None:
    lo, hi = torch.tensor([-9.0, -3.25]), torch.tensor([-2.0, 1.5])
    k = num_levels(packed)
    t = level_table(lo, hi, packed, "mulaw")
    delta = (hi - lo) / float(k)
    j = torch.arange(k, dtype=torch.float32)
    want = qins_exp(hi.reshape(-1, 1) - j * delta.reshape(-1, 1)) - qins_exp(lo).reshape(-1, 1)
    assert torch.equal(t[:, 1 : k + 1], want) and bool((t[:, 0] == 0).all())
    if packed:
        assert torch.equal(t[:, 128:], -t[:, :128])
    assert spacing_steps(packed, "mulaw") == k and spacing_steps(packed, "log") == k - 1
    assert bool(valid_levels(lo, hi, packed, "mulaw").all())
    # the K+1-th step would land on 0: the smallest level is about z·(e^δ - 1)
    z = math.exp(float(lo[0]))
    assert float(t[0, k]) == pytest.approx(z * math.expm1(float(delta[0])), rel=1e-4)


@settings(max_examples=80, deadline=None)
@given(float32_weights(), mulaw_configs)
@example(torch.tensor([[1.0, 0.5, -0.25, 0.0, -0.0, 1e-3]]), QinsConfig(shared_tables=0))
def test_every_weight_decodes_to_the_nearest_level_of_its_row_or_zero_with_its_sign(
    w: torch.Tensor, config: QinsConfig
) -> None:
    codes, sign, lo, hi, w_hat, table = _encoded(w, config)
    k = num_levels(config.packed)
    w = _rows(w, config)
    w2, wh2 = _rows(w, config).to(F64), _rows(w_hat, config).to(F64)
    levels = torch.cat([table[:, 1 : k + 1], torch.zeros_like(table[:, :1])], 1).to(F64)  # [rows, K + 1]
    best = (levels.unsqueeze(1) - w2.abs().unsqueeze(2)).abs().amin(2)  # [rows, N]
    assert torch.equal((wh2.abs() - w2.abs()).abs(), best)
    nonzero = wh2 != 0
    assert torch.equal(torch.signbit(wh2[nonzero]), torch.signbit(w2[nonzero]))


@settings(max_examples=80, deadline=None)
@given(float32_weights(), mulaw_configs)
def test_the_error_is_within_half_a_step_of_the_compander(w: torch.Tensor, config: QinsConfig) -> None:
    """``|ŵ - w| <= (e^δ - 1)/2·(|w| + z)`` for ``|w|`` up to the top level (float32 slack 1e-5)."""
    _, _, lo, hi, w_hat, table = _encoded(w, config)
    w = _rows(w, config)
    delta = (hi.to(F64) - lo.to(F64)) / spacing_steps(config.packed, "mulaw")
    z = lo.to(F64).exp()
    w2, wh2 = _rows(w, config).to(F64).abs(), _rows(w_hat, config).to(F64).abs()
    top = table[:, 1:2].to(F64)
    inside = w2 <= top
    bound = torch.expm1(delta) / 2 * (w2 + z) * (1 + 1e-5)
    assert bool(((wh2 - w2).abs() <= bound)[inside].all())


@given(float32_weights(), mulaw_configs)
def test_exact_zeros_stay_exact_with_their_sign(w: torch.Tensor, config: QinsConfig) -> None:
    _, _, _, _, w_hat, _ = _encoded(w, config)
    w = _rows(w, config).reshape(w_hat.shape)
    zero = w == 0
    assert bool((w_hat[zero] == 0).all())
    if config.packed:  # the sign bit is kept for -0.0 (split: the sign buffer keeps it)
        assert torch.equal(torch.signbit(w_hat[zero]), torch.signbit(w[zero]))


@pytest.mark.parametrize("config", MULAW_CONFIGS, ids=config_id)
def test_float32_extremes_encode_to_valid_states_that_decode_finite(config: QinsConfig) -> None:
    big = 3.4028234663852886e38
    w = torch.tensor([[big, -2.5, 1e-3, 0.0], [1e-38, -2e-38, 0.0, 1e-45], [0.0, 0.0, -0.0, 0.0]])
    codes, sign, lo, hi = encode(w, config)
    assert float(hi.max()) <= LOG_FLOAT32_MAX and bool(valid_levels(lo, hi, config.packed, "mulaw").all())
    w_hat = decode_codes(codes, sign, lo, hi, spacing="mulaw")
    assert bool(torch.isfinite(w_hat).all()) and float(w_hat[0, 0]) > 3.3e38
    if config.per_row:  # a row below ~K·2**-126 flushes to zero; an all-zero row stays zero
        assert bool((w_hat[1:] == 0).all())
    lin = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    for cache_weight in (True, False):
        layer = ProjectiveLinear.from_linear(lin, config, cache_weight=cache_weight)
        fresh = ProjectiveLinear(4, 3, bias=False, config=config, cache_weight=cache_weight)
        fresh.load_state_dict(layer.state_dict())
        assert bool(torch.isfinite(fresh(torch.tensor([[1e-30, 0.0, 0.0, 0.0]]))).all())


def test_the_span_search_covers_int8s_uniform_grid_to_the_log_grid() -> None:
    assert SPANS[0] == pytest.approx(0.02) and SPANS[-1] == pytest.approx(24.0)
    # a uniform row is best served near D -> 0 (int8's grid); a heavier tail by a wider span
    gen = torch.Generator().manual_seed(1)
    uniform = torch.linspace(-1, 1, 4001).reshape(1, -1)
    gauss = torch.randn(1, 4001, generator=gen)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((1, 4001))
    loguni = torch.exp(torch.linspace(-12, 0, 4001)).reshape(1, -1)
    spans = [float(hi - lo) for lo, hi in (mulaw_range(r.abs(), True) for r in (uniform, gauss, laplace, loguni))]
    assert spans[0] < 0.1 < spans[1] < min(spans[2], spans[3])


@pytest.mark.parametrize("tables", [0, 4], ids=["per_row", "shared_tables"])
def test_mulaw_rows_have_less_squared_error_than_int8_absmax_on_gaussian_rows(tables: int) -> None:
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    err = (decode_codes(*encode(w, QinsConfig(shared_tables=tables)), spacing="mulaw") - w).square().sum(1)
    s = w.abs().amax(1, keepdim=True) / 127
    int8 = ((w / s).round().clamp(-127, 127) * s - w).square().sum(1)
    assert bool((err < int8).all())


def test_a_state_whose_mulaw_levels_collapse_is_refused_before_loading() -> None:
    layer = ProjectiveLinear.from_linear(torch.nn.Linear(5, 3), QinsConfig())
    state = layer.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    bad = dict(state)
    bad["log_min"] = state["log_max"].clone()  # zero span: every level is 0
    fresh = ProjectiveLinear(5, 3, config=QinsConfig())
    with pytest.raises(
        ValueError, match=r"log_min/log_max at row 0: the mulaw levels of this range are not strictly decreasing"
    ):
        fresh.load_state_dict(bad)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())


def test_a_log_state_does_not_load_into_a_mulaw_layer_and_names_the_fix() -> None:
    log_layer = ProjectiveLinear.from_linear(torch.nn.Linear(5, 3), QinsConfig(spacing="log"))
    with pytest.raises(
        ValueError, match=r"level spacing is 'log' but the layer's is 'mulaw'; .*QinsConfig\(spacing='log'"
    ):
        ProjectiveLinear(5, 3, config=QinsConfig()).load_state_dict(log_layer.state_dict())
    same = ProjectiveLinear(5, 3, config=QinsConfig(spacing="log"))
    same.load_state_dict(log_layer.state_dict())
    assert torch.equal(same.weight, log_layer.weight)


def test_a_state_without_spacing_metadata_is_read_as_log_spaced() -> None:
    """States written before the mulaw spacing carry ``{"packed", "per_row", "log_range"}`` only."""
    log_layer = ProjectiveLinear.from_linear(torch.nn.Linear(5, 3), QinsConfig(spacing="log"))
    state = log_layer.state_dict()
    del state._metadata[""]["qins"]["spacing"]
    old = ProjectiveLinear(5, 3, config=QinsConfig(spacing="log"))
    old.load_state_dict(state)
    assert torch.equal(old.weight, log_layer.weight)
    with pytest.raises(ValueError, match="level spacing is 'log'"):
        ProjectiveLinear(5, 3, config=QinsConfig()).load_state_dict(state)
