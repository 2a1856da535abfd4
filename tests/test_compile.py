"""torch.compile: no graph breaks, no recompiles, no stale outputs, compiled == eager."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from qins import ProjectiveLinear, QinsConfig
from tests.strategies import config_id

MODES = pytest.mark.parametrize("cache_weight", [True, False], ids=["cached", "memory_saving"])
# Per-row (the default) and per-tensor logs: both must compile without recompiles.
FORMATS = pytest.mark.parametrize("config", [QinsConfig(), QinsConfig.codec_compatible()], ids=config_id)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


def stack(
    cache_weight: bool, seed: int = 0, widths: tuple[int, ...] = (16, 32, 24, 8), config: QinsConfig | None = None
) -> nn.Sequential:
    """Several ProjectiveLinear layers; each source weight has its own scale, so its own log range."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.mul_(10.0 ** (i - 1))
        layers += [ProjectiveLinear.from_linear(lin, config, cache_weight=cache_weight), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@FORMATS
@MODES
def test_compiled_layer_compiles_one_frame_without_graph_breaks(cache_weight: bool, config: QinsConfig) -> None:
    layer = ProjectiveLinear.from_linear(nn.Linear(16, 8), config, cache_weight=cache_weight)
    cnt = CompileCounter()
    compiled = torch.compile(layer, backend=cnt, fullgraph=True)
    x = torch.randn(4, 16)
    for _ in range(10):
        out = compiled(x)
    assert cnt.frame_count == 1
    assert sum(counters["graph_break"].values()) == 0
    assert torch.equal(out, layer(x))


@FORMATS
@MODES
def test_memory_saving_graph_is_one_opaque_qins_linear_op_and_cached_graph_a_plain_linear(
    cache_weight: bool, config: QinsConfig
) -> None:
    """The memory-saving graph calls qins::linear once and decodes nothing itself; the cached one only multiplies."""
    layer = ProjectiveLinear.from_linear(nn.Linear(16, 8), config, cache_weight=cache_weight)
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):  # noqa: ANN001
        graphs.append(gm)
        return gm.forward

    torch.compile(layer, backend=backend, fullgraph=True)(torch.randn(2, 16))
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op in ("call_function", "call_method")]
    assert targets.count("qins.linear.default") == (0 if cache_weight else 1), targets
    assert not any("gather" in t or "exp" in t or "index" in t for t in targets), targets


@FORMATS
@MODES
def test_no_recompile_across_layers_with_different_log_ranges_or_new_state(
    cache_weight: bool, config: QinsConfig
) -> None:
    model = stack(cache_weight, config=config)
    ranges = {
        (tuple(m.log_min.reshape(-1).tolist()), tuple(m.log_max.reshape(-1).tolist()))
        for m in model
        if isinstance(m, ProjectiveLinear)
    }
    assert len(ranges) == 3
    cnt = CompileCounter()
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    x = torch.randn(5, 16)
    compiled(x)
    other = stack(cache_weight, seed=1, config=config)
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(5):
            compiled(x)
        model.load_state_dict(other.state_dict())  # new codes and new log ranges
        for _ in range(5):
            out = compiled(x)
    assert cnt.frame_count == 1
    assert torch.equal(out, other(x))


@MODES
def test_compiled_model_returns_new_outputs_after_load_state_dict(cache_weight: bool) -> None:
    model = stack(cache_weight)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 16)
    old = compiled(x)
    other = stack(cache_weight, seed=2)
    model.load_state_dict(other.state_dict())
    new = compiled(x)
    assert not torch.equal(new, old)
    assert torch.equal(new, other(x))


@pytest.mark.slow
@MODES
def test_inductor_output_equals_eager_within_float32_summation_bound(cache_weight: bool) -> None:
    """Inductor may reorder the length-n sums, so each side is within γ_n·Σ|x||ŵ| of exact:
    |compiled - eager| <= 2γ_n·(|x| @ |ŵ|ᵀ + |b|), γ_n = n·2^-24/(1 - n·2^-24) (decode is exact: same table)."""
    layer = ProjectiveLinear.from_linear(nn.Linear(64, 32), cache_weight=cache_weight)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(6, 64)
    eager, comp = layer(x), compiled(x)
    n = 65
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    s = x.abs() @ layer.weight.abs().T + layer.bias.abs()
    assert bool(((comp - eager).abs() <= 2 * gamma * s).all())


class _RecordCalls(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@MODES
def test_forward_never_calls_item_or_float_on_tensors(cache_weight: bool) -> None:
    """log_min/log_max reach the decode as 0-d tensors: no host sync, no Python-float specialisation."""
    layer = ProjectiveLinear.from_linear(nn.Linear(16, 8), cache_weight=cache_weight)
    x = torch.randn(2, 16)
    with _RecordCalls() as mode:
        layer(x)
    assert mode.names, "the mode saw no torch calls at all"
    assert not {"item", "__float__", "tolist", "__bool__"} & set(mode.names), mode.names
