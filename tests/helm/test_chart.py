"""helm/kiln rendered by Helm's own renderer (helm-python-sdk embeds the Helm v4 Go SDK),
then checked against the Kubernetes OpenAPI schemas (kubernetes-validate) and KubeRay's
RayService types."""
import json
import os

import jsonschema
import pytest
import yaml

helm = pytest.importorskip("helm_python")
kv = pytest.importorskip("kubernetes_validate")

CHART = os.path.join(os.path.dirname(__file__), "..", "..", "helm", "kiln")
HERE = os.path.dirname(__file__)
K8S = "1.33.0"

VALUE_SETS = {
    "defaults": {},
    "cpu-demo": {"worker": {"gpu": False, "resources": {"requests": {"cpu": "2", "memory": "4Gi"},
                                                        "limits": {"cpu": "2", "memory": "4Gi"}},
                            "tolerations": []},
                 "engine": {"device": "cpu"}, "autoscaler": {"enabled": False},
                 "head": {"resources": {"requests": {"cpu": "1", "memory": "2Gi"}}}},
    "one-node-tp2": {"engine": {"tensorParallelSize": 2}, "model": {"path": "Llama-3.1-8B-Instruct",
                     "storage": {"type": "hostPath", "hostPath": "/mnt/models"}},
                     "worker": {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
                     "apiKey": {"enabled": True, "existingSecret": "team-llm-key", "secretKey": "token"}},
    "many-nodes-pp2-autoscale": {
        "engine": {"pipelineParallelSize": 2, "maxModelLen": 8192, "quant": "int4-awq", "kvCacheDtype": "fp8"},
        "serve": {"replicas": {"min": 1, "initial": 2, "max": 8}, "routing": "kv", "targetOngoingRequests": 16},
        "model": {"path": "llama-70b", "storage": {"type": "pvc", "existingClaim": "models",
                                                   "init": {"enabled": True, "command": ["sh", "-c", "ls /models"]}}},
        "apiKey": {"enabled": True}, "ingress": {"enabled": True, "host": "llm.example.com", "className": "nginx",
                                                 "tlsSecret": "llm-tls"},
        "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
        "autoscaler": {"idleTimeoutSeconds": 120}},
}


def render(values: dict) -> list[dict]:
    chart = helm.Chart.load(CHART)
    out = chart.render(values, name="kiln-test", namespace="llm", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def rendered(request):
    return request.param, VALUE_SETS[request.param], render(VALUE_SETS[request.param])


def test_manifests_validate(rendered):
    name, values, docs = rendered
    rayservice_schema = json.load(open(os.path.join(HERE, "rayservice-v1.schema.json")))
    monitor_schemas = json.load(open(os.path.join(HERE, "monitoring-v1.schema.json")))
    kinds = set()
    for doc in docs:
        kinds.add(doc["kind"])
        if doc["kind"] == "RayService":
            jsonschema.validate(doc, rayservice_schema)
            spec = doc["spec"]["rayClusterConfig"]
            for group in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
                kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                             "template": group["template"]}, K8S, strict=True)
        elif doc["kind"] in monitor_schemas:
            jsonschema.validate(doc, monitor_schemas[doc["kind"]])
        else:
            kv.validate(doc, K8S, strict=True)
    assert {"RayService", "Service", "PodDisruptionBudget"} <= kinds
    if values.get("ingress", {}).get("enabled"):
        assert {"Ingress", "ServiceMonitor", "PodMonitor"} <= kinds


def test_invariants(rendered):
    name, values, docs = rendered
    (rs,) = by_kind(docs, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    head, (worker,) = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    engine = values.get("engine", {})
    gpus = engine.get("tensorParallelSize", 1) * engine.get("pipelineParallelSize", 1)
    container = worker["template"]["spec"]["containers"][0]
    if values.get("worker", {}).get("gpu", True):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    else:
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    # Probes on /health, on the port the Service targets.
    hc = head["template"]["spec"]["containers"][0]
    assert hc["readinessProbe"]["httpGet"]["path"] == "/health" == hc["livenessProbe"]["httpGet"]["path"]
    (svc,) = by_kind(docs, "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == hc["readinessProbe"]["httpGet"]["port"] == "serve"
    assert svc["spec"]["selector"].items() <= head["template"]["metadata"]["labels"].items()
    # Autoscaling bounds: Serve replicas and worker pods both follow serve.replicas.
    reps = {"min": 1, "initial": 1, "max": 1, **values.get("serve", {}).get("replicas", {})}
    assert (worker["minReplicas"], worker["replicas"], worker["maxReplicas"]) == (reps["min"], reps["initial"],
                                                                                  reps["max"])
    assert cluster["enableInTreeAutoscaling"] == values.get("autoscaler", {}).get("enabled", True)
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert (args["min_replicas"], args["num_replicas"], args["max_replicas"]) == (reps["min"], reps["initial"],
                                                                                  reps["max"])
    assert args["engine"]["parallel"]["tensor_parallel_size"] * args["engine"]["parallel"][
        "pipeline_parallel_size"] == gpus
    # The API key travels only through a Secret.
    assert args["api_key"] is None
    key = values.get("apiKey", {})
    envs = {e["name"]: e for c in (hc, container) for e in c["env"]}
    if key.get("enabled"):
        ref = envs["KILN_API_KEY"]["valueFrom"]["secretKeyRef"]
        if key.get("existingSecret"):
            assert ref["name"] == key["existingSecret"] and not by_kind(docs, "Secret")
        else:
            (secret,) = by_kind(docs, "Secret")
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"]
        assert ref["key"] == key.get("secretKey", "api-key")
    else:
        assert "KILN_API_KEY" not in envs
    # Model storage is mounted where the engine looks.
    storage = values.get("model", {}).get("storage", {}).get("type", "none")
    if storage != "none":
        assert args["engine"]["model"] == "/models/" + values["model"]["path"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["models"] == "/models"
    if values.get("model", {}).get("storage", {}).get("init", {}).get("enabled"):
        assert worker["template"]["spec"]["initContainers"][0]["volumeMounts"][0]["mountPath"] == "/models"


def test_serve_config_matches_kiln_serve(rendered):
    """The chart's serveConfigV2 equals what `kiln serve-config` prints for the same settings."""
    from kiln.cli import _serve_config, build_parser
    from kiln.cluster.job import serve_config_v2

    name, values, docs = rendered
    (rs,) = by_kind(docs, "RayService")
    chart_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    args = chart_cfg["applications"][0]["args"]
    from kiln.config import ServeConfig

    ServeConfig.from_dict(args)  # every field known, every value valid
    engine = values.get("engine", {})
    serve = values.get("serve", {})
    reps = {"min": 1, "initial": 1, "max": 1, **serve.get("replicas", {})}
    argv = ["serve", "--host", "0.0.0.0", "--tp", str(engine.get("tensorParallelSize", 1)),
            "--pp", str(engine.get("pipelineParallelSize", 1)), "--replicas", str(reps["initial"]),
            "--min-replicas", str(reps["min"]), "--max-replicas", str(reps["max"]),
            "--target-ongoing-requests", str(serve.get("targetOngoingRequests", 32)),
            "--routing", serve.get("routing", "kv"), "--device", engine.get("device", "auto"),
            "--max-model-len", str(engine.get("maxModelLen", 0)), "--quant", engine.get("quant", "none"),
            "--kv-cache-dtype", engine.get("kvCacheDtype", "auto")]
    if args["engine"]["model"]:
        argv += ["--model", args["engine"]["model"]]
    cli_cfg = serve_config_v2(_serve_config(build_parser().parse_args(argv)))
    assert chart_cfg == json.loads(json.dumps(cli_cfg))


@pytest.mark.parametrize("bad", [
    {"engine": {"tensorParallelSize": "two"}},
    {"engine": {"tensorParallelSize": 0}},
    {"engine": {"gpuMemoryUtilization": 1.5}},
    {"serve": {"routing": "random"}},
    {"serve": {"replicas": {"min": 1, "initial": 1, "max": 0}}},
    {"service": {"port": 70000}},
    {"model": {"storage": {"type": "s3"}}},
    {"engine": {"tensorParallelSize": 2, "typo": 1}},
    {"autoscaler": {"upscalingMode": "Fast"}},
])
def test_values_schema_rejects_bad_values(bad):
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError):
        chart.validate_schema(bad)
    with pytest.raises(helm.HelmError):
        chart.render(bad, name="x", namespace="llm", is_install=True)


def test_rendered_serve_config_runs_on_ray_serve(ray_cluster):
    """The chart's config is the one kiln runs: serve.run what serveConfigV2 says, on this CPU."""
    import importlib
    import socket
    import urllib.request

    from ray import serve

    docs = render({**VALUE_SETS["cpu-demo"], "engine": {"device": "cpu", "maxModelLen": 2048}})
    (rs,) = by_kind(docs, "RayService")
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for app in config["applications"]:
            module, attr = app["import_path"].split(":")
            builder = getattr(importlib.import_module(module), attr)
            serve.run(builder(app["args"]), name=app["name"], route_prefix=app["route_prefix"])
        body = json.dumps({"model": "SmolLM2-135M-Instruct", "max_tokens": 12, "temperature": 0,
                           "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            assert "Paris" in json.loads(r.read())["choices"][0]["message"]["content"]
    finally:
        serve.shutdown()
