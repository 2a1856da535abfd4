"""ProjectiveLinear: accuracy against nn.Linear with a derived bound, state, dtypes, devices, cache."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qins import ProjectiveLinear, QinsConfig
from qins.codec import SMALLEST_NORMAL
from qins.formats import DEFAULT_SHARED_TABLES
from tests.strategies import LAYER_CONFIGS, config_id, default_dtype

CONFIGS = pytest.mark.parametrize("config", LAYER_CONFIGS, ids=config_id)
SEED = QinsConfig.codec_compatible()

F64 = torch.float64
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def output_error_bound(layer: ProjectiveLinear, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """Elementwise bound on |layer(x) - y|, y = x @ Wᵀ + b in exact arithmetic (float64 here).

    Derivation. Per row r (or per tensor), with δ = (log_max - log_min)/S (S = 126 packed, 254
    split) and β = δ/2 + ε, a weight in range decodes with the same sign and
    |log|ŵ| - log|w|| <= β, so |ŵ - w| <= (e^β - 1)|w|; a weight below the range (mse ranges, or a
    float32 sub-normal) goes to the nearer of 0 and the smallest level, |ŵ - w| <= m with
    m = e^{log_min}(1+ε)/2 (mse) or 2^-126 (minmax: only sub-normals lie below). So per weight
    |ŵ - w| <= E = (e^β - 1)|w| + m. Casting ŵ to the compute dtype (unit round-off u) gives
    |w̃ - w| <= (1+u)E + u|w|. A float32-accumulated dot of length n (bias included) adds at most
    γ_n·Σ|x||w̃|, and rounding the output adds u·|result|. With S = |x|@|W|ᵀ + |b| and B = |x|@Eᵀ:
        |ŷ - y| <= (1+u)B + u·S + (γ_n + u(1+γ_n))(1+u)(S + B).
    Shared tables: row r's levels are its table's scaled by ``row_scale[r]``, the levels of the logs
    ``log + ln row_scale[r]`` (up to the product's rounding, inside ε), so the same bound holds per row.
    """
    lo, hi = layer.log_min.to(F64), layer.log_max.to(F64)
    if layer.row_table is not None:
        idx, shift = layer.row_table.long(), layer.row_scale.to(F64).log()
        lo, hi = lo[idx] + shift, hi[idx] + shift
    steps = layer.config.levels - 1
    eps = 2.0**-20 * (1 + lo.abs() + hi.abs())
    beta = (hi - lo) / steps / 2 + eps
    below = torch.exp(lo) * (1 + eps) / 2 if layer.config.log_range == "mse" else torch.full_like(lo, SMALLEST_NORMAL)
    w = linear.weight.to(F64)
    rows = (-1, 1) if lo.dim() else ()
    e = (torch.exp(beta).reshape(rows) - 1) * w.abs() + below.reshape(rows)
    u = UNIT_ROUNDOFF[x.dtype] if x.dtype != torch.float32 else 0.0
    n = linear.in_features + 1
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    s = x.to(F64).abs() @ w.abs().T
    if linear.bias is not None:
        s = s + linear.bias.to(F64).abs()
    b = x.to(F64).abs() @ e.T
    return (1 + u) * b + u * s + (gamma + u * (1 + gamma)) * (1 + u) * (s + b)


def reference(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    y = x.to(F64) @ linear.weight.to(F64).T
    return y + linear.bias.to(F64) if linear.bias is not None else y


def make_linear(in_f: int = 48, out_f: int = 24, bias: bool = True, device: str | torch.device = "cpu") -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=bias, device=device)
    with torch.no_grad():
        lin.weight[0, :3] = 0.0  # exact zeros are part of real weights
    return lin


@CONFIGS
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(48,), (5, 48), (2, 3, 48)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("cache_weight", [True, False], ids=["cached", "memory_saving"])
def test_output_within_propagated_bound_of_nn_linear(
    bias: bool, shape: tuple[int, ...], cache_weight: bool, config: QinsConfig, device: torch.device
) -> None:
    lin = make_linear(bias=bias, device=device)
    layer = ProjectiveLinear.from_linear(lin, config, cache_weight=cache_weight)
    x = torch.randn(*shape, device=device)
    y = layer(x)
    assert y.shape == (*shape[:-1], 24) and y.dtype == torch.float32
    err = (y.to(F64) - reference(lin, x)).abs()
    assert bool((err <= output_error_bound(layer, x, lin)).all())


@CONFIGS
@pytest.mark.parametrize("cache_weight", [True, False], ids=["cached", "memory_saving"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_module_output_within_propagated_bound(
    dtype: torch.dtype, cache_weight: bool, config: QinsConfig, device: torch.device
) -> None:
    lin = make_linear(device=device)
    layer = ProjectiveLinear.from_linear(lin, config, cache_weight=cache_weight).to(dtype)
    x = torch.randn(7, 48, device=device).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    err = (y.to(F64) - reference(lin, x)).abs()
    assert bool((err <= output_error_bound(layer, x, lin)).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_from_half_precision_linear_computes_in_its_dtype(dtype: torch.dtype) -> None:
    lin = make_linear().to(dtype)
    layer = ProjectiveLinear.from_linear(lin)
    assert layer.compute_dtype == dtype and layer.bias.dtype == dtype and layer.weight.dtype == dtype
    x = torch.randn(3, 48).to(dtype)
    assert layer(x).dtype == dtype


@pytest.mark.parametrize("cache_weight", [True, False], ids=["cached", "memory_saving"])
def test_output_dtype_follows_input_dtype_and_keeps_the_bias(cache_weight: bool) -> None:
    layer = ProjectiveLinear.from_linear(make_linear(), cache_weight=cache_weight)
    x = torch.randn(2, 48, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():  # the float32 layer in bf16 math: the bf16 weight and bias, once each
        want = torch.nn.functional.linear(x.float(), layer.decode_weight().to(torch.bfloat16).float(),
                                          layer.bias.to(torch.bfloat16).float())
    assert torch.allclose(y.float(), want, rtol=2e-2, atol=2e-2)
    assert not torch.allclose(y.float(), want - layer.bias.float(), rtol=2e-2, atol=2e-2)  # the bias is there


def test_state_dict_holds_codes_and_logs_but_never_the_cache() -> None:
    layer = ProjectiveLinear.from_linear(make_linear(), SEED)
    sd = layer.state_dict()
    assert set(sd) == {"stored", "sign", "log_min", "log_max", "bias"}
    assert sd["stored"].dtype == torch.uint8 and sd["sign"].dtype == torch.int8
    assert sd["log_min"].dtype == torch.float32 and sd["log_min"].dim() == 0 and sd["log_max"].dim() == 0
    assert isinstance(layer.bias, nn.Parameter)


def test_packed_per_row_state_dict_has_one_byte_codes_no_sign_and_row_logs() -> None:
    layer = ProjectiveLinear.from_linear(make_linear(), QinsConfig(packed=True, per_row=True, shared_tables=0))
    sd = layer.state_dict()
    assert set(sd) == {"stored", "log_min", "log_max", "bias"}
    assert sd["stored"].dtype == torch.uint8 and sd["stored"].shape == (24, 48)
    assert sd["log_min"].shape == (24,) and sd["log_max"].shape == (24,) and sd["log_min"].dtype == torch.float32
    assert sd._metadata[""] == {
        "version": 2, "qins": {"packed": True, "per_row": True, "log_range": "mse", "spacing": "mulaw"}
    }


def test_the_default_state_dict_has_one_byte_codes_shared_tables_and_a_table_and_scale_per_row() -> None:
    layer = ProjectiveLinear.from_linear(make_linear())
    sd = layer.state_dict()
    n = QinsConfig().shared_tables
    assert n == DEFAULT_SHARED_TABLES > 0
    assert set(sd) == {"stored", "log_min", "log_max", "row_table", "row_scale", "bias"}
    assert sd["log_min"].shape == sd["log_max"].shape == (n,) and sd["log_min"].dtype == torch.float32
    assert sd["row_table"].dtype == torch.uint8 and sd["row_table"].shape == (24,)
    assert sd["row_scale"].dtype == torch.float32 and sd["row_scale"].shape == (24,)
    assert sd._metadata[""] == {"version": 2, "qins": {"packed": True, "per_row": True, "log_range": "mse",
                                                       "spacing": "mulaw", "shared_tables": n}}


@pytest.mark.parametrize("cache_weight", [True, False], ids=["cached", "memory_saving"])
def test_load_state_dict_into_fresh_layer_gives_bit_identical_outputs(cache_weight: bool) -> None:
    """The seed lost its Python-float copies of log_min/log_max on load; the buffers carry them."""
    layer = ProjectiveLinear.from_linear(make_linear(), cache_weight=cache_weight)
    fresh = ProjectiveLinear(48, 24, cache_weight=cache_weight)
    x = torch.randn(4, 48)
    before = fresh(x)
    fresh.load_state_dict(layer.state_dict())
    assert not torch.equal(before, fresh(x))
    assert torch.equal(fresh(x), layer(x))


def test_load_state_dict_refreshes_the_cache_in_place() -> None:
    a = ProjectiveLinear.from_linear(make_linear())
    b = ProjectiveLinear.from_linear(nn.Linear(48, 24))
    cache = b._cached_weight
    b.load_state_dict(a.state_dict())
    assert b._cached_weight is cache
    assert torch.equal(b._cached_weight, a._cached_weight)


def test_invalidate_cache_refreshes_after_codes_change() -> None:
    layer = ProjectiveLinear.from_linear(make_linear(), SEED)
    x = torch.randn(2, 48)
    y0 = layer(x)
    with torch.no_grad():
        layer.sign.neg_()
    assert torch.equal(layer(x), y0)  # documented: the cache is stale until refreshed
    layer.invalidate_cache()
    assert torch.allclose(layer(x) - layer.bias, -(y0 - layer.bias))


def test_invalidate_cache_replaces_a_cache_that_no_longer_fits_the_codes() -> None:
    """Refreshed in place only when shape, dtype and device all still match; otherwise replaced:
    codes swapped by hand for fewer rows, or a cache that is not in the compute dtype."""
    layer = ProjectiveLinear.from_linear(make_linear(bias=False), SEED)
    old = layer._cached_weight
    with torch.no_grad():
        layer.stored = layer.stored[:5].clone()  # 5 of the 24 rows (per-tensor logs: still valid)
        layer.sign = layer.sign[:5].clone()
    layer.invalidate_cache()
    assert layer._cached_weight is not old and torch.equal(layer._cached_weight, layer.decode_weight())
    layer._cached_weight = layer._cached_weight.double()  # same shape and device, another dtype
    layer.invalidate_cache()
    assert layer._cached_weight.dtype == layer.compute_dtype == torch.float32
    assert torch.equal(layer._cached_weight, layer.decode_weight())


def test_a_config_that_is_not_a_qinsconfig_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match=r"^config must be a QinsConfig, got dict$"):
        ProjectiveLinear(4, 3, config={"packed": True})


def test_a_layer_built_on_a_device_holds_every_tensor_there() -> None:
    """Non-persistent buffers included: ``to_empty``/``to`` then move one consistent set."""
    for cache_weight in (True, False):
        layer = ProjectiveLinear(6, 5, bias=True, device="meta", cache_weight=cache_weight)
        assert {t.device.type for t in [*layer.parameters(), *layer.buffers()]} == {"meta"}


def test_memory_saving_mode_decodes_every_forward_and_keeps_no_cache() -> None:
    layer = ProjectiveLinear.from_linear(make_linear(), SEED, cache_weight=False)
    assert layer._cached_weight is None
    x = torch.randn(2, 48)
    y0 = layer(x)
    with torch.no_grad():
        layer.sign.neg_()
    assert not torch.equal(layer(x), y0)
    assert layer._cached_weight is None


def test_to_half_converts_cache_and_keeps_logs_float32() -> None:
    layer = ProjectiveLinear.from_linear(make_linear(), SEED)
    lo = layer.log_min.clone()
    fp32_cache = layer._cached_weight.clone()
    layer.half()
    assert layer._cached_weight.dtype == torch.float16 and layer.compute_dtype == torch.float16
    assert layer.log_min.dtype == torch.float32 and torch.equal(layer.log_min, lo)
    assert layer.stored.dtype == torch.uint8 and layer.sign.dtype == torch.int8
    assert torch.equal(layer._cached_weight, layer.decode_weight())
    # Back to float32: the cache is re-decoded from the codes, not up-cast from float16.
    layer.to(torch.float32)
    assert layer._cached_weight.dtype == torch.float32
    assert torch.equal(layer._cached_weight, fp32_cache)


def test_to_device_moves_every_tensor(device: torch.device) -> None:
    layer = ProjectiveLinear.from_linear(make_linear(), SEED).to(device)
    tensors = [layer.stored, layer.sign, layer.log_min, layer.log_max, layer.bias, layer._cached_weight]
    assert all(t.device.type == device.type for t in tensors)
    assert layer(torch.randn(2, 48, device=device)).device.type == device.type


def test_weight_property_returns_the_decoded_weight() -> None:
    lin = make_linear()
    layer = ProjectiveLinear.from_linear(lin)
    assert layer.weight.shape == lin.weight.shape
    assert torch.equal(layer.weight, layer.decode_weight())
    assert torch.equal(ProjectiveLinear.from_linear(lin, cache_weight=False).weight, layer.decode_weight())


def test_weight_property_is_the_cache_itself_in_cached_mode_and_a_fresh_decode_otherwise() -> None:
    cached = ProjectiveLinear.from_linear(make_linear())
    assert cached.weight is cached._cached_weight  # no decode, no copy: the cache
    saving = ProjectiveLinear.from_linear(make_linear(), cache_weight=False)
    first, second = saving.weight, saving.weight
    assert saving._cached_weight is None and first is not second and torch.equal(first, second)


@pytest.mark.parametrize("cache_weight", [True, False])
def test_repr_names_sizes_bias_format_and_mode(cache_weight: bool) -> None:
    from qins import kernels

    layer = ProjectiveLinear.from_linear(
        make_linear(), QinsConfig(False, "minmax", True, spacing="log"), cache_weight=cache_weight
    )
    expected = (
        "ProjectiveLinear(in_features=48, out_features=24, bias=True, format=split, spacing=log, log_range=minmax, "
        f"per_row=True, cache_weight={cache_weight}"
        + ("" if cache_weight else f", kernel={kernels.backend_name(torch.device('cpu'))}") + ")"
    )
    assert repr(layer) == expected
    packed = ProjectiveLinear(3, 2, bias=False)
    assert repr(packed) == (
        "ProjectiveLinear(in_features=3, out_features=2, bias=False, format=packed, spacing=mulaw, per_row=True, "
        f"shared_tables={DEFAULT_SHARED_TABLES}, cache_weight=True)"
    )


def test_logs_stay_float32_through_meta_and_to_empty_whatever_the_default_dtype() -> None:
    layer = ProjectiveLinear.from_linear(make_linear())
    on_meta = layer.to("meta")
    assert on_meta.log_min.is_meta and on_meta.log_max.is_meta and on_meta.log_min.dtype == torch.float32
    with default_dtype(torch.float64):
        empty = ProjectiveLinear(48, 24, device="meta").to_empty(device="cpu")
    assert empty.log_min.dtype == empty.log_max.dtype == torch.float32
    assert empty.log_min.device.type == "cpu" and not empty.log_max.is_meta


def test_deepcopy_gives_identical_outputs_and_an_independent_cache() -> None:
    layer = ProjectiveLinear.from_linear(make_linear(), SEED)
    clone = copy.deepcopy(layer)
    x = torch.randn(3, 48)
    assert torch.equal(clone(x), layer(x))
    assert clone._cached_weight.data_ptr() != layer._cached_weight.data_ptr()
    with torch.no_grad():
        clone.sign.neg_()
    clone.invalidate_cache()
    assert not torch.equal(clone(x), layer(x))


def test_from_linear_leaves_the_source_unchanged() -> None:
    lin = make_linear()
    sd = {k: v.clone() for k, v in lin.state_dict().items()}
    ProjectiveLinear.from_linear(lin)
    assert all(torch.equal(v, lin.state_dict()[k]) for k, v in sd.items())


def test_from_linear_rejects_nan_weight_and_non_linear() -> None:
    lin = make_linear()
    with torch.no_grad():
        lin.weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"1 non-finite.*\(3, 4\)"):
        ProjectiveLinear.from_linear(lin)
    with pytest.raises(ValueError, match="nn.Linear"):
        ProjectiveLinear.from_linear(nn.Conv1d(2, 2, 1))  # type: ignore[arg-type]


def test_constructor_rejects_non_positive_sizes() -> None:
    with pytest.raises(ValueError, match="positive"):
        ProjectiveLinear(0, 4)


def test_from_linear_refuses_other_modules_naming_their_type() -> None:
    """Found by mutation testing: the refusal's type name was never checked."""
    with pytest.raises(ValueError, match="^from_linear expects nn.Linear, got Conv1d$"):
        ProjectiveLinear.from_linear(nn.Conv1d(4, 4, 1))


def test_the_smallest_layer_is_one_by_one_and_empty_sizes_are_refused() -> None:
    """Found by mutation testing: the size check's boundaries."""
    layer = ProjectiveLinear(1, 1)
    assert (layer.in_features, layer.out_features) == (1, 1) and layer(torch.randn(2, 1)).shape == (2, 1)
    for sizes in [(0, 1), (1, 0), (3, 0)]:
        with pytest.raises(ValueError):
            ProjectiveLinear(*sizes)
