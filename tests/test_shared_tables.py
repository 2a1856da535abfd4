"""Shared tables (``QinsConfig(shared_tables=n)``): n mulaw tables per layer, a table and a scale per row.

Pinned here: the encoder's exact nearest-value rounding and its no-clipping scale, the table count,
every native ISA path and batch path against the reference (Hypothesis, odd shapes, the tuning knobs
that force several column blocks), the decode of every ISA bit for bit, the op's refusals, the
layer's state (round trip, validation, metadata), the embedding and its tied head, autograd and
``torch.compile``.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qins
import qins.kernels as qk
from qins.formats import MAX_SHARED_TABLES, QinsConfig, decode_codes, level_table, num_levels
from tests.strategies import (
    SHARED_CONFIGS,
    SHARED_TABLE_COUNTS,
    SharedCase,
    config_id,
    float32_weights,
    shared_case,
)
from tests.test_cpp_paths import GEMV_BATCHES, GEMV_DRAWS, PATH_DRAWS, every_isa_with_knobs
from tests.test_kernels import U, native, native_paths, on_path


def _decode(case: SharedCase) -> torch.Tensor:
    return decode_codes(case.codes, case.sign, case.log_min, case.log_max, spacing="mulaw",
                        row_table=case.row_table, row_scale=case.row_scale)


def check_close_shared(case: SharedCase, y: torch.Tensor, y_ref: torch.Tensor) -> None:
    """|y - y_ref| within the float32 bound of two sums of n products in any order, plus the two
    roundings that differ: the reference rounds each ``scale·level``, the kernels each scaled sum."""
    w = _decode(case).double()
    s = case.x.double().abs() @ w.abs().T
    if case.bias is not None:
        s = s + case.bias.double().abs()
    n = case.codes.shape[1] + 3
    tol = 2 * (n * U / (1 - n * U)) * s
    err = (y.double() - y_ref.double()).abs()
    bad = err > tol
    assert not bad.any(), f"max excess {(err - tol).max().item():.3g} at {bad.nonzero()[:5].tolist()}"


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------


FLOAT32_MAX = torch.finfo(torch.float32).max
#: rows scaled to float32's maximum and smallest normal: their logs leave float32's exp range
EXTREME_ROWS = torch.tensor([
    [2.0**-126, -FLOAT32_MAX, 0.5, 2.0**-128], [2.0**-126 * 1.00001, 2.0**-126, -(2.0**-126), 0.0],
    [1.0, 2.0, -3.0, 4.0], [FLOAT32_MAX, FLOAT32_MAX, -(2.0**-126), 1e-30],
])


@settings(max_examples=80, deadline=None)
@given(w=float32_weights(max_elems=96), packed=st.booleans(), tables=st.sampled_from(SHARED_TABLE_COUNTS))
@example(w=EXTREME_ROWS, packed=True, tables=4)
@example(w=EXTREME_ROWS, packed=False, tables=1)
def test_every_weight_decodes_to_the_nearest_of_its_rows_values_or_zero(w, packed, tables):
    w = _rows(w)
    codes, sign, lo, hi, row_table, row_scale = qins.encode(w, QinsConfig(packed=packed, shared_tables=tables))
    dec = decode_codes(codes, sign, lo, hi, spacing="mulaw", row_table=row_table, row_scale=row_scale)
    k = num_levels(packed)
    values = level_table(lo, hi, packed, "mulaw")[row_table.long(), 1 : k + 1] * row_scale.reshape(-1, 1)
    candidates = torch.cat([values, torch.zeros_like(values[:, :1])], 1)  # [R, K + 1]
    nearest = (candidates.double().unsqueeze(1) - w.abs().double().unsqueeze(2)).abs().amin(2)
    assert torch.equal((dec.abs().double() - w.abs().double()).abs(), nearest)
    kept = dec != 0
    assert torch.equal(torch.signbit(dec[kept]), torch.signbit(w[kept]))
    assert bool((dec[w == 0] == 0).all())


@settings(max_examples=60, deadline=None)
@given(w=float32_weights(max_elems=96, max_log10=30.0), packed=st.booleans(),
       tables=st.sampled_from(SHARED_TABLE_COUNTS))
def test_each_rows_scale_puts_its_top_level_on_its_largest_weight_so_nothing_is_clipped(w, packed, tables):
    w = _rows(w)
    codes, sign, lo, hi, row_table, row_scale = qins.encode(w, QinsConfig(packed=packed, shared_tables=tables))
    top = level_table(lo, hi, packed, "mulaw")[row_table.long(), 1] * row_scale
    big = w.abs().amax(1)
    live = big > 0
    # the top level is max|w| up to the roundings of the scale and of its product (1 ulp each)
    normal = live & (big > 1e-37) & (big < 3e38)
    assert bool(((top[normal].double() - big[normal].double()).abs() <= 2 * U * big[normal].double()).all())
    assert bool((row_scale > 0).all()) and bool(torch.isfinite(row_scale).all())


@pytest.mark.parametrize("tables", SHARED_TABLE_COUNTS)
@pytest.mark.parametrize("packed", [True, False])
def test_a_layer_has_n_tables_and_every_row_names_one_of_them(packed, tables):
    gen = torch.Generator().manual_seed(tables)
    # rows of different shapes (gaussian, heavy-tailed, near uniform), so several spans pay
    w = torch.cat([torch.randn(40, 200, generator=gen), torch.randn(40, 200, generator=gen) ** 5,
                   torch.rand(40, 200, generator=gen)]) * 0.02
    codes, sign, lo, hi, row_table, row_scale = qins.encode(w, QinsConfig(packed=packed, shared_tables=tables))
    assert lo.shape == hi.shape == (tables,)
    assert row_table.dtype == torch.uint8 and row_table.shape == (120,)
    assert int(row_table.max()) < lo.shape[0]
    if tables > 1:
        assert len(row_table.unique()) > 1  # these rows want different spans
    assert bool((lo < hi).all())


def test_more_shared_tables_never_model_a_larger_layer_error():
    # the greedy choice keeps the spans of fewer tables' choice, so the modelled error can only fall;
    # checked on the exact squared error, which follows it on this Gaussian-and-heavy-tailed layer
    gen = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(64, 256, generator=gen), torch.randn(64, 256, generator=gen) ** 3]) * 0.02
    errors = []
    for tables in (1, 2, 4, 8):
        enc = qins.encode(w, QinsConfig(shared_tables=tables))
        dec = decode_codes(*enc[:4], spacing="mulaw", row_table=enc[4], row_scale=enc[5])
        errors.append(float((dec - w).double().square().sum()))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.98 * errors[0], errors


def test_the_shared_tables_encoding_is_deterministic():
    w = torch.randn(50, 77, generator=torch.Generator().manual_seed(3))
    a, b = qins.encode(w, QinsConfig(shared_tables=4)), qins.encode(w, QinsConfig(shared_tables=4))
    assert all(torch.equal(x, y) for x, y in zip(a, b) if x is not None)


@pytest.mark.parametrize("kwargs, error", [
    ({"shared_tables": True}, TypeError),
    ({"shared_tables": 1.0}, TypeError),
    ({"shared_tables": -1}, ValueError),
    ({"shared_tables": MAX_SHARED_TABLES + 1}, ValueError),
    ({"shared_tables": 4, "per_row": False}, ValueError),
    ({"shared_tables": 4, "spacing": "log"}, ValueError),
])
def test_a_config_with_impossible_shared_tables_is_refused(kwargs, error):
    with pytest.raises(error, match="shared_tables"):
        QinsConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# Kernels: every ISA path, every batch path, against the reference
# ---------------------------------------------------------------------------------------------


def _every_isa_shared(seed, batch, out, inn, packed, tables, bias, gemm, col_block, own_gemm, threads) -> None:
    case = shared_case(seed, batch, out, inn, packed, tables, bias)
    every_isa_with_knobs(case, check_close_shared, gemm=gemm, col_block=col_block, own_gemm=own_gemm,
                         threads=threads)


@settings(max_examples=40, deadline=None)
@given(**PATH_DRAWS, tables=st.sampled_from(SHARED_TABLE_COUNTS))
def test_every_isa_and_batch_path_computes_the_reference_with_shared_tables(**draws):
    _every_isa_shared(**draws)


@pytest.mark.parametrize("batch", GEMV_BATCHES)
@settings(max_examples=4, deadline=None)
@given(**GEMV_DRAWS, tables=st.sampled_from(SHARED_TABLE_COUNTS))
def test_every_gemv_pass_size_computes_the_reference_with_shared_tables(batch, **draws):
    _every_isa_shared(batch=batch, **draws)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), out=st.integers(1, 40), inn=st.integers(1, 300), packed=st.booleans(),
       tables=st.sampled_from(SHARED_TABLE_COUNTS))
def test_every_isa_decodes_each_row_through_its_own_table_bit_for_bit(seed, out, inn, packed, tables):
    # against the per-row path with each row given its table's logs: the same tables, whose decode
    # is pinned to the reference bit for bit in tests/test_kernels.py
    mod = native()
    case = shared_case(seed, 1, out, inn, packed, tables, False)
    idx = case.row_table.long()
    for isa, gather in native_paths():
        with on_path(isa, gather):
            shared, _ = mod.decode_debug(case.codes, case.sign, case.log_min, case.log_max, case.x, 1, qk.ISAS[isa],
                                         case.row_table)
            per_row, _ = mod.decode_debug(case.codes, case.sign, case.log_min[idx], case.log_max[idx], case.x, 1,
                                          qk.ISAS[isa])
        assert torch.equal(shared.view(torch.int32), per_row.view(torch.int32)), (isa, gather)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(row_scale=None), "come together"),
    (lambda a: a.update(row_table=a["row_table"].to(torch.int64)), "uint8"),
    (lambda a: a.update(row_table=a["row_table"][:-1]), "uint8"),
    (lambda a: a["row_table"].__setitem__(2, 4), "names table 4 of 4"),
    (lambda a: a.update(log_min=torch.zeros(17), log_max=torch.ones(17)), "1 <= n <= 16"),
    (lambda a: a.update(row_scale=a["row_scale"].double()), "float32"),
])
def test_the_native_op_refuses_shared_tables_it_cannot_read_safely(change, match):
    mod = native()
    case = shared_case(0, 2, 8, 30, True, 4, False)
    args = dict(x=case.x, codes=case.codes, sign=None, log_min=case.log_min, log_max=case.log_max, bias=None,
                spacing=1, isa=0, row_table=case.row_table.clone(), row_scale=case.row_scale)
    change(args)
    with pytest.raises(RuntimeError, match=match):
        mod.linear(**args)


def test_the_reference_refuses_a_table_without_its_scales():
    case = shared_case(0, 2, 8, 30, True, 4, False)
    with pytest.raises(ValueError, match="come together"):
        decode_codes(case.codes, None, case.log_min, case.log_max, spacing="mulaw", row_table=case.row_table)


# ---------------------------------------------------------------------------------------------
# The layer, its state, the embedding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", SHARED_CONFIGS, ids=lambda c: f"{config_id(c)}-{c.shared_tables}")
@pytest.mark.parametrize("cache_weight", [True, False])
def test_a_shared_tables_layer_computes_its_decoded_weight_and_round_trips_its_state(config, cache_weight):
    torch.manual_seed(0)
    lin = torch.nn.Linear(150, 33)
    layer = qins.ProjectiveLinear.from_linear(lin, config, cache_weight=cache_weight)
    assert layer.log_min.shape == (config.shared_tables,) and layer.row_table.shape == (33,)
    x = torch.randn(5, 150)
    expect = torch.nn.functional.linear(x, layer.decode_weight(), lin.bias)
    torch.testing.assert_close(layer(x), expect, rtol=1e-5, atol=1e-6)
    sd = layer.state_dict()
    assert sd._metadata[""]["qins"]["shared_tables"] == config.shared_tables
    fresh = qins.ProjectiveLinear(150, 33, config=config, cache_weight=cache_weight)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), layer(x))
    half = layer.to(torch.float16)
    assert half.row_scale.dtype == torch.float32 and half.log_min.dtype == torch.float32


@pytest.mark.parametrize("corrupt, match", [
    (lambda sd: sd["row_table"].__setitem__(3, 9), "names table 9"),
    (lambda sd: sd["row_scale"].__setitem__(1, 0.0), "positive and finite"),
    (lambda sd: sd["row_scale"].__setitem__(1, math.inf), "positive and finite"),
    (lambda sd: (sd["row_scale"].__setitem__(1, 3.4e38), sd["log_min"].add_(1), sd["log_max"].add_(1)), "overflows"),
    (lambda sd: sd.pop("row_table"), "missing"),
    (lambda sd: sd.__setitem__("row_scale", sd["row_scale"][:-1]), "shape"),
])
def test_a_corrupt_shared_tables_state_is_refused_before_anything_changes(corrupt, match):
    layer = qins.ProjectiveLinear.from_linear(torch.nn.Linear(40, 12), QinsConfig(shared_tables=4))
    target = qins.ProjectiveLinear.from_linear(torch.nn.Linear(40, 12), QinsConfig(shared_tables=4))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    sd = layer.state_dict()
    corrupt(sd)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(sd)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_a_per_row_state_and_a_shared_tables_layer_name_the_config_that_loads_each_other():
    per_row = qins.ProjectiveLinear.from_linear(torch.nn.Linear(40, 12), QinsConfig(shared_tables=0))
    shared = qins.ProjectiveLinear(40, 12, config=QinsConfig(shared_tables=4))
    with pytest.raises(ValueError, match=r"QinsConfig\(packed=True, per_row=True, shared_tables=0\)"):
        shared.load_state_dict(per_row.state_dict())
    with pytest.raises(ValueError, match=r"QinsConfig\(packed=True, per_row=True, shared_tables=4\)"):
        qins.ProjectiveLinear(40, 12, config=QinsConfig(shared_tables=0)).load_state_dict(
            qins.ProjectiveLinear.from_linear(torch.nn.Linear(40, 12), QinsConfig(shared_tables=4)).state_dict())


def test_a_shared_tables_state_without_metadata_is_read_from_its_keys():
    layer = qins.ProjectiveLinear.from_linear(torch.nn.Linear(40, 12), QinsConfig(shared_tables=2))
    plain = dict(layer.state_dict())  # a plain dict: no _metadata (a safetensors round trip)
    fresh = qins.ProjectiveLinear(40, 12, config=QinsConfig(shared_tables=layer.log_min.shape[0]))
    fresh.load_state_dict(plain)
    assert torch.equal(fresh.decode_weight(), layer.decode_weight())


def test_save_and_load_keep_a_models_shared_tables(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    qins.convert_model_to_projective(model, QinsConfig(shared_tables=4), cache_weight=False, skip=())
    path = tmp_path / "m.safetensors"
    qins.save(model, path)
    again = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    qins.load(again, path)
    x = torch.randn(3, 64)
    assert isinstance(again[0], qins.ProjectiveLinear) and again[0].config.shared_tables == 4
    assert torch.equal(again(x), model(x))


def test_a_shared_tables_embedding_reads_rows_and_its_tied_head_computes_the_same_weight():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(300, 48)
    q = qins.ProjectiveEmbedding.from_embedding(emb, QinsConfig(shared_tables=4))
    ids = torch.tensor([[0, 7, 299], [5, 5, 1]])
    assert torch.equal(q(ids), q.weight[ids])
    head = qins.ProjectiveTiedHead(q)
    x = torch.randn(2, 48)
    torch.testing.assert_close(head(x), x @ q.weight.T, rtol=1e-5, atol=1e-6)


def test_gradients_flow_through_shared_tables_as_through_the_decoded_weight():
    layer = qins.ProjectiveLinear.from_linear(torch.nn.Linear(40, 12), QinsConfig(shared_tables=4),
                                              cache_weight=False)
    x = torch.randn(3, 40, requires_grad=True)
    layer(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, layer.decode_weight(), layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_runs_a_shared_tables_layer_as_one_op():
    layer = qins.ProjectiveLinear.from_linear(torch.nn.Linear(40, 12), QinsConfig(shared_tables=4),
                                              cache_weight=False)
    x = torch.randn(3, 40)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("blocks", [None, [(0, 7), (7, 20)]], ids=["whole", "blocks"])
def test_encoding_leaves_the_float32_weight_it_reads_unchanged(blocks):
    from qins.encode import encode_shared

    w = torch.randn(20, 33, generator=torch.Generator().manual_seed(5))
    before = w.clone()
    qins.encode(w, QinsConfig(shared_tables=4))
    encode_shared(w, QinsConfig(shared_tables=4), blocks)
    assert torch.equal(w, before)
