"""Named model shapes for random-weight runs (speed work without a checkpoint)."""
from __future__ import annotations

from kiln.config import ModelConfig

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                rope_theta=100000.0, tie_word_embeddings=True, eos_token_id=2, name="smollm2-135m"),
    "llama-3.1-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, eos_token_id=128001,
                                name="llama-3.1-8b"),
    "llama-3.1-70b": ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
                                 rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, eos_token_id=128001,
                                 name="llama-3.1-70b"),
    "qwen2-7b": ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=152064, hidden_size=3584,
                            intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0,
                            attention_bias=True, rms_norm_eps=1e-6, name="qwen2-7b"),
}
