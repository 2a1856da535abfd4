"""Seeded tiny transformers models for examples, tests and benchmarks.

Nothing is downloaded: each model is built from a transformers config with random weights drawn
after ``torch.manual_seed(seed)``, so the same arguments give the same model bit for bit.
Needs transformers (imported when a factory is called, not when this module is imported).

    from qins.testing.models import tiny_phi3
    model = tiny_phi3()                      # Phi3ForCausalLM: hidden 64, 2 layers, vocab 1000
    big = tiny_phi3(seed=1, hidden_size=256, num_hidden_layers=4, vocab_size=32000)
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["tiny_phi3_config", "tiny_phi3"]


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
