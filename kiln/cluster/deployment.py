"""The Ray Serve application: one ingress (the central router and HTTP front)
and a replica deployment whose every replica owns a TP x PP group of GPUs.

    app = build_app(ServeConfig(...))        # or, from a Serve config file:
    import_path: kiln.cluster.deployment:app_builder   args: ServeConfig.to_dict()

A replica runs the engine loop in a thread. Its tokens go back to the ingress
multiplexed: one output stream per (ingress, replica) pair carries msgpack
chunks of all that ingress's requests (streams.py); each request's own call
only reports acceptance, errors and the end. A replica reports its KV events
and load to the ingress in numbered messages. The
ingress's Router ranks replicas for each request, and Serve's request-router
hook (KilnRequestRouter) follows that ranking.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque

from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kiln.cluster import router as router_registry
from kiln.cluster.protocol import Chunk, Report, pack_request, unpack_request
from kiln.cluster.router import Router
from kiln.cluster.streams import Demux, Outbox
from kiln.cluster.server import OpenAIServer, build_fastapi
from kiln.config import SamplingParams, ServeConfig
from kiln.workers.loaders import resolve_model

log = logging.getLogger("kiln.serve")

INGRESS = "KilnIngress"
REPLICA = "KilnReplica"
SWITCH_INTERVAL_S = 0.0005
REPORT_EVERY_S = 0.5  # load reports while idle
KV_REPORT_EVERY_S = 0.05  # KV events go out at most this often (blocks fill every few steps while decoding)
ORPHAN_CHECK_S = 10.0  # a request whose output nobody has read for ORPHAN_AFTER_S is aborted
ORPHAN_AFTER_S = 60.0


def _detached(call, *args, **kwargs):
    """Make a Serve handle call outside the HTTP request's context. Serve gives calls made in that
    context the request's internal id, and two concurrent ones (the prompts of one completions call)
    then collide in its router's bookkeeping, where one is never routed; we cancel our calls ourselves."""
    return contextvars.Context().run(call, *args, **kwargs)


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
        if route.get("replica"):  # a replica's output stream; if that replica is gone, any one refuses it
            target = by_id.get(route["replica"])
            return [[target]] if target is not None else [candidate_replicas]
        router.set_replicas([rid.unique_id for rid in self.curr_replicas])
        if route.get("sticky"):  # an abort must reach the replica that runs the request
            target = router.assigned(route["id"])
            return [[by_id[target]]] if target in by_id else [candidate_replicas]
        ranked = router.rank(list(by_id), route.get("hashes") or [], route.get("id"), route.get("tokens"))
        return [[by_id[r]] for r in ranked]

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
        if not engine.random_weights and (q.quantizes() or engine.parallel.world_size > 1):
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
        self._outbox = Outbox(self.replica_id)  # lives on the event loop that runs generate/outputs
        try:  # Serve builds replicas on their event loop; the engine thread posts its output there
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._remaining: dict[str, int] = {}  # engine thread: outputs each request has still to finish
        self._error: str | None = None
        self._stop = False
        self._seq = 0
        self._last_report = 0.0
        self._last_load: dict = {}
        self._kv: list = []  # KV events not yet reported
        self._steps, self._step_s = 0, 0.0  # engine steps taken and the time in them (the step-time metric)
        self._sent: deque = deque(maxlen=32)  # keep report responses referenced until sent
        # The engine thread shares the GIL with Serve's threads. When it wakes (a step's tokens
        # are on the host) it may wait for the holder's switch interval (default 5 ms, a GPU
        # step's worth) before it can plan the next step; 0.5 ms bounds that wait.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._loop_thread, name="kiln-engine", daemon=True)
        self._thread.start()

    # -- requests (called by the ingress through Serve) ----------------------------

    async def generate(self, request: bytes, channel: str = "", route: dict | None = None):
        """Run one request. Yields an empty chunk once accepted (its tokens go out on `channel`'s
        output stream, see `outputs`), a chunk with an error if it fails, and ends when its output is out."""
        request_id, prompt, params = unpack_request(request)
        self._loop = asyncio.get_running_loop()
        if self._error is not None:
            yield Chunk(self.replica_id, error={"status": 503, "message": self._error}).pack()
            return
        try:
            self.executor.validate(prompt, params)
        except ValueError as e:
            yield Chunk(self.replica_id, error={"status": 400, "message": str(e)}).pack()
            return
        done = self._outbox.register(request_id, channel)
        with self._cv:
            self._inbox.append(("add", request_id, prompt, params))
            self._cv.notify()
        finished = False
        try:
            yield Chunk(self.replica_id).pack()
            while True:
                try:
                    error = await asyncio.wait_for(asyncio.shield(done), ORPHAN_CHECK_S)
                    break
                except asyncio.TimeoutError:
                    if self._outbox.orphaned(request_id, ORPHAN_AFTER_S):
                        log.warning("request %s: nobody has read its output for %ss; aborting it",
                                    request_id, ORPHAN_AFTER_S)
                        return
            finished = True
            if error is not None:
                yield Chunk(self.replica_id, error=error).pack()
        finally:
            if not finished:  # the client went away (or the stream was cancelled): free its work
                self._outbox.drop(request_id)
                with self._cv:
                    self._inbox.append(("abort", request_id, None))
                    self._cv.notify()

    async def outputs(self, channel: str, replica: str, route: dict | None = None):
        """The token stream of every request from one ingress (`channel`), one msgpack Chunk per batch."""
        if replica != self.replica_id:  # the replica asked for is gone and Serve sent this elsewhere
            raise ValueError(f"replica {replica} is not running (this is {self.replica_id})")
        if self._error is not None:
            raise RuntimeError(self._error)
        self._loop = asyncio.get_running_loop()
        async for data in self._outbox.stream(channel):
            yield data

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
    # It touches no asyncio state: each step's output goes to the event loop in one call.

    def _post(self, fn, *args) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(fn, *args)

    def _loop_thread(self) -> None:
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
                        self._post(self._outbox.fail, rid, {"status": 400, "message": str(e)})
                elif item[1] in self._remaining:
                    ex.abort_request(item[1], item[2])
                    if item[2] is None:  # the whole request: nobody waits for its stream any more
                        self._remaining.pop(item[1], None)
            if ex.has_unfinished():
                t0 = time.perf_counter()
                try:
                    events, aborted = ex.step()
                except Exception as e:  # a failed collective, a dead rank: fail everything, report unhealthy
                    self._fail(f"replica {self.replica_id}: {e}")
                    return
                self._steps += 1
                self._step_s += time.perf_counter() - t0
                self._deliver(events, aborted)
            self._report()

    def _deliver(self, events, aborted) -> None:
        remaining = self._remaining
        rows, gone, done = [], [], []

        def finish_one(rid: str) -> None:
            left = remaining[rid] - 1
            if left > 0:
                remaining[rid] = left
            else:
                del remaining[rid]
                done.append(rid)

        for ev in events:
            if ev.request_id in remaining:
                rows.append(ev.pack())
                if ev.finished:
                    finish_one(ev.request_id)
        for rid, index in aborted:
            if rid in remaining:
                gone.append([rid, index])
                finish_one(rid)
        if rows or gone:
            self._post(self._outbox.publish, rows, gone, done)

    def _load(self) -> dict:
        s = self.executor.last_stats
        return {"running": s.get("num_running", 0), "waiting": s.get("num_waiting", 0),
                "kv_usage": s.get("kv_cache_usage", 0.0), "prefix_hits": s.get("prefix_cache_hits", 0),
                "prefix_queries": s.get("prefix_cache_queries", 0), "steps": self._steps, "step_s": self._step_s}

    def _report(self) -> None:
        self._kv.extend(self.executor.take_kv_events())
        now = time.monotonic()
        since = now - self._last_report
        if since < KV_REPORT_EVERY_S:  # while decoding, blocks fill every few steps: batch their events
            return
        load = self._load()
        if not self._kv and (since < REPORT_EVERY_S or (load == self._last_load and since < 10)):
            return
        self._last_report, self._last_load = now, load
        report = Report(self.replica_id, self._seq, [list(e) for e in self._kv], load)
        self._kv = []
        self._seq += 1
        if self._loop is not None:  # the event loop makes the Serve call: the engine thread goes on stepping
            self._post(self._send_report, report.pack())
        else:
            self._send_report(report.pack())

    def _send_report(self, data: bytes) -> None:
        self._sent.append(self._ingress.report.remote(data))

    def _fail(self, reason: str) -> None:
        log.error("%s", reason)
        self._error = reason
        self._post(self._outbox.fail_all, {"status": 503, "message": reason})


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
        self.router = Router(cfg.router, cfg.engine.cache.block_size)
        router_registry.register(cfg.app_name, self.router)
        self.replicas = replicas
        self.channel = uuid.uuid4().hex  # names this ingress to the replicas' output streams
        self.demux = Demux(self._open_outputs)
        max_len = cfg.engine.scheduler.max_model_len or source.config.max_position_embeddings
        self.server = OpenAIServer(self, source.tokenizer, cfg, default_model_name(cfg), max_len, self.router)

    def __serve_build_asgi_app__(self):
        return build_fastapi(self.server)

    async def report(self, data: bytes) -> None:
        r = Report.unpack(data)
        self.router.report(r.replica, r.seq, r.kv, r.load)

    # -- Backend for OpenAIServer ----------------------------------------------------

    async def stream(self, request_id: str, prompt: list[int], params: SamplingParams, hashes: list[int]):
        """The request's output, a Chunk per batch of tokens (all that arrived since the consumer last asked)."""
        box = self.demux.open(request_id)
        gen = _detached(self.replicas.options(stream=True).generate.remote,
                        pack_request(request_id, prompt, params), self.channel,
                        route={"id": request_id, "hashes": hashes, "tokens": len(prompt)})
        watch = None
        try:
            try:
                first = Chunk.unpack(await gen.__anext__())
            except StopAsyncIteration:
                first = Chunk("", error={"status": 503, "message": "the replica ended the request"})
            if first.error:
                box.done = True
                yield first
                return
            self.demux.attach(request_id, first.replica)
            watch = asyncio.create_task(self._watch(gen, box, first.replica))
            last, hold, rate = False, 0.0, self.cfg.stream_events_per_s
            while not last:
                chunk, last = await box.take(hold)
                yield chunk
                # This stream's share of the messages-per-second budget (ServeConfig.stream_events_per_s):
                # each message costs a Ray object to the HTTP proxy and an SSE event, however few tokens
                # it holds; with many streams, one carries the tokens of several steps.
                if rate:
                    hold = time.monotonic() + self.demux.active / rate
        finally:
            self.demux.close(request_id)
            if watch is not None:
                watch.cancel()
            if not box.done:
                gen.cancel()  # reaches the replica's generator, which aborts the request

    @staticmethod
    async def _watch(gen, box, replica: str) -> None:
        """The request's own Serve call: it ends once the output is out, or brings an error."""
        try:
            async for data in gen:
                chunk = Chunk.unpack(data)
                if chunk.error:
                    box.put(replica, error=chunk.error)
            return
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # the request is over
            error = "the request was cancelled"
        except Exception as e:  # noqa: BLE001 - the replica died: the request fails, the server keeps serving
            error = f"failed: {e}"
        box.put(replica, error={"status": 503, "message": f"replica {replica}: {error}"})

    def _open_outputs(self, replica: str):
        return self.replicas.options(stream=True).outputs.remote(self.channel, replica, route={"replica": replica})

    async def abort(self, request_id: str, index: int | None) -> None:
        await _detached(self.replicas.abort.remote, request_id, index, route={"id": request_id, "sticky": True})

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


# The ingress runs its code, and Serve's router, on the replica's own event loop rather than on
# threads of their own (Serve's "throughput optimized" settings): every streamed message otherwise
# crosses threads (and the GIL) on its way to the HTTP proxy, and Router state is touched by one
# thread only. Its handlers never block for long (tokenizing a prompt is the longest).
_INGRESS_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def build_app(cfg: ServeConfig):
    """The Serve application for `cfg` (what `serve.run` takes)."""
    replica = serve.deployment(KilnReplica, name=REPLICA, **_replica_options(cfg))
    ingress = serve.deployment(KilnIngress, name=INGRESS, num_replicas=1, max_ongoing_requests=100_000,
                               ray_actor_options={"num_cpus": 0.01, "runtime_env": {"env_vars": _INGRESS_ENV}},
                               logging_config={"enable_access_log": False})
    return ingress.bind(replica.bind(cfg.to_dict()), cfg.to_dict())


def app_builder(args: dict):
    """Entry for Serve config files: `import_path: kiln.cluster.deployment:app_builder`, `args:` a ServeConfig dict."""
    return build_app(ServeConfig.from_dict(args))
