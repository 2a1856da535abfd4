"""The native CPU kernels where earlier faults slipped past the other kernel tests.

* The batch paths of ``qins::linear`` (``qins_kernels.h``): up to ``kMaxGemvBatch`` rows the LUT-GEMV
  straight from the codes; then decoded blocks of rows x columns, multiplied by the ISA's own
  micro-GEMM up to ``kOwnGemmMaxBatch`` rows and by ATen's BLAS above (``at::mm_out`` for the first
  column block, ``addmm_`` for the others) with ``own_gemm=1`` (the default on Intel), by the own
  micro-GEMM at every batch with ``own_gemm=2`` (the default elsewhere), by the BLAS at every batch
  with ``own_gemm=0``; on AVX2 the own GEMM computes batches up to 96 straight from the codes
  (``code_gemm``: x packed in panels of 16 rows, tiles of 6 weight rows), with no decoded block. tests/test_kernels.py
  draws batches of at most 65, so the
  BLAS path was never run with more than one column block. Here every path runs with several
  column blocks: on small odd layers through the tuning knobs (a scratch of a few columns), and on
  the real 11008-wide down-projection (slow).
* The native encoder's flush (``range_codes``): past the range, a magnitude goes to the nearer of 0
  and the smallest level K, exactly half of level K going to K. The single-element test in
  tests/test_search_kernel.py only reaches the scalar tail of each ISA; here ties and their float32
  neighbours sit at every lane of the 8- and 16-wide vector bodies too.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qins.kernels as qk
from qins.formats import level_table, num_levels
from qins.kernels import reference
from tests.strategies import LinearCase, qins_codes
from tests.test_kernels import TUNING_FIELDS, check_close, env, native, native_isas, native_paths, on_path, tuning

KMAX_GEMV_BATCH = 8  # qins_kernels.h kMaxGemvBatch
KOWN_GEMM_MAX_BATCH = 96  # qins_kernels.h kOwnGemmMaxBatch
TALL_BLOCK_BATCH = 257  # ops.cpp: above 256 rows of x, the BLAS path's blocks are 8 x gemm_rows tall (own_gemm < 2)
#: Every batch of the LUT-GEMV: in one pass of up to 8 rows of x on AVX2 (kAvx2GemvGroup), in passes of
#: up to 4 on the other ISAs (kGemvGroup), each pass size its own instantiation of the kernel.
GEMV_BATCHES = tuple(range(1, KMAX_GEMV_BATCH + 1))
#: The first and last batch of each path and one inside: GEMV, own micro-GEMM, BLAS (and its tall blocks).
PATH_BATCHES = (1, 5, KMAX_GEMV_BATCH, KMAX_GEMV_BATCH + 1, 40, 64, 65, KOWN_GEMM_MAX_BATCH,
                KOWN_GEMM_MAX_BATCH + 1, 130, TALL_BLOCK_BATCH - 1, TALL_BLOCK_BATCH)


def _layer_case(seed: int, batch: int, out: int, inn: int, packed: bool, per_row: bool, spacing: int,
                bias: bool) -> LinearCase:
    gen = torch.Generator().manual_seed(seed)
    codes, sign = qins_codes(gen, out, inn, packed, 0.05)
    shape = (out,) if per_row else ()
    lo = torch.rand(shape, generator=gen) * -8 - 4
    b = torch.randn(out, generator=gen) if bias else None
    return LinearCase(torch.randn(batch, inn, generator=gen), codes, sign, lo, lo + 6, b, spacing)


#: a layer at every batch path, odd shapes, and the knobs that make several column blocks:
#: budget = gemm_rows * gemm_cols floats of scratch (16 x 64 gives blocks of 64 columns)
PATH_DRAWS = dict(
    seed=st.integers(0, 2**31 - 1),
    batch=st.sampled_from(PATH_BATCHES),
    out=st.integers(1, 70),
    inn=st.one_of(st.integers(1, 70), st.integers(65, 400)),
    packed=st.booleans(),
    bias=st.booleans(),
    gemm=st.sampled_from([(16, 64), (16, 200), (1, 1), (128, 3072)]),
    col_block=st.sampled_from([64, 128, 1 << 30]),
    own_gemm=st.sampled_from([0, 1, 2]),
    threads=st.sampled_from([1, 2]),
)


@settings(max_examples=40, deadline=None)
@given(**PATH_DRAWS, per_row=st.booleans(), spacing=st.sampled_from([0, 1]))
def test_every_batch_path_sums_every_column_block_at_every_isa(
    seed, batch, out, inn, packed, per_row, spacing, bias, gemm, col_block, own_gemm, threads
):
    case = _layer_case(seed, batch, out, inn, packed, per_row, spacing, bias)
    every_isa_with_knobs(case, check_close, gemm=gemm, col_block=col_block, own_gemm=own_gemm, threads=threads)


#: PATH_DRAWS for a batch given apart (GEMV_BATCHES)
GEMV_DRAWS = {k: v for k, v in PATH_DRAWS.items() if k != "batch"}


@pytest.mark.parametrize("batch", GEMV_BATCHES)
@settings(max_examples=6, deadline=None)
@given(**GEMV_DRAWS, per_row=st.booleans(), spacing=st.sampled_from([0, 1]))
def test_every_gemv_pass_size_matches_the_reference_at_every_isa(
    batch, seed, out, inn, packed, per_row, spacing, bias, gemm, col_block, own_gemm, threads
):
    """Each batch 1..8 on every ISA path: one pass of ``batch`` rows of x on AVX2, passes of at most 4
    elsewhere; odd shapes reach the 32- and 8-column steps' tails and the scalar tail of every row."""
    case = _layer_case(seed, batch, out, inn, packed, per_row, spacing, bias)
    every_isa_with_knobs(case, check_close, gemm=gemm, col_block=col_block, own_gemm=own_gemm, threads=threads)


def every_isa_with_knobs(case, check, *, gemm: tuple[int, int], col_block: int, own_gemm: int, threads: int) -> None:
    """``check(case, y, y_ref)`` for the op on every native ISA path, at ``threads`` torch threads
    and the tuning knobs given (``gemm``: ``(gemm_rows, gemm_cols)``), against the reference."""
    native()
    y_ref = reference.linear(*case.args())
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with tuning(gemm_rows=gemm[0], gemm_cols=gemm[1], col_block=col_block, own_gemm=own_gemm):
            for isa, gather in native_paths():
                with on_path(isa, gather):
                    check(case, torch.ops.qins.linear(*case.args()), y_ref)
    finally:
        torch.set_num_threads(old)


@pytest.mark.slow
@pytest.mark.parametrize("own_gemm", [1, 2])
@pytest.mark.parametrize("batch", [KOWN_GEMM_MAX_BATCH, KOWN_GEMM_MAX_BATCH + 1, 160])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
def test_the_real_down_projection_sums_every_column_block_on_the_own_gemm_and_the_blas_path(batch, packed, own_gemm):
    """A Llama down-projection at prefill (300 x 11008, every ISA), at the largest batch of the
    own micro-GEMM and above it (ATen's BLAS with ``own_gemm=1``, the own micro-GEMM with 2): 11008
    columns are several column blocks of the default scratch, so each output sums the first block's
    and the others' products (``mm_out`` then ``addmm_`` on the BLAS path)."""
    native()
    case = _layer_case(batch + packed, batch, 300, 11008, packed, True, 1, True)
    y_ref = reference.linear(*case.args())
    with tuning(own_gemm=own_gemm):
        for isa, gather in native_paths():
            with on_path(isa, gather):
                check_close(case, torch.ops.qins.linear(*case.args()), y_ref)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [KOWN_GEMM_MAX_BATCH + 1, 131])
def test_an_odd_wide_layer_on_the_blas_path_matches_the_reference(batch):
    """Odd shapes on the BLAS path: 45 rows (one partial row block) x 11011 columns (a padded last
    column block), per-tensor logs, log spacing, no bias."""
    native()
    case = _layer_case(batch, batch, 45, 11011, False, False, 0, False)
    y_ref = reference.linear(*case.args())
    with tuning(gemm_rows=16, gemm_cols=1024, own_gemm=1):
        for isa, gather in native_paths():
            with on_path(isa, gather):
                check_close(case, torch.ops.qins.linear(*case.args()), y_ref)


# ---- the native encoder's flush: exactly half of the smallest level, at every lane ----


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 3),
    cols=st.integers(1, 80),  # the 8- and 16-lane bodies and their tails
    ranges=st.integers(1, 2),
    write=st.integers(0, 1),
    packed=st.booleans(),
    span=st.sampled_from([0.5, 4.0, 20.0]),
)
def test_a_magnitude_at_half_the_smallest_level_flushes_to_it_and_its_neighbours_alike_at_every_lane(
    seed, rows, cols, ranges, write, packed, span
):
    """Each magnitude is beyond range ``write`` (more than half a step below level K): exactly half
    of level K (code K), the float32 just below (0) or just above (K), zero (0), or a value inside
    the range. Every ISA's codes equal the reference's, and the half ties are K."""
    native()
    write = min(write, ranges - 1)
    k = num_levels(packed)
    g = torch.Generator().manual_seed(seed)
    hi = torch.rand(rows, 1, generator=g) * 4 - 2
    lo = hi - span * (1 + torch.rand(rows, ranges, generator=g))
    tables = torch.stack([level_table(lo[:, s], hi.reshape(-1), packed, spacing="log") for s in range(ranges)])
    half = tables[write, :, k : k + 1] * 0.5  # [rows, 1], exact (a power-of-two scaling)
    below, above = torch.nextafter(half, torch.zeros(())), torch.nextafter(half, torch.full((), float("inf")))
    inside = torch.exp(hi - torch.rand(rows, cols, generator=g) * span)
    kind = torch.randint(0, 5, (rows, cols), generator=g)
    mag = torch.where(kind == 0, half, torch.where(kind == 1, below, torch.where(kind == 2, above, inside)))
    mag = torch.where(kind == 3, torch.zeros(()), mag)
    gap = hi - torch.log(mag)  # +inf for zeros
    _, want = reference.range_codes(mag, gap, lo, hi, tables, packed, write)
    assert (want[(kind == 0) | (kind == 2)] == k).all() and (want[(kind == 1) | (kind == 3)] == 0).all()
    for isa in native_isas():
        with env(QINS_CPU_ISA=isa):
            _, codes = qk.range_codes(mag, gap, lo, hi, tables, packed, write)
        assert torch.equal(codes, want), f"{isa}: {(codes != want).sum().item()} codes differ"



# ---- what the other kernel tests left open (found by the C++ mutation pass, tests/cpp_mutation.py) ----

#: set_tuning's accepted range of each knob (ops.cpp check_tuning)
TUNING_RANGES = {"col_block": (1, 1 << 40), "gemm_rows": (1, 1 << 20), "gemm_cols": (1, 1 << 24),
                 "prefetch": (0, 1 << 20), "pipeline": (0, 2), "own_gemm": (0, 2), "row_chunk": (1, 16)}


def test_every_tuning_knob_takes_both_ends_of_its_range_and_refuses_one_past_each():
    mod = native()
    old = list(mod.get_tuning())
    for field, (lo, hi) in TUNING_RANGES.items():
        for ok in (lo, hi):
            with tuning(**{field: ok}):
                assert dict(zip(TUNING_FIELDS, mod.get_tuning()))[field] == ok
        for bad in (lo - 1, hi + 1):
            with pytest.raises(RuntimeError, match=rf"{field} must be in \[{lo}, {hi}\], got {bad}$"):
                with tuning(**{field: bad}):
                    pass
        assert list(mod.get_tuning()) == old


@pytest.mark.parametrize("rows, inn", [(5, 3), (2, 70), (1, 130)])
def test_decode_debug_prepares_every_row_of_x_in_one_column_order(rows, inn):
    """Row b of x is column c + 1 times (b + 1): every prepared row is the first one times b + 1, also
    with more rows than columns."""
    mod = native()
    codes = torch.zeros(4, inn, dtype=torch.uint8)
    x = torch.arange(1, inn + 1, dtype=torch.float32) * torch.arange(1, rows + 1, dtype=torch.float32)[:, None]
    lo, hi = torch.tensor(-1.0), torch.tensor(0.0)
    for isa in native_isas():
        _, xp = mod.decode_debug(codes, None, lo, hi, x, 0, qk.ISAS[isa])
        assert xp.shape[0] == rows
        perm = xp[0]
        assert sorted(perm[perm > 0].tolist()) == list(range(1, inn + 1)), isa
        for b in range(rows):
            assert torch.equal(xp[b], perm * (b + 1)), (isa, b)
