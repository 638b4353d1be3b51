"""The router alone: prefix index, scoring, policies, admission, report ordering."""
import pytest

from kiln.cluster.router import Overloaded, PrefixIndex, Router
from kiln.config import RouterConfig
from kiln.scheduler.block_manager import prompt_block_hashes

BS = 16


def hashes(tokens):
    return prompt_block_hashes(tokens, BS)


def test_prefix_index_counts_leading_blocks_only():
    idx = PrefixIndex()
    h = hashes(list(range(64)))  # 4 blocks
    idx.apply("a", [("stored", h[0], None), ("stored", h[1], h[0]), ("stored", h[3], h[2])])
    idx.apply("b", [("stored", h[0], None)])
    assert idx.matched_blocks(h, ["a", "b", "c"]) == {"a": 2, "b": 1, "c": 0}  # a's block 3 is not a prefix
    idx.apply("a", [("evicted", h[1])])
    assert idx.matched_blocks(h, ["a", "b"]) == {"a": 1, "b": 1}
    idx.drop("a")
    assert idx.matched_blocks(h, ["a", "b"]) == {"a": 0, "b": 1}


def _conversation(r: Router, replica: str, blocks: int, seed: int = 0) -> list[int]:
    """A conversation whose history (all but its last two blocks) `replica` caches; its hashes."""
    h = hashes([seed * 100_000 + i for i in range(blocks * BS)])
    r.report(replica, r._next_seq[replica], [("stored", x, None) for x in h[:-2]], {})
    return h


def test_kv_cost_is_prefill_tokens_plus_queued_work():
    r = Router(RouterConfig(policy="kv", decode_cost_tokens=32), block_size=BS)
    r.set_replicas(["a", "b"])
    h = _conversation(r, "a", 50)  # 800 tokens, 768 cached on a
    assert r.rank(["a", "b"], h, "t") == ["a", "b"]
    assert r.loads["a"].inflight == 1 and r.loads["a"].prefill_tokens == 32  # booked at once: 800 - 768
    r.first_token("t")
    assert r.loads["a"].prefill_tokens == 0 and r.loads["a"].inflight == 1
    r.finished("t")
    assert r.loads["a"].inflight == 0


def test_conversation_stays_home_under_moderate_imbalance():
    """Home holds 3 requests, the other replica none: 3 queued requests cost far less than recomputing the
    history, so the conversation stays (the old score, 0.5 * 3/1.5 = 1.0 of load, moved it)."""
    r = Router(RouterConfig(policy="kv"), block_size=BS)
    r.set_replicas(["a", "b"])
    h = _conversation(r, "a", 50)
    for i in range(3):  # three other conversations' later turns on a: short prefills, then decoding
        r.rank(["a", "b"], _conversation(r, "a", 50, seed=i + 1), f"o{i}")
    assert [r.assigned(f"o{i}") for i in range(3)] == ["a"] * 3
    assert r.rank(["a", "b"], h) == ["a", "b"]  # 32 + 3 x 32 queued + 3 x 32 rows < 800 to recompute on b
    for i in range(3):
        r.first_token(f"o{i}")
    assert r.rank(["a", "b"], h) == ["a", "b"]


def test_conversation_moves_when_home_queue_outweighs_recompute():
    r = Router(RouterConfig(policy="kv"), block_size=BS)
    r.set_replicas(["a", "b"])
    h = _conversation(r, "a", 50)
    for i in range(3):  # three cold 800-token prompts sent to a (b was not a candidate then), still in prefill
        r.rank(["a"], hashes([7_000_000 + 1000 * i + j for j in range(800)]), f"c{i}")
    assert r.loads["a"].prefill_tokens == 2400
    assert r.rank(["a", "b"], h) == ["b", "a"]  # a: 32 + 2400 queued + 3 x 32 > b: 800
    for i in range(3):  # their prefills are done: only their decode rows are left
        r.first_token(f"c{i}")
    assert r.rank(["a", "b"], h) == ["a", "b"]
    for i in range(30):  # a long queue of decoding requests outweighs the recompute too
        r.routed(f"d{i}", "a")
    assert r.rank(["a", "b"], h) == ["b", "a"]


def test_cold_prompts_and_ties_go_to_least_loaded():
    r = Router(RouterConfig(policy="kv"))
    r.set_replicas(["a", "b", "c"])
    r.routed("x", "a")
    r.routed("y", "b")
    assert r.rank(["a", "b", "c"], hashes(list(range(40))))[0] == "c"
    h = hashes(list(range(40)))
    for rep in ("a", "c"):
        r.report(rep, 0, [("stored", h[0], None), ("stored", h[1], h[0])], {})
    r.routed("z", "c")
    r.routed("w", "c")  # equal match on a and c; a has less load
    assert r.rank(["a", "b", "c"], h)[0] == "a"


def test_cold_prompt_goes_where_least_work_is_queued():
    """Least loaded in tokens: one request still prefilling a long prompt outweighs two that decode."""
    r = Router(RouterConfig(policy="kv"), block_size=BS)
    r.set_replicas(["a", "b"])
    r.rank(["a", "b"], hashes(list(range(1000, 1800))), "long")  # cold, 800 tokens: to a (a tie, by name)
    assert r.assigned("long") == "a"
    for i in range(2):
        r.routed(f"d{i}", "b")
    cold = hashes(list(range(5000, 5320)))
    assert r.rank(["a", "b"], cold) == ["b", "a"]
    r.first_token("long")
    assert r.rank(["a", "b"], cold) == ["a", "b"]


def test_optimistic_accounting_for_load_policies():
    """Two requests ranked before Serve reports either as routed do not pile onto one replica."""
    for policy in ("kv", "least-loaded"):
        r = Router(RouterConfig(policy=policy), block_size=BS)
        r.set_replicas(["a", "b"])
        first = r.rank(["a", "b"], hashes(list(range(320))), "1")[0]
        second = r.rank(["a", "b"], hashes(list(range(1000, 1320))), "2")[0]
        assert {first, second} == {"a", "b"}, policy
        r.routed("1", first)  # Serve confirms: nothing counts twice
        assert r.loads["a"].inflight == r.loads["b"].inflight == 1
        r.routed("2", first)  # Serve sent it past our first choice: the booking follows
        assert r.loads[first].inflight == 2 and r.loads[second].inflight == 0
        assert r.rank(["a", "b"], hashes(list(range(2000, 2320))), "1")[0] == second  # a retry moves it
        assert r.loads[first].inflight == 1 and r.loads[second].inflight == 1
        for rid in ("1", "2"):
            r.finished(rid)
        assert r.loads["a"].inflight == r.loads["b"].inflight == 0
        assert r.loads["a"].prefill_tokens == r.loads["b"].prefill_tokens == 0


def test_round_robin_and_least_loaded():
    r = Router(RouterConfig(policy="round-robin"))
    r.set_replicas(["a", "b", "c"])
    assert [r.rank(["a", "b", "c"], [])[0] for _ in range(4)] == ["a", "b", "c", "a"]
    r = Router(RouterConfig(policy="least-loaded"))
    r.set_replicas(["a", "b"])
    r.routed("1", "a")
    assert r.rank(["a", "b"], hashes(list(range(40)))) == ["b", "a"]


def test_admission_control():
    r = Router(RouterConfig(max_queued_per_replica=2))
    r.set_replicas(["a", "b"])
    for i, rep in enumerate("aabb"):
        r.routed(str(i), rep)
    with pytest.raises(Overloaded):
        r.admit()
    r.finished("0")
    r.admit()
    assert r.rank(["a", "b"], [])[0] == "a"  # the one with room comes first


def test_admitted_requests_hold_places_until_routed():
    """A burst arrives before Serve has routed any of it: admitted requests count as queued."""
    r = Router(RouterConfig(max_queued_per_replica=2))
    r.set_replicas(["a", "b"])
    for i in range(4):
        r.admit(str(i))
    with pytest.raises(Overloaded):
        r.admit("4")
    r.routed("0", "a")  # routing moves a place from admitted to the replica: still full
    with pytest.raises(Overloaded):
        r.admit("4")
    r.finished("1")  # a request that ends before it was routed gives its place back
    r.admit("4")
    r.rank(["a", "b"], [], "2")  # ranking books it: the place moves from admitted to the replica
    with pytest.raises(Overloaded):
        r.admit("5")
    r.finished("2")
    r.admit("5")


def test_reports_apply_in_sequence_order():
    r = Router(RouterConfig())
    r.set_replicas(["a"])
    h = hashes(list(range(32)))
    r.report("a", 1, [("evicted", h[0])], {"running": 1})
    assert r.index.matched_blocks(h, ["a"])["a"] == 0
    r.report("a", 0, [("stored", h[0], None)], {"running": 5})
    # seq 0 (stored) then seq 1 (evicted): the block is gone, and the newer load stands
    assert r.index.matched_blocks(h, ["a"])["a"] == 0 and r.loads["a"].running == 1


def test_router_hash_matches_block_manager():
    """The router's prompt hashes are the block manager's: a replica's 'stored' events line up."""
    from kiln.config import SamplingParams
    from kiln.scheduler.block_manager import BlockManager
    from kiln.scheduler.request import Sequence

    bm = BlockManager(16, BS)
    tokens = list(range(50))
    seq = Sequence(1, "r", tokens, SamplingParams(), [0], 100)
    bm.allocate(seq, 50)
    seq.num_computed_tokens = 50
    bm.commit(seq)
    r = Router(RouterConfig())
    r.set_replicas(["a"])
    r.report("a", 0, bm.take_events(), {})
    assert r.cached_fraction("a", hashes(tokens)) == 1.0


class _Replica:
    """A replica's block manager, run the way the scheduler runs it: match, allocate, compute, commit, free."""

    def __init__(self, num_blocks: int) -> None:
        from kiln.scheduler.block_manager import BlockManager

        self.bm = BlockManager(num_blocks, BS)
        self.seq = 0
        self.reports = 0

    def serve(self, tokens: list[int]) -> int:
        """Prefill and finish one prompt; the tokens found in the cache."""
        from kiln.config import SamplingParams
        from kiln.scheduler.request import Sequence

        self.seq += 1
        seq = Sequence(self.seq, str(self.seq), tokens, SamplingParams(), [0], 10_000)
        cached = self.bm.match_prefix(seq)
        assert self.bm.allocate(seq, len(tokens) - len(cached) * BS, cached)
        seq.num_computed_tokens = len(tokens)
        self.bm.commit(seq)
        self.bm.free(seq)
        return len(cached) * BS

    def report_to(self, router: Router, name: str) -> None:
        router.report(name, self.reports, self.bm.take_events(), {})
        self.reports += 1


def test_kv_routing_under_cache_pressure_sticks_and_forgets_evictions():
    """Multi-turn conversations over two replicas whose caches cannot hold them all: each conversation stays
    on its replica, and the index holds exactly what each replica's block manager still caches."""
    import random

    rng = random.Random(0)
    r = Router(RouterConfig(policy="kv"))
    replicas = {"a": _Replica(40), "b": _Replica(40)}  # 640 tokens each; the 8 conversations reach 8 x 192
    r.set_replicas(sorted(replicas))
    system = [rng.randrange(1000) for _ in range(32)]
    convs = [system + [rng.randrange(1000) for _ in range(64)] for _ in range(8)]
    home: dict[int, str] = {}
    moved = evicted = 0
    for turn in range(4):
        for c in range(len(convs)):  # a turn of every conversation in flight at once
            if turn:
                convs[c] = convs[c] + [rng.randrange(1000) for _ in range(32)]  # the answer and the next question
            h = hashes(convs[c])
            name = r.rank(sorted(replicas), h)[0]
            r.routed(f"{turn}.{c}", name)
            matched = r.index.matched_blocks(h, [name])[name]
            # What the router counted as cached on that replica is there.
            assert replicas[name].serve(convs[c]) == min(matched, (len(convs[c]) - 1) // BS) * BS
            moved += turn > 0 and home[c] != name
            home[c] = name
            evicted += sum(ev[0] == "evicted" for ev in replicas[name].bm.events)
            replicas[name].report_to(r, name)
            for n, rep in replicas.items():  # no stale entries: every evicted block has left the index
                assert {x for x, s in r.index.holders.items() if n in s} == set(rep.bm.cached)
        for c in range(len(convs)):
            r.finished(f"{turn}.{c}")
    assert evicted > 0  # the caches were under pressure
    assert sorted(home.values()).count("a") == 4  # new conversations were spread by load
    assert moved == 0
