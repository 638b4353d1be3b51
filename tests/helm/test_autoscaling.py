"""The chart's replica autoscaling, driven through Ray Serve's own policy by a load trace.

The chart's values become a ServeConfig (via its serveConfigV2), that becomes the
AutoscalingConfig kiln deploys, and Ray Serve's default policy (with its scaling
delays) decides replica counts second by second while load ramps up, holds, and drops.
"""
import math

import pytest
import yaml

from kiln.cluster.deployment import autoscaling_config
from kiln.config import ServeConfig
from tests.helm.test_chart import VALUE_SETS, by_kind, render

policy_module = pytest.importorskip("ray.serve.autoscaling_policy")


def simulate(config, trace, monkeypatch) -> list[int]:
    """Replica count at each second of `trace` (ongoing requests per second)."""
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingContext

    policy = policy_module._apply_autoscaling_config(policy_module.replica_queue_length_autoscaling_policy)
    clock = [0.0]
    monkeypatch.setattr(policy_module.time, "time", lambda: clock[0])
    replicas, state, out = config.initial_replicas, {}, []
    for t, load in enumerate(trace):
        clock[0] = float(t)
        ctx = AutoscalingContext(
            deployment_id=DeploymentID(name="KilnReplica", app_name="kiln"), deployment_name="KilnReplica",
            app_name="kiln", current_num_replicas=replicas, target_num_replicas=replicas, running_replicas=[],
            total_num_requests=float(load), total_queued_requests=0.0, aggregated_metrics=None, raw_metrics=None,
            capacity_adjusted_min_replicas=config.min_replicas, capacity_adjusted_max_replicas=config.max_replicas,
            policy_state=state, last_scale_up_time=None, last_scale_down_time=None, current_time=float(t),
            config=config)
        decision, state = policy(ctx)
        # Serve bounds every decision by the configured range (as its autoscaling state manager does).
        replicas = max(config.min_replicas, min(config.max_replicas, math.ceil(decision)))
        out.append(replicas)
    return out


def test_ramp_plateau_drop(monkeypatch):
    docs = render(VALUE_SETS["many-nodes-pp2-autoscale"])
    (rs,) = by_kind(docs, "RayService")
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    cfg = autoscaling_config(ServeConfig.from_dict(args))
    assert (cfg.min_replicas, cfg.initial_replicas, cfg.max_replicas) == (1, 2, 8)
    assert cfg.upscale_delay_s == 30 and cfg.downscale_delay_s == 600 and cfg.target_ongoing_requests == 16

    # 0-59 s idle, 60-179 s ramp to 200 ongoing requests, hold to 1199 s, then nothing until 2400 s.
    trace = [0] * 60 + [round(200 * (t + 1) / 120) for t in range(120)] + [200] * 1020 + [0] * 1200
    reps = simulate(cfg, trace, monkeypatch)

    assert min(reps) >= 1 and max(reps) <= 8
    # Idle at the start: down from the initial 2 only after the 600 s downscale delay (which the ramp interrupts).
    assert reps[:60] == [2] * 60
    # The ramp wants more than 2 replicas once load exceeds 2 x 16 requests; nothing happens before
    # that wish has held for the 30 s upscale delay, and by the plateau we run the maximum.
    wish = next(t for t, load in enumerate(trace) if load > 2 * 16)
    first_up = next(t for t, r in enumerate(reps) if r > 2)
    assert wish + 30 - 1 <= first_up <= wish + 30 + 2
    assert all(r == 8 for r in reps[240:1200])
    # After the drop: still 8 until the 600 s downscale delay has passed, then down to the minimum.
    assert all(r == 8 for r in reps[1200:1200 + 598])
    assert all(r == 1 for r in reps[1200 + 620:])
