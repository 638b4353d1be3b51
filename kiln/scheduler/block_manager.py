"""Paged KV blocks: allocation, reference counts, automatic prefix caching.

A full block's hash covers its parent's hash and its own tokens, so equal
hashes mean equal prefixes. Blocks whose KV is computed are registered under
their hash; when the last sequence using a block lets go, the block stays
cached in an LRU free queue and is only evicted (its hash forgotten) when the
block is handed out again. Uncached free blocks go to the head of the queue:
they hold nothing worth keeping, so they are reused first.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from kiln.scheduler.request import Sequence


def hash_block(parent: int | None, tokens: list[int]) -> int:
    """Stable across processes (the router recomputes it from the prompt)."""
    h = hashlib.blake2b(digest_size=8)
    h.update((parent or 0).to_bytes(8, "little"))
    h.update(array("i", tokens).tobytes())
    return int.from_bytes(h.digest(), "little")


def prompt_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Hashes of the full blocks of a token list, in order."""
    hashes: list[int] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self._committed: dict[int, int] = {}  # seq id -> full blocks registered so far
        # KV events for the router: ("stored", hash, parent) and ("evicted", hash).
        self.events: list[tuple] = []
        self.prefix_queries = 0  # prompt tokens looked up in the cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by running sequences (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def take_events(self) -> list[tuple]:
        events, self.events = self.events, []
        return events

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """The sequence's full-block hashes, extended to at least `num_blocks`."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of `seq`; changes nothing.

        At least one token is always left to compute, so the last position has
        logits to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        limit = (seq.num_tokens - 1) // self.block_size
        found = []
        for h in self._hashes(seq, limit)[:limit]:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens (after `cached` ones).

        All or nothing: returns False and changes nothing when blocks run out.
        """
        have = len(seq.block_table) + len(cached)
        start = seq.num_computed_tokens + len(cached) * self.block_size
        need = -(-(start + num_new_tokens) // self.block_size) - have
        cached_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        if need > len(self.free_queue) - cached_free:
            return False
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
        seq.block_table.extend(cached)
        for _ in range(max(need, 0)):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                    self.events.append(("evicted", block.hash))
                block.hash = None
            block.ref_count = 1
            seq.block_table.append(block_id)
        if cached:
            self._committed[seq.seq_id] = len(cached)
        return True

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        done = self._committed.get(seq.seq_id, 0)
        full = seq.num_computed_tokens // self.block_size
        if full <= done:
            return
        hashes = self._hashes(seq, full)
        for i in range(done, full):
            h = hashes[i]
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.cached:
                block.hash = h
                self.cached[h] = block.block_id
                self.events.append(("stored", h, hashes[i - 1] if i else None))
        self._committed[seq.seq_id] = full

    def free(self, seq: Sequence) -> None:
        # Reverse order: a sequence's last blocks are evicted before its first,
        # which other prompts are likelier to share.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        seq.block_table = []
        self._committed.pop(seq.seq_id, None)
