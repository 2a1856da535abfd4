"""The activation-aware (calibrated) encoder and the calibration pass: qins/calibrated.py, qins/calibration.py."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import qins
from qins.calibrated import _round, encode_calibrated, output_error, weighted_error


def _moment(x: torch.Tensor) -> torch.Tensor:
    return (x.double().T @ x.double()) / x.shape[0]


def _correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    """Inputs whose columns are correlated and of very different scales (as LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scale = torch.exp(torch.randn(cols, generator=g))
    return (base @ mix) * scale


@pytest.mark.slow
@given(rows=st.integers(1, 9), cols=st.integers(2, 40), seed=st.integers(0, 2**16), packed=st.booleans(),
       spacing=st.sampled_from(qins.formats.SPACINGS))
def test_calibrated_ranges_never_have_a_larger_weighted_error_than_the_data_free_ranges(
        rows, cols, seed, packed, spacing):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    h_moment = _moment(_correlated_inputs(64, cols, seed))
    config = qins.QinsConfig(packed=packed, spacing=spacing, shared_tables=0)  # ranges per row, compared per row
    codes, sign, lo, hi = encode_calibrated(w, h_moment, config, error_feedback=False)
    calibrated = qins.decode_codes(codes, sign, lo, hi, spacing=spacing)
    free = qins.decode_codes(*qins.encode(w, config), spacing=spacing)
    h = torch.diagonal(h_moment)
    assert torch.all(weighted_error(w, calibrated, h) <= weighted_error(w, free, h) * (1 + 1e-12))
    # without feedback every weight sits on its own row's level (log rounding, or the nearest for mulaw)
    assert torch.equal(calibrated, _round(w, lo.reshape(-1, 1), hi.reshape(-1, 1), packed, spacing=spacing)[1])


@pytest.mark.slow
@given(rows=st.integers(1, 9), cols=st.integers(2, 40), seed=st.integers(0, 2**16), packed=st.booleans(),
       tables=st.sampled_from([1, 4, 16]))
def test_calibrated_shared_tables_never_have_a_larger_layer_weighted_error_than_the_data_free_ones(
        rows, cols, seed, packed, tables):
    # the tables are chosen for the whole layer, so the comparison is the layer's, not each row's
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    h_moment = _moment(_correlated_inputs(64, cols, seed))
    config = qins.QinsConfig(packed=packed, shared_tables=tables)
    calibrated = qins.decode_codes(*encode_calibrated(w, h_moment, config, error_feedback=False), spacing="mulaw")
    free = qins.decode_codes(*qins.encode(w, config), spacing="mulaw")
    h = torch.diagonal(h_moment)
    assert weighted_error(w, calibrated, h).sum() <= weighted_error(w, free, h).sum() * (1 + 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("spacing", ["mulaw", "log"])
@pytest.mark.parametrize("packed", [True, False])
def test_error_feedback_lowers_the_output_error_on_correlated_inputs(packed, spacing):
    torch.manual_seed(1)
    w = torch.randn(48, 96)
    h_moment = _moment(_correlated_inputs(4000, 96, 2))
    config = qins.QinsConfig(packed=packed, spacing=spacing)
    free = output_error(w, qins.decode_codes(*qins.encode(w, config), spacing=spacing), h_moment)
    ranges_only = output_error(
        w, qins.decode_codes(*encode_calibrated(w, h_moment, config, error_feedback=False), spacing=spacing), h_moment)
    feedback = output_error(w, qins.decode_codes(*encode_calibrated(w, h_moment, config), spacing=spacing), h_moment)
    assert ranges_only < free
    assert feedback < 0.8 * ranges_only, (free, ranges_only, feedback)


def test_calibrated_encoding_is_deterministic_and_in_the_unchanged_format():
    torch.manual_seed(3)
    w = torch.randn(17, 33)
    h_moment = _moment(_correlated_inputs(200, 33, 4))
    per_row = qins.QinsConfig(shared_tables=0)
    a, b = encode_calibrated(w, h_moment, per_row), encode_calibrated(w, h_moment, per_row)
    assert all(torch.equal(x, y) for x, y in zip(a, b) if x is not None)
    codes, sign, lo, hi = a
    assert codes.dtype == torch.uint8 and sign is None and lo.dtype == hi.dtype == torch.float32
    assert lo.shape == hi.shape == (17,) and torch.all(lo <= hi)
    assert bool(qins.formats.valid_levels(lo, hi, True, "mulaw").all())
    top = qins.level_table(lo, hi, True, "mulaw")[:, 1]  # the top level is max|w| (float32 rounding)
    assert torch.allclose(top, w.abs().amax(1), rtol=1e-5, atol=0)
    _, _, lo_log, hi_log = encode_calibrated(w, h_moment, qins.QinsConfig(spacing="log"))
    assert torch.all(hi_log <= torch.log(w.abs().amax(1)) + 1e-6)  # log: log_max is ln max|w| or a clip below it
    codes2, sign2, *_ = encode_calibrated(w, h_moment, qins.QinsConfig(packed=False))
    assert sign2.dtype == torch.int8 and int(codes2.max()) <= 255


def test_calibrated_shared_tables_are_deterministic_scaled_to_each_rows_largest_weight_and_loadable():
    torch.manual_seed(3)
    w = torch.randn(17, 33) * torch.rand(17, 1)
    h_moment = _moment(_correlated_inputs(200, 33, 4))
    config = qins.QinsConfig(shared_tables=4)
    a, b = encode_calibrated(w, h_moment, config), encode_calibrated(w, h_moment, config)
    assert all(torch.equal(x, y) for x, y in zip(a, b) if x is not None)
    codes, sign, lo, hi, row_table, row_scale = a
    assert lo.shape == hi.shape == (4,) and row_table.shape == row_scale.shape == (17,) and sign is None
    top = qins.level_table(lo, hi, True, "mulaw")[row_table.long(), 1] * row_scale
    assert torch.allclose(top, w.abs().amax(1), rtol=1e-6, atol=0)
    layer = qins.ProjectiveLinear(33, 17, bias=False, config=config)
    layer.load_state_dict({"stored": codes, "log_min": lo, "log_max": hi, "row_table": row_table,
                           "row_scale": row_scale})  # the state checks accept it
    dec = layer.decode_weight()
    data_free = qins.ProjectiveLinear.from_linear(torch.nn.Linear(33, 17, bias=False), config)
    with torch.no_grad():
        data_free._set_codes(*qins.encode(w, config))
    assert output_error(w, dec, h_moment) < output_error(w, data_free.decode_weight(), h_moment)


def test_a_calibrated_layer_computes_with_its_decoded_weight_and_survives_save_and_load(tmp_path):
    torch.manual_seed(5)
    linear = nn.Linear(40, 24)
    x = _correlated_inputs(300, 40, 6)
    layer = qins.ProjectiveLinear.from_linear(linear, input_moment=_moment(x), cache_weight=False)
    expected = torch.nn.functional.linear(x, layer.decode_weight(), linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    data_free = qins.ProjectiveLinear.from_linear(linear)
    assert not torch.equal(layer.stored, data_free.stored)
    path = tmp_path / "cal.safetensors"
    model = nn.Sequential(layer)
    qins.save(model, path)
    fresh = nn.Sequential(qins.ProjectiveLinear(40, 24, cache_weight=False))
    qins.load(fresh, path)
    assert torch.equal(fresh[0].stored, layer.stored) and torch.equal(fresh[0].log_max, layer.log_max)


def test_encode_calibrated_refuses_what_it_cannot_encode():
    w = torch.randn(4, 6)
    h = torch.eye(6, dtype=torch.float64)
    with pytest.raises(ValueError, match="per_row"):
        encode_calibrated(w, h, qins.QinsConfig(per_row=False))
    with pytest.raises(ValueError, match=r"moment must be a finite \[6, 6\]"):
        encode_calibrated(w, torch.eye(5))
    bad = h.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="moment must be a finite"):
        encode_calibrated(w, bad)
    with pytest.raises(ValueError, match="2-d"):
        encode_calibrated(torch.randn(2, 3, 4), torch.eye(4))
    with pytest.raises(ValueError):
        encode_calibrated(torch.tensor([[float("inf"), 1.0]]), torch.eye(2))


def test_a_singular_moment_is_damped_not_refused():
    w = torch.randn(5, 8)
    x = torch.randn(3, 8)  # 3 rows: rank 3 of 8
    codes, *_ = encode_calibrated(w, _moment(x))
    assert codes.shape == (5, 8)
    zero = torch.zeros(8, 8, dtype=torch.float64)  # a layer whose inputs were all zero
    assert encode_calibrated(w, zero)[0].shape == (5, 8)


def test_calibrate_records_each_linears_input_second_moment_and_removes_its_hooks():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [torch.randn(4, 6), torch.randn(2, 6)]
    cal = qins.calibrate(model, batches, skip=())
    x = torch.cat(batches)
    torch.testing.assert_close(cal.moment("0"), _moment(x))
    torch.testing.assert_close(cal.moment("2"), _moment(torch.relu(model[0](x))).to(torch.float64),
                               rtol=1e-5, atol=1e-6)
    assert cal.rows == {"0": 6, "2": 6}
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert set(qins.calibrate(model, batches, skip=("2",)).moments) == {"0"}


class _SharedInputs(nn.Module):
    """``a`` reads ``h``; ``h`` is then doubled in place; ``b``, ``c`` and ``d`` read the doubled ``h``
    (``d`` twice), as an attention's q/k/v read one tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(4, 3) for _ in range(4))

    def forward(self, x):
        h = x * 1.0
        y = self.a(h)
        h.mul_(2.0)
        return y + self.b(h) + self.c(h) + self.d(h) + self.d(h)


@pytest.mark.parametrize("inference", [False, True])
def test_calibrate_gives_layers_that_share_an_input_its_exact_moment_and_sees_in_place_changes(inference):
    torch.manual_seed(3)
    model = _SharedInputs()
    batches = [torch.randn(2, 5, 4), torch.randn(3, 4)]

    def moment(scale: float, times: int = 1) -> torch.Tensor:
        total = torch.zeros(4, 4, dtype=torch.float64)
        for x in batches:
            x = (x * 1.0 * scale).reshape(-1, 4)
            for _ in range(times):
                total += (x.T @ x).double()
        return total / (13 * times)

    with torch.inference_mode(inference):
        cal = qins.calibrate(model, batches, skip=())
    assert torch.equal(cal.moment("a"), moment(1.0))
    assert all(torch.equal(cal.moment(n), moment(2.0)) for n in "bc")
    assert torch.equal(cal.moment("d"), moment(2.0, times=2))
    assert cal.rows == {"a": 13, "b": 13, "c": 13, "d": 26}


def test_calibrate_leaves_no_hook_behind_when_a_batch_fails_and_refuses_an_empty_run():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(RuntimeError):
        qins.calibrate(model, [torch.randn(2, 4)])
    assert not model[0]._forward_pre_hooks
    with pytest.raises(ValueError, match="no nn.Linear saw an input"):
        qins.calibrate(model, [])


def test_converting_with_a_calibration_uses_it_and_refuses_one_that_misses_a_layer():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 4))
    batches = [_correlated_inputs(64, 12, 9)]
    cal = qins.calibrate(model, batches, skip=())
    partial = qins.calibrate(model, batches, skip=("2",))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="no input statistics for"):
        qins.convert_model_to_projective(model, calibration=partial, skip=())
    assert isinstance(model[0], nn.Linear) and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(TypeError, match="calibration must be a qins.Calibration"):
        qins.convert_model_to_projective(model, calibration={"0": torch.eye(12)}, skip=())
    reference = qins.ProjectiveLinear.from_linear(model[0], input_moment=cal.moment("0"))
    report = qins.convert_model_to_projective(model, calibration=cal, skip=())
    assert report.converted == ["0", "2"]
    assert torch.equal(model[0].stored, reference.stored)


def test_calibrated_ranges_of_tiny_rows_stay_inside_the_loadable_log_bounds(tmp_path):
    from qins.formats import LOG_FLOAT32_MAX, LOG_FLOAT32_MIN

    w = torch.tensor([[1e-30, -3e-31, 2e-33, 0.0], [1e30, -1.0, 1e-20, 5.0]])
    linear = nn.Linear(4, 2, bias=False)
    linear.weight.data.copy_(w)
    layer = qins.ProjectiveLinear.from_linear(linear, input_moment=torch.eye(4, dtype=torch.float64))
    assert torch.all(layer.log_min >= LOG_FLOAT32_MIN) and torch.all(layer.log_max <= LOG_FLOAT32_MAX)
    assert torch.isfinite(layer.decode_weight()).all()
    qins.save(nn.Sequential(layer), tmp_path / "tiny.safetensors")
    fresh = nn.Sequential(qins.ProjectiveLinear(4, 2, bias=False))
    qins.load(fresh, tmp_path / "tiny.safetensors")  # validation refuses any level that is not a finite normal float32
    assert torch.equal(fresh[0].stored, layer.stored)
