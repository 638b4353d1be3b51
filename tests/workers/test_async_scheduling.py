"""Async scheduling (step N+1 planned before step N's tokens are read) changes no output.

It is on by default on CUDA only; here it is forced on for the CPU engine
(conftest's async_llm) and compared with the synchronous engine on the same
requests. tests/workers/test_executor.py runs its abort test on both.
"""
import random

import pytest

from kiln import LLM, SamplingParams


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the a kiln fire clay pot glaze river mountain code python data model token cache".split()
    return [" ".join(rng.choice(words) for _ in range(rng.choice([1, 4, 20, 60]))) for _ in range(n)]


def outputs(results):
    return [[(o.token_ids, o.finish_reason, o.text) for o in r.outputs] for r in results]


def test_sync_engine_is_the_cpu_default(llm):
    assert not llm.executor.async_scheduling


def test_greedy_with_eos_and_lengths_matches_sync(llm, async_llm):
    questions = ["Say only the word yes.", "What is 2+2? Answer with a number only.", "Name one color.",
                 "Reply with OK.", "Write a long story about a kiln.", "List three fruits."]
    convs = [[{"role": "user", "content": q}] for q in questions] * 3
    params = [SamplingParams(temperature=0, max_tokens=random.Random(i).randint(4, 40)) for i in range(len(convs))]
    want = llm.chat(convs, params)
    got = async_llm.chat(convs, params)
    assert outputs(got) == outputs(want)
    reasons = {o.outputs[0].finish_reason for o in want}
    assert reasons == {"stop", "length"}  # EOS happens: the dropped-row path runs
    assert async_llm.executor.stats()["num_running"] == 0


def test_sampling_features_match_sync(llm, async_llm):
    ps = prompts(8, seed=1)
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=20, n=3),
        SamplingParams(temperature=1.0, top_k=20, min_p=0.05, seed=3, max_tokens=16, logprobs=3),
        SamplingParams(temperature=0.7, seed=11, max_tokens=18, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(temperature=0, max_tokens=25, frequency_penalty=0.8, min_tokens=10),
        SamplingParams(temperature=0, max_tokens=30, stop=[" the", "."], logprobs=1),
        SamplingParams(temperature=0.9, seed=5, max_tokens=12, stop_token_ids=[28]),
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=0.5, seed=2, max_tokens=22, min_tokens=22),
    ]
    want = llm.generate(ps, params)
    got = async_llm.generate(ps, params)
    assert outputs(got) == outputs(want)
    for w, g in zip(want, got):
        for wo, go in zip(w.outputs, g.outputs):
            if wo.logprobs is not None:
                assert [{t: x.rank for t, x in d.items()} for d in go.logprobs] == \
                    [{t: x.rank for t, x in d.items()} for d in wo.logprobs]
                flat = [[x.logprob for x in d.values()] for d in (wo.logprobs, go.logprobs) for d in d]
                half = len(flat) // 2
                assert sum(flat[half:], []) == pytest.approx(sum(flat[:half], []), abs=1e-5)


def test_preemption_and_prefix_cache_match_sync(smollm_source):
    ps = [("A shared preface about glazes and kilns. " * 6) + p for p in prompts(12, seed=2)]
    params = SamplingParams(temperature=0, max_tokens=24)
    results = []
    for mode in (False, True):
        small = LLM(smollm_source, device="cpu", num_blocks=40, async_scheduling=mode)
        first = small.generate(ps, params)
        again = small.generate(ps[:3], params)
        assert small.executor.scheduler.num_preemptions > 0
        bm = small.executor.block_manager
        assert bm.num_free_blocks == bm.num_blocks and small.executor._launched is None
        results.append((outputs(first), outputs(again), [r.num_cached_tokens for r in again]))
    assert results[1] == results[0]
    assert min(results[1][2]) > 0


def test_perplexity_after_an_eos_finish(llm, async_llm):
    async_llm.generate(["Hi"], SamplingParams(temperature=0, max_tokens=64))
    text = "Clay is shaped, dried and fired in a kiln."
    assert async_llm.perplexity(text) == pytest.approx(llm.perplexity(text), rel=1e-5)
