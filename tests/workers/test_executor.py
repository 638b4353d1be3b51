"""The step loop: abort frees everything; requests join while others run."""
import pytest

from kiln.config import SamplingParams


@pytest.mark.parametrize("engine", ["llm", "async_llm"])
def test_abort_frees_blocks_and_other_requests_continue(engine, request):
    llm = request.getfixturevalue(engine)
    ex = llm.executor
    free = ex.block_manager.num_free_blocks
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ids = llm.tokenizer.encode("The history of pottery " * 20)
    ex.add_request("keep", ids, p)
    ex.add_request("drop", ids[::-1], p)
    got = {"keep": [], "drop": []}
    for _ in range(3):
        events, _ = ex.step()
        for e in events:
            got[e.request_id].append(e.token_id)
    # Async scheduling: a step is in flight as we abort, and its tokens arrive one call later.
    assert (ex._launched is not None) == ex.async_scheduling
    ex.abort_request("drop")
    events, aborted = ex.step()
    assert aborted == [("drop", 0)]
    assert {e.request_id for e in events} == {"keep"}
    got["keep"] += [e.token_id for e in events]
    ex.add_request("late", ids[:20], p)  # joins while "keep" runs
    for _ in range(100):
        if not ex.has_unfinished():
            break
        events, _ = ex.step()
        for e in events:
            got.setdefault(e.request_id, []).append(e.token_id)
    assert ex.stats()["num_running"] == 0
    assert len(got["keep"]) == 30 and len(got["late"]) == 30 and len(got["drop"]) == 3 - ex.async_scheduling
    assert ex.block_manager.num_free_blocks == free
    assert llm.generate([ids], p)[0].outputs[0].token_ids == got["keep"]
