"""The scheduler alone, driven by a fake model that returns fixed tokens."""
from kiln.config import SamplingParams, SchedulerConfig
from kiln.scheduler.block_manager import BlockManager
from kiln.scheduler.request import Sequence, Status
from kiln.scheduler.scheduler import Scheduler

BS = 4
EOS = 0


def make(num_blocks=64, max_tokens=64, max_seqs=8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens),
                     BlockManager(num_blocks, BS))


def add(s: Scheduler, rid: str, n_prompt: int, max_tokens=4, base=1, **kw) -> Sequence:
    seq = Sequence(s.new_seq_id(), rid, list(range(base, base + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw),
                   [EOS], 1000)
    s.add(seq)
    return seq


def step(s: Scheduler, token: int = 7):
    out = s.schedule()
    finished = s.update(out, [token] * sum(e.sample for e in out.scheduled))
    return out, finished


def test_chunked_prefill_respects_token_budget():
    s = make(max_tokens=16)
    a = add(s, "a", 40)
    sizes = []
    for _ in range(3):
        out, _ = step(s)
        sizes.append([(e.seq.request_id, e.num_new_tokens, e.sample) for e in out.scheduled])
    assert sizes == [[("a", 16, False)], [("a", 16, False)], [("a", 8, True)]]
    assert a.num_output_tokens == 1


def test_decodes_and_new_prompts_mix_in_one_step():
    s = make(max_tokens=20)
    a = add(s, "a", 10)
    step(s)  # a prefilled, sampled its first token
    b = add(s, "b", 30, base=100)  # no shared prefix with a
    out, _ = step(s)
    assert [(e.seq.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 1), ("b", 19)]
    assert out.num_tokens == 20
    out, _ = step(s)
    assert [(e.seq.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 1), ("b", 11)]


def test_finished_leave_and_waiting_join_at_once():
    s = make(max_seqs=2)
    a = add(s, "a", 4, max_tokens=1)
    b = add(s, "b", 4, max_tokens=3)
    c = add(s, "c", 4)
    out, finished = step(s)
    assert {e.seq.request_id for e in out.scheduled} == {"a", "b"}  # max_num_seqs=2
    assert finished == [a] and a.finish_reason == "length" and a.block_table == []
    out, _ = step(s)
    assert [e.seq.request_id for e in out.scheduled] == ["b", "c"]


def test_stop_on_eos_and_min_tokens():
    s = make()
    a = add(s, "a", 4, max_tokens=10)
    _, finished = step(s, token=EOS)
    assert finished == [a] and a.finish_reason == "stop"
    b = add(s, "b", 4, max_tokens=10, ignore_eos=True)
    _, finished = step(s, token=EOS)
    assert finished == [] and b.num_output_tokens == 1
    c = add(s, "c", 4, max_tokens=10, stop_token_ids=[9])
    step(s)
    _, finished = step(s, token=9)
    assert c in finished and c.stop_reason == 9


def test_preemption_newest_first_then_recompute():
    # 6 blocks of 4 tokens: two 8-token prompts fill 4, then each grows to 5 blocks.
    s = make(num_blocks=6)
    a = add(s, "a", 8, max_tokens=12)
    b = add(s, "b", 8, max_tokens=12)
    step(s)
    preempted_b = False
    for _ in range(20):
        out, _ = step(s)
        if out.num_preempted:
            preempted_b = b.status is Status.WAITING and a.status is Status.RUNNING
            break
    assert preempted_b, "the newest sequence must yield its blocks"
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.num_preemptions == 1
    # Run to completion: b comes back and recomputes its prompt + generated tokens.
    for _ in range(200):
        if not s.num_unfinished:
            break
        step(s)
    assert a.num_output_tokens == 12 and b.num_output_tokens == 12
    assert s.block_manager.num_free_blocks == 6


def test_abort_frees_everything():
    s = make()
    a = add(s, "a", 10)
    b = add(s, "b", 10)
    step(s)
    assert s.abort("a") == [a]
    assert a.finish_reason == "abort" and a.block_table == []
    out, _ = step(s)
    assert [e.seq for e in out.scheduled] == [b]
    s.abort("b")
    assert s.num_unfinished == 0 and s.block_manager.num_free_blocks == 64


def test_n_samples_share_prompt_blocks():
    s = make()
    p = add(s, "r", 10, n=3)
    step(s)  # parent prefill; children are created now and wait at the head
    assert len(s.waiting) == 2
    out, _ = step(s)
    kids = [e for e in out.scheduled if e.seq is not p]
    assert len(kids) == 2
    for e in kids:
        # two full blocks (8 tokens) came from the cache; only the 2-token tail is computed
        assert e.seq.num_cached_tokens == 8 and e.num_new_tokens == 2
        assert e.seq.block_table[:2] == p.block_table[:2]
    assert s.block_manager.blocks[p.block_table[0]].ref_count == 3
    assert sorted(k.seq.index for k in kids) == [1, 2]


def test_deterministic_across_replicas():
    """Two schedulers fed the same calls make the same plans (SPMD ranks)."""
    plans = []
    for _ in range(2):
        s = make(num_blocks=10, max_tokens=12)
        for i, n in enumerate([9, 3, 14, 5]):
            add(s, str(i), n, max_tokens=6)
        plan = []
        for _ in range(60):
            out, _ = step(s)
            plan.append([(e.seq.seq_id, e.num_new_tokens) for e in out.scheduled])
        plans.append(plan)
    assert plans[0] == plans[1]
