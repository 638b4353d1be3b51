"""Hugging Face model directories: config.json, *.safetensors, tokenizer files."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

from kiln.config import ModelConfig
from kiln.workers.models import SUPPORTED_ARCHITECTURES

_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id")


def read_config(path: str) -> ModelConfig:
    cfg_file = os.path.join(path, "config.json")
    try:
        with open(cfg_file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None and not archs:
        arch = _MODEL_TYPES.get(raw.get("model_type"))
    if arch is None:
        raise ValueError(f"unsupported architecture {archs or raw.get('model_type')!r} in {cfg_file}; "
                         f"kiln supports {', '.join(SUPPORTED_ARCHITECTURES)}")
    kw = {k: raw[k] for k in _CONFIG_FIELDS if raw.get(k) is not None}
    # transformers 5 moved rope_theta / rope_scaling into `rope_parameters`.
    rope = raw.get("rope_parameters") or raw.get("rope_scaling")
    if rope:
        kw.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            kw["rope_scaling"] = rope
    kw["attention_bias"] = bool(raw.get("attention_bias", arch == "Qwen2ForCausalLM"))
    if raw.get("sliding_window") and raw.get("use_sliding_window", arch == "MistralForCausalLM") \
            and raw["sliding_window"] < raw.get("max_position_embeddings", 0):
        # Within the window, full attention is exact; so cap the context there.
        kw["max_position_embeddings"] = raw["sliding_window"]
    return ModelConfig(architecture=arch, name=os.path.basename(os.path.normpath(path)), **kw)


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not names:
        raise ValueError(f"{path} has no *.safetensors weights")
    return [os.path.join(path, n) for n in names]


def iter_weights(path: str) -> Iterator[tuple[str, object]]:
    """(name, lazy slice): slicing one reads only those rows from the file."""
    from safetensors import SafetensorError, safe_open

    for file in safetensors_files(path):
        if not os.path.exists(file):
            raise ValueError(f"weight file {file} listed in the index does not exist")
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_slice(name)
        except SafetensorError as e:
            raise ValueError(f"{file} is not a valid safetensors file: {e}") from None
