"""The Ray Serve application: one ingress (the central router and HTTP front)
and a replica deployment whose every replica owns a TP x PP group of GPUs.

    app = build_app(ServeConfig(...))        # or, from a Serve config file:
    import_path: kiln.cluster.deployment:app_builder   args: ServeConfig.to_dict()

A replica runs the engine loop in a thread and streams msgpack chunks back;
it reports its KV events and load to the ingress in numbered messages. The
ingress's Router ranks replicas for each request, and Serve's request-router
hook (KilnRequestRouter) follows that ranking.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque

from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kiln.cluster import router as router_registry
from kiln.cluster.protocol import Chunk, Report, pack_request, unpack_request
from kiln.cluster.router import Router
from kiln.cluster.server import OpenAIServer, build_fastapi
from kiln.config import SamplingParams, ServeConfig
from kiln.workers.loaders import resolve_model

log = logging.getLogger("kiln.serve")

INGRESS = "KilnIngress"
REPLICA = "KilnReplica"
REPORT_EVERY_S = 0.5  # load reports while idle; KV events go out after every step that has some


def default_model_name(cfg: ServeConfig) -> str:
    if cfg.model_name:
        return cfg.model_name
    model = cfg.engine.model
    if model is None:
        return "SmolLM2-135M-Instruct"
    base = os.path.basename(os.path.normpath(model))
    return base[:-5] if base.endswith(".gguf") else base


class KilnRequestRouter(RequestRouter):
    """Serve's routing hook: rank replicas with the ingress's Router (same process)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        router = router_registry.lookup(self.app_name)
        route = (pending_request.kwargs.get("route") if pending_request is not None else None) or {}
        if router is None or not candidate_replicas:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        router.set_replicas([rid.unique_id for rid in self.curr_replicas])
        if route.get("sticky"):  # an abort must reach the replica that runs the request
            target = router.assigned(route["id"])
            return [[by_id[target]]] if target in by_id else [candidate_replicas]
        return [[by_id[r]] for r in router.rank(list(by_id), route.get("hashes") or [])]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        router = router_registry.lookup(self.app_name)
        route = pending_request.kwargs.get("route") or {}
        if router is not None and route.get("id") and not route.get("sticky"):
            router.routed(route["id"], replica_id.unique_id)


class KilnReplica:
    """One model replica: an Executor (local, or Ray rank actors for TP x PP) and its loop."""

    def __init__(self, config: dict) -> None:
        cfg = ServeConfig.from_dict(config)
        self.cfg = cfg
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        engine = cfg.engine
        q = engine.quant
        if not engine.random_weights and (q.mode != "none" or q.kv_cache_dtype == "fp8"
                                          or engine.parallel.world_size > 1):
            # A checkpoint to quantize or split: build (or reuse) the engine directory first.
            from kiln.workers.builder import cached_engine

            source = resolve_model(engine.model)
            if source.engine is None:
                engine.model = cached_engine(engine, source)
        if engine.parallel.world_size > 1:
            from ray.util.placement_group import get_current_placement_group

            from kiln.workers.worker import RayExecutor

            # This actor holds bundle 0 of the replica's placement group; the ranks take the rest.
            self.executor = RayExecutor(engine, resolve_model(engine.model, engine.random_weights),
                                        placement_group=get_current_placement_group(), bundle_offset=1)
        else:
            from kiln.workers.executor import Executor

            self.executor = Executor(engine)
        self._ingress = serve.get_deployment_handle(INGRESS, app_name=cfg.app_name)
        self._cv = threading.Condition()
        self._inbox: list[tuple] = []
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._remaining: dict[str, int] = {}
        self._error: str | None = None
        self._stop = False
        self._seq = 0
        self._last_report = 0.0
        self._last_load: dict = {}
        self._sent: deque = deque(maxlen=32)  # keep report responses referenced until sent
        self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
        self._thread.start()

    # -- requests (called by the ingress through Serve) ----------------------------

    async def generate(self, request: bytes, route: dict | None = None):
        """Stream msgpack chunks of sampled tokens for one request."""
        request_id, prompt, params = unpack_request(request)
        queue: asyncio.Queue = asyncio.Queue()
        with self._cv:
            if self._error is not None:
                yield Chunk(self.replica_id, error={"status": 503, "message": self._error}).pack()
                return
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
            self._inbox.append(("add", request_id, prompt, params))
            self._cv.notify()
        finished = False
        try:
            while True:
                chunk, finished = await queue.get()
                yield chunk.pack()
                if finished:
                    return
        finally:
            with self._cv:
                self._queues.pop(request_id, None)
                if not finished:  # the client went away (or the stream was cancelled): free its work
                    self._inbox.append(("abort", request_id, None))
                    self._cv.notify()

    async def abort(self, request_id: str, index: int | None = None, route: dict | None = None) -> None:
        with self._cv:
            self._inbox.append(("abort", request_id, index))
            self._cv.notify()

    def check_health(self) -> None:
        """Serve calls this periodically; raising restarts the replica."""
        if self._error is not None:
            raise RuntimeError(self._error)
        if not getattr(self.executor, "healthy", True):
            raise RuntimeError(getattr(self.executor, "error", None) or "engine unhealthy")

    def __del__(self) -> None:
        self._stop = True
        if hasattr(self.executor, "shutdown"):
            self.executor.shutdown()

    # -- the engine thread ---------------------------------------------------------

    def _post(self, request_id: str, chunk: Chunk, finished: bool) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, (chunk, finished))

    def _loop(self) -> None:
        ex = self.executor
        while not self._stop:
            with self._cv:
                if not self._inbox and not ex.has_unfinished():
                    self._cv.wait(timeout=REPORT_EVERY_S)
                inbox, self._inbox = self._inbox, []
            for item in inbox:
                if item[0] == "add":
                    _, rid, prompt, params = item
                    try:
                        ex.add_request(rid, prompt, params)
                        self._remaining[rid] = params.n
                    except ValueError as e:
                        with self._cv:
                            self._post(rid, Chunk(self.replica_id, error={"status": 400, "message": str(e)}), True)
                elif item[1] in self._remaining:
                    ex.abort_request(item[1], item[2])
                    if item[2] is None:  # the whole request: nobody waits for its stream any more
                        self._remaining.pop(item[1], None)
            if ex.has_unfinished():
                try:
                    events, aborted = ex.step()
                except Exception as e:  # a failed collective, a dead rank: fail everything, report unhealthy
                    self._fail(f"replica {self.replica_id}: {e}")
                    return
                self._deliver(events, aborted)
            self._report()

    def _deliver(self, events, aborted) -> None:
        by_request: dict[str, Chunk] = {}
        for ev in events:
            if ev.request_id not in self._remaining:
                continue
            chunk = by_request.setdefault(ev.request_id, Chunk(self.replica_id))
            chunk.events.append(ev.pack())
            if ev.finished:
                self._remaining[ev.request_id] = self._remaining.get(ev.request_id, 1) - 1
        for rid, index in aborted:
            if rid not in self._remaining:
                continue
            by_request.setdefault(rid, Chunk(self.replica_id)).aborted.append([rid, index])
            self._remaining[rid] = self._remaining.get(rid, 1) - 1
        load = self._load()
        with self._cv:
            for rid, chunk in by_request.items():
                chunk.load = load
                done = self._remaining.get(rid, 0) <= 0
                if done:
                    self._remaining.pop(rid, None)
                self._post(rid, chunk, done)

    def _load(self) -> dict:
        s = self.executor.last_stats
        return {"running": s.get("num_running", 0), "waiting": s.get("num_waiting", 0),
                "kv_usage": s.get("kv_cache_usage", 0.0), "prefix_hits": s.get("prefix_cache_hits", 0),
                "prefix_queries": s.get("prefix_cache_queries", 0)}

    def _report(self) -> None:
        kv = [list(e) for e in self.executor.take_kv_events()]
        now = time.monotonic()
        load = self._load()
        if not kv and (now - self._last_report < REPORT_EVERY_S or (load == self._last_load and
                                                                    now - self._last_report < 10)):
            return
        self._last_report, self._last_load = now, load
        report = Report(self.replica_id, self._seq, kv, load)
        self._seq += 1
        self._sent.append(self._ingress.report.remote(report.pack()))

    def _fail(self, reason: str) -> None:
        log.error("%s", reason)
        with self._cv:
            self._error = reason
            for rid in list(self._queues):
                self._post(rid, Chunk(self.replica_id, error={"status": 503, "message": reason}), True)


@serve.ingress()
class KilnIngress:
    """The central router and HTTP front (one replica: it owns the prefix index)."""

    def __init__(self, replicas: DeploymentHandle, config: dict) -> None:
        cfg = ServeConfig.from_dict(config)
        # On Kubernetes the key comes from a Secret through the environment, never the config.
        cfg.api_key = cfg.api_key or os.environ.get("KILN_API_KEY") or None
        self.cfg = cfg
        source = resolve_model(cfg.engine.model, cfg.engine.random_weights)
        if source.tokenizer is None:
            raise ValueError("serving needs a tokenizer; random-weight presets have none (use an HF directory)")
        self.router = Router(cfg.router)
        router_registry.register(cfg.app_name, self.router)
        self.replicas = replicas
        max_len = cfg.engine.scheduler.max_model_len or source.config.max_position_embeddings
        self.server = OpenAIServer(self, source.tokenizer, cfg, default_model_name(cfg), max_len, self.router)

    def __serve_build_asgi_app__(self):
        return build_fastapi(self.server)

    async def report(self, data: bytes) -> None:
        r = Report.unpack(data)
        self.router.report(r.replica, r.seq, r.kv, r.load)

    # -- Backend for OpenAIServer ----------------------------------------------------

    async def stream(self, request_id: str, prompt: list[int], params: SamplingParams, hashes: list[int]):
        gen = self.replicas.options(stream=True).generate.remote(
            pack_request(request_id, prompt, params), route={"id": request_id, "hashes": hashes})
        finished = False
        try:
            async for data in gen:
                yield Chunk.unpack(data)
            finished = True
        finally:
            if not finished:
                gen.cancel()  # reaches the replica's generator, which aborts the request

    async def abort(self, request_id: str, index: int | None) -> None:
        await self.replicas.abort.remote(request_id, index, route={"id": request_id, "sticky": True})

    async def ready(self) -> tuple[bool, dict]:
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self.cfg.app_name)
        dep = app.deployments.get(REPLICA) if app else None
        if dep is None:
            return False, {"replicas": {}}
        states = {k.value if hasattr(k, "value") else str(k): v for k, v in dep.replica_states.items()}
        running = states.get("RUNNING", 0)
        # Ready when the configured replicas run; replicas that autoscaling is adding do not count
        # (the deployment reports UPSCALING meanwhile, and the service keeps serving).
        want = self.cfg.min_replicas if self.cfg.autoscaling and self.cfg.min_replicas else self.cfg.num_replicas
        ok = dep.status.value not in ("UNHEALTHY", "DEPLOY_FAILED") and running >= max(1, want)
        return ok, {"replicas": states, "deployment": dep.status.value}


def autoscaling_config(cfg: ServeConfig) -> AutoscalingConfig:
    """Ray Serve replica autoscaling for `cfg` (replicas follow ongoing requests)."""
    return AutoscalingConfig(
        min_replicas=cfg.min_replicas if cfg.min_replicas is not None else cfg.num_replicas,
        initial_replicas=cfg.num_replicas,
        max_replicas=cfg.max_replicas or cfg.num_replicas,
        target_ongoing_requests=cfg.target_ongoing_requests,
        upscale_delay_s=cfg.upscale_delay_s, downscale_delay_s=cfg.downscale_delay_s)


def _replica_options(cfg: ServeConfig) -> dict:
    engine = cfg.engine
    world = engine.parallel.world_size
    gpu = engine.device != "cpu" and _cluster_has_gpus()
    opts: dict = {"max_ongoing_requests": cfg.router.max_queued_per_replica + engine.scheduler.max_num_seqs,
                  "request_router_config": RequestRouterConfig(request_router_class=KilnRequestRouter),
                  "health_check_period_s": 5, "graceful_shutdown_timeout_s": 30,
                  "logging_config": {"enable_access_log": False}}
    if world > 1:
        # Bundle 0: this replica's actor; bundles 1..world: its ranks, packed on one node for TP.
        rank = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 0.01}
        opts["placement_group_bundles"] = [{"CPU": 0.1}] + [dict(rank) for _ in range(world)]
        opts["placement_group_strategy"] = "STRICT_PACK" if engine.parallel.tensor_parallel_size > 1 else "PACK"
        opts["ray_actor_options"] = {"num_cpus": 0.1}
    else:
        opts["ray_actor_options"] = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 0.01}
    if cfg.autoscaling:
        opts["autoscaling_config"] = autoscaling_config(cfg)
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(cfg: ServeConfig):
    """The Serve application for `cfg` (what `serve.run` takes)."""
    replica = serve.deployment(KilnReplica, name=REPLICA, **_replica_options(cfg))
    ingress = serve.deployment(KilnIngress, name=INGRESS, num_replicas=1, max_ongoing_requests=100_000,
                               ray_actor_options={"num_cpus": 0.01}, logging_config={"enable_access_log": False})
    return ingress.bind(replica.bind(cfg.to_dict()), cfg.to_dict())


def app_builder(args: dict):
    """Entry for Serve config files: `import_path: kiln.cluster.deployment:app_builder`, `args:` a ServeConfig dict."""
    return build_app(ServeConfig.from_dict(args))
