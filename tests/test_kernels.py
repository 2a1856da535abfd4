"""``qins::linear``: every backend and CPU ISA path against the reference, within a derived bound.

The bound. All paths decode bit-identical weights (tested below), convert x to float32 exactly
and accumulate ``n = in + 1`` terms (the products and the bias) in float32, each partial sum
and product rounded at most once (FMA or not). By the standard summation bound each result is
within ``γ_n·S`` of the exact value, ``γ_n = n·u / (1 - n·u)``, ``u = 2^-24``,
``S = |x|·|ŵ|ᵀ + |b|`` (float64); so two paths differ by at most ``2·γ_n·S`` whatever their
orders. A bf16/fp16 output adds one rounding per side: at most one output ulp at the result's
magnitude.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qins.kernels as qk
from qins.formats import SPACINGS, decode_codes, level_table
from qins.kernels import reference
from tests.strategies import LinearCase, qins_codes, qins_linear_cases, qins_log_pairs

U = 2.0**-24
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
MIN_ULP = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}


def native():
    mod = qk.native_module()
    if mod is None:
        pytest.skip("native CPU kernels unavailable")
    return mod


def native_isas() -> list[str]:
    mod = qk.native_module()
    return [] if mod is None else [name for name, i in qk.ISAS.items() if mod.supported(i)]


@contextlib.contextmanager
def env(**values: str | None):
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bound(case: LinearCase, y_ref: torch.Tensor) -> torch.Tensor:
    """The derived |y_k - y_ref| bound (float64, shaped like y)."""
    w = decode_codes(case.codes, case.sign, case.log_min, case.log_max, spacing=SPACINGS[case.spacing]).double()
    s = case.x.double().abs() @ w.abs().T
    if case.bias is not None:
        s = s + case.bias.double().abs()
    n = case.codes.shape[1] + 1
    tol = 2 * (n * U / (1 - n * U)) * s
    dtype = case.x.dtype
    if dtype != torch.float32:
        mag = y_ref.double().abs() + tol
        ulp = torch.exp2(torch.floor(torch.log2(mag.clamp_min(1e-300))) - MANTISSA[dtype])
        tol = tol + ulp.clamp_min(MIN_ULP[dtype])
    return tol


def check_close(case: LinearCase, y: torch.Tensor, y_ref: torch.Tensor) -> None:
    assert y.dtype == case.x.dtype and y.shape == y_ref.shape
    err = (y.double() - y_ref.double()).abs()
    tol = bound(case, y_ref)
    bad = err > tol
    assert not bad.any(), f"max excess {(err - tol).max().item():.3g} at {bad.nonzero()[:5].tolist()}"


# ---------------------------------------------------------------------------------------------
# Tables and decode: bit-identical to the reference on every ISA path
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60)
@given(st.data(), st.booleans(), st.sampled_from([None, 1, 7, 64]), st.sampled_from(SPACINGS))
def test_tables_bit_identical(data, packed, rows, spacing):
    mod = native()
    lo, hi = data.draw(qins_log_pairs(rows=rows))
    ref = level_table(lo, hi, packed, spacing).view(torch.int32)
    for isa in native_isas():
        got = mod.table(lo, hi, packed, SPACINGS.index(spacing), qk.ISAS[isa]).view(torch.int32)
        assert torch.equal(got, ref), f"{isa}: {(got != ref).sum().item()} table entries differ"


def _edge_rows(edges: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_min, log_max)`` rows whose first or last level has ``t·log2e`` at, and a few ulps either
    side of, each edge (a fixed partner log at the other end, or both ends near the edge), plus
    ordinary rows."""
    log2e = 1.4426950408889634
    vals = []
    for edge in edges:
        t = torch.tensor(edge / log2e, dtype=torch.float32)
        for k in range(-3, 4):
            vals.append(t + k * torch.finfo(torch.float32).eps * t.abs())
    t = torch.stack(vals + [torch.tensor(-6.0), torch.tensor(-1.0), torch.tensor(0.0)])
    return torch.cat([t, torch.full_like(t, -6.0), t]), torch.cat([torch.full_like(t, 0.5), t, t + 3.0])


#: the vector paths' one-scaling region (n in [-124, 126], exp_scale_exact) and the subnormal levels
IN_DOMAIN_EDGES = (-126.0, -125.0, -124.5, -124.0, 126.0, 126.5, 127.0)
#: the exponent clamps of the kernels' scaling (n in [-252, 254]) and past them
CLAMP_EDGES = (-254.0, -252.5, -252.0, 128.0, 254.0, 255.0)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
def test_tables_bit_identical_at_the_edges_of_the_one_scaling_region(packed, spacing):
    """Rows on either side of the region where the vector paths scale by 2**n in one step, down to
    subnormal levels: the reference's bits on every ISA path."""
    mod = native()
    lo, hi = _edge_rows(IN_DOMAIN_EDGES)
    ref = level_table(lo, hi, packed, spacing).view(torch.int32)
    for isa in native_isas():
        got = mod.table(lo, hi, packed, SPACINGS.index(spacing), qk.ISAS[isa]).view(torch.int32)
        bad = (got != ref).any(1).nonzero().flatten()
        rows = bad[:5]
        assert bad.numel() == 0, f"{isa}: rows {rows.tolist()} (lo {lo[rows].tolist()}, hi {hi[rows].tolist()})"


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
def test_every_isa_path_computes_the_same_table_for_any_logs_clamps_included(packed, spacing):
    """Far outside any valid range (levels of 2**±250, overflow) the ISA paths still agree bit for
    bit, NaNs included. (The torch reference overflows to 0 past 2**254 where the kernels give inf;
    such levels are never valid: qins.formats.valid_levels.)"""
    mod = native()
    lo, hi = _edge_rows(IN_DOMAIN_EDGES + CLAMP_EDGES)
    tables = {isa: mod.table(lo, hi, packed, SPACINGS.index(spacing), qk.ISAS[isa]).view(torch.int32)
              for isa in native_isas()}
    first = tables.pop("scalar")
    for isa, got in tables.items():
        bad = (got != first).any(1).nonzero().flatten()
        assert bad.numel() == 0, f"{isa} vs scalar: rows {bad[:5].tolist()}"


@settings(max_examples=30)
@given(st.integers(1, 200), st.integers(1, 20), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1),
       st.sampled_from(SPACINGS))
def test_decode_bit_identical(inn, out, packed, per_row, seed, spacing):
    mod = native()
    gen = torch.Generator().manual_seed(seed)
    codes, sign = qins_codes(gen, out, inn, packed, 0.1)
    shape = (out,) if per_row else ()
    lo = torch.rand(shape, generator=gen) * -20
    hi = lo + torch.rand(shape, generator=gen) * 10
    ref = decode_codes(codes, sign, lo, hi, spacing=spacing).view(torch.int32)
    col = torch.arange(1, inn + 1, dtype=torch.float32)
    for isa, gather in native_paths():
        with on_path(isa, gather):
            w, xp = mod.decode_debug(codes, sign, lo, hi, col, SPACINGS.index(spacing), qk.ISAS[isa])
        perm = xp[0].long()  # column (1-based) at each position; 0 = padding
        assert sorted(perm[perm > 0].tolist()) == list(range(1, inn + 1))
        assert (w[:, perm == 0] == 0).all()
        nat = torch.empty(out, inn)
        nat[:, perm[perm > 0] - 1] = w[:, perm > 0]
        assert torch.equal(nat.view(torch.int32), ref), (isa, gather)


# ---------------------------------------------------------------------------------------------
# The op against the reference
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60)
@given(qins_linear_cases())
def test_linear_matches_reference_all_paths(case):
    y_ref = reference.linear(*case.args())
    with env(QINS_KERNEL="reference"):
        assert torch.equal(torch.ops.qins.linear(*case.args()), y_ref)
    for isa, gather in native_paths():
        with on_path(isa, gather):
            check_close(case, torch.ops.qins.linear(*case.args()), y_ref)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("batch", [1, 6, 9])
def test_wide_and_tall_layers(packed, batch):
    """Column blocks (in > 4096), several row chunks and parallel tasks, per-row logs."""
    native()
    gen = torch.Generator().manual_seed(batch)
    out, inn = 70, 4099 if batch > 8 else 8200
    codes, sign = qins_codes(gen, out, inn, packed, 0.05)
    lo = torch.rand(out, generator=gen) * -8 - 4
    case = LinearCase(torch.randn(batch, inn, generator=gen), codes, sign, lo, lo + 6, torch.randn(out, generator=gen))
    y_ref = reference.linear(*case.args())
    for isa, gather in native_paths():
        with on_path(isa, gather):
            check_close(case, torch.ops.qins.linear(*case.args()), y_ref)


@pytest.mark.slow
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("batch", [9, 33])
def test_large_batch_gemm_sums_every_column_block_of_a_long_row(packed, batch):
    """A Llama down-projection at prefill: in_features 11008 is several of the GEMM's column blocks
    (scratch of gemm_rows x gemm_cols floats, 128 x 3072 by default) for 300 rows, so each output
    sums partial products of every block; every ISA path against the reference."""
    native()
    gen = torch.Generator().manual_seed(batch + packed)
    out, inn = 300, 11008
    codes, sign = qins_codes(gen, out, inn, packed, 0.05)
    lo = torch.rand(out, generator=gen) * -8 - 4
    case = LinearCase(torch.randn(batch, inn, generator=gen), codes, sign, lo, lo + 6, torch.randn(out, generator=gen))
    y_ref = reference.linear(*case.args())
    for isa in native_isas():
        with env(QINS_CPU_ISA=isa):
            check_close(case, torch.ops.qins.linear(*case.args()), y_ref)


TUNING_FIELDS = ("col_block", "gemm_rows", "gemm_cols", "prefetch", "pipeline", "own_gemm", "row_chunk", "gather")


def native_paths() -> list[tuple[str, int | None]]:
    """Every native kernel path as ``(ISA name, gather knob)``: the AVX2 path's two ways of looking
    up the table (``gather=1``: half by vgatherdps, half by scalar loads; ``0``: scalar loads only)
    are two paths; the other ISAs ignore the knob (``None``: left as it is)."""
    return [(isa, g) for isa in native_isas() for g in ((1, 0) if isa == "avx2" else (None,))]


@contextlib.contextmanager
def on_path(isa: str, gather: int | None):
    """The op dispatched to ``isa`` (``QINS_CPU_ISA``) with the gather knob set (see native_paths)."""
    knob = contextlib.nullcontext() if gather is None else tuning(gather=gather)
    with env(QINS_CPU_ISA=isa, QINS_KERNEL=None), knob:
        yield


@contextlib.contextmanager
def tuning(**changes: int):
    """The native module's knobs changed for the block (``get_tuning`` order: TUNING_FIELDS)."""
    mod = native()
    old = list(mod.get_tuning())
    new = dict(zip(TUNING_FIELDS, old), **changes)
    mod.set_tuning(*(new[f] for f in TUNING_FIELDS))
    try:
        yield
    finally:
        mod.set_tuning(*old)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
@pytest.mark.parametrize("batch", [1, 3])
def test_gemv_knobs_that_keep_the_order_keep_the_result_bit_identical(packed, batch):
    """Row chunk, prefetch distance, the pipelined table and AVX2's gathers only schedule work or
    fetch the same table entries another way: every row still sums its columns in the same order,
    so the result is bit-identical; a column block changes the order (within the bound). 37 rows:
    chunks of 2, 3 and 16 all leave a remainder."""
    native()
    gen = torch.Generator().manual_seed(batch + 10 * packed)
    out, inn = 37, 200
    codes, sign = qins_codes(gen, out, inn, packed, 0.05)
    lo = torch.rand(out, generator=gen) * -8 - 4
    case = LinearCase(torch.randn(batch, inn, generator=gen), codes, sign, lo, lo + 6, torch.randn(out, generator=gen))
    y_ref = reference.linear(*case.args())
    for isa in native_isas():
        with env(QINS_CPU_ISA=isa, QINS_KERNEL=None):
            y0 = torch.ops.qins.linear(*case.args())
            check_close(case, y0, y_ref)
            for knobs in ({"row_chunk": 1}, {"row_chunk": 3}, {"row_chunk": 16}, {"prefetch": 0}, {"prefetch": 64},
                          {"pipeline": 0}, {"pipeline": 2}, {"pipeline": 2, "prefetch": 0}, {"gather": 0},
                          {"gather": 1}):
                with tuning(**knobs):
                    assert torch.equal(torch.ops.qins.linear(*case.args()), y0), (isa, knobs)
            with tuning(col_block=64):
                check_close(case, torch.ops.qins.linear(*case.args()), y_ref)


def _intel() -> bool:
    """Whether this CPU's vendor is Intel (``/proc/cpuinfo``; elsewhere ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "GenuineIntel" in f.read()
    except OSError:
        import platform

        return "Intel" in platform.processor()


def test_tuning_defaults_and_refusals():
    mod = native()
    # own_gemm: the BLAS above kOwnGemmMaxBatch on Intel (MKL's best kernels run there), the own
    # micro-GEMM at every batch elsewhere (ops.cpp default_own_gemm); gather: AVX2's vgatherdps on
    # Intel only (AMD's are slower than scalar loads)
    assert dict(zip(TUNING_FIELDS, mod.get_tuning())) == {
        "col_block": 1 << 30, "gemm_rows": 128, "gemm_cols": 3072, "prefetch": 12288, "pipeline": 1,
        "own_gemm": 1 if _intel() else 2, "row_chunk": 2, "gather": 1 if _intel() else 0}
    for bad in (0, 17):
        with pytest.raises(RuntimeError, match=r"row_chunk must be in \[1, 16\]"):
            with tuning(row_chunk=bad):
                pass
    assert dict(zip(TUNING_FIELDS, mod.get_tuning()))["row_chunk"] == 2  # a refused call changes nothing


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_threads_agree(batch):
    native()
    gen = torch.Generator().manual_seed(1)
    out, inn = 600, 1000
    codes, sign = qins_codes(gen, out, inn, True, 0.05)
    lo = torch.rand(out, generator=gen) * -8 - 4
    case = LinearCase(torch.randn(batch, inn, generator=gen), codes, sign, lo, lo + 6, None)
    y_ref = reference.linear(*case.args())
    old = torch.get_num_threads()
    try:
        ys = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ys.append(torch.ops.qins.linear(*case.args()))
    finally:
        torch.set_num_threads(old)
    check_close(case, ys[0], ys[1])
    check_close(case, ys[1], y_ref)


@pytest.mark.parametrize("own_gemm", [0, 1, 2])
@pytest.mark.parametrize("batch", [3, 32, 130])
def test_every_batch_path_runs_on_several_threads_inside_inference_mode(batch, own_gemm):
    """``torch.inference_mode()`` is thread-local, and ``at::parallel_for``'s worker threads do not
    inherit it: the BLAS path's ``mm_out``/``addmm_`` into the op's output (an inference tensor)
    raised "Inplace update to inference tensor outside InferenceMode" on a worker. 2 threads, several
    row blocks each, several column blocks (5000 columns), every kernel path and GEMM choice."""
    native()
    gen = torch.Generator().manual_seed(batch)
    out, inn = 300, 5000
    codes, sign = qins_codes(gen, out, inn, False, 0.05)
    lo = torch.rand(out, generator=gen) * -8 - 4
    case = LinearCase(torch.randn(batch, inn, generator=gen), codes, sign, lo, lo + 6, torch.randn(out, generator=gen))
    y_ref = reference.linear(*case.args())
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with tuning(own_gemm=own_gemm):
            for isa, gather in native_paths():
                with on_path(isa, gather), torch.inference_mode():
                    y = torch.ops.qins.linear(*case.args())
                check_close(case, y, y_ref)
    finally:
        torch.set_num_threads(old)


def test_empty_and_bad_inputs():
    native()
    codes = torch.zeros(4, 5, dtype=torch.uint8)
    lo, hi = torch.tensor(-1.0), torch.tensor(0.0)
    assert torch.ops.qins.linear(torch.randn(0, 5), codes, None, lo, hi, None).shape == (0, 4)
    empty = torch.zeros(4, 0, dtype=torch.uint8)  # in_features == 0: y = bias
    bias = torch.randn(4)
    assert torch.equal(torch.ops.qins.linear(torch.randn(2, 3, 0), empty, None, lo, hi, bias), bias.expand(2, 3, 4))
    with pytest.raises(RuntimeError):
        torch.ops.qins.linear(torch.randn(2, 6), codes, None, lo, hi, None)
    with pytest.raises(RuntimeError):
        torch.ops.qins.linear(torch.randn(2, 5), codes, None, torch.zeros(3), torch.zeros(3), None)


# ---------------------------------------------------------------------------------------------
# Integration: torch.compile, autograd, memory, build and fallback
# ---------------------------------------------------------------------------------------------


def _fused_case(requires_grad: bool = False):
    gen = torch.Generator().manual_seed(4)
    codes, _ = qins_codes(gen, 6, 20, True, 0.1)
    lo = torch.rand(6, generator=gen) * -6 - 2
    x, b = torch.randn(3, 20, generator=gen), torch.randn(6, generator=gen)
    return x.requires_grad_(requires_grad), codes, None, lo, lo + 5, b


@pytest.fixture
def op_calls(monkeypatch):
    """Every call that goes through the op (qins.kernels.linear) while the test runs."""
    calls = []
    op = qk.linear

    def spy(*args):
        calls.append(args)
        return op(*args)

    monkeypatch.setattr(qk, "linear", spy)
    return calls


def test_fused_linear_runs_the_ops_body_directly_for_eager_no_grad_cpu_calls(op_calls):
    args = _fused_case()
    y = qk.fused_linear(*args)
    assert op_calls == []
    assert torch.equal(y, torch.ops.qins.linear(*args))
    with torch.no_grad():  # a leaf that requires grad needs none here
        xg = args[0].clone().requires_grad_()
        assert torch.equal(qk.fused_linear(xg, *args[1:]), y) and op_calls == []


class _Subclass(torch.Tensor):
    pass


class _PassThroughFunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _PassThroughDispatchMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "when",
    ["x_requires_grad", "bias_requires_grad", "x_subclass", "codes_subclass", "function_mode", "dispatch_mode",
     "fake_tensors", "meta_device", "jit_trace"],
)
def test_fused_linear_calls_the_op_whenever_the_op_itself_is_needed(op_calls, when):
    """Autograd must record the op; modes, subclasses, other devices and tracers must see it."""
    x, codes, sign, lo, hi, b = _fused_case(requires_grad=when == "x_requires_grad")
    if when == "bias_requires_grad":
        b.requires_grad_()
    if when in ("x_requires_grad", "bias_requires_grad"):
        y = qk.fused_linear(x, codes, sign, lo, hi, b)
        assert y.requires_grad and y.grad_fn is not None
    elif when == "x_subclass":  # a subclass's __torch_function__ must see the op
        assert type(qk.fused_linear(x.as_subclass(_Subclass), codes, sign, lo, hi, b)) is _Subclass
    elif when == "codes_subclass":
        assert type(qk.fused_linear(x, codes.as_subclass(_Subclass), sign, lo, hi, b)) is _Subclass
    elif when == "function_mode":
        with _PassThroughFunctionMode():
            qk.fused_linear(x, codes, sign, lo, hi, b)
    elif when == "dispatch_mode":
        with _PassThroughDispatchMode():
            qk.fused_linear(x, codes, sign, lo, hi, b)
    elif when == "fake_tensors":
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode()
        fx, fcodes = mode.from_tensor(x), mode.from_tensor(codes)
        with mode:
            assert qk.fused_linear(fx, fcodes, sign, mode.from_tensor(lo), mode.from_tensor(hi), None).shape == (3, 6)
    elif when == "meta_device":
        m = [t.to("meta") for t in (x, codes, lo, hi, b)]
        assert qk.fused_linear(m[0], m[1], None, m[2], m[3], m[4]).shape == (3, 6)
    else:
        traced = torch.jit.trace(lambda x_: qk.fused_linear(x_, codes, sign, lo, hi, b), (x,), check_trace=False)
        assert "qins::linear" in str(traced.graph)
    assert len(op_calls) == 1


def test_cpu_dispatch_asks_about_triton_only_under_qins_kernel_triton(monkeypatch):
    """The CPU path reads the environment once; ``QINS_KERNEL=triton`` without the interpreter
    asks, is told no, and keeps the native kernels."""
    mod = native()
    asked = []
    real = qk._use_triton
    monkeypatch.setattr(qk, "_use_triton", lambda device, rows: asked.append(rows) or real(device, rows))
    args = _fused_case()
    y = mod.linear(*args, 0, 0)  # log spacing, the automatic ISA
    for kind in (None, "auto", "native"):
        with env(QINS_KERNEL=kind, QINS_CPU_ISA=None):
            assert torch.equal(qk._dispatch(*args), y)
    with env(QINS_KERNEL="reference"):
        assert torch.equal(qk._dispatch(*args), reference.linear(*args))
    assert asked == []
    with env(QINS_KERNEL="triton", TRITON_INTERPRET=None, QINS_CPU_ISA=None):
        assert torch.equal(qk._dispatch(*args), y)
    assert asked == [3]


def test_compile_fullgraph_one_frame():
    from torch._dynamo.testing import CompileCounter

    gen = torch.Generator().manual_seed(2)
    codes, _ = qins_codes(gen, 24, 40, True, 0.1)
    x, b = torch.randn(3, 40, generator=gen), torch.randn(24, generator=gen)

    def f(x, lo, hi):
        return torch.ops.qins.linear(x, codes, None, lo, hi, b).relu() * 2

    counter = CompileCounter()
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    for i in range(4):
        lo, hi = torch.full((24,), -3.0 - i), torch.full((24,), 0.5 * i)
        assert torch.allclose(compiled(x, lo, hi), f(x, lo, hi), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_autograd_through_reference_formula():
    gen = torch.Generator().manual_seed(3)
    codes, sign = qins_codes(gen, 6, 9, False, 0.1)
    lo, hi = torch.tensor(-3.0), torch.tensor(0.0)
    x = torch.randn(4, 9, generator=gen, requires_grad=True)
    b = torch.randn(6, generator=gen, requires_grad=True)
    torch.ops.qins.linear(x, codes, sign, lo, hi, b).square().sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    reference.linear(x2, codes, sign, lo, hi, b2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(b.grad, b2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("needs", ["x-and-bias", "bias-only", "x-no-bias"])
def test_autograd_on_3d_input_gives_the_float32_formula_for_each_needed_gradient(needs, dtype):
    from qins.formats import decode_codes

    gen = torch.Generator().manual_seed(8)
    codes, sign = qins_codes(gen, 6, 9, False, 0.1)
    lo, hi = torch.tensor(-3.0), torch.tensor(0.0)
    x = torch.randn(2, 5, 9, generator=gen).to(dtype).requires_grad_(needs != "bias-only")
    b = None if needs == "x-no-bias" else torch.randn(6, generator=gen).to(dtype).requires_grad_()
    y = torch.ops.qins.linear(x, codes, sign, lo, hi, b)
    g = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(g)
    w = decode_codes(codes, sign, lo, hi, spacing="log")
    if needs == "bias-only":
        assert x.grad is None
    else:  # float32 math, rounded once to x's dtype
        assert x.grad.dtype == dtype and torch.allclose(x.grad, (g.float() @ w).to(dtype), rtol=1e-6, atol=1e-6)
    if b is not None:
        expected = g.float().reshape(-1, 6).sum(0).to(dtype)
        assert b.grad.shape == (6,) and b.grad.dtype == dtype
        assert torch.allclose(b.grad, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 64])
def test_no_weight_sized_temporary(batch):
    mod = native()
    gen = torch.Generator().manual_seed(4)
    out, inn = 1024, 1024
    codes, _ = qins_codes(gen, out, inn, True, 0.0)
    lo, hi = torch.full((out,), -6.0), torch.full((out,), 0.0)
    x = torch.randn(batch, inn, generator=gen)
    weight_bytes = out * inn * 4

    def largest_allocation(fn) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max([e.cpu_memory_usage for e in prof.events()] + [0])

    native_peak = largest_allocation(lambda: torch.ops.qins.linear(x, codes, None, lo, hi, None))
    with env(QINS_KERNEL="reference"):  # the check can see a weight-sized buffer
        assert largest_allocation(lambda: torch.ops.qins.linear(x, codes, None, lo, hi, None)) >= weight_bytes
    assert native_peak < weight_bytes // 4
    # The C++ per-thread scratch (outside torch's allocator) is bounded by the block size, not the layer.
    rows, cols = mod.get_tuning()[1:3]
    assert mod.scratch_bytes_max() <= rows * cols * 4 <= 2 << 20


_SCRATCH_SCRIPT = """
import sys, torch, qins.kernels as qk
mod = qk.native_module()
knobs = list(mod.get_tuning()); knobs[int(sys.argv[2])] = 2; mod.set_tuning(*knobs)  # own_gemm: own GEMM at every batch
gen = torch.Generator().manual_seed(0)
codes = torch.randint(0, 256, (40, 300), dtype=torch.uint8, generator=gen)
sign = None if sys.argv[1] == "packed" else torch.randint(0, 2, (40, 300), dtype=torch.int8, generator=gen) * 2 - 1
for batch in (9, 32, 96, 97):  # scratch_bytes_max only grows: the batches that need no scratch first
    torch.ops.qins.linear(torch.randn(batch, 300, generator=gen), codes, sign, torch.full((40,), -6.0),
                          torch.zeros(40), None)
    print(mod.scratch_bytes_max())
"""


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
def test_avx2_own_gemm_computes_batches_9_to_96_from_the_codes_and_decodes_blocks_above(packed):
    """AVX2's own GEMM (own_gemm=2) computes batches 9 to 96 (kCodeGemmMaxBatch) straight from the codes:
    the decoded-block scratch stays unused; batch 97 multiplies decoded blocks (the check can see). In
    a fresh process: scratch_bytes_max is the largest scratch of the process so far."""
    native()
    if "avx2" not in native_isas():
        pytest.skip("this CPU has no AVX2 path")
    run_env = {k: v for k, v in os.environ.items() if k != "QINS_KERNEL"}
    run_env["QINS_CPU_ISA"] = "avx2"
    done = subprocess.run([sys.executable, "-c", _SCRATCH_SCRIPT, "packed" if packed else "split",
                           str(TUNING_FIELDS.index("own_gemm"))], env=run_env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    used = [int(v) for v in done.stdout.split()[-4:]]
    assert used[:3] == [0, 0, 0] and used[3] > 0, used


def test_native_built_under_ci():
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("only enforced under CI=true")
    assert qk.native_module() is not None, "the native CPU kernels did not build in CI"
    assert qk.backend_name("cpu").startswith("native") or os.environ.get("QINS_KERNEL") == "reference"


def test_backend_name():
    if qk.native_module() is None:
        assert qk.backend_name("cpu") == "reference"
        return
    assert qk.backend_name("cpu") == "native-" + {1: "scalar", 2: "avx2", 3: "avx512"}[qk.native_module().best_isa()]
    with env(QINS_CPU_ISA="scalar"):
        assert qk.backend_name("cpu") == "native-scalar"
    with env(QINS_KERNEL="reference"):
        assert qk.backend_name("cpu") == "reference"
    assert qk.backend_name("meta") == "reference"
    assert qk.backend_name() == qk.backend_name("cpu")  # the default device is the CPU


def test_cuda_without_triton_falls_back_to_reference_and_warns_once(monkeypatch, caplog):
    """CUDA runs Triton by default; if triton cannot be imported it runs the reference, with one
    warning, and ``QINS_KERNEL=triton`` without triton is an error."""
    import sys
    import warnings

    monkeypatch.delenv("QINS_KERNEL", raising=False)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    monkeypatch.delitem(sys.modules, "qins.kernels.triton_kernel", raising=False)
    monkeypatch.delattr(qk, "triton_kernel", raising=False)
    monkeypatch.setattr(qk, "_triton", None)
    monkeypatch.setattr(qk, "_triton_missing", False)
    with pytest.warns(RuntimeWarning, match="^qins: triton cannot be imported .*falls back to the") as caught:
        with caplog.at_level("DEBUG", logger="qins.kernels"):
            assert qk.backend_name("cuda") == "reference"
    assert len(caught) == 1
    [record] = [r for r in caplog.records if r.name == "qins.kernels"]
    assert record.levelname == "DEBUG" and record.getMessage() == "qins: triton import failed"
    assert isinstance(record.exc_info[1], RuntimeError) and isinstance(record.exc_info[1].__cause__, ImportError)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert qk.backend_name("cuda") == "reference"  # warned once, not again
        assert qk.backend_name("cpu") != "triton"  # CPU never asks for triton unless told
    monkeypatch.setenv("QINS_KERNEL", "reference")
    assert qk.backend_name("cuda") == "reference"
    monkeypatch.setenv("QINS_KERNEL", "triton")
    with pytest.raises(RuntimeError, match="^QINS_KERNEL=triton but triton cannot be imported$"):
        qk.backend_name("cuda")
    monkeypatch.setenv("QINS_KERNEL", "bogus")
    with pytest.raises(ValueError, match="triton"):
        qk.backend_name("cpu")


def test_build_failure_falls_back_and_warns_once(monkeypatch, caplog):
    why = "simulated compiler failure " + "x" * 400  # the warning quotes the first 300 characters

    def boom():
        raise RuntimeError(why)

    monkeypatch.setattr(qk._build, "load_native", boom)
    monkeypatch.setattr(qk, "_native", qk._UNSET)
    monkeypatch.delenv("QINS_KERNEL", raising=False)
    gen = torch.Generator().manual_seed(5)
    codes, sign = qins_codes(gen, 7, 11, False, 0.1)
    args = (torch.randn(2, 11, generator=gen), codes, sign, torch.tensor(-2.0), torch.tensor(1.0), None)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("DEBUG", logger="qins.kernels"):
        warnings.simplefilter("always")
        y1 = torch.ops.qins.linear(*args)
        y2 = torch.ops.qins.linear(*args)
    (warning,) = [w for w in caught if "failed to build" in str(w.message)]
    assert warning.category is RuntimeWarning
    assert str(warning.message) == (f"qins: the native CPU kernels failed to build (RuntimeError: {why[:300]}); "
                                    "qins::linear falls back to the (slow) reference implementation")
    (record,) = [r for r in caplog.records if r.name == "qins.kernels" and r.getMessage() == "qins native build failed"]
    assert record.levelname == "DEBUG" and record.exc_info is not None and record.exc_info[1].args == (why,)
    assert torch.equal(y1, reference.linear(*args)) and torch.equal(y2, y1)
    assert qk.backend_name("cpu") == "reference"
    monkeypatch.setenv("QINS_KERNEL", "native")
    with pytest.raises(RuntimeError, match="^QINS_KERNEL=native but the native CPU kernels are unavailable$"):
        torch.ops.qins.linear(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_reference_returns_the_input_dtype(dtype):
    gen = torch.Generator().manual_seed(12)
    codes, sign = qins_codes(gen, 6, 9, False, 0.1)
    x = torch.randn(2, 9, generator=gen).to(dtype)
    y = reference.linear(x, codes, sign, torch.tensor(-3.0), torch.tensor(0.5), torch.randn(6, generator=gen).to(dtype))
    assert y.dtype == dtype and y.shape == (2, 6)


def test_an_unknown_qins_cpu_isa_is_refused_naming_the_choices(monkeypatch):
    monkeypatch.setenv("QINS_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match=r"^QINS_CPU_ISA must be one of \['avx2', 'avx512', 'scalar'\], got 'sse9'$"):
        qk.cpu_isa()


def test_build_failure_under_qins_kernel_native_raises_from_the_build_error(monkeypatch):
    def boom():
        raise OSError("no compiler")

    monkeypatch.setattr(qk._build, "load_native", boom)
    monkeypatch.setattr(qk, "_native", qk._UNSET)
    monkeypatch.setenv("QINS_KERNEL", "native")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: it is an error
        with pytest.raises(RuntimeError,
                           match="^QINS_KERNEL=native but the native CPU kernels failed to build$") as info:
            qk.native_module()
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.args == ("no compiler",)


def test_fake_kernel_gives_the_output_shape_in_the_input_dtype_and_checks_in_features():
    """``register_fake`` serves meta tensors too: the shape logic that torch.compile traces with."""
    codes = torch.zeros(7, 11, dtype=torch.uint8, device="meta")
    lo, hi = torch.tensor(-1.0, device="meta"), torch.tensor(0.0, device="meta")
    for shape in [(11,), (5, 11), (2, 3, 11), (2, 1, 4, 11)]:
        for dtype in (torch.float32, torch.bfloat16):
            y = torch.ops.qins.linear(torch.empty(shape, dtype=dtype, device="meta"), codes, None, lo, hi, None)
            assert y.shape == (*shape[:-1], 7) and y.dtype == dtype and y.is_meta
    with pytest.raises(RuntimeError):
        torch.ops.qins.linear(torch.empty(2, 3, 12, device="meta"), codes, None, lo, hi, None)
    with pytest.raises(RuntimeError):
        torch.ops.qins.linear(torch.empty(11, 11, device="meta"), codes[:, :10], None, lo, hi, None)
