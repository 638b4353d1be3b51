"""The LLM API end to end on the real SmolLM2 (CPU)."""
import random

import pytest

from kiln import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def mixed_prompts(llm, n=32, seed=0):
    rng = random.Random(seed)
    words = "the a kiln fire clay pot glaze river mountain code python data model token cache block".split()
    prompts = []
    for i in range(n):
        length = rng.choice([1, 3, 8, 20, 45, 90])
        prompts.append(" ".join(rng.choice(words) for _ in range(length)))
    return prompts


def test_batch_equals_alone(llm):
    prompts = mixed_prompts(llm)
    together = llm.generate(prompts, GREEDY)
    for p, out in zip(prompts, together):
        alone = llm.generate([p], GREEDY)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, p
        assert out.prompt == p and out.finished


def test_prefix_cache_hit_same_tokens(llm):
    system = "You are a careful assistant who answers in one sentence. " * 8
    first = llm.generate([system + "What is clay?"], GREEDY)[0]
    second = llm.generate([system + "What is clay?"], GREEDY)[0]
    assert second.num_cached_tokens > 0
    assert second.num_cached_tokens >= (len(second.prompt_token_ids) - 1) // 16 * 16 - 16
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    other = llm.generate([system + "What is a kiln?"], GREEDY)[0]
    assert other.num_cached_tokens >= 16


def test_preemption_keeps_outputs_identical(llm, smollm_source):
    prompts = mixed_prompts(llm, n=12, seed=1)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reference = llm.generate(prompts, params)
    # 24 blocks of 16 tokens cannot hold 12 sequences of up to ~110 tokens at once.
    small = LLM(smollm_source, device="cpu", num_blocks=24, enable_prefix_caching=False)
    got = small.generate(prompts, params)
    assert small.executor.scheduler.num_preemptions > 0
    for a, b in zip(reference, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert small.executor.block_manager.num_free_blocks == 24


def test_seed_reproducible_and_batch_independent(llm):
    p = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    a = llm.generate(["Tell me a story about"], p)[0].outputs[0].token_ids
    b = llm.generate(["Tell me a story about"], p)[0].outputs[0].token_ids
    crowd = llm.generate(["Tell me a story about", "Something else", "More"],
                         [p, SamplingParams(temperature=1.0, max_tokens=20), SamplingParams(temperature=0.5)])
    assert a == b == crowd[0].outputs[0].token_ids
    c = llm.generate(["Tell me a story about"], SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16,
                                                               seed=99, ignore_eos=True))[0].outputs[0].token_ids
    assert c != a


def test_n_samples_share_prompt(llm):
    prompt = "List three colors: " * 10
    out = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 8 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    stats = llm.executor.stats()
    assert stats["prefix_cache_hits"] > 0


def test_stop_strings_and_tokens(llm):
    base = llm.generate(["1, 2, 3, 4,"], GREEDY)[0].outputs[0]
    assert base.text.startswith(" 5, 6")
    out = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0, max_tokens=12, stop=[" 7"]))[0].outputs[0]
    assert out.text == " 5, 6," and out.finish_reason == "stop" and out.stop_reason == " 7"
    out = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0, max_tokens=12, stop=" 7",
                                                       include_stop_str_in_output=True))[0].outputs[0]
    assert out.text == " 5, 6, 7"
    tok6 = base.token_ids[2]
    out = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0, max_tokens=12,
                                                       stop_token_ids=[tok6]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == tok6 and out.token_ids[-1] == tok6


def test_max_tokens_eos_and_ignore_eos(llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    natural = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert natural.finish_reason == "stop" and natural.token_ids[-1] in llm.executor.eos_token_ids
    assert "Paris" in natural.text and "<|im_end|>" not in natural.text
    forced = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=len(natural.token_ids) + 5,
                                           ignore_eos=True))[0].outputs[0]
    assert forced.finish_reason == "length" and len(forced.token_ids) == len(natural.token_ids) + 5
    short = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 3


def test_logprobs(llm):
    import torch

    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4,
                                                                   logprobs=5))[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and entry[tok].rank == 1  # greedy picks the top token
        assert 5 <= len(entry) <= 6
        top = sorted((lp.logprob for lp in entry.values()), reverse=True)
        assert top[0] == pytest.approx(entry[tok].logprob)
        assert entry[tok].logprob <= 0
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))
    assert out.logprobs[0][out.token_ids[0]].decoded_token == " Paris"
    del torch


def test_top_k_one_is_greedy_and_penalties_change_output(llm):
    g = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].token_ids
    k1 = llm.generate(["Once upon a time"], SamplingParams(temperature=1.5, top_k=1, max_tokens=16,
                                                           seed=3))[0].outputs[0].token_ids
    assert g == k1
    rep = "the the the the the the the the"
    plain = llm.generate([rep], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    pen = llm.generate([rep], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                             frequency_penalty=2.0, presence_penalty=1.0,
                                             repetition_penalty=1.5))[0].outputs[0]
    assert len(set(pen.token_ids)) > len(set(plain.token_ids))


def test_stream_matches_generate(llm):
    p = SamplingParams(temperature=0, max_tokens=20, stop=["Paris."])
    snaps = list(llm.stream("Q: What is the capital of France?\nA:", p))
    final = llm.generate(["Q: What is the capital of France?\nA:"], p)[0]
    texts = [s.outputs[0].text for s in snaps]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    assert snaps[-1].finished and texts[-1] == final.outputs[0].text
    assert all("Paris" not in t for t in texts)  # held back, then cut at the stop string


def test_chat_streams_and_batches(llm):
    convs = [[{"role": "user", "content": "Say hi"}], [{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "Name a color"}]]
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=10))
    assert len(outs) == 2 and outs[1].prompt.startswith("<|im_start|>system\nBe brief.")
    streamed = list(llm.chat_stream(convs[0], SamplingParams(temperature=0, max_tokens=10)))
    assert streamed[-1].outputs[0].text == outs[0].outputs[0].text


@pytest.mark.parametrize("make, match", [
    (lambda: SamplingParams(top_p=1.5), "top_p"),
    (lambda: SamplingParams(max_tokens=-1), "max_tokens"),
    (lambda: SamplingParams(temperature=-0.1), "temperature"),
    (lambda: SamplingParams(n=0), "n must"),
    (lambda: SamplingParams(top_k=-5), "top_k"),
    (lambda: SamplingParams(stop=[""]), "stop"),
    (lambda: SamplingParams(logprobs=100), "logprobs"),
])
def test_bad_sampling_params(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_prompts_leave_engine_clean(llm):
    ctx = llm.executor.max_model_len
    with pytest.raises(ValueError, match=f"prompt has {ctx + 5} tokens.*{ctx}"):
        llm.generate([[1] * (ctx + 5)], GREEDY)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 10**9]], GREEDY)
    with pytest.raises(ValueError, match="prompt must be"):
        llm.generate([3.5], GREEDY)
    # A bad prompt among good ones rejects the batch before anything runs.
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["fine", []], GREEDY)
    assert not llm.executor.has_unfinished()
    assert llm.generate(["still fine"], GREEDY)[0].outputs[0].token_ids
