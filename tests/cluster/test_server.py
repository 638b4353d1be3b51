"""`kiln serve` as a user runs it: 2 SmolLM2 replicas on Ray Serve, the official openai client."""
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

MODEL = "SmolLM2-135M-Instruct"
KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, headers=None, timeout=30):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _post(url, body: bytes, headers=None, timeout=120):
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", "--replicas", "2", "--port", str(port),
                             "--device", "cpu", "--kv-cache-bytes", str(1 << 27), "--api-key", KEY,
                             "--max-queued", "3", "--max-model-len", "2048",
                             # a small budget of streamed messages: streams batch several tokens per event
                             "--stream-events-per-s", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"kiln serve exited: {proc.stdout.read()[-3000:]}")
        try:
            if _get(base + "/health", timeout=5)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(2)
    else:
        proc.kill()
        pytest.fail("kiln serve did not become healthy")
    yield base
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: drain and stop
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("kiln serve did not stop on SIGINT")
    assert proc.returncode == 0


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)


def test_models_health_and_auth(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, body, _ = _get(server + "/health")
    assert status == 200 and json.loads(body)["replicas"] == {"RUNNING": 2}
    status, body, _ = _post(server + "/v1/chat/completions", b"{}")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body, _ = _post(server + "/v1/chat/completions", b"{}", {"Authorization": "Bearer wrong"})
    assert status == 401


def test_chat_stream_and_not(client):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, temperature=0)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 20 and r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_completions_stop_seed_logprobs_n(client):
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"])
    assert r.choices[0].text == " 5, 6," and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"], stream=True) if c.choices)
    assert streamed == " 5, 6,"
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=42, **kw).choices[0].text
    assert a == client.completions.create(seed=42, **kw).choices[0].text
    assert a != client.completions.create(seed=7, **kw).choices[0].text
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and all(x <= 0 for x in lp.token_logprobs) and len(lp.top_logprobs[0]) == 2
    assert lp.tokens[0] == " Paris" and max(lp.top_logprobs[0].values()) == lp.token_logprobs[0]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       logprobs=True, top_logprobs=3, n=2, temperature=1.0, seed=1)
    assert len(r.choices) == 2 and len(r.choices[0].logprobs.content[0].top_logprobs) == 3
    r = client.completions.create(model=MODEL, prompt=["Red,", "Blue,"], max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]


def test_concurrent_streams_get_every_token_in_order(client):
    """Six streams at once, multiplexed on the replicas' output streams and batched into few events each:
    every stream gets all its tokens, in order, as the same text non-streaming requests get."""
    kw = dict(model=MODEL, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    prompts = [", ".join(str(k + i) for i in range(4)) + "," for k in range(1, 7)]  # "1, 2, 3, 4," ...

    def streamed(prompt):
        chunks = list(client.completions.create(prompt=prompt, stream=True, stream_options={"include_usage": True},
                                                **kw))
        texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
        return "".join(texts), len(texts), chunks[-1].usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(streamed, prompts))
        want = list(pool.map(lambda p: client.completions.create(prompt=p, **kw).choices[0].text, prompts))
    for k, ((text, _, n), expected) in enumerate(zip(got, want), start=1):
        assert n == 24 and text == expected
        assert text.startswith(f" {k + 4}, {k + 5}, {k + 6},"), text
    assert sum(events for _, events, _ in got) < len(prompts) * 24 * 3 // 4  # events carry several tokens


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}), 400,
     "max_tokens"),
    (json.dumps({"model": MODEL, "messages": "hello"}), 400, "messages"),
    (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404, "model"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -1}), 400,
     "temperature"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}), 400, "top_p"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}), 400, "n"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}]}), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}), 400,
     "max_tokens"),
    (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400, None),
])
def test_bad_input_gets_openai_errors(server, client, body, status, param):
    body = body if isinstance(body, bytes) else body.encode()
    got, err, _ = _post(server + "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    if param:
        assert err["error"]["param"].startswith(param)
    # ... and the server keeps serving
    ok = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert ok.choices[0].text


def test_prefix_routing_keeps_a_conversation_on_one_replica(server, client):
    system = "You are a meticulous assistant for potters. Answer briefly and precisely. " * 6
    replicas = []
    for question in ("What is clay?", "What is a kiln?", "What is glaze?"):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=4, temperature=0,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
        replicas.append(raw.headers["x-kiln-replica"])
        time.sleep(0.7)  # let the replica's KV report reach the router
    assert len(set(replicas)) == 1 and replicas[0]
    from prometheus_client.parser import text_string_to_metric_families

    metrics = {f.name: f for f in text_string_to_metric_families(_get(server + "/metrics")[1].decode())}
    hits = {s.labels["replica"]: s.value for s in metrics["kiln:prefix_cache_hits"].samples
            if s.name.endswith("_total")}
    assert hits[replicas[0]] >= 64


def test_metrics_parse_and_name_the_replicas(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3)
    families = {f.name: f for f in text_string_to_metric_families(_get(server + "/metrics")[1].decode())}
    for name in ("kiln:num_requests_running", "kiln:num_requests_waiting", "kiln:kv_cache_usage_perc",
                 "kiln:prefix_cache_hits", "kiln:prefix_cache_queries", "kiln:time_to_first_token_seconds",
                 "kiln:inter_token_latency_seconds", "kiln:e2e_request_latency_seconds", "kiln:prompt_tokens",
                 "kiln:generation_tokens", "kiln:engine_steps", "kiln:engine_step_seconds"):
        assert name in families, name
    assert len({s.labels["replica"] for s in families["kiln:num_requests_running"].samples}) == 2
    ttft = [s for s in families["kiln:time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in ttft) >= 1


def _running(server) -> float:
    """Requests the router has in flight plus those the replicas report running."""
    from prometheus_client.parser import text_string_to_metric_families

    fam = {f.name: f for f in text_string_to_metric_families(_get(server + "/metrics")[1].decode())}
    return sum(s.value for name in ("kiln:num_requests_routed", "kiln:num_requests_running")
               for s in fam[name].samples)


def _open_stream(server, body: dict):
    import http.client
    from urllib.parse import urlparse

    url = urlparse(server)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    return conn, resp


def test_hang_ups_leave_the_other_streams_of_their_replica_alone(server):
    """Streams of one replica share its output stream: clients that go away must not take it down."""
    body = {"model": MODEL, "prompt": "Tell me a story:", "max_tokens": 48, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    streams = [_open_stream(server, body) for _ in range(4)]  # two a replica (least loaded)
    for conn, _ in streams[:3]:
        conn.sock.close()
        conn.close()
    events = [json.loads(line[6:]) for line in streams[3][1] if line.startswith(b"data: {")]
    assert events[-1]["usage"]["completion_tokens"] == 48
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    streams[3][0].close()
    deadline = time.monotonic() + 30
    while _running(server) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _running(server) == 0


def test_disconnect_aborts_and_overload_gets_429(server, client):
    body = {"model": MODEL, "prompt": "Write a long story:", "max_tokens": 1500, "ignore_eos": True,
            "stream": True}
    conn, resp = _open_stream(server, body)  # status 200, first event read
    for _ in range(3):
        assert resp.fp.readline()
    assert _running(server) >= 1
    conn.sock.close()  # hang up mid-stream
    conn.close()
    deadline = time.monotonic() + 30
    while _running(server) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _running(server) == 0, "the abandoned request is still running"

    def one(_):
        try:
            client.completions.create(model=MODEL, prompt="Count slowly:", max_tokens=60,
                                      extra_body={"ignore_eos": True})
            return 200, None
        except Exception as e:  # openai.RateLimitError
            return getattr(e, "status_code", 0), getattr(getattr(e, "response", None), "headers", {})

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    codes = [c for c, _ in results]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    assert all(h.get("retry-after") == "1" for c, h in results if c == 429)
