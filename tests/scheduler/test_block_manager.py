from kiln.config import SamplingParams
from kiln.scheduler.block_manager import BlockManager, hash_block, prompt_block_hashes
from kiln.scheduler.request import Sequence

BS = 4


def seq(i: int, tokens: list[int]) -> Sequence:
    return Sequence(i, f"r{i}", tokens, SamplingParams(max_tokens=8), [0], 1000)


def compute(bm: BlockManager, s: Sequence, n: int) -> None:
    """Allocate and 'run' n tokens, as scheduler + engine would."""
    assert bm.allocate(s, n)
    s.num_computed_tokens += n
    bm.commit(s)


def test_hash_chain_depends_on_parent_and_tokens():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert a != hash_block(None, [1, 2, 3, 5])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert prompt_block_hashes(list(range(10)), BS) == [a := hash_block(None, [0, 1, 2, 3]),
                                                       hash_block(a, [4, 5, 6, 7])]


def test_allocate_free_and_ref_counts():
    bm = BlockManager(8, BS)
    s = seq(1, list(range(10)))
    assert bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in s.block_table)
    bm.free(s)
    assert s.block_table == [] and bm.num_free_blocks == 8


def test_all_or_nothing_when_out_of_blocks():
    bm = BlockManager(2, BS)
    s = seq(1, list(range(12)))
    assert not bm.allocate(s, 12)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_prefix_hit_shares_blocks_and_leaves_last_token():
    bm = BlockManager(16, BS)
    a = seq(1, list(range(10)))
    compute(bm, a, 10)  # 2 full blocks committed
    b = seq(2, list(range(8)) + [99, 98, 97])
    hit = bm.match_prefix(b)
    assert hit == a.block_table[:2]
    assert bm.allocate(b, b.num_tokens - 8, hit)
    assert bm.blocks[hit[0]].ref_count == 2
    # A prompt that is exactly cached still recomputes its last block (something to sample from).
    c = seq(3, list(range(8)))
    assert bm.match_prefix(c) == a.block_table[:1]


def test_events_and_lru_eviction_of_freed_cached_blocks():
    bm = BlockManager(4, BS)
    a = seq(1, list(range(8)) + [50])
    compute(bm, a, 9)
    stored = [e for e in bm.take_events() if e[0] == "stored"]
    assert [e[1] for e in stored] == prompt_block_hashes(a.token_ids, BS)
    assert stored[1][2] == stored[0][1]  # parent hash
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.cached) == 2
    # Uncached free blocks are reused first; cached ones only after, a's tail block before its head.
    b = seq(2, [7] * 8)
    assert bm.allocate(b, 8)
    assert bm.take_events() == []
    c = seq(3, [8] * 4)
    assert bm.allocate(c, 4)
    assert bm.take_events() == [("evicted", prompt_block_hashes(a.token_ids, BS)[1])]
    assert len(bm.cached) == 1
    assert len(bm.match_prefix(seq(4, list(range(8)) + [1]))) == 1


def test_cached_free_blocks_count_against_allocation():
    bm = BlockManager(3, BS)
    a = seq(1, list(range(8)) + [1])
    compute(bm, a, 9)
    bm.free(a)
    b = seq(2, list(range(8)) + [2, 3, 4, 5, 6])
    hit = bm.match_prefix(b)
    assert len(hit) == 2
    # needs 2 cached + 2 new = 4 blocks > 3: refuse without touching anything
    assert not bm.allocate(b, 5, hit)
    assert bm.num_free_blocks == 3 and all(bm.blocks[h].ref_count == 0 for h in hit)


def test_prefix_caching_off():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = seq(1, list(range(10)))
    compute(bm, a, 10)
    assert bm.match_prefix(seq(2, list(range(10)))) == [] and not bm.cached
