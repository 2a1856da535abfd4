"""The Triton backend of ``qins::linear`` compiled and run on a CUDA GPU.

Skipped without a GPU (CI has none), **failed** instead when ``QINS_REQUIRE_CUDA=1`` (set by
``perf/gpu_check.sh``, the script run on a lent GPU machine). The oracle is the CPU: tables must
be bit-identical to :func:`qins.formats.level_table` computed on the CPU (this is where an FMA
contraction in the table kernel would show), and every output within the accumulation-order
bound of ``tests/test_kernels.py`` (``2·γ_n·S``) of :func:`qins.kernels.reference.linear` on the
CPU, for every candidate launch configuration, odd shapes, 1-3-d strided x, fp32/bf16/fp16.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    if os.environ.get("QINS_REQUIRE_CUDA") == "1":
        pytest.fail("QINS_REQUIRE_CUDA=1 but torch sees no CUDA device", pytrace=False)
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.fail("TRITON_INTERPRET=1 with a GPU: these tests must compile the kernels", pytrace=False)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import qins.kernels as qk  # noqa: E402
from qins import ProjectiveLinear, QinsConfig  # noqa: E402
from qins.formats import level_table  # noqa: E402
from qins.kernels import reference  # noqa: E402
from qins.kernels import triton_kernel as tk  # noqa: E402
from tests.strategies import LinearCase, qins_codes, qins_linear_cases, qins_log_pairs, triton_cases  # noqa: E402
from tests.test_kernels import check_close  # noqa: E402

CUDA = torch.device("cuda")


def on_gpu(case: LinearCase, config=None) -> torch.Tensor:
    """The Triton kernel on the GPU, its result brought back to the CPU."""
    return tk.linear(*case.to(CUDA).args(), config=config).cpu()


@settings(max_examples=100)
@given(st.data(), st.booleans(), st.sampled_from([None, 1, 7, 33, 4096]))
def test_table_bit_identical_to_the_cpu_level_table(data, packed, rows, spacing="log"):
    lo, hi = data.draw(qins_log_pairs(rows=rows))
    ref = level_table(lo, hi, packed, spacing="log").view(torch.int32)
    got = tk.table(lo.to(CUDA), hi.to(CUDA), packed).cpu().view(torch.int32)
    bad = (got != ref).nonzero()[:5].tolist()
    assert torch.equal(got, ref), (
        f"{(got != ref).sum().item()} table entries differ, e.g. (row, entry, got, want, lo, hi): "
        + "; ".join(f"{r} {e} {got[r, e].item()} {ref[r, e].item()} "
                    f"{lo.reshape(-1)[r].item() if lo.dim() else lo.item()!r} "
                    f"{hi.reshape(-1)[r].item() if hi.dim() else hi.item()!r}" for r, e in bad))


@settings(max_examples=25)
@given(triton_cases(max_in=700, max_out=300, max_batch=70))
@pytest.mark.parametrize("config", tk.CANDIDATES, ids=lambda c: c.name)
def test_every_candidate_config_matches_the_cpu_reference(config, case):
    check_close(case, on_gpu(case, config), reference.linear(*case.args()))


@settings(max_examples=80)
@given(qins_linear_cases())
def test_the_op_default_matches_the_cpu_reference(case):
    y = torch.ops.qins.linear(*case.to(CUDA).args())
    assert y.device.type == "cuda"
    check_close(case, y.cpu(), reference.linear(*case.args()))


@pytest.mark.parametrize("shape", [(3072, 3072), (8192, 3072), (3072, 8192)], ids=str)
@pytest.mark.parametrize("batch", [1, 5, 8, 9, 33, 512])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
def test_llm_sized_layers_match_the_cpu_reference(shape, batch, packed):
    gen = torch.Generator().manual_seed(batch)
    out, inn = shape
    codes, sign = qins_codes(gen, out, inn, packed, 0.05)
    lo = torch.rand(out, generator=gen) * -2 - 8
    case = LinearCase(torch.randn(batch, inn, generator=gen), codes, sign, lo, lo + 6, torch.randn(out, generator=gen))
    check_close(case, torch.ops.qins.linear(*case.to(CUDA).args()).cpu(), reference.linear(*case.args()))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
@pytest.mark.parametrize("per_row", [True, False], ids=["per_row", "per_tensor"])
@pytest.mark.parametrize("lead", [(2, 3), (4, 3)], ids=["6rows-triton", "12rows-reference"])
def test_memory_saving_layer_on_cuda_matches_the_cpu_reference(packed, per_row, lead):
    torch.manual_seed(0)
    lin = torch.nn.Linear(300, 77)
    layer = ProjectiveLinear.from_linear(lin, QinsConfig(packed=packed, per_row=per_row), cache_weight=False)
    x = torch.randn(*lead, 300)
    case = LinearCase(x, *(None if t is None else t.clone() for t in (layer.stored, layer.sign, layer.log_min,
                                                                       layer.log_max, layer.bias)))
    layer = layer.to(CUDA)
    assert "kernel=triton (batch <= 8, else reference)" in layer.extra_repr()
    assert qk._use_triton(CUDA, lead[0] * lead[1]) == (lead[0] * lead[1] <= qk.CUDA_TRITON_MAX_ROWS)
    check_close(case, layer(x.to(CUDA)).cpu(), reference.linear(*case.args()))


def test_cuda_graph_replay_equals_eager():
    gen = torch.Generator().manual_seed(7)
    codes, _ = qins_codes(gen, 1000, 700, True, 0.1)
    args = [t.to(CUDA) for t in (torch.randn(1, 700, generator=gen), codes)]
    lo, hi = torch.full((1000,), -9.0, device=CUDA), torch.full((1000,), -3.0, device=CUDA)
    eager = torch.ops.qins.linear(args[0], args[1], None, lo, hi, None)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.qins.linear(args[0], args[1], None, lo, hi, None)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.qins.linear(args[0], args[1], None, lo, hi, None)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


def test_compiled_layer_is_one_frame_and_matches_eager():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = ProjectiveLinear.from_linear(torch.nn.Linear(96, 40), cache_weight=False).to(CUDA)
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    x = torch.randn(3, 96, device=CUDA)
    assert torch.equal(compiled(x), layer(x))
    assert counter.frame_count == 1


def test_autograd_through_the_gpu_forward():
    gen = torch.Generator().manual_seed(3)
    codes, sign = qins_codes(gen, 60, 90, False, 0.1)
    lo, hi = torch.tensor(-3.0), torch.tensor(0.0)
    x = torch.randn(4, 90, generator=gen)
    b = torch.randn(60, generator=gen)
    xg, bg = x.to(CUDA).requires_grad_(), b.to(CUDA).requires_grad_()
    torch.ops.qins.linear(xg, codes.to(CUDA), sign.to(CUDA), lo.to(CUDA), hi.to(CUDA), bg).square().sum().backward()
    xc, bc = x.clone().requires_grad_(), b.clone().requires_grad_()
    reference.linear(xc, codes, sign, lo, hi, bc).square().sum().backward()
    assert torch.allclose(xg.grad.cpu(), xc.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(bg.grad.cpu(), bc.grad, rtol=1e-4, atol=1e-4)
