"""The Triton backend of ``qins::linear`` (``qins/kernels/triton_kernel.py``) in the Triton interpreter.

Runs on CPU tensors with ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` when torch sees no
GPU; with a GPU this module is skipped and ``tests/test_triton_cuda.py`` runs). Skipped when triton is not
installed (the main ``pytest tests`` run), **failed** instead when ``QINS_REQUIRE_TRITON=1`` (set
by ``nox -s triton``, which installs it).

The bound is the one of ``tests/test_kernels.py`` with no extra slack: the Triton table is
bit-identical to ``level_table`` (``test_table_bit_identical``), so both paths multiply the same
float32 weights by the same float32 x and sum ``n = in + 1`` terms (products and bias) in float32,
every product and partial sum rounded at most once (the interpreter's ``tl.dot`` is a float32
``np.matmul`` per ``bk`` chunk added to the accumulator; the gemv kernel adds products into a
``[bn, bk]`` accumulator and sums it at the end). Hence each is within ``γ_n·S`` of the exact value
and they differ by at most ``2·γ_n·S``, plus one output ulp for bf16/fp16.

Not covered here: a GPU (``tests/test_triton_cuda.py``). There, if mul+add were contracted into FMA
despite ``enable_fp_fusion=False``, table entries could differ by a few ulps; entries within ``k``
ulps (relative ``2k·u``) would add ``2k·u·S`` to the bound.
"""
from __future__ import annotations

import os

import pytest

if os.environ.get("QINS_REQUIRE_TRITON") == "1":
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # the dedicated session must not pass by skipping
        pytest.fail(f"QINS_REQUIRE_TRITON=1 but triton cannot be imported: {exc}", pytrace=False)
else:
    pytest.importorskip("triton")

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import qins.kernels as qk  # noqa: E402
from qins.formats import level_table  # noqa: E402
from qins.kernels import reference  # noqa: E402
from qins.kernels import triton_kernel as tk  # noqa: E402
from tests.mutmut_depth import child_environ  # noqa: E402
from tests.strategies import LinearCase, default_dtype, qins_codes, qins_log_pairs, triton_cases  # noqa: E402
from tests.test_kernels import check_close, env  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the Triton interpreter on CPU tensors (TRITON_INTERPRET=1)", allow_module_level=True)


@settings(max_examples=40)
@given(st.data(), st.booleans(), st.sampled_from([None, 1, 7, 33]))
def test_table_bit_identical(data, packed, rows):
    lo, hi = data.draw(qins_log_pairs(rows=rows))
    ref = level_table(lo, hi, packed, spacing="log").view(torch.int32)
    got = tk.table(lo, hi, packed).view(torch.int32)
    assert torch.equal(got, ref), f"{(got != ref).sum().item()} table entries differ"


@settings(max_examples=60)
@given(triton_cases())
def test_linear_matches_reference(case):
    y_ref = reference.linear(*case.args())
    y = tk.linear(*case.args())
    check_close(case, y, y_ref)
    with env(QINS_KERNEL="triton"):
        assert torch.equal(torch.ops.qins.linear(*case.args()), y)  # the op dispatches to the same kernel


def test_all_zero_codes_give_bias_and_signed_zeros():
    codes = torch.tensor([[0, 128, 0], [128, 128, 0]], dtype=torch.uint8)  # packed: 0 and -0
    x = torch.randn(3, 3)
    lo, hi = torch.tensor(-3.0), torch.tensor(1.0)
    assert torch.equal(tk.linear(x, codes, None, lo, hi, None), torch.zeros(3, 2))
    b = torch.randn(2)
    assert torch.equal(tk.linear(x, codes, None, lo, hi, b), b.expand(3, 2))


def test_empty_and_bad_inputs():
    codes = torch.zeros(4, 5, dtype=torch.uint8)
    lo, hi = torch.tensor(-1.0), torch.tensor(0.0)
    assert tk.linear(torch.randn(0, 5), codes, None, lo, hi, None).shape == (0, 4)
    empty = torch.zeros(4, 0, dtype=torch.uint8)
    bias = torch.randn(4)
    assert torch.equal(tk.linear(torch.randn(2, 3, 0), empty, None, lo, hi, bias), bias.expand(2, 3, 4))
    with pytest.raises(RuntimeError):
        tk.linear(torch.randn(2, 6), codes, None, lo, hi, None)
    with pytest.raises(RuntimeError):
        tk.linear(torch.randn(2, 5), codes, None, torch.zeros(3), torch.zeros(3), None)
    for bad in (torch.randn(3), torch.randn(4, 1)):  # the kernel would read 4 values
        with pytest.raises(RuntimeError, match=r"bias must be \[4\]"):
            tk.linear(torch.randn(2, 5), codes, None, lo, hi, bad)


def test_cuda_defaults_to_triton_and_cpu_only_when_interpreted():
    with env(QINS_KERNEL=None):
        # the CUDA default where triton imports: Triton for small batches, the reference above
        assert qk.backend_name("cuda") == f"triton (batch <= {qk.CUDA_TRITON_MAX_ROWS}, else reference)"
        assert qk.CUDA_TRITON_MAX_ROWS == 8
        assert [qk._use_triton(torch.device("cuda"), rows) for rows in (0, 1, 8, 9, 512)] == [True] * 3 + [False] * 2
        assert not qk._use_triton(torch.device("cpu"), 1)
        rows = []
        real = qk._use_triton
        spy = (lambda device, n: rows.append(n) or real(device, n))  # noqa: E731
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(qk, "_use_triton", spy)
            # meta tensors: the CPU path decides without asking _use_triton (one env read)
            codes, sign, lo, hi = (t if t is None else t.to("meta") for t in _args(out=3, inn=1))
            for shape in [(1,), (4, 1), (2, 3, 1), (0, 1)]:
                assert qk._dispatch(
                    torch.randn(shape, device="meta"), codes, sign, lo[:3], hi[:3], None
                ).shape == (*shape[:-1], 3)
        assert rows == [1, 4, 6, 0] and all(type(n) is int for n in rows)  # rows of x, as an int
        assert qk.backend_name("cpu") != "triton"  # CPU keeps native/reference unless asked
    with env(QINS_KERNEL="reference"):
        assert qk.backend_name("cuda") == "reference"
    with env(QINS_KERNEL="triton"):
        assert qk.backend_name("cuda") == "triton"
        assert qk._use_triton(torch.device("cuda"), 10**6)  # every batch when asked for
        assert qk.backend_name("cpu") == "triton"  # interpreted
        with env(TRITON_INTERPRET="0"):
            assert qk.backend_name("cpu") != "triton"  # CPU keeps native/reference outside the interpreter


@settings(max_examples=12)
@given(triton_cases(max_in=600, max_out=40, max_batch=20))
@pytest.mark.parametrize("config", tk.CANDIDATES, ids=lambda c: c.name)
def test_every_candidate_config_matches_reference(config, case):
    check_close(case, tk.linear(*case.args(), config=config), reference.linear(*case.args()))


def test_default_config_is_gemv_up_to_its_batch_limit_then_tile():
    names = {m: tk.default_config(m).name for m in (0, 1, 2, tk.GEMV_MAX_M, tk.GEMV_MAX_M + 1, 63, 64, 4096)}
    assert names == {0: "gemv-n1-k1024-w4", 1: "gemv-n1-k1024-w4", 2: "gemv-n2-k512-w4", 8: "gemv-n2-k512-w4",
                     9: "tile-n32-k32-m16-w4", 63: "tile-n32-k32-m16-w4", 64: "tile-n64-k32-m64-w4",
                     4096: "tile-n64-k32-m64-w4"}
    assert {tk.default_config(m) for m in names} <= set(tk.CANDIDATES)  # every default was run on the GPU


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="dot", bn=8, bk=8), r"^Config.kind must be 'gemv' or 'tile', got 'dot'$"),
        (dict(kind="gemv", bn=8, bk=8, bm=2), r"^a gemv Config has bm=1$"),
        (dict(kind="gemv", bn=6, bk=8),
         r"^Config block sizes and num_warps must be powers of two, got "
         r"Config\(kind='gemv', bn=6, bk=8, bm=1, num_warps=4\)$"),
        (dict(kind="gemv", bn=8, bk=8, num_warps=3),
         r"^Config block sizes and num_warps must be powers of two, got .*num_warps=3\)$"),
        (dict(kind="gemv", bn=8, bk=0), r"^Config block sizes and num_warps must be powers of two, got .*bk=0.*$"),
        (dict(kind="tile", bn=32, bk=8, bm=16),
         r"^tl.dot needs tile blocks of at least 16, got Config\(kind='tile', bn=32, bk=8, bm=16, num_warps=4\)$"),
        (dict(kind="tile", bn=32, bk=16, bm=8), r"^tl.dot needs tile blocks of at least 16, got .*bm=8.*$"),
        (dict(kind="tile", bn=8, bk=16, bm=16), r"^tl.dot needs tile blocks of at least 16, got .*bn=8.*$"),
    ],
    ids=["kind", "gemv-bm", "bn-not-pow2", "warps-not-pow2", "bk-zero", "tile-bk", "tile-bm", "tile-bn"],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tk.Config(**kwargs)


def test_config_names_say_every_block_size():
    assert tk.Config("gemv", bn=8, bk=256).name == "gemv-n8-k256-w4"
    assert tk.Config("tile", bn=64, bk=32, bm=16, num_warps=8).name == "tile-n64-k32-m16-w8"


def test_plan_launches_the_configs_kernel_on_its_grid():
    gemv, tile = tk.Config("gemv", bn=4, bk=256), tk.Config("tile", bn=32, bk=32, bm=16)
    assert tk.plan(gemv, 5, 70) == (tk._gemv_kernel, (18, 5), dict(BN=4, BK=256))
    assert tk.plan(gemv, 65535, 1) == (tk._gemv_kernel, (1, 65535), dict(BN=4, BK=256))  # axis 1 is full
    assert tk.plan(tile, 5, 70) == (tk._linear_kernel, (1, 3), dict(BM=16, BN=32, BK=32))
    assert tk.plan(tile, 65536, 70) == (tk._linear_kernel, (4096, 3), dict(BM=16, BN=32, BK=32))  # no row limit
    with pytest.raises(RuntimeError, match="^a gemv launch takes at most 65535 rows of x, got 65536$"):
        tk.plan(gemv, 65536, 70)


def test_gemv_refuses_more_rows_than_a_grid_axis_holds():
    codes, sign, lo, hi = _args(out=3, inn=2)
    x = torch.empty(65536, 2).expand(65536, 2)
    with pytest.raises(RuntimeError, match="^a gemv launch takes at most 65535 rows of x, got 65536$"):
        tk.linear(x, codes, sign, lo[:3], hi[:3], None, config=tk.CANDIDATES[0])


def test_autograd_through_triton_forward():
    gen = torch.Generator().manual_seed(3)
    codes, sign = qins_codes(gen, 6, 9, False, 0.1)
    lo, hi = torch.tensor(-3.0), torch.tensor(0.0)
    x = torch.randn(4, 9, generator=gen, requires_grad=True)
    b = torch.randn(6, generator=gen, requires_grad=True)
    with env(QINS_KERNEL="triton"):
        torch.ops.qins.linear(x, codes, sign, lo, hi, b).square().sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    reference.linear(x2, codes, sign, lo, hi, b2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(b.grad, b2.grad, rtol=1e-5, atol=1e-5)


# ---- found by mutation testing: input checks, empty shapes, dtypes, the debug log ----


def _args(out: int = 7, inn: int = 11, packed: bool = False, per_row: bool = True, seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    codes, sign = qins_codes(gen, out, inn, packed, 0.1)
    lo, hi = (torch.full((out,), -3.0), torch.full((out,), 0.5)) if per_row else (torch.tensor(-3.0), torch.tensor(0.5))
    return codes, sign, lo, hi


def test_bad_inputs_are_refused_with_the_reason():
    codes, sign, lo, hi = _args()
    x = torch.randn(2, 11)
    bad = [
        ((x, codes.float(), sign, lo, hi, None), r"^codes must be uint8 \[out, in\]$"),
        ((x, codes.flatten(), sign, lo, hi, None), r"^codes must be uint8 \[out, in\]$"),
        ((torch.randn(2, 3, 12), codes, sign, lo, hi, None), r"^x has 12 features, codes 11$"),
        ((x, codes, sign.to(torch.int16), lo, hi, None), "^sign must be int8 like codes$"),
        ((x, codes, sign[:, :10], lo, hi, None), "^sign must be int8 like codes$"),
        ((x, codes, sign, lo, hi[:3], None), "^log_min and log_max must have the same shape$"),
        ((x, codes, sign, lo[:3], hi[:3], None), r"^logs must be 0-d or \[out\]$"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            tk.linear(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_empty_shapes_give_the_bias_or_nothing_in_the_input_dtype(dtype):
    codes, sign, lo, hi = _args()
    bias = torch.randn(7).to(dtype)
    for x, c, s, lo_, hi_, b, shape in [
        (torch.randn(0, 11), codes, sign, lo, hi, bias, (0, 7)),
        (torch.randn(3, 0, 11), codes, sign, lo, hi, None, (3, 0, 7)),
        (torch.randn(2, 0), codes[:, :0], sign[:, :0], lo, hi, bias, (2, 7)),  # in_features 0: y = bias
        (torch.randn(2, 11), codes[:0], sign[:0], lo[:0], hi[:0], None, (2, 0)),
    ]:
        y = tk.linear(x.to(dtype), c, s, lo_, hi_, b)
        assert y.shape == shape and y.dtype == dtype
        if b is not None and y.numel():
            assert torch.equal(y, b.expand(shape))


def test_a_half_precision_bias_is_added_in_float32():
    codes, sign, lo, hi = _args(packed=True, per_row=False)
    case = LinearCase(torch.randn(3, 11).to(torch.bfloat16), codes, None, lo, hi, torch.randn(7).to(torch.bfloat16))
    check_close(case, tk.linear(*case.args()), reference.linear(*case.args()))


def test_each_launch_is_logged_at_debug_level(caplog):
    codes, sign, lo, hi = _args(out=5, inn=9, packed=True, per_row=True)
    with caplog.at_level("DEBUG", logger="qins.kernels"):
        tk.linear(torch.randn(2, 3, 9), codes, None, lo, hi, None)
    assert "qins triton linear: x (6, 9) codes (5, 9) per_row=True packed=True" in [
        r.getMessage() for r in caplog.records
    ]


def test_table_computes_from_float32_logs_in_a_float32_table_whatever_it_is_given():
    lo, hi = torch.tensor([-3.25, -1.5]), torch.tensor([0.5, 2.0])
    want = tk.table(lo, hi, True)
    assert torch.equal(tk.table(lo.double(), hi.double(), True), want)
    half = lo.to(torch.bfloat16), hi.to(torch.bfloat16)
    assert torch.equal(tk.table(*half, True), tk.table(half[0].float(), half[1].float(), True))
    with pytest.raises(RuntimeError, match="^log_min and log_max must have the same shape$"):
        tk.table(torch.zeros(3), torch.zeros(4), True)
    with default_dtype(torch.float64):
        under_float64 = tk.table(lo, hi, False)
    assert under_float64.dtype == torch.float32 and torch.equal(under_float64, tk.table(lo, hi, False))


# ---- the table kernel's GPU code, read without a GPU: only IEEE round-to-nearest float32 ops ----

_PTX_SCRIPT = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qins.kernels import triton_kernel as tk

def ops(packed, fusion):
    sig = {"lo_ptr": "*fp32", "hi_ptr": "*fp32", "out_ptr": "*fp32", "PACKED": "constexpr"}
    src = ASTSource(fn=tk._table_kernel, signature=sig, constexprs={"PACKED": packed})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": fusion}).asm["ptx"]
    return sorted(set(re.findall(r"^\s*([a-z][a-z0-9]*\.[a-z0-9.]*f32[a-z0-9.]*)", ptx, re.M)))

print(json.dumps({"packed": ops(True, False), "split": ops(False, False), "fused": ops(False, True)}))
"""

#: float32 PTX instructions that round exactly like one IEEE float32 operation of the CPU reference
#: (or are exact: negation, conversions of small integers, truncation of an integral float)
_IEEE_OPS = {"add.rn.f32", "sub.rn.f32", "mul.rn.f32", "div.rn.f32", "neg.f32", "cvt.rn.f32.s32", "cvt.rn.f32.u32",
             "cvt.rzi.s32.f32"}


def test_table_kernel_compiles_for_a_gpu_to_ieee_round_to_nearest_float32_ops_only():
    """Compiles ``_table_kernel`` for sm_90 (Triton ships ptxas; no GPU needed) and reads its PTX.

    Each float32 instruction must round like the CPU reference's operation (``.rn``, no ``.ftz``),
    with no FMA contraction and no approximate division: then the GPU table is bit-identical to
    ``level_table`` by IEEE semantics. An H200 found the approximate ``/`` (``div.full``/``approx``);
    the ``fused`` compile shows the check sees contraction when it is allowed."""
    import json
    import subprocess
    import sys

    env = child_environ({k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # compile, do not interpret
    run = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    for kind in ("packed", "split"):
        assert set(found[kind]) <= _IEEE_OPS, f"{kind}: {sorted(set(found[kind]) - _IEEE_OPS)}"
        assert "div.rn.f32" in found[kind] and "mul.rn.f32" in found[kind]
    assert "fma.rn.f32" in found["fused"]  # enable_fp_fusion=True would contract: the check can fail


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 9), out=st.integers(1, 70), inn=st.integers(1, 100),
       packed=st.booleans(), tables=st.sampled_from([1, 4, 16]), bias=st.booleans())
def test_shared_tables_match_the_reference(seed, batch, out, inn, packed, tables, bias):
    from tests.strategies import shared_case
    from tests.test_shared_tables import check_close_shared

    case = shared_case(seed, batch, out, inn, packed, tables, bias)
    y = tk.linear(*case.args())
    check_close_shared(case, y, reference.linear(*case.args()))
    with env(QINS_KERNEL="triton"):
        assert torch.equal(torch.ops.qins.linear(*case.args()), y)
