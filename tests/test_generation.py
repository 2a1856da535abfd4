"""Generation correctness with the KV cache, across transformers versions.

Every check runs on four models: the legacy-style remote-code model (``tests/legacy_model``,
loaded with ``trust_remote_code=True`` after ``qins.patch_transformers()``) and the native
``Phi3ForCausalLM``, each in FP32 and converted to QINS. Greedy generation with the cache must
equal generation without it, token for token and with logits within 1e-4; the cache must really
be used, i.e. the model's forward receives the prompt once and then one token per step.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from qins import convert_model_to_projective
from qins.integrations.transformers import compat
from tests.strategies import forward_input_lengths, load_legacy_model, tiny_phi3

NEW_TOKENS = 8
ATOL = 1e-4
KINDS = ("legacy", "native")
PRECISIONS = ("fp32", "qins")


@pytest.fixture(scope="module")
def patched() -> Iterator[None]:
    compat.patch_transformers()
    yield
    compat.unpatch_transformers()


@pytest.fixture(scope="module", params=[(k, p) for k in KINDS for p in PRECISIONS], ids=lambda kp: "-".join(kp))
def model(request: pytest.FixtureRequest, patched: None, tmp_path_factory: pytest.TempPathFactory):
    kind, precision = request.param
    m = load_legacy_model(tmp_path_factory.mktemp("legacy")) if kind == "legacy" else tiny_phi3()
    if precision == "qins":
        report = convert_model_to_projective(m)
        assert report.converted, "QINS conversion replaced no nn.Linear"
    return m


def generate(model, input_ids, attention_mask, use_cache: bool):
    """Greedy generation of exactly NEW_TOKENS tokens; returns (output, forward input lengths)."""
    with forward_input_lengths(model) as lengths, torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert out.sequences.shape[-1] == input_ids.shape[-1] + NEW_TOKENS
    return out, lengths


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 1000, (1, length), generator=torch.Generator().manual_seed(seed))


def assert_same_generation(cached, uncached) -> None:
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    cached_logits, uncached_logits = torch.stack(cached.logits), torch.stack(uncached.logits)
    assert cached_logits.shape == uncached_logits.shape
    assert (cached_logits - uncached_logits).abs().max().item() <= ATOL


def test_greedy_generation_with_cache_equals_generation_without(model):
    ids = prompt(6, seed=1)
    cached, _ = generate(model, ids, torch.ones_like(ids), use_cache=True)
    uncached, _ = generate(model, ids, torch.ones_like(ids), use_cache=False)
    assert_same_generation(cached, uncached)


def test_cached_generation_feeds_forward_the_prompt_then_one_token_per_step(model):
    ids = prompt(7, seed=2)
    _, cached_lengths = generate(model, ids, torch.ones_like(ids), use_cache=True)
    _, uncached_lengths = generate(model, ids, torch.ones_like(ids), use_cache=False)
    assert cached_lengths == [7] + [1] * (NEW_TOKENS - 1)
    assert uncached_lengths == list(range(7, 7 + NEW_TOKENS))  # the recorder sees re-encoding


def test_left_padded_batch_generates_the_same_with_and_without_cache(model):
    long, short = prompt(6, seed=3), prompt(4, seed=4)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 2, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    cached, lengths = generate(model, ids, mask, use_cache=True)
    uncached, _ = generate(model, ids, mask, use_cache=False)
    assert lengths == [6] + [1] * (NEW_TOKENS - 1)
    assert_same_generation(cached, uncached)
    # Left padding is really masked out: the padded row continues as the short prompt alone does.
    alone, _ = generate(model, short, torch.ones_like(short), use_cache=True)
    assert cached.sequences[1, 2:].tolist() == alone.sequences[0].tolist()
    padded_row = torch.stack([step[1] for step in cached.logits])
    alone_logits = torch.stack([step[0] for step in alone.logits])
    assert (padded_row - alone_logits).abs().max().item() <= ATOL


def test_legacy_model_computes_what_native_phi3_computes_with_the_same_weights(patched, tmp_path):
    native = tiny_phi3()
    legacy = load_legacy_model(tmp_path)
    legacy.load_state_dict(native.state_dict())
    ids = torch.cat([prompt(6, seed=5), torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt(4, seed=6)], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        expected = native(ids, attention_mask=mask, use_cache=False).logits
        got = legacy(ids, attention_mask=mask, use_cache=False).logits
    attended = mask.bool()  # padded positions' outputs are meaningless in both
    assert (got[attended] - expected[attended]).abs().max().item() <= ATOL
