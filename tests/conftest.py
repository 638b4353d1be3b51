"""Shared fixtures: one parsed SmolLM2, one LLM and one HF reference per session."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter; this must be set
# before any kernel module is imported (triton.jit reads it at decoration).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kiln.workers.loaders import embedded_model_path, resolve_model  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm_path() -> str:
    return embedded_model_path()


@pytest.fixture(scope="session")
def smollm_source(smollm_path):
    """The parsed GGUF (config, tokenizer, weight reader), shared by every engine."""
    return resolve_model(smollm_path)


@pytest.fixture(scope="session")
def llm(smollm_source):
    from kiln import LLM

    return LLM(smollm_source, device="cpu")


@pytest.fixture(scope="session")
def async_llm(smollm_source):
    """The same engine with async scheduling forced on (the CUDA default) on the CPU."""
    from kiln import LLM

    llm = LLM(smollm_source, device="cpu", async_scheduling=True)
    assert llm.executor.async_scheduling
    return llm


@pytest.fixture(scope="session")
def hf_model(smollm_path):
    """HF transformers on the same GGUF, fp32: the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm_path),
                                                 gguf_file=os.path.basename(smollm_path), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (parallel replicas, Serve)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()
