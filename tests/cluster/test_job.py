"""`ray job submit` path: a head started with `ray start --head`, a job that runs `kiln serve`."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    if not os.path.exists(ray_bin):  # a venv over system site-packages keeps ray's script outside it
        ray_bin = shutil.which("ray") or ray_bin
    gcs, dash = _free_port(), _free_port()
    # A throwaway local cluster: no token authentication (Ray 2.60 turns it on by default).
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}
    subprocess.run([ray_bin, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", "--num-cpus=4", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_submitted_job_brings_the_endpoint_up(head):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from kiln.cluster.job import submit

    port = _free_port()
    job_id = submit(head, ["--port", str(port), "--device", "cpu", "--kv-cache-bytes", str(1 << 26)])
    client = JobSubmissionClient(head)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        assert status in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(job_id)[-3000:]
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(2)
    else:
        pytest.fail("the job's endpoint never became healthy:\n" + client.get_job_logs(job_id)[-3000:])
    req = urllib.request.Request(base + "/v1/chat/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "SmolLM2-135M-Instruct", "max_tokens": 12, "temperature": 0,
                                                  "messages": [{"role": "user", "content": "What is the capital of France?"}]
                                                  }).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        assert "Paris" in json.loads(r.read())["choices"][0]["message"]["content"]
    client.stop_job(job_id)
    for _ in range(120):
        if client.get_job_status(job_id).is_terminal():
            break
        time.sleep(1)
    assert client.get_job_status(job_id) == JobStatus.STOPPED
