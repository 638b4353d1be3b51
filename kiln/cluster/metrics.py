"""Prometheus metrics of the service, with a `replica` label where it applies.

Latencies and token counts are measured at the router (what clients see);
queue sizes, KV usage and prefix-cache counters come from the replicas'
reports and are exported as they were last reported.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class _ReplicaCollector:
    def __init__(self, router) -> None:
        self.router = router

    def collect(self):
        running = GaugeMetricFamily("kiln:num_requests_running", "Requests in the replica's running batch",
                                    labels=["replica"])
        waiting = GaugeMetricFamily("kiln:num_requests_waiting", "Requests waiting in the replica's queue",
                                    labels=["replica"])
        usage = GaugeMetricFamily("kiln:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)",
                                  labels=["replica"])
        routed = GaugeMetricFamily("kiln:num_requests_routed", "Requests the router sent and that are not done",
                                   labels=["replica"])
        hits = CounterMetricFamily("kiln:prefix_cache_hits", "Prompt tokens served from the prefix cache",
                                   labels=["replica"])
        queries = CounterMetricFamily("kiln:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      labels=["replica"])
        steps = CounterMetricFamily("kiln:engine_steps", "Engine steps the replica has run", labels=["replica"])
        step_s = CounterMetricFamily("kiln:engine_step_seconds", "Time the replica's engine spent in steps",
                                     labels=["replica"])
        for replica, load in sorted(self.router.loads.items()):
            running.add_metric([replica], load.running)
            waiting.add_metric([replica], load.waiting)
            usage.add_metric([replica], load.kv_usage)
            routed.add_metric([replica], load.inflight)
            hits.add_metric([replica], load.prefix_hits)
            queries.add_metric([replica], load.prefix_queries)
            steps.add_metric([replica], load.steps)
            step_s.add_metric([replica], load.step_s)
        yield from (running, waiting, usage, routed, hits, queries, steps, step_s)


class Metrics:
    def __init__(self, router) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("kiln:time_to_first_token_seconds", "Time to first token", ["replica"],
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("kiln:inter_token_latency_seconds", "Time between a request's tokens", ["replica"],
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("kiln:e2e_request_latency_seconds", "Request latency, arrival to last token",
                             ["replica"], buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("kiln:prompt_tokens", "Prompt tokens processed", ["replica"], registry=r)
        self.generation_tokens = Counter("kiln:generation_tokens", "Tokens generated", ["replica"], registry=r)
        self.requests = Counter("kiln:request_success", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.rejected = Counter("kiln:requests_rejected", "Requests refused with HTTP 429", registry=r)
        self.errors = Counter("kiln:request_errors", "Requests that ended in an error", ["code"], registry=r)
        r.register(_ReplicaCollector(router))

    def render(self) -> bytes:
        return generate_latest(self.registry)
