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


def test_kv_policy_prefers_cached_replica_until_it_is_loaded():
    r = Router(RouterConfig(policy="kv", max_queued_per_replica=10))
    r.set_replicas(["a", "b"])
    h = hashes(list(range(160)))  # 10 blocks
    r.report("a", 0, [("stored", x, None) for x in h[:8]], {})
    assert r.rank(["a", "b"], h) == ["a", "b"]
    r.routed("r0", "a")  # 1 queued vs 0: 0.8 - 0.5 * 1/1 > 0, a still wins
    assert r.rank(["a", "b"], h) == ["a", "b"]
    for i in range(1, 4):  # 4 vs 0: 0.8 - 0.5 * 4/2 < 0, the idle replica wins
        r.routed(f"r{i}", "a")
    assert r.rank(["a", "b"], h) == ["b", "a"]
    r.finished("r1"), r.finished("r2"), r.finished("r3")
    assert r.rank(["a", "b"], h) == ["a", "b"]


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
