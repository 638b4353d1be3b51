"""Tensor and pipeline parallelism on CPU: real Ray actors, gloo, the real SmolLM2."""
import time

import pytest

from kiln import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,",
           "Once upon a time, in a land far away, there lived a potter who"]
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def reference(llm):
    return llm.generate(PROMPTS, PARAMS)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_matches_single_rank(ray_cluster, smollm_source, reference, tp, pp):
    with LLM(smollm_source, device="cpu", tensor_parallel_size=tp, pipeline_parallel_size=pp,
             kv_cache_bytes=1 << 27) as llm:
        assert len(llm.executor.workers) == tp * pp
        got = llm.generate(PROMPTS, PARAMS)
        for ref, out in zip(reference, got):
            a, b = ref.outputs[0], out.outputs[0]
            assert a.token_ids == b.token_ids
            # Logits stay close: the sampled tokens' logprobs agree (fp32).
            for ea, eb, t in zip(a.logprobs, b.logprobs, a.token_ids):
                assert abs(ea[t].logprob - eb[t].logprob) < 1e-3
        # Requests keep flowing: stop strings abort single outputs, n > 1 forks.
        out = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0, max_tokens=12, stop=[" 7"]))[0]
        assert out.outputs[0].text == " 5, 6," and out.outputs[0].finish_reason == "stop"
        many = llm.generate(["Colors: "], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=5,
                                                         ignore_eos=True))[0]
        assert len(many.outputs) == 3 and all(len(o.token_ids) == 5 for o in many.outputs)
        assert llm.executor.stats()["num_running"] == 0
    assert not llm.healthy  # shut down


def test_dead_rank_fails_requests_without_hanging(ray_cluster, smollm_source):
    import ray

    llm = LLM(smollm_source, device="cpu", tensor_parallel_size=2, kv_cache_bytes=1 << 27, collective_timeout_s=20)
    stream = llm.stream("Tell me a long story about a kiln", SamplingParams(max_tokens=200, ignore_eos=True))
    next(stream)
    ray.kill(llm.executor.workers[1])
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="replica unhealthy: rank 1"):
        for _ in stream:
            pass
    assert time.monotonic() - t < 25
    assert not llm.healthy
    with pytest.raises(RuntimeError, match="unhealthy"):
        llm.generate(["again"], SamplingParams(max_tokens=2))
    llm.shutdown()


def test_bad_layout_is_a_clear_error(ray_cluster, smollm_source):
    with pytest.raises(ValueError, match="pipeline_parallel_size=31 exceeds the model's 30 layers"):
        LLM(smollm_source, device="cpu", pipeline_parallel_size=31, kv_cache_bytes=1 << 24)
