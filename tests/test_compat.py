"""Unit tests of `qins.integrations.transformers.compat`: the legacy transformers API patch.

Each test starts from the unpatched state and leaves it unpatched. The same tests run under every
transformers version of the nox matrix; where a version has an API natively, the test pins that
the patch left it alone, and the semantic rules hold either way.
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import logging
import sys
import types

import pytest
import torch
from packaging.version import Version
from transformers import GenerationMixin, PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache

from qins.integrations.transformers import compat
from tests import isolation
from tests.isolation import MASK_MODULE
from tests.strategies import forward_input_lengths, legacy_model_dir, load_legacy_model

COMPAT = "qins.integrations.transformers.compat"
LEGACY_CACHE_API = {
    Cache: ("get_usable_length", "seen_tokens", "get_max_length"),
    DynamicCache: ("from_legacy_cache", "to_legacy_cache"),
}
GENERATE_PASSES_CACHE_KWARG = "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters


@pytest.fixture
def unpatched():
    """Run the test from the unpatched state, and leave it unpatched."""
    compat.unpatch_transformers()
    yield
    compat.unpatch_transformers()


def _kv(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, tokens, 8, generator=g), torch.randn(1, 2, tokens, 8, generator=g)


def _filled(cache: Cache, tokens_per_layer: list[int]) -> Cache:
    for layer_idx, tokens in enumerate(tokens_per_layer):
        cache.update(*_kv(tokens, seed=layer_idx), layer_idx)
    return cache


class BoundedCache(DynamicCache):
    """A DynamicCache that reports a size limit of 8 through every API generation has used."""

    LIMIT = 8

    def get_max_cache_shape(self, *args, **kwargs) -> int:  # 4.49 - 4.57
        return self.LIMIT

    def get_max_length(self, *args, **kwargs) -> int:  # <= 4.48 and 5.x
        return self.LIMIT


# --- patch mechanics -------------------------------------------------------------------------


def test_patch_is_idempotent(unpatched):
    first = compat.patch_transformers()
    state = isolation.namespaces()
    assert compat.patch_transformers() == first
    isolation.assert_same(state, isolation.namespaces())


def test_unpatch_restores_exactly_what_was_there(unpatched, tmp_path):
    before = isolation.namespaces()
    compat.patch_transformers()
    model = load_legacy_model(tmp_path)
    remote_config, remote_model = type(model.config), type(model)
    adapted_prepare = vars(remote_model)["prepare_inputs_for_generation"]
    assert getattr(adapted_prepare, "__qins_adapted__", False) == GENERATE_PASSES_CACHE_KWARG
    compat.unpatch_transformers()
    isolation.assert_same(before, isolation.namespaces())
    assert not getattr(vars(remote_model)["prepare_inputs_for_generation"], "__qins_adapted__", False)
    assert "rope_scaling" not in vars(remote_config)


def test_patch_never_replaces_native_attributes(unpatched):
    before = isolation.namespaces()
    compat.patch_transformers()
    after = isolation.namespaces()
    native_loader = before["dynamic_module_utils"]["get_class_in_module"]
    loader = after["dynamic_module_utils"]["get_class_in_module"]
    # The one native callable that may be wrapped (5.x: remote-class adapter) still calls through.
    assert loader is native_loader or (GENERATE_PASSES_CACHE_KWARG and loader.__wrapped__ is native_loader)
    for space, attrs in before.items():
        for name, value in attrs.items():
            if (space, name) != ("dynamic_module_utils", "get_class_in_module"):
                assert after[space][name] is value, f"native {space}.{name} was replaced"


def test_patch_adds_exactly_the_missing_legacy_api(unpatched):
    native = {(owner, name): hasattr(owner, name) for owner, names in LEGACY_CACHE_API.items() for name in names}
    added = compat.patch_transformers()
    for (owner, name), was_native in native.items():
        assert hasattr(owner, name)
        assert (f"{owner.__name__}.{name}" in added) != was_native
    assert hasattr(sys.modules[MASK_MODULE], "_prepare_4d_causal_attention_mask")
    if Version(sys.modules["transformers"].__version__) < Version("4.49"):  # every legacy API is native
        assert added == ()


def test_patch_and_unpatch_log_exactly_what_they_did(unpatched, caplog):
    with caplog.at_level(logging.DEBUG, logger="qins.integrations.transformers.compat"):
        added = compat.patch_transformers()
        changes = len(compat._undo)  # the additions, plus remote classes already imported and adapted
        compat.unpatch_transformers()
    messages = [r.getMessage() for r in caplog.records if r.name == "qins.integrations.transformers.compat"]
    expected = []
    for label in added:
        if label == MASK_MODULE:
            expected.append(f"qins.integrations.transformers.compat: added module {MASK_MODULE}")
        elif label.startswith("dynamic_module_utils.get_class_in_module"):
            expected.append("qins.integrations.transformers.compat: wrapped dynamic_module_utils.get_class_in_module")
        else:
            expected.append(f"qins.integrations.transformers.compat: added {label}")
    assert messages[: len(added)] == expected
    assert changes >= len(added) and messages[-1] == f"{COMPAT}: unpatched ({changes} changes undone)"
    if MASK_MODULE in added:  # 5.x: the stand-in module says what it is
        compat.patch_transformers()
        assert sys.modules[MASK_MODULE].__doc__ == f"{COMPAT} stand-in for the module removed in 5.0."
        assert sys.modules[MASK_MODULE].__name__ == MASK_MODULE


def test_without_the_mask_module_the_patch_adds_a_named_stand_in_and_unpatch_removes_it(unpatched, monkeypatch, caplog):
    """The branch for a transformers without ``modeling_attn_mask_utils`` (gone in some 5.x), run on
    any version: the module hidden from imports, as a removed one is."""
    monkeypatch.setitem(sys.modules, MASK_MODULE, None)  # importing it now raises ImportError
    with caplog.at_level(logging.DEBUG, logger="qins.integrations.transformers.compat"):
        added = compat.patch_transformers()
    assert f"qins.integrations.transformers.compat: added module {MASK_MODULE}" in [
        r.getMessage() for r in caplog.records if r.name == "qins.integrations.transformers.compat"
    ]
    stand_in = sys.modules[MASK_MODULE]
    assert MASK_MODULE in added and isinstance(stand_in, types.ModuleType)
    assert stand_in.__name__ == MASK_MODULE
    assert stand_in.__doc__ == f"{COMPAT} stand-in for the module removed in 5.0."
    assert stand_in._prepare_4d_causal_attention_mask is compat._prepare_4d_causal_attention_mask
    compat.unpatch_transformers()
    assert MASK_MODULE not in sys.modules  # the stand-in is gone; monkeypatch puts the module back
    monkeypatch.setitem(sys.modules, MASK_MODULE, None)
    assert MASK_MODULE in compat.patch_transformers()
    other = types.ModuleType(MASK_MODULE)
    monkeypatch.setitem(sys.modules, MASK_MODULE, other)  # replaced after the patch, by someone else
    compat.unpatch_transformers()
    assert sys.modules[MASK_MODULE] is other  # unpatch removes only its own stand-in


def test_patch_logs_each_addition_at_debug_level(unpatched, caplog):
    with caplog.at_level(logging.DEBUG, logger="qins.integrations.transformers.compat"):
        added = compat.patch_transformers()
    messages = [r.getMessage() for r in caplog.records if r.name == "qins.integrations.transformers.compat"]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "qins.integrations.transformers.compat")
    for label in added:
        assert any(label.split(" ")[0] in m for m in messages), label


@pytest.mark.parametrize("version", ["4.43.4", "6.0.0"])
def test_patch_raises_naming_version_and_native_alternative_when_unsupported(unpatched, monkeypatch, version):
    # sys.modules, not the module bound at import: some transformers imports re-register it.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    with pytest.raises(compat.UnsupportedTransformersError) as excinfo:
        compat.patch_transformers()
    assert str(excinfo.value) == (
        f"qins.patch_transformers() does not support transformers {version} (supported: >=4.44,<6); "
        "legacy Phi-3 / Phi-3.5 remote code would generate without its KV cache. Load the native "
        "implementation instead: transformers.Phi3ForCausalLM, i.e. "
        "AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False)."
    )
    monkeypatch.undo()
    assert compat.patch_transformers() is not None  # the failed call left nothing half-patched


@pytest.mark.parametrize("version", ["4.44.0", "4.44.2", "5.99.0"])
def test_version_check_accepts_the_edges_of_the_supported_range(monkeypatch, version):
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    assert compat._check_version() is None


def _cached_generation_lengths(model, prompt_len: int = 5, new_tokens: int = 4) -> list[int]:
    ids = torch.randint(3, 1000, (1, prompt_len))
    with forward_input_lengths(model) as lengths, torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    return lengths


def test_repatching_keeps_legacy_generation_on_the_cache(unpatched, tmp_path):
    compat.patch_transformers()
    load_legacy_model(tmp_path / "first")
    compat.unpatch_transformers()
    compat.patch_transformers()  # the remote class is now reused, not loaded again
    assert _cached_generation_lengths(load_legacy_model(tmp_path / "again")) == [5, 1, 1, 1]


def test_unpatched_legacy_generation_fails_loudly_or_uses_the_cache(unpatched, tmp_path):
    try:
        lengths = _cached_generation_lengths(load_legacy_model(tmp_path))
    except (AttributeError, ImportError, KeyError) as err:  # a missing legacy API: loud, never silent
        assert any(name in str(err) for name in (
            "get_usable_length", "seen_tokens", "get_max_length", "from_legacy_cache", "modeling_attn_mask_utils",
            "'type'",  # 5.x config.rope_scaling without "type"
        )), err
    else:  # the installed version has the whole legacy API natively
        assert lengths == [5, 1, 1, 1]


def test_a_failure_part_way_through_patching_undoes_every_earlier_change(monkeypatch, unpatched):
    # monkeypatch first: its teardown (restoring hidden native attributes) runs after the unpatch.
    # Every version must have at least two changes to interrupt: hide native legacy conversions
    # (monkeypatch puts them back) so that 4.44, where the whole legacy API is native, adds them.
    for name in ("from_legacy_cache", "to_legacy_cache"):
        if name in vars(DynamicCache):
            monkeypatch.delattr(DynamicCache, name)
    before = isolation.namespaces()
    changes = len(compat.patch_transformers())
    compat.unpatch_transformers()
    assert changes >= 2
    debug = compat.log.debug
    for k in range(1, changes + 1):  # the k-th change is made, then its log line raises
        calls = []

        def failing_debug(*args, k=k, calls=calls, **kwargs):
            calls.append(args)
            if len(calls) == k:
                raise RuntimeError("injected failure")

        monkeypatch.setattr(compat.log, "debug", failing_debug)
        with pytest.raises(RuntimeError, match="injected failure"):
            compat.patch_transformers()
        monkeypatch.setattr(compat.log, "debug", debug)
        isolation.assert_same(before, isolation.namespaces())
        assert compat._undo is None and compat._added == ()  # not half-patched: a retry starts afresh
    assert len(compat.patch_transformers()) == changes
    compat.unpatch_transformers()


def test_legacy_prepare_inputs_shim_leaves_nothing_on_the_cache(unpatched):
    seen = []

    def legacy_prepare(self, input_ids, past_key_values=None, **kwargs):
        seen.append((past_key_values, past_key_values.get_max_length()))
        if kwargs.get("fail"):
            raise ValueError("legacy code failed")
        return {"input_ids": input_ids, "position_ids": torch.arange(5)[None]}

    adapted = compat._adapt_prepare_inputs(legacy_prepare)
    cache = DynamicCache()
    inputs = adapted(None, torch.zeros(1, 2, dtype=torch.long), cache=cache)
    assert seen == [(cache, None)]  # legacy convention during the call: None = no limit
    assert "get_max_length" not in vars(cache)  # the temporary shim is gone afterwards
    assert inputs["position_ids"].tolist() == [[3, 4]]  # cut to the new tokens
    with pytest.raises(ValueError, match="legacy code failed"):
        adapted(None, torch.zeros(1, 2, dtype=torch.long), cache=cache, fail=True)
    assert "get_max_length" not in vars(cache)  # removed even when the legacy code raises
    cache.get_max_length = lambda: 7  # an instance's own attribute is never shadowed nor removed
    adapted(None, torch.zeros(1, 2, dtype=torch.long), cache=cache)
    assert seen[-1] == (cache, 7) and vars(cache)["get_max_length"]() == 7


def test_the_old_name_patch_dynamic_cache_warns_and_is_patch_transformers():
    import qins

    with pytest.warns(FutureWarning, match="patch_transformers"):
        assert qins.patch_dynamic_cache is compat.patch_transformers
    assert "patch_dynamic_cache" not in qins.__all__ and not hasattr(compat, "patch_dynamic_cache")


# --- semantics -------------------------------------------------------------------------------


def test_get_usable_length_returns_tokens_cached_for_the_layer(unpatched):
    compat.patch_transformers()
    cache = _filled(DynamicCache(), [5, 3])
    assert cache.get_usable_length(1) == 5
    assert cache.get_usable_length(1, 0) == 5
    assert cache.get_usable_length(1, 1) == 3
    assert cache.get_usable_length(4096, 1) == 3  # unbounded: never cut
    assert DynamicCache().get_usable_length(7) == 0


def test_get_usable_length_bounded_by_max_cache_length(unpatched):
    compat.patch_transformers()
    cache = _filled(BoundedCache(), [6])
    assert cache.get_usable_length(2) == 6  # 6 + 2 == 8: fits
    assert cache.get_usable_length(3) == 5  # 6 + 3 > 8: max - new
    assert cache.get_usable_length(8) == 0


def test_seen_tokens_counts_the_tokens_seen_so_far(unpatched):
    compat.patch_transformers()
    cache = DynamicCache()
    assert cache.seen_tokens == 0
    for step, tokens in enumerate([5, 1, 1]):
        for layer_idx in range(2):
            cache.update(*_kv(tokens, seed=step), layer_idx)
    assert cache.seen_tokens == 7


def test_seen_tokens_are_those_of_layer_0(unpatched):
    compat.patch_transformers()
    assert _filled(DynamicCache(), [5, 3]).seen_tokens == 5


class _LimitOnly:
    """A cache-like object without ``layers``, reporting its limit through ``get_max_cache_shape``
    (the 4.49-4.57 API) and a contradicting ``get_max_length``: the former must win."""

    def __init__(self, limit: int, cached: int = 0) -> None:
        self.limit, self.cached = limit, cached

    def get_max_cache_shape(self) -> int:
        return self.limit

    def get_max_length(self) -> int:
        return 99

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cached


@pytest.mark.parametrize("limit, expected", [(8, 8), (0, 0), (-1, None)])
def test_get_max_length_reads_get_max_cache_shape_first_and_maps_negative_to_none(limit, expected):
    assert compat._get_max_length(_LimitOnly(limit)) == expected  # no `layers` attribute needed


def test_get_usable_length_keeps_every_cached_token_when_they_fit_exactly():
    assert compat._get_usable_length(_LimitOnly(8, cached=5), 3) == 5  # 5 + 3 == 8 fits
    assert compat._get_usable_length(_LimitOnly(8, cached=5), 4) == 4  # one too many: cut to 8 - 4


def test_get_max_length_is_none_without_a_limit_for_legacy_callers(unpatched, tmp_path):
    native_max_length = hasattr(Cache, "get_max_length")
    compat.patch_transformers()
    cache = _filled(DynamicCache(), [5, 5])
    if native_max_length and cache.get_max_length() is not None:
        assert cache.get_max_length() == -1  # 5.x native semantics are left alone ...
    else:
        assert cache.get_max_length() is None
    assert BoundedCache().get_max_length() == BoundedCache.LIMIT
    # ... and the legacy caller (prepare_inputs_for_generation) sees None: a -1 would cut the mask.
    model = load_legacy_model(tmp_path)
    ids = torch.randint(3, 1000, (1, 6))
    cache_kwarg = "cache" if GENERATE_PASSES_CACHE_KWARG else "past_key_values"
    inputs = model.prepare_inputs_for_generation(ids, attention_mask=torch.ones_like(ids), **{cache_kwarg: cache})
    assert inputs["input_ids"].tolist() == ids[:, 5:].tolist()
    assert inputs["attention_mask"].shape == (1, 6)
    assert inputs["position_ids"].tolist() == [[5]]
    assert cache.get_max_length() in (None, -1)  # the legacy view did not leak into the cache


def test_legacy_tuple_conversions_round_trip(unpatched):
    compat.patch_transformers()
    legacy = tuple(_kv(4, seed=layer_idx) for layer_idx in range(3))
    cache = DynamicCache.from_legacy_cache(legacy)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 4
    back = cache.to_legacy_cache()
    assert len(back) == 3
    for (k, v), (k2, v2) in zip(legacy, back):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    for layer_idx, (k, v) in enumerate(legacy):
        assert torch.equal(cache.key_cache[layer_idx], k) and torch.equal(cache.value_cache[layer_idx], v)
    assert DynamicCache.from_legacy_cache(None).get_seq_length() == 0


def test_key_cache_view_gives_way_to_a_subclass_instance_attribute(unpatched):
    class OwnLists(DynamicCache):
        def __init__(self) -> None:
            super().__init__()
            self.key_cache, self.value_cache = ["own keys"], ["own values"]

    compat.patch_transformers()
    cache = OwnLists()
    assert cache.key_cache == ["own keys"] and cache.value_cache == ["own values"]


def test_key_cache_view_read_on_the_class_is_the_view_itself(unpatched):
    added = compat.patch_transformers()
    for name, attr in (("key_cache", "keys"), ("value_cache", "values")):
        if f"DynamicCache.{name}" in added:  # 4.56+: a per-layer view of layer.keys / layer.values
            view = vars(DynamicCache)[name]
            assert isinstance(view, compat._LayerView) and view.attr == attr
            assert getattr(DynamicCache, name) is view  # class access: the descriptor, as for properties
        else:
            assert name in vars(DynamicCache) or hasattr(DynamicCache(), name)


def _native_mask_function():
    """transformers' own ``_prepare_4d_causal_attention_mask``; None where its module is gone (5.x)."""
    try:
        module = importlib.import_module(MASK_MODULE)
    except ImportError:
        assert Version(sys.modules["transformers"].__version__).major >= 5
        return None
    assert module.__dict__.get("_prepare_4d_causal_attention_mask") is not compat._prepare_4d_causal_attention_mask
    return module._prepare_4d_causal_attention_mask


def _reference_mask(mask2d, batch, q_len, past, sliding_window, dtype):
    """Brute-force additive causal mask: one loop per (batch, query, key)."""
    lowest = torch.finfo(dtype).min
    out = torch.zeros(batch, 1, q_len, past + q_len, dtype=dtype)
    for b, i, j in itertools.product(range(batch), range(q_len), range(past + q_len)):
        causal = j <= past + i and (sliding_window is None or past + i - j <= sliding_window)
        if not causal or (mask2d is not None and mask2d[b, j] == 0):
            out[b, 0, i, j] = lowest
    return out


@pytest.mark.parametrize("q_len,past,sliding_window,padded", [
    (5, 0, None, False), (5, 0, None, True), (1, 6, None, True), (3, 4, None, True),
    (5, 0, 2, True), (1, 6, 3, False), (4, 3, 3, True), (2, 0, None, False), (2, 3, None, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_causal_mask_stand_in_matches_the_legacy_semantics(unpatched, q_len, past, sliding_window, padded, dtype):
    batch = 2
    embeds = torch.zeros(batch, q_len, 8, dtype=dtype)
    mask2d = torch.ones(batch, past + q_len, dtype=torch.long)
    if padded:
        mask2d[1, :2] = 0  # second row left-padded by two tokens
    got = compat._prepare_4d_causal_attention_mask(mask2d, (batch, q_len), embeds, past, sliding_window)
    assert got.dtype == dtype and torch.equal(got, _reference_mask(mask2d, batch, q_len, past, sliding_window, dtype))
    if q_len > 1 or sliding_window is not None:
        unmasked = compat._prepare_4d_causal_attention_mask(None, (batch, q_len), embeds, past, sliding_window)
        assert torch.equal(unmasked, _reference_mask(None, batch, q_len, past, sliding_window, dtype))
    else:
        assert compat._prepare_4d_causal_attention_mask(None, (batch, q_len), embeds, past, sliding_window) is None
    native = _native_mask_function()
    if native is not None:  # 4.x: the stand-in must agree with transformers' own
        assert torch.equal(got, native(mask2d, (batch, q_len), embeds, past, sliding_window=sliding_window))


def test_causal_mask_stand_in_inverts_a_4d_mask_and_checks_its_shape(unpatched):
    embeds = torch.zeros(2, 3, 8)
    mask4d = torch.randint(0, 2, (2, 1, 3, 5)).float()
    got = compat._prepare_4d_causal_attention_mask(mask4d, (2, 3), embeds, 2)
    assert torch.equal(got, torch.where(mask4d == 1, 0.0, torch.finfo(torch.float32).min))
    with pytest.raises(ValueError, match="4D attention mask"):
        compat._prepare_4d_causal_attention_mask(mask4d, (2, 3), embeds, 1)
    native = _native_mask_function()
    if native is not None:  # 4.x: the stand-in must agree with transformers' own
        assert torch.equal(got, native(mask4d, (2, 3), embeds, 2))


def test_remote_config_reads_rope_scaling_legacy_style(unpatched, tmp_path):
    from transformers import AutoConfig

    compat.patch_transformers()
    plain = AutoConfig.from_pretrained(legacy_model_dir(tmp_path / "a"), trust_remote_code=True, local_files_only=True)
    assert plain.rope_scaling is None
    scaled = AutoConfig.from_pretrained(
        legacy_model_dir(tmp_path / "b", rope_scaling={"type": "linear", "factor": 2.0}),
        trust_remote_code=True, local_files_only=True,
    )
    assert scaled.rope_scaling["type"] == "linear" and scaled.rope_scaling["factor"] == 2.0
    model = load_legacy_model(tmp_path / "c", rope_scaling={"type": "linear", "factor": 2.0})
    assert model.model.layers[0].self_attn.rotary_emb.scale == 2.0


def test_remote_class_adapter_wraps_legacy_modules_once_and_nothing_else(caplog):
    def legacy(self, input_ids, past_key_values=None, **kwargs):
        return {"input_ids": input_ids}

    def modern(self, input_ids, cache=None, past_key_values=None, **kwargs):
        return {"input_ids": input_ids}

    Legacy = type("Legacy", (torch.nn.Module,), {"prepare_inputs_for_generation": legacy})
    Modern = type("Modern", (torch.nn.Module,), {"prepare_inputs_for_generation": modern})
    NotAModule = type("NotAModule", (), {"prepare_inputs_for_generation": legacy})
    undo: list = []
    with caplog.at_level(logging.DEBUG, logger="qins.integrations.transformers.compat"):
        for cls in (Legacy, Modern, NotAModule):
            compat._adapt_remote_class(cls, undo)
    if not GENERATE_PASSES_CACHE_KWARG:  # 4.x generate passes past_key_values itself: nothing to adapt
        assert undo == [] and vars(Legacy)["prepare_inputs_for_generation"] is legacy
        return
    adapted = vars(Legacy)["prepare_inputs_for_generation"]
    assert adapted.__qins_adapted__ is True and adapted.__wrapped__ is legacy
    assert vars(Modern)["prepare_inputs_for_generation"] is modern
    assert vars(NotAModule)["prepare_inputs_for_generation"] is legacy
    assert [r.getMessage() for r in caplog.records if r.name == "qins.integrations.transformers.compat"] == [
        f"{COMPAT}: adapted remote Legacy.prepare_inputs_for_generation for transformers 5.x"
    ]
    compat._adapt_remote_class(Legacy, undo)  # already adapted: not wrapped twice
    assert vars(Legacy)["prepare_inputs_for_generation"] is adapted and len(undo) == 1
    compat._adapt_remote_class("not a class", undo)
    undo.pop()()
    assert vars(Legacy)["prepare_inputs_for_generation"] is legacy


def test_remote_config_adapter_replaces_only_an_inherited_native_rope_scaling():
    def init(self, rope_scaling=None, **kwargs):
        PretrainedConfig.__init__(self, rope_scaling=rope_scaling, **kwargs)

    LegacyConfig = type("LegacyConfig", (PretrainedConfig,), {"__init__": init, "model_type": "legacy_test"})
    NoParam = type("NoParam", (PretrainedConfig,), {"model_type": "legacy_test2"})
    Own = type("Own", (PretrainedConfig,), {"__init__": init, "rope_scaling": property(lambda self: "own")})
    native = inspect.getattr_static(PretrainedConfig, "rope_scaling", None)
    undo: list = []
    for cls in (LegacyConfig, NoParam, Own):
        compat._adapt_remote_class(cls, undo)
    if not isinstance(native, property):  # 4.x: a plain attribute, nothing to adapt
        assert undo == [] and "rope_scaling" not in vars(LegacyConfig)
        return
    view = vars(LegacyConfig)["rope_scaling"]
    assert isinstance(view, property) and view.fget is not native.fget and view.fset is native.fset
    assert "rope_scaling" not in vars(NoParam) and Own.rope_scaling.fget(None) == "own"
    assert LegacyConfig().rope_scaling is None
    for u in reversed(undo):
        u()
    assert "rope_scaling" not in vars(LegacyConfig)


def test_patch_api_is_exported_from_the_package() -> None:
    import qins
    from qins.integrations.transformers import compat

    assert qins.patch_transformers is compat.patch_transformers
    assert qins.unpatch_transformers is compat.unpatch_transformers
    assert qins.UnsupportedTransformersError is compat.UnsupportedTransformersError


# ---- found by mutation testing: the version guards, simulated on this transformers ----

#: (owner, name) of everything the patch may add to the cache classes: the legacy API and the views
_CACHE_PIECES = [(o, n) for o, names in LEGACY_CACHE_API.items() for n in names] + [
    (DynamicCache, "key_cache"),
    (DynamicCache, "value_cache"),
]


def test_a_transformers_that_has_the_whole_legacy_api_gets_none_of_it_replaced(unpatched, monkeypatch):
    import types

    mask_module = (
        importlib.import_module(MASK_MODULE) if importlib.util.find_spec(MASK_MODULE) else types.ModuleType(MASK_MODULE)
    )
    monkeypatch.setitem(sys.modules, MASK_MODULE, mask_module)
    native = {}
    for owner, name in [*_CACHE_PIECES, (mask_module, compat._MASK_FN)]:
        native[owner, name] = object()
        monkeypatch.setattr(owner, name, native[owner, name], raising=False)
    added = compat.patch_transformers()
    assert all(not label.startswith(("Cache.", "DynamicCache.", MASK_MODULE)) for label in added), added
    assert all(inspect.getattr_static(owner, name) is value for (owner, name), value in native.items())
    compat.unpatch_transformers()
    assert all(inspect.getattr_static(owner, name) is value for (owner, name), value in native.items())


def test_a_transformers_that_lacks_the_legacy_api_gets_each_piece_and_loses_it_on_unpatch(unpatched, monkeypatch):
    import types

    mask_module = types.ModuleType(MASK_MODULE)  # the module exists but lacks the function (late 4.x)
    monkeypatch.setitem(sys.modules, MASK_MODULE, mask_module)
    for owner in DynamicCache.__mro__[:-1]:  # Cache and every other base, not object
        for _, name in _CACHE_PIECES:
            if name in vars(owner):
                monkeypatch.delattr(owner, name)
    views = not hasattr(DynamicCache(), "key_cache")  # 4.x sets key_cache in __init__: it cannot go
    api = [(o, n) for o, n in _CACHE_PIECES if n not in ("key_cache", "value_cache")]
    assert not any(hasattr(DynamicCache(), n) for _, n in api)
    added = compat.patch_transformers()
    want = [f"{o.__name__}.{n}" for o, n in (_CACHE_PIECES if views else api)] + [f"{MASK_MODULE}.{compat._MASK_FN}"]
    assert [a for a in added if a.startswith(("Cache.", "DynamicCache.", MASK_MODULE))] == want
    assert (
        vars(Cache)["get_usable_length"] is compat._get_usable_length
        and vars(Cache)["get_max_length"] is compat._get_max_length
    )
    assert vars(Cache)["seen_tokens"].fget is compat._seen_tokens
    assert vars(DynamicCache)["from_legacy_cache"].__func__ is compat._from_legacy_cache
    assert vars(DynamicCache)["to_legacy_cache"] is compat._to_legacy_cache
    if views:
        assert [vars(DynamicCache)[n].attr for n in ("key_cache", "value_cache")] == ["keys", "values"]
    assert (
        sys.modules[MASK_MODULE] is mask_module
        and vars(mask_module)[compat._MASK_FN] is compat._prepare_4d_causal_attention_mask
    )
    compat.unpatch_transformers()
    assert not any(n in vars(o) for o, n in _CACHE_PIECES) and compat._MASK_FN not in vars(mask_module)


def test_the_remote_class_adapter_is_installed_when_generate_passes_cache_even_without_a_rope_property(
    unpatched, monkeypatch
):
    from transformers import dynamic_module_utils

    monkeypatch.setattr(PretrainedConfig, "rope_scaling", None, raising=False)  # a plain attribute, as in 4.x
    loader = dynamic_module_utils.get_class_in_module
    added = compat.patch_transformers()
    wrapped = "dynamic_module_utils.get_class_in_module (legacy remote-class adapter)" in added
    assert wrapped == GENERATE_PASSES_CACHE_KWARG
    assert (dynamic_module_utils.get_class_in_module is not loader) == wrapped
    compat.unpatch_transformers()
    assert dynamic_module_utils.get_class_in_module is loader


@pytest.mark.skipif(
    not GENERATE_PASSES_CACHE_KWARG, reason="4.x generate passes past_key_values itself: nothing to adapt"
)
@pytest.mark.parametrize("prefix", ["qins_test_remote", None], ids=["custom-prefix", "prefix-attribute-absent"])
def test_remote_classes_already_imported_under_the_dynamic_module_prefix_are_adapted_and_no_others(
    unpatched, monkeypatch, prefix
):
    import types

    from transformers import dynamic_module_utils

    def legacy(self, input_ids, past_key_values=None, **kwargs):
        return {"input_ids": input_ids}

    if prefix is None:  # an older transformers without the constant: the documented default name
        monkeypatch.delattr(dynamic_module_utils, "TRANSFORMERS_DYNAMIC_MODULE_NAME", raising=False)
    else:
        monkeypatch.setattr(dynamic_module_utils, "TRANSFORMERS_DYNAMIC_MODULE_NAME", prefix, raising=False)
    classes = {}
    for name in [f"{prefix or 'transformers_modules'}.legacy_phi", "qins_test_not_remote.legacy_phi"]:
        module = types.ModuleType(name)
        classes[name] = type(
            "Legacy", (torch.nn.Module,), {"prepare_inputs_for_generation": legacy, "__module__": name}
        )
        module.Legacy = classes[name]
        monkeypatch.setitem(sys.modules, name, module)
    remote, local = classes.values()
    compat.patch_transformers()
    assert vars(remote)["prepare_inputs_for_generation"].__wrapped__ is legacy
    assert vars(local)["prepare_inputs_for_generation"] is legacy  # not a remote module: left alone
    compat.unpatch_transformers()
    assert vars(remote)["prepare_inputs_for_generation"] is legacy


def test_the_rope_scaling_view_reads_either_key_gives_type_and_passes_writes_through():
    native = property(lambda self: self._p, lambda self, v: setattr(self, "_p", v), lambda self: delattr(self, "_p"))
    view = compat._rope_scaling_property(native)
    assert view.__doc__ == "Legacy view: None when unscaled, else a dict with 'type'."
    holder = type("Holder", (), {"rope_scaling": view})()
    cases = [
        (None, None), ({}, None), ({"rope_type": "default"}, None), ({"type": "default", "factor": 1.0}, None),
        ({"rope_type": "linear", "factor": 2.0}, {"rope_type": "linear", "factor": 2.0, "type": "linear"}),
        ({"type": "dynamic", "factor": 3.0}, {"type": "dynamic", "factor": 3.0}),
        ({"type": "yarn", "rope_type": "linear"}, {"type": "yarn", "rope_type": "linear"}),  # "type" wins
    ]
    for stored, seen in cases:
        holder.rope_scaling = stored  # the native setter
        assert holder._p is stored and holder.rope_scaling == seen
    del holder.rope_scaling  # the native deleter
    assert not hasattr(holder, "_p")


def test_the_remote_class_adapter_copes_with_a_config_class_without_rope_scaling(monkeypatch):
    def init(self, rope_scaling=None, **kwargs):
        PretrainedConfig.__init__(self, **kwargs)

    monkeypatch.delattr(PretrainedConfig, "rope_scaling", raising=False)  # 4.x: an instance attribute only
    LegacyConfig = type("LegacyConfig", (PretrainedConfig,), {"__init__": init, "model_type": "legacy_test3"})
    undo: list = []
    compat._adapt_remote_class(LegacyConfig, undo)
    assert undo == [] and "rope_scaling" not in vars(LegacyConfig)
