"""Run the service on a Ray cluster: `kiln serve` (local or RAY_ADDRESS) and `kiln submit`.

`kiln serve` starts a local Ray cluster when RAY_ADDRESS is unset and joins
the named one otherwise, deploys the Serve application, and keeps it up until
Ctrl-C or SIGTERM, when it drains in-flight requests and removes it. It is
also the entrypoint of `ray job submit`: a job runs `kiln serve ...` on the
cluster's head node.
"""
from __future__ import annotations

import os
import shlex
import signal
import threading
import time

from kiln.config import ServeConfig


def serve_forever(cfg: ServeConfig, detach: bool = False, ready_timeout_s: float = 1800) -> None:
    import ray
    from ray import serve

    from kiln.cluster.deployment import build_app, default_model_name

    address = os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False if not address else None,
                 logging_level="warning")
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
    _wait_ready(cfg, ready_timeout_s, stop)
    print(f"kiln: serving {default_model_name(cfg)} with {cfg.num_replicas} replica(s) at "
          f"http://{cfg.host}:{cfg.port}/v1", flush=True)
    if detach:
        return
    try:
        while not stop.wait(1.0):
            pass
    finally:
        print("kiln: draining and stopping", flush=True)
        serve.delete(cfg.app_name)  # replicas finish in-flight requests (graceful_shutdown_timeout_s)
        if not address:
            serve.shutdown()
            ray.shutdown()


def _wait_ready(cfg: ServeConfig, timeout_s: float, stop: threading.Event) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        app = serve.status().applications.get(cfg.app_name)
        if app is not None and app.status.value == "RUNNING":
            return
        if app is not None and app.status.value == "DEPLOY_FAILED":
            raise RuntimeError(f"deploying {cfg.app_name} failed: {app.message}")
        time.sleep(1.0)
    if not stop.is_set():
        raise RuntimeError(f"{cfg.app_name} was not ready after {timeout_s:.0f}s")


def serve_config_v2(cfg: ServeConfig) -> dict:
    """The Serve config (what KubeRay's RayService takes as serveConfigV2) that runs `cfg`.

    The Helm chart renders the same structure from its values; a test checks the two agree.
    """
    args = cfg.to_dict()
    args["api_key"] = None  # never in the config: the ingress reads KILN_API_KEY from a Secret
    return {"proxy_location": "HeadOnly", "http_options": {"host": cfg.host, "port": cfg.port},
            "applications": [{"name": cfg.app_name, "route_prefix": "/",
                              "import_path": "kiln.cluster.deployment:app_builder", "args": args}]}


def submit(address: str, serve_args: list[str], working_dir: str | None = None, wait: bool = False) -> str:
    """Submit `kiln serve SERVE_ARGS` as a Ray job on the cluster at `address`; return the job id."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    runtime_env = {"working_dir": working_dir} if working_dir else None
    job_id = client.submit_job(entrypoint="kiln serve " + shlex.join(serve_args), runtime_env=runtime_env)
    if wait:
        for _ in range(3600):
            status = client.get_job_status(job_id)
            if status.is_terminal():
                break
            time.sleep(1.0)
    return job_id
