"""A replica spread over several GPUs: one Ray actor per rank, and their driver.

`RankWorker` runs one rank's Executor in a loop (SPMD). Rank 0, the leader,
also keeps the request inbox: the driver hands it msgpack bytes and gets
msgpack bytes back, so no pickled object crosses a process boundary on the
request path. `RayExecutor` is that driver: it places the ranks with a
placement group (STRICT_PACK for tensor parallelism), forms their process
groups, and offers the calling process the same interface as a local
Executor. A dead rank or a timed-out collective marks the replica unhealthy
and fails every request in flight with that message.
"""
from __future__ import annotations

import atexit
import os
import socket
import threading
import time

import msgpack

from kiln.config import EngineConfig, SamplingParams
from kiln.workers.executor import Executor, TokenEvent, validate_request
from kiln.workers.loaders import ModelSource

# Environment the ranks inherit from the driver when set there.
_FORWARDED_ENV = ("KILN_KERNELS", "TRITON_INTERPRET", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                  "NVSHMEM_DISABLE_NVLS", "NCCL_DEBUG", "CUDA_LAUNCH_BLOCKING")


class RankWorker:
    """One rank of a replica (wrapped with `ray.remote` by RayExecutor)."""

    def __init__(self, rank: int, config: dict) -> None:
        self.rank = rank
        self.config = EngineConfig.from_dict(config)
        self.executor: Executor | None = None
        self.error: str | None = None
        self._cv = threading.Condition()
        self._inbox: list[list] = []
        self._events: list[list] = []
        self._aborted: list[list] = []
        self._busy = False
        self._running = False

    def rendezvous(self) -> str:
        """An address on this node for the others to join (called on rank 0)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def start(self, init_method: str) -> dict:
        from kiln.workers.engine import resolve_device
        from kiln.workers.parallel import init_distributed

        pc = self.config.parallel
        device = resolve_device(self.config.device)
        ctx = init_distributed(self.rank, pc.tensor_parallel_size, pc.pipeline_parallel_size, init_method, device,
                               pc.collective_timeout_s)
        self.executor = Executor(self.config, ctx=ctx)
        ex = self.executor
        return {"max_model_len": ex.max_model_len, "num_blocks": ex.block_manager.num_blocks,
                "vocab_size": ex.vocab_size, "device": str(ex.engine.device)}

    def run(self) -> None:
        """The step loop; returns after a shutdown, raises if a collective fails."""
        import torch.distributed as dist

        self._running = True
        try:
            if self.rank == 0:
                self._lead()
            else:
                while not self.executor.shutdown_requested:
                    self.executor.step()
        except Exception as e:
            with self._cv:
                self.error = f"rank {self.rank} failed: {type(e).__name__}: {e}"
                self._cv.notify_all()
            raise
        finally:
            self._running = False
            if dist.is_initialized():
                dist.destroy_process_group()

    def _lead(self) -> None:
        ex = self.executor
        heartbeat = self.config.parallel.heartbeat_s
        while not ex.shutdown_requested:
            with self._cv:
                if not self._inbox and not ex.has_unfinished():
                    # Idle: wait for work, but step anyway now and then, so the other
                    # ranks' waits stay far inside the collective timeout.
                    self._cv.wait(timeout=heartbeat)
                ex._pending.extend(self._inbox)
                self._inbox.clear()
            events, aborted = ex.step()
            with self._cv:
                self._events.extend(e.pack() for e in events)
                self._aborted.extend(list(a) for a in aborted)
                self._busy = ex.has_unfinished()
                if events or aborted or not self._busy:
                    self._cv.notify_all()

    def exchange(self, payload: bytes, wait_s: float) -> bytes:
        """Queue the driver's requests and aborts; return the tokens produced since the last call."""
        items = msgpack.unpackb(payload)
        with self._cv:
            if items:
                self._inbox.extend(items)
                self._busy = True
                self._cv.notify_all()
            deadline = time.monotonic() + wait_s
            while not self._events and not self._aborted and self.error is None and self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            events, self._events = self._events, []
            aborted, self._aborted = self._aborted, []
            kv = [list(e) for e in self.executor.take_kv_events()] if self.executor else []
            stats = self.executor.stats() if self.executor else {}
            return msgpack.packb({"events": events, "aborted": aborted, "error": self.error, "kv": kv,
                                  "stats": stats, "busy": self._busy or bool(self._inbox)})

    def stats(self) -> bytes:
        return msgpack.packb(self.executor.stats())


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "cause", None) or e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class RayExecutor:
    """The driver side of a multi-rank replica, with a local Executor's interface."""

    def __init__(self, config: EngineConfig, source: ModelSource, poll_s: float = 0.05,
                 placement_group=None, bundle_offset: int = 0) -> None:
        """Start tp x pp ranks. Inside a Ray Serve replica, pass its placement group:
        the ranks then take bundles bundle_offset.. of it instead of a new group."""
        import ray
        from ray.util.placement_group import placement_group as ray_placement_group
        from ray.util.placement_group import remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.config = config
        self.source = source
        self.tokenizer = source.tokenizer
        cfg = source.config
        eos = set(cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids if self.tokenizer else [])
        self.eos_token_ids = sorted(eos)
        self.poll_s = poll_s
        self.error: str | None = None
        self._pending: list[list] = []
        self._busy = False
        self._closed = False
        self._kv: list[list] = []
        self._stats: dict = {}
        self._own_pg = placement_group is None
        from kiln.workers.models.llama import validate_layout

        validate_layout(source.config, config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size)
        if not ray.is_initialized():
            # A local cluster unless RAY_ADDRESS names one to join.
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, logging_level="warning")
        pc = config.parallel
        world = pc.world_size
        gpus = config.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
        bundle = {"GPU": 1, "CPU": 1} if gpus else {"CPU": 0.01}
        self._pg = placement_group or ray_placement_group(
            [dict(bundle) for _ in range(world)], strategy="STRICT_PACK" if pc.tensor_parallel_size > 1 else "PACK")
        try:
            ray.get(self._pg.ready(), timeout=60)
        except Exception:
            if self._own_pg:
                remove_placement_group(self._pg)
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {world} ranks need {world} x "
                             f"{bundle} on {'one node' if pc.tensor_parallel_size > 1 else 'the cluster'}; "
                             f"the Ray cluster has {ray.available_resources()}") from None
        import kiln

        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(kiln.__file__)),
                                                          os.environ.get("PYTHONPATH")]))
        actor = ray.remote(RankWorker)
        self.workers = [
            actor.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), max_concurrency=4,
                          runtime_env={"env_vars": env},
                          scheduling_strategy=PlacementGroupSchedulingStrategy(
                              self._pg, placement_group_bundle_index=bundle_offset + i)).remote(i, config.to_dict())
            for i in range(world)]
        try:
            init = ray.get(self.workers[0].rendezvous.remote(), timeout=120)
            infos = ray.get([w.start.remote(init) for w in self.workers], timeout=1800)
        except Exception as e:
            self._teardown()
            cause = getattr(e, "cause", None) or e
            raise (cause if isinstance(cause, ValueError) else
                   RuntimeError(f"starting {world} ranks failed: {cause}")) from None
        self.max_model_len = infos[0]["max_model_len"]
        self.vocab_size = infos[0]["vocab_size"]
        self.devices = [i["device"] for i in infos]
        self._loops = [w.run.remote() for w in self.workers]
        atexit.register(self.shutdown)

    # -- the Executor interface ------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.max_model_len, self.vocab_size)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._check()
        self.validate(prompt_token_ids, params)
        self._pending.append(["add", request_id, list(prompt_token_ids), params.to_dict()])

    def abort_request(self, request_id: str, index: int | None = None) -> None:
        if self.error is None and not self._closed:
            self._pending.append(["abort", request_id, index])

    def has_unfinished(self) -> bool:
        return bool(self._pending) or self._busy

    def flush(self) -> list[TokenEvent]:
        return []  # the ranks step in their own loop; tokens arrive through step()

    def score(self, token_ids: list[int]) -> list[float]:
        raise ValueError("perplexity runs on a single-rank engine (tensor_parallel_size = pipeline_parallel_size = 1)")

    def step(self) -> tuple[list[TokenEvent], list[tuple[str, int]]]:
        import ray

        self._check()
        payload = msgpack.packb(self._pending)
        self._pending = []
        try:
            reply = msgpack.unpackb(ray.get(self.workers[0].exchange.remote(payload, self.poll_s),
                                            timeout=self.poll_s + self.config.parallel.collective_timeout_s))
        except Exception as e:
            self._fail(f"the leader rank is gone: {type(e).__name__}: {e}")
        # A rank's loop only ends on shutdown; before that, an ended loop means it died or
        # a collective failed. Name the other ranks first: the leader's error is then
        # usually just the echo ("connection closed by peer").
        done, _ = ray.wait(self._loops, num_returns=len(self._loops), timeout=0)
        errors = []
        for rank, ref in enumerate(self._loops):
            if rank and ref in done:
                try:
                    ray.get(ref)
                    errors.append(f"rank {rank} exited")
                except Exception as e:
                    errors.append(f"rank {rank}: {_first_line(e)}")
        if reply["error"]:
            errors.append(reply["error"])
        if errors:
            self._fail("; ".join(errors))
        self._busy = reply["busy"]
        self._kv.extend(reply["kv"])
        self._stats = reply["stats"]
        return [TokenEvent.unpack(r) for r in reply["events"]], [tuple(a) for a in reply["aborted"]]

    @property
    def last_stats(self) -> dict:
        """The leader's stats as of the last step() (no extra call)."""
        return self._stats

    def take_kv_events(self) -> list[list]:
        kv, self._kv = self._kv, []
        return kv

    def stats(self) -> dict:
        import ray

        self._check()
        return msgpack.unpackb(ray.get(self.workers[0].stats.remote(), timeout=30))

    @property
    def healthy(self) -> bool:
        return self.error is None and not self._closed

    # -- lifecycle -------------------------------------------------------------

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"replica unhealthy: {self.error}")
        if self._closed:
            raise RuntimeError("this replica has been shut down")

    def _fail(self, reason: str) -> None:
        self.error = reason
        self._teardown()
        raise RuntimeError(f"replica unhealthy: {reason}")

    def shutdown(self) -> None:
        """Stop the ranks cleanly (they finish the current step), then free their GPUs."""
        import ray

        if self._closed or not ray.is_initialized():
            return
        if self.error is None:
            try:
                ray.get(self.workers[0].exchange.remote(msgpack.packb([["shutdown"]]), 0), timeout=30)
                ray.get(self._loops, timeout=30)
            except Exception:
                pass
        self._teardown()

    def _teardown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        self._closed = True
        for w in getattr(self, "workers", []):
            try:
                ray.kill(w)
            except Exception:
                pass
        if self._own_pg:
            try:
                remove_placement_group(self._pg)
            except Exception:
                pass
