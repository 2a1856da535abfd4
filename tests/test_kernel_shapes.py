"""``qins::linear`` on every ISA path at every batch path, with in_features chosen to hit each column
branch of the kernels: the AVX2 path sums 32-column steps (two gathers and 16 scalar lookups), then
8-column steps, then a scalar tail, with 4, 2 or 1 accumulators per x row for gemv groups of 1, 2 and
3-4 rows; batches above 8 decode blocks of rows. ``in = 32 a + 8 b + c`` draws each part, so every
combination of "body / 8-step / tail present or not" comes up, for both formats and spacings."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qins.kernels import reference
from tests.strategies import LinearCase, qins_codes
from tests.test_kernels import check_close, env, native, native_isas


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 4), st.integers(0, 3), st.integers(0, 7),
    st.sampled_from([1, 2, 3, 4, 5, 8, 9, 33]),
    st.booleans(), st.booleans(), st.sampled_from([0, 1]), st.integers(0, 2**31 - 1),
)
def test_every_column_branch_and_batch_path_matches_the_reference(a, b, c, batch, packed, per_row, spacing, seed):
    native()
    inn = 32 * a + 8 * b + c
    if inn == 0:
        inn = 1
    gen = torch.Generator().manual_seed(seed)
    out = 1 + seed % 13
    codes, sign = qins_codes(gen, out, inn, packed, 0.1)
    shape = (out,) if per_row else ()
    lo = torch.rand(shape, generator=gen) * -12.0
    hi = lo + torch.rand(shape, generator=gen) * 8.0
    case = LinearCase(torch.randn(batch, inn, generator=gen), codes, sign, lo, hi, None, spacing)
    y_ref = reference.linear(*case.args())
    for isa in native_isas():
        with env(QINS_CPU_ISA=isa, QINS_KERNEL=None):
            check_close(case, torch.ops.qins.linear(*case.args()), y_ref)
