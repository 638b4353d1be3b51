"""KV-aware choice of replica: a prefix index over the replicas' KV events, and load.

Replicas report which KV blocks they stored and evicted, by the same chained
block hash their block manager uses. The router hashes each prompt the same
way and counts, per replica, how many of its leading blocks that replica
holds. `kv` then sends the prompt where its first token costs the least work,
counted in prompt tokens (as NVIDIA Dynamo's KV router and SGLang's
cache-aware router do):

    cost(r) = prompt tokens not cached on r          (the prefill it would do there)
            + queued prefill tokens on r             (uncached tokens of requests sent there, no first token yet)
            + decode_cost_tokens * requests on r     (each in-flight request takes a row of every step)

With in-flight batching a few queued requests cost far less than recomputing a
long cached history, so a conversation stays on its replica until that
replica's queue outweighs the recompute. Lowest cost first; ties, and cold
prompts (whose prefill is the same everywhere), go to the least loaded;
replicas at or over RouterConfig.kv_usage_limit go after the others.
`least-loaded` and `round-robin` are there to compare against.

The router counts its own choices at once (optimistic accounting): `rank` with
a request id books the request on its first choice before Serve sends it, so
requests close together see each other; `routed` corrects the booking if Serve
sent it elsewhere, `first_token` ends its queued prefill, `finished` frees it.

Pure Python, no Ray: the Serve glue (deployment.py) asks `rank()`.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass

from kiln.config import RouterConfig


class Overloaded(Exception):
    """Every replica's queue is full."""


@dataclass
class ReplicaLoad:
    inflight: int = 0  # requests this router sent (or is sending) there that have not finished
    prefill_tokens: int = 0  # their uncached prompt tokens, while they have no first token
    running: int = 0  # as last reported by the replica
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_hits: int = 0
    prefix_queries: int = 0
    steps: int = 0  # engine steps the replica has taken, and the seconds spent in them
    step_s: float = 0.0


class PrefixIndex:
    """block hash -> replicas holding it."""

    def __init__(self) -> None:
        self.holders: dict[int, set[str]] = defaultdict(set)

    def apply(self, replica: str, events: list) -> None:
        for ev in events:
            if ev[0] == "stored":
                self.holders[ev[1]].add(replica)
            elif ev[0] == "evicted":
                s = self.holders.get(ev[1])
                if s is not None:
                    s.discard(replica)
                    if not s:
                        del self.holders[ev[1]]

    def drop(self, replica: str) -> None:
        for h in [h for h, s in self.holders.items() if replica in s]:
            self.apply(replica, [("evicted", h)])

    def matched_blocks(self, hashes: list[int], replicas: list[str]) -> dict[str, int]:
        """Per replica: how many of the prompt's leading blocks it holds (a prefix: stop at the first miss)."""
        out = dict.fromkeys(replicas, 0)
        alive = set(replicas)
        for h in hashes:
            alive &= self.holders.get(h, set())
            if not alive:
                break
            for r in alive:
                out[r] += 1
        return out


@dataclass
class _Booking:
    replica: str
    prefill: int  # uncached prompt tokens counted in the replica's prefill_tokens (0 once the first token is out)


class Router:
    def __init__(self, config: RouterConfig, block_size: int = 16) -> None:
        self.config = config
        self.block_size = block_size  # tokens per prompt hash: the replicas' KV block size
        self.index = PrefixIndex()
        self.loads: dict[str, ReplicaLoad] = defaultdict(ReplicaLoad)
        self.replicas: list[str] = []
        self._rr = itertools.count()
        self._assigned: dict[str, _Booking] = {}  # request id -> where it is booked
        self._admitted: set[str] = set()  # admitted, not yet routed: they hold a place too
        # Reports arrive over concurrent calls; apply each replica's in sequence order.
        self._next_seq: dict[str, int] = defaultdict(int)
        self._held: dict[str, dict[int, tuple[list, dict]]] = defaultdict(dict)

    # -- state from the replicas ---------------------------------------------

    def set_replicas(self, replicas: list[str]) -> None:
        for gone in set(self.replicas) - set(replicas):
            self.index.drop(gone)
            self.loads.pop(gone, None)
            self._next_seq.pop(gone, None)
            self._held.pop(gone, None)
        self.replicas = sorted(replicas)

    def report(self, replica: str, seq: int, kv_events: list, load: dict) -> None:
        """A replica's numbered report; out-of-order ones wait for the gap to fill."""
        held = self._held[replica]
        held[seq] = (kv_events, load)
        while self._next_seq[replica] in held:
            events, ld = held.pop(self._next_seq[replica])
            self._next_seq[replica] += 1
            self.index.apply(replica, events)
            self.update_load(replica, ld)
        if len(held) > 1000:  # a lost report: resynchronise rather than stall forever
            self._next_seq[replica] = min(held)

    def update_load(self, replica: str, load: dict) -> None:
        if load:
            r = self.loads[replica]
            r.running, r.waiting = load.get("running", 0), load.get("waiting", 0)
            r.kv_usage = load.get("kv_usage", 0.0)
            r.prefix_hits, r.prefix_queries = load.get("prefix_hits", 0), load.get("prefix_queries", 0)
            r.steps, r.step_s = load.get("steps", 0), load.get("step_s", 0.0)

    def routed(self, request_id: str, replica: str) -> None:
        """Serve sent the request to `replica` (usually where `rank` booked it already)."""
        self._admitted.discard(request_id)
        booking = self._assigned.get(request_id)
        if booking is None or booking.replica != replica:
            # Not ranked with its id, or sent past our first choice: its prefill there is unknown.
            self._book(request_id, replica, 0)

    def assigned(self, request_id: str) -> str | None:
        booking = self._assigned.get(request_id)
        return booking.replica if booking is not None else None

    def first_token(self, request_id: str) -> None:
        """The request's prefill is done: it no longer queues prefill work on its replica."""
        booking = self._assigned.get(request_id)
        if booking is not None and booking.prefill:
            load = self.loads.get(booking.replica)
            if load is not None:
                load.prefill_tokens = max(0, load.prefill_tokens - booking.prefill)
            booking.prefill = 0

    def finished(self, request_id: str) -> None:
        self._admitted.discard(request_id)
        self._unbook(request_id)

    def _book(self, request_id: str, replica: str, prefill: int) -> None:
        self._unbook(request_id)
        self._assigned[request_id] = _Booking(replica, prefill)
        load = self.loads[replica]
        load.inflight += 1
        load.prefill_tokens += prefill

    def _unbook(self, request_id: str) -> None:
        booking = self._assigned.pop(request_id, None)
        load = self.loads.get(booking.replica) if booking is not None else None
        if load is not None:  # (a replica that is gone has no load left to give back)
            load.inflight = max(0, load.inflight - 1)
            load.prefill_tokens = max(0, load.prefill_tokens - booking.prefill)

    # -- decisions -------------------------------------------------------------

    def admit(self, request_id: str | None = None) -> None:
        """Raise Overloaded when no replica can take another request.

        Serve routes a request a little after it is admitted; until then (`routed` or `finished`)
        an admitted `request_id` counts against the free places, so a burst cannot overfill them.
        """
        cap = self.config.max_queued_per_replica
        if self.replicas:
            free = sum(max(0, cap - self.loads[r].inflight) for r in self.replicas)
            if free <= len(self._admitted):
                raise Overloaded(f"all {len(self.replicas)} replicas have {cap} requests queued")
        if request_id is not None:
            self._admitted.add(request_id)

    def rank(self, candidates: list[str], hashes: list[int], request_id: str | None = None,
             num_tokens: int | None = None) -> list[str]:
        """Candidates, best first. Full replicas go last (Serve still needs somewhere to send).

        With `request_id`, the request is booked on the first choice at once (see the module doc);
        `num_tokens` is the prompt's length (default: its full blocks).
        """
        if not candidates:
            return []
        if request_id is not None:  # ranked again (Serve retries): it must not count against itself
            self._unbook(request_id)
        order, uncached = self._order(candidates, hashes, num_tokens)
        if request_id is not None:
            self._admitted.discard(request_id)
            self._book(request_id, order[0], uncached(order[0]))
        return order

    def _order(self, candidates: list[str], hashes: list[int], num_tokens: int | None):
        cfg = self.config
        cap = cfg.max_queued_per_replica
        loads = self.loads
        open_ = [r for r in candidates if loads[r].inflight < cap] or list(candidates)
        full = [r for r in candidates if r not in open_]
        prompt = num_tokens if num_tokens is not None else len(hashes) * self.block_size
        if cfg.policy == "round-robin":
            order = sorted(open_)
            k = next(self._rr) % len(order)
            return order[k:] + order[:k] + full, lambda r: prompt
        if cfg.policy == "least-loaded" or not hashes:
            by_load = sorted(open_, key=lambda r: (loads[r].inflight, loads[r].kv_usage, r))
            return by_load + full, lambda r: prompt
        matched = self.index.matched_blocks(hashes, open_)

        def uncached(r: str) -> int:
            # The replica always computes the prompt's last token, even when every block is cached.
            return max(1, prompt - matched.get(r, 0) * self.block_size)

        def cost(r: str) -> float:
            load = loads[r]
            return uncached(r) + load.prefill_tokens + cfg.decode_cost_tokens * load.inflight

        key = {r: (loads[r].kv_usage >= cfg.kv_usage_limit, cost(r), loads[r].inflight, loads[r].kv_usage, r)
               for r in open_}
        return sorted(open_, key=key.__getitem__) + full, uncached

    def cached_fraction(self, replica: str, hashes: list[int]) -> float:
        return self.index.matched_blocks(hashes, [replica])[replica] / len(hashes) if hashes else 0.0


# The ingress process registers its router here; the Serve request router (which
# Ray constructs inside that same process) finds it by application name.
_ROUTERS: dict[str, Router] = {}


def register(app_name: str, router: Router) -> None:
    _ROUTERS[app_name] = router


def lookup(app_name: str) -> Router | None:
    return _ROUTERS.get(app_name)
