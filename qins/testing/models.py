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

__all__ = ["tiny_llama", "tiny_llama_config", "tiny_phi3_config", "tiny_phi3", "write_llama_checkpoint"]


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


def tiny_llama_config(
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    vocab_size: int = 1000,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = False,
    **overrides: Any,
):
    """A small Llama-style `LlamaConfig` (no download): grouped-query attention (half as many key/value
    heads as query heads by default), SwiGLU MLP, intermediate_size 2*hidden_size unless given."""
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or max(1, num_attention_heads // 2),
        vocab_size=vocab_size,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(*, seed: int = 0, **config_kwargs: Any):
    """A seeded, randomly initialised `LlamaForCausalLM` in eval mode, built from `tiny_llama_config`."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**config_kwargs)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def write_llama_checkpoint(path, config, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                           max_shard_bytes: int = 256 * 1024 * 1024) -> dict[str, Any]:
    """Write a seeded Llama-style checkpoint as ``save_pretrained`` lays it out (config.json,
    ``model-0000i-of-0000n.safetensors`` shards and their index, or one ``model.safetensors``),
    without ever building the model: memory stays about one shard, so checkpoints larger than RAM
    can be written.

    Tensor ``i`` (in the order of ``LlamaForCausalLM(config).state_dict()``) is drawn from its own
    generator seeded ``seed * 1_000_003 + i``: normal, std 0.02, for matrices; ones for the norms.
    The tied ``lm_head.weight`` is not written when ``config.tie_word_embeddings``. Returns
    ``{"bytes": total tensor bytes, "largest": elements of the largest tensor, "tensors": count}``.
    """
    import json
    import os

    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    os.makedirs(path, exist_ok=True)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    names = [(n, tuple(t.shape)) for n, t in skeleton.state_dict().items()
             if not (config.tie_word_embeddings and n == "lm_head.weight")]
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in names:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    index = {name: i for i, (name, _) in enumerate(names)}
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                t = torch.ones(shape, dtype=dtype)
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + index[name])
                t = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=g).to(dtype)
            tensors[name] = t
            weight_map[name] = file
            total += t.numel() * t.element_size()
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        del tensors
    if len(files) > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    import transformers

    setattr(config, "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype", dtype)
    config.save_pretrained(path)
    largest = max(torch.Size(s).numel() for _, s in names)
    return {"bytes": total, "largest": largest, "tensors": len(names)}
