"""The real SmolLM2 gives the same greedy tokens through the Triton kernels as
through the torch references (Triton's interpreter on CPU; natively on GPU)."""
import pytest

from kiln import SamplingParams
from kiln.kernels import backend

pytestmark = pytest.mark.skipif(not backend.HAS_TRITON, reason="needs triton")


def test_triton_path_matches_reference(llm):
    long = "One two three four five six seven eight nine ten eleven twelve thirteen fourteen, and then " * 2
    prompts = [long, "The capital of France is"]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with backend.use("torch"):
        ref = llm.generate(prompts, params)
    with backend.use("triton"):
        got = llm.generate(prompts, params)
        # A prefix-cache hit exercises the extend path (new chunk after cached blocks).
        again = llm.generate([long + " fifteen sixteen"], params)[0]
    with backend.use("torch"):
        again_ref = llm.generate([long + " fifteen sixteen"], params)[0]
    assert again.num_cached_tokens >= 16
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    assert again.outputs[0].token_ids == again_ref.outputs[0].token_ids
