"""The real SmolLM2 on CPU against HF transformers on the same GGUF weights."""
import os

import pytest
import torch

from kiln import SamplingParams
from kiln.scheduler.request import Sequence
from kiln.scheduler.scheduler import ScheduledSeq

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4,",
    "Translate to French: I love cheese.\n",
    "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n",
    "A",
    "The quick brown fox jumps over the lazy dog. " * 6,
]


def test_greedy_tokens_match_hf(llm, hf_model):
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for prompt, out in zip(ids, outs):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist(), llm.tokenizer.decode(prompt)


def test_last_position_logits_match_hf(llm, hf_model):
    engine = llm.executor.engine
    for i, text in enumerate(PROMPTS):
        ids = llm.tokenizer.encode(text)
        seq = Sequence(10_000 + i, "logits", ids, SamplingParams(), [], engine.max_model_len)
        seq.block_table = list(range(-(-len(ids) // engine.block_size)))
        got = engine.execute([ScheduledSeq(seq, len(ids), True)])[0]
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0, -1].float()
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel < 1e-3, (text, rel)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(smollm_path), gguf_file=os.path.basename(smollm_path))


@pytest.mark.parametrize("text", [
    "Hello world 12345 ünïcode  spaces\n\nnew line",
    "<|im_start|>user\nhi<|im_end|>",
    "  leading spaces and trailing  ",
    "emoji 🎉 and 中文 and code: x = [i ** 2 for i in range(10)]",
])
def test_tokenizer_matches_hf(llm, hf_tokenizer, text):
    tok = hf_tokenizer
    assert llm.tokenizer.encode(text) == tok(text).input_ids
    assert llm.tokenizer.decode(tok(text).input_ids, skip_special_tokens=False) == text
