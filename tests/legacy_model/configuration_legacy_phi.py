"""Configuration of the legacy-style test model (see ``modeling_legacy_phi.py``).

Written for the qins test-suite. Like the legacy Phi-3 remote configuration, it stores
``rope_scaling`` itself (``None`` or a dict with ``"type"``) and validates it before
``PretrainedConfig.__init__`` runs.
"""
from transformers.configuration_utils import PretrainedConfig


class LegacyPhiConfig(PretrainedConfig):
    model_type = "legacy_phi"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=None,
        hidden_act="silu",
        max_position_embeddings=512,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        use_cache=True,
        rope_theta=10000.0,
        rope_scaling=None,
        sliding_window=None,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self._check_rope_scaling()
        self.sliding_window = sliding_window
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _check_rope_scaling(self):
        if self.rope_scaling is None:
            return
        if not isinstance(self.rope_scaling, dict) or self.rope_scaling.get("type") != "linear":
            raise ValueError(f"rope_scaling must be None or {{'type': 'linear', 'factor': f}}, got {self.rope_scaling}")
        if float(self.rope_scaling.get("factor", 0.0)) < 1.0:
            raise ValueError(f"rope_scaling factor must be >= 1, got {self.rope_scaling}")
