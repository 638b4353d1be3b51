"""The build's side process: a one-layer engine of the build's config starts and exits cleanly."""
import dataclasses

from kiln.config import EngineConfig, QuantConfig
from kiln.workers import kernel_warmup
from kiln.workers.loaders import resolve_model


def test_one_layer_engine_of_the_build_config_runs():
    mc = resolve_model("smollm2-135m", random_weights=True).config
    cfg = EngineConfig(device="cpu", quant=QuantConfig(mode="int4-awq", lm_head="int8-wo"))
    proc = kernel_warmup.start(cfg, mc)
    assert kernel_warmup.finish(proc, timeout_s=120)


def test_a_failing_child_is_reported():
    mc = resolve_model("smollm2-135m", random_weights=True).config
    cfg = EngineConfig(device="cpu")
    proc = kernel_warmup.start(cfg, dataclasses.replace(mc, architecture="GPT2LMHeadModel"))
    assert not kernel_warmup.finish(proc, timeout_s=120)
