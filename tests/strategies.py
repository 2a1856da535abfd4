"""The one home of Hypothesis strategies and tiny-model factories.

Everything here is deterministic given its arguments (seeded), and nothing is downloaded:
models are built from transformers configs with random weights.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from hypothesis import strategies as st

# ----------------------------------------------------------------------------------------------
# Hypothesis strategies
# ----------------------------------------------------------------------------------------------

FLOAT32_TINY = 1.401298464324817e-45  # smallest positive subnormal float32


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

#: Every (packed, log_range, per_row) combination, with readable ids for parametrize.
ALL_CONFIGS = [QinsConfig(p, r, row) for p in (True, False) for r in ("mse", "minmax") for row in (True, False)]


def config_id(config: QinsConfig) -> str:
    return f"{'packed' if config.packed else 'split'}-{config.log_range}-{'row' if config.per_row else 'tensor'}"


#: A representative subset for slower layer-level tests: the default, the seed, and one of each axis.
LAYER_CONFIGS = [QinsConfig(), QinsConfig.seed(), QinsConfig(False, "mse", True), QinsConfig(True, "minmax", False)]

configs = st.sampled_from(ALL_CONFIGS)


# ----------------------------------------------------------------------------------------------
# Tiny-model factories
# ----------------------------------------------------------------------------------------------


def tiny_phi3_config(
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    vocab_size: int = 1000,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = False,
    **overrides: Any,
):
    """A small `Phi3Config` (no download). intermediate_size defaults to 2*hidden_size."""
    from transformers import Phi3Config

    kwargs: dict[str, Any] = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    kwargs.update(overrides)
    return Phi3Config(**kwargs)


def tiny_phi3(*, seed: int = 0, **config_kwargs: Any):
    """A seeded, randomly initialised `Phi3ForCausalLM` in eval mode, built from `tiny_phi3_config`."""
    from transformers import Phi3ForCausalLM

    config = tiny_phi3_config(**config_kwargs)
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Legacy remote-code model (tests/legacy_model), loaded through trust_remote_code
# (owned by the qins.compat work; see tests/test_compat.py and tests/test_generation.py)
# ----------------------------------------------------------------------------------------------

import contextlib  # noqa: E402  (imports of this appended section)
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

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
    legacy cache API, call ``qins.compat.patch_transformers()`` first.
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
