"""HF-directory checkpoints of each supported architecture, against transformers; bad inputs."""
import json
import os

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.workers.loaders import resolve_model

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512)


def _save(tmp_path, name, config, shard=None, tokenizer=None):
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so logits are far from uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    path = tmp_path / name
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    if tokenizer is not None:
        (path / "tokenizer.json").write_text(tokenizer.tk.to_str())
        (path / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": tokenizer.chat_template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return str(path), model.eval()


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {
        "llama31": (LlamaConfig(**SMALL, rope_parameters=LLAMA3_ROPE), None),
        "qwen2": (Qwen2Config(**SMALL), None),
        "mistral": (MistralConfig(**SMALL, sliding_window=None), None),
        "llama-sharded-tied": (LlamaConfig(**SMALL, tie_word_embeddings=True), "2MB"),
    }


@pytest.mark.parametrize("name", ["llama31", "qwen2", "mistral", "llama-sharded-tied"])
def test_hf_directory_matches_transformers(tmp_path, name, llm):
    config, shard = _configs()[name]
    path, ref = _save(tmp_path, name, config, shard, tokenizer=llm.tokenizer if name == "llama31" else None)
    if shard:
        assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    kiln = LLM(path, device="cpu", kv_cache_bytes=1 << 24)
    # 200 tokens: past original_max_position_embeddings=64, where llama3 scaling matters.
    prompt = torch.randint(0, 49152, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    out = kiln.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0))[0]
    with torch.no_grad():
        ref_ids = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 200, dtype=torch.long),
                               max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, 200:].tolist()
        ref_logits = ref(torch.tensor([prompt])).logits[0, -1]
    assert out.outputs[0].token_ids == ref_ids
    first = out.outputs[0].logprobs[0][ref_ids[0]].logprob
    assert abs(first - torch.log_softmax(ref_logits, -1)[ref_ids[0]].item()) < 1e-3
    if name == "llama31":
        assert kiln.tokenizer.encode("Hello world") == llm.tokenizer.encode("Hello world")
        assert "<|im_start|>user" in kiln.tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_path():
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model("/nonexistent/model")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        resolve_model(str(tmp_path))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(100))
    with pytest.raises(ValueError, match="not a valid GGUF"):
        resolve_model(str(bad))


def test_corrupt_safetensors(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(**SMALL).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="not a valid safetensors"):
        LLM(str(tmp_path), device="cpu", kv_cache_bytes=1 << 20)


def test_incomplete_checkpoint(tmp_path):
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    LlamaConfig(**SMALL).save_pretrained(tmp_path)
    save_file({"model.embed_tokens.weight": torch.zeros(49152, 64)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing .* tensors"):
        LLM(str(tmp_path), device="cpu", kv_cache_bytes=1 << 20)


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(f))


def test_random_weights_presets():
    src = resolve_model("llama-3.1-8b", random_weights=True)
    assert src.config.num_key_value_heads == 8 and src.weights is None
    assert abs(src.config.num_params() / 1e9 - 8.03) < 0.01
    assert abs(resolve_model("llama-3.1-70b", random_weights=True).config.num_params() / 1e9 - 70.6) < 0.1
    small = LLM("smollm2-135m", random_weights=True, device="cpu", kv_cache_bytes=1 << 24)
    out = small.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="preset"):
        resolve_model("no-such-preset", random_weights=True)
