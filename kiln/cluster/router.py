"""KV-aware choice of replica: a prefix index over the replicas' KV events, and load.

Replicas report which KV blocks they stored and evicted, by the same chained
block hash their block manager uses. The router hashes each prompt the same
way and counts, per replica, how many of its leading blocks that replica
holds. A replica's score is that cached fraction against its queue (relative
to the other replicas') and KV usage, with the weights in RouterConfig; cold
prompts and ties go to the least loaded.
`least-loaded` and `round-robin` are there to compare against.

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
    inflight: int = 0  # requests this router sent there that have not finished
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


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.index = PrefixIndex()
        self.loads: dict[str, ReplicaLoad] = defaultdict(ReplicaLoad)
        self.replicas: list[str] = []
        self._rr = itertools.count()
        self._assigned: dict[str, str] = {}  # request id -> replica
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
        self._admitted.discard(request_id)
        if request_id not in self._assigned:
            self._assigned[request_id] = replica
            self.loads[replica].inflight += 1

    def assigned(self, request_id: str) -> str | None:
        return self._assigned.get(request_id)

    def finished(self, request_id: str) -> None:
        self._admitted.discard(request_id)
        replica = self._assigned.pop(request_id, None)
        if replica is not None:
            self.loads[replica].inflight = max(0, self.loads[replica].inflight - 1)

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

    def rank(self, candidates: list[str], hashes: list[int]) -> list[str]:
        """Candidates, best first. Full replicas go last (Serve still needs somewhere to send)."""
        if not candidates:
            return []
        cfg = self.config
        cap = cfg.max_queued_per_replica
        open_ = [r for r in candidates if self.loads[r].inflight < cap] or list(candidates)
        full = [r for r in candidates if r not in open_]
        if cfg.policy == "round-robin":
            order = sorted(open_)
            k = next(self._rr) % len(order)
            return order[k:] + order[:k] + full
        by_load = sorted(open_, key=lambda r: (self.loads[r].inflight, self.loads[r].kv_usage, r))
        if cfg.policy == "least-loaded" or not hashes:
            return by_load + full
        matched = self.index.matched_blocks(hashes, open_)
        if not any(matched.values()):
            return by_load + full  # a cold prompt: balance load

        # Load counts relative to the others: requests above the least-loaded replica, in units
        # of the mean queue. A cached prefix saves one prefill; a long queue costs many.
        floor = min(self.loads[r].inflight for r in open_)
        mean = sum(self.loads[r].inflight for r in open_) / len(open_)

        def score(r: str) -> float:
            load = self.loads[r]
            return (cfg.prefix_weight * matched[r] / len(hashes)
                    - cfg.load_weight * (load.inflight - floor) / max(1.0, mean)
                    - cfg.kv_usage_weight * load.kv_usage)

        # Stable sort over the load order: equal scores fall back to the least loaded.
        return sorted(by_load, key=score, reverse=True) + full

    def cached_fraction(self, replica: str, hashes: list[int]) -> float:
        return self.index.matched_blocks(hashes, [replica])[replica] / len(hashes) if hashes else 0.0


# The ingress process registers its router here; the Serve request router (which
# Ray constructs inside that same process) finds it by application name.
_ROUTERS: dict[str, Router] = {}


def register(app_name: str, router: Router) -> None:
    _ROUTERS[app_name] = router


def lookup(app_name: str) -> Router | None:
    return _ROUTERS.get(app_name)
