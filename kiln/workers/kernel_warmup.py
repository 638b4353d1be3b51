"""Compile an engine's Triton kernels in a side process while the build runs.

A build on a machine that has never compiled kiln's kernels spends ~25 s of
an 8B fp8 build in Triton's compiler (the trial start, kernel_cache.py), on
the CPU, after the GPU work and the writing are done. Kernels depend on the
shapes and dtypes of one layer, not on the number of layers or the values of
the weights, so a one-layer engine of the same config with random weights
compiles every kernel the full engine will use. Started as the build begins,
its compiles overlap the build's drawing or reading, calibration and
writing, and the build's own trial start then finds them in the shared
Triton cache. Triton writes cache entries atomically, so the two processes
never see half an entry. Correctness never depends on it: a kernel it did not
compile (it failed, or the build picked another int4 group) is compiled by
the trial start as before.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time

from kiln.config import EngineConfig, ModelConfig

log = logging.getLogger("kiln.build")

KV_BYTES = 1 << 30  # the one layer's KV cache: enough blocks for the warm-up's longest prefill


def start(config: EngineConfig, model: ModelConfig) -> subprocess.Popen:
    """Launch the one-layer engine of `config` in a child process (stdout and stderr discarded)."""
    cfg = dataclasses.replace(config, cache=dataclasses.replace(config.cache, kv_cache_bytes=KV_BYTES,
                                                                 num_blocks=None))
    if cfg.quant.mode == "int4-awq":  # the group the build will pick for these widths
        from kiln.workers.quantize import pick_group

        widths = [model.hidden_size, model.num_attention_heads * model.head_dim, model.intermediate_size]
        try:
            cfg.quant = dataclasses.replace(cfg.quant, group_size=pick_group(widths, cfg.quant.group_size))
        except ValueError:
            pass  # the build itself will say so
    spec = {"config": cfg.to_dict(), "model": dataclasses.replace(model, num_hidden_layers=1).to_dict()}
    return subprocess.Popen([sys.executable, "-m", "kiln.workers.kernel_warmup", json.dumps(spec)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finish(proc: subprocess.Popen, timeout_s: float = 600.0) -> bool:
    """Wait for the child (bounded); True when it compiled everything it set out to."""
    t = time.perf_counter()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    log.info("kernel warm-up process: exit %s after waiting %.1fs", code, time.perf_counter() - t)
    return code == 0


def _main(spec: dict) -> None:
    from kiln.workers.engine import Engine
    from kiln.workers.loaders import ModelSource

    cfg = EngineConfig.from_dict(spec["config"])
    source = ModelSource(name="kernel warm-up", path="", config=ModelConfig(**spec["model"]), weights=None,
                         tokenizer=None)
    Engine(cfg, source)


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
