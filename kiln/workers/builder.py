"""Checkpoint -> engine directory: read once, fuse, quantize, split per rank, write.

    kiln build CHECKPOINT -o ENGINE_DIR --tp 2 --quant int4-awq --kv-cache-dtype fp8

An engine directory holds `engine.json` (the model, the build settings, the
GPU it was built for, kiln and torch versions, kernel tuning) and one
safetensors file per rank, in exactly the layout that rank's model keeps in
memory, so loading is a straight read onto the device. The model is built
whole (tp=pp=1) on the build device, quantized there (calibrating on built-in
text where the mode needs it), and each rank's shard is then sliced out of
it: every quantization format is row-wise, so slicing after quantizing gives
the same bytes as quantizing each shard.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import hashlib
import json
import logging
import os
import shutil
import time

import torch

from kiln.config import EngineConfig, ModelConfig, QuantConfig
from kiln.workers.loaders import ModelSource, resolve_model
from kiln.workers.models import LlamaForCausalLM
from kiln.workers.models.llama import validate_layout
from kiln.workers.parallel import ParallelContext, layer_range

log = logging.getLogger("kiln.build")
# 2: int4 codes packed plane-major within a group (kiln/kernels/quant.py); 3: quant.lm_head;
# 4: an FP8 KV cache holds K smoothed per channel and Hadamard-rotated (kiln/kernels/rope.py)
ENGINE_FORMAT = 4


def kiln_version() -> str:
    from kiln import __version__

    return __version__


def target_of(device: torch.device) -> dict:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"device": "cuda", "gpu_name": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}"}
    return {"device": "cpu", "gpu_name": None, "capability": None}


class _Progress:
    """One line per stage with its size and time (a bar for the per-rank loop)."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.t = time.perf_counter()

    def stage(self, what: str, nbytes: int | None = None) -> None:
        now = time.perf_counter()
        if self.verbose:
            size = f", {nbytes / 2**30:.2f} GiB" if nbytes else ""
            print(f"kiln build: {what} ({now - self.t:.1f}s{size})", flush=True)
        self.t = now


class Builder:
    def __init__(self, config: EngineConfig, verbose: bool = True, dense_random: bool = False,
                 trial_start: bool = True) -> None:
        """`dense_random`: for random weights, draw a dense model and quantize it as a checkpoint
        would be (calibration and AWQ on random tokens) instead of drawing quantized codes:
        what timing a real build needs. `trial_start`: compile the engine's kernels into it
        (GPU, one rank)."""
        self.config = config
        self.verbose = verbose
        self.dense_random = dense_random
        self.trial_start = trial_start

    def build(self, out_dir: str, source: ModelSource | None = None) -> dict:
        """Write the engine to `out_dir`; returns its engine.json contents.

        On a GPU, a one-rank engine also gets the Triton kernels its loads need, compiled by a
        trial start at the end (kernel_cache): the first load on a fresh machine then finds
        them instead of compiling for ~15 s. Kernels compiled while calibrating count too, and
        a side process compiles them while the build runs (kernel_warmup)."""
        from kiln.workers import kernel_cache, kernel_warmup
        from kiln.workers.engine import resolve_device

        cfg = self.config
        device = resolve_device(cfg.device)
        os.makedirs(out_dir, exist_ok=True)
        source = source or resolve_model(cfg.model, cfg.random_weights)
        one_rank = cfg.parallel.tensor_parallel_size * cfg.parallel.pipeline_parallel_size == 1
        trial = device.type == "cuda" and one_rank and self.trial_start
        warm = kernel_warmup.start(dataclasses.replace(cfg, quant=self._quant()), source.config) if trial else None
        try:
            with kernel_cache.recording(out_dir, device) if one_rank else contextlib.nullcontext():
                meta = self._build(out_dir, source)
                if trial:
                    t = time.perf_counter()
                    ok = kernel_warmup.finish(warm)  # its engine's memory is free before the trial start's
                    if self.verbose:
                        print(f"kiln build: kernel warm-up process {'done' if ok else 'failed'} "
                              f"(waited {time.perf_counter() - t:.1f}s)", flush=True)
                    self._trial_start(out_dir, meta)
        finally:
            if warm is not None and warm.poll() is None:
                warm.kill()
                warm.wait()
        return meta

    def _quant(self) -> QuantConfig:
        """The build's quantization settings as the engine records them (auto resolved)."""
        return dataclasses.replace(self.config.quant, lm_head=self.config.quant.lm_head_quant())

    def _trial_start(self, out_dir: str, meta: dict) -> None:
        """Start an engine of the built layout (random values: kernels depend on shapes and
        dtypes only) so that every kernel a load compiles is compiled now."""
        from kiln.workers.engine import Engine

        t = time.perf_counter()
        gc.collect()  # the built model is gone: give its memory back before the KV budget is taken
        torch.cuda.empty_cache()
        q = QuantConfig(**meta["build"]["quant"])
        source = ModelSource(name="trial start", path=out_dir, config=ModelConfig(**meta["model"]),
                             weights=None, tokenizer=None)
        engine = Engine(dataclasses.replace(self.config, quant=q, dtype=meta["build"]["dtype"]), source)
        del engine
        gc.collect()  # its CUDA graphs and KV cache, before a real engine (LLM(checkpoint)) takes memory
        torch.cuda.empty_cache()
        if self.verbose:
            print(f"kiln build: compiled the engine's kernels ({time.perf_counter() - t:.1f}s)", flush=True)

    def _build(self, out_dir: str, source: ModelSource | None) -> dict:
        from safetensors.torch import save_file

        from kiln.workers.engine import resolve_device, resolve_dtype
        from kiln.workers.quantize import calibration_tokens, quantize_model

        cfg = self.config
        q = self._quant()
        t0 = time.perf_counter()
        progress = _Progress(self.verbose)
        mc = source.config
        tp, pp = cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size
        validate_layout(mc, tp, pp)
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        max_len = cfg.scheduler.max_model_len or mc.max_position_embeddings
        files = {}
        if source.weights is None and not self.dense_random:
            # Random weights: each rank's shard is drawn directly in its final (quantized) form,
            # so even a 70B shape never exists whole.
            progress.stage("random weights: no checkpoint to read")
            for rank in range(tp * pp):
                ctx = ParallelContext(tp_rank=rank % tp, tp_size=tp, pp_rank=rank // tp, pp_size=pp)
                with torch.device(device):
                    model = LlamaForCausalLM(mc, ctx, dtype, device, 1, q.mode, q.group_size, q.lm_head)
                model.init_random(cfg.seed + rank)
                files[str(rank)] = self._save(model, out_dir, rank, save_file, progress)
                del model
        else:
            with torch.device(device):  # rotary tables long enough for the calibration text
                full = LlamaForCausalLM(mc, ParallelContext(), dtype, device, q.calibration_tokens + 1)
            if source.weights is None:
                full.init_random(cfg.seed)
                progress.stage("drew dense random weights", _nbytes(full))
            else:
                full.load_weights(source.weights())
                progress.stage(f"read and fused {source.path}", _nbytes(full))
            if q.mode == "int4-awq" and source.quant_block and source.quant_block < q.group_size:
                # The checkpoint is already block-quantized: keep its blocks, so nothing is lost twice.
                q = dataclasses.replace(q, group_size=source.quant_block)
            if q.quantizes():
                tokens = calibration_tokens(source.tokenizer, mc.vocab_size, q.calibration_tokens,
                                            use_text=source.weights is not None)
                group = quantize_model(full, q.mode, q.kv_cache_dtype == "fp8", q.group_size, tokens, dtype, device,
                                       q.lm_head)
                q = dataclasses.replace(q, group_size=group)
                progress.stage(f"quantized to {q.mode}" + (", calibrated FP8 KV scales"
                                                           if q.kv_cache_dtype == "fp8" else ""), _nbytes(full))
            for rank in range(tp * pp):
                ctx = ParallelContext(tp_rank=rank % tp, tp_size=tp, pp_rank=rank // tp, pp_size=pp)
                if tp * pp == 1:
                    shard = full
                else:
                    with torch.device("meta"):
                        shard = LlamaForCausalLM(mc, ctx, dtype, torch.device("meta"), 1, q.mode, q.group_size,
                                                 q.lm_head)
                    shard = slice_shard(full, shard, ctx)
                files[str(rank)] = self._save(shard, out_dir, rank, save_file, progress)
        if source.tokenizer is not None:
            tk = source.tokenizer
            with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
                f.write(tk.tk.to_str())
            with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
                json.dump({"chat_template": tk.chat_template, "bos_token": tk.bos_token, "eos_token": tk.eos_token,
                           "eos_token_ids": tk.eos_token_ids}, f)
        from kiln.kernels.attention_triton import PREFILL_CONFIG

        meta = {
            "format": "kiln-engine", "format_version": ENGINE_FORMAT,
            "kiln_version": kiln_version(), "torch_version": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": source.path, "random_weights": source.weights is None,
            "model": mc.to_dict(),
            "build": {"dtype": str(dtype).removeprefix("torch."), "quant": dataclasses.asdict(q),
                      "tensor_parallel_size": tp, "pipeline_parallel_size": pp, "max_seq_len": max_len,
                      "max_batch_size": cfg.scheduler.max_num_seqs},
            "target": target_of(device),
            "tuning": {"prefill_tiles": PREFILL_CONFIG},
            "files": files,
            "tokenizer": source.tokenizer is not None,
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        with open(os.path.join(out_dir, "engine.json"), "w") as f:
            json.dump(meta, f, indent=2)
        progress.stage(f"wrote {out_dir} in {meta['build_seconds']:.1f}s")
        return meta

    def _save(self, model, out_dir: str, rank: int, save_file, progress: _Progress) -> str:
        name = f"rank{rank}.safetensors"
        state = engine_state(model)
        save_file(state, os.path.join(out_dir, name))
        progress.stage(f"rank {rank}: {len(state)} tensors", sum(t.numel() * t.element_size() for t in state.values()))
        return name


def _nbytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in engine_state(model).values())


def engine_state(model) -> dict[str, torch.Tensor]:
    """What an engine file holds: parameters and persistent buffers, a tied LM head once."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.lm_head_tied():
        state.pop("lm_head.weight", None)
    return state


@torch.no_grad()
def slice_shard(full, shard, ctx: ParallelContext):
    """Fill `shard` (a rank's model on the meta device) with its slices of `full` (tp=pp=1)."""
    from kiln.workers.models.layers import MergedColumnLinear, RowParallelLinear, VocabParallelEmbedding
    from kiln.workers.models.llama import LlamaAttention

    start_layer, _ = layer_range(full.cfg.num_hidden_layers, ctx.pp_rank, ctx.pp_size)
    device = full.cos_sin.device
    full_modules = dict(full.named_modules())
    for name, m in list(shard.named_modules()):
        parts = name.split(".")
        if len(parts) > 1 and parts[0] == "layers":
            parts[1] = str(int(parts[1]) + start_layer)
        src = full_modules[".".join(parts)] if name else full
        for key, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            value = getattr(src, key)
            if isinstance(m, MergedColumnLinear):  # every tensor is indexed by output row
                value = torch.cat([value[src.parts[sid][0] + start:src.parts[sid][0] + start + size]
                                   for sid, (_, start, size) in m.parts.items()])
            elif isinstance(m, RowParallelLinear) and key in ("weight", "qweight", "scales", "mins"):
                per = {"weight": 1, "qweight": 8 if m.quant == "int4-awq" else 1}.get(key, m.group)
                if key == "scales" and m.quant != "int4-awq":
                    per = None  # a scale per output row: every column shard keeps all of them
                if per is not None:
                    value = value[:, m.start // per:(m.start + m.size) // per]
            elif isinstance(m, LlamaAttention) and key == "k_smooth":  # per KV head
                value = value[m.kv_start:m.kv_start + m.num_kv_heads]
            elif isinstance(m, VocabParallelEmbedding) and key in ("weight", "qweight", "scales"):
                rows = value[m.start:m.start + m.per_rank]
                value = torch.zeros(m.per_rank, *value.shape[1:], dtype=value.dtype, device=device)
                value[:rows.shape[0]] = rows
            new = value.detach().clone().to(device)
            if isinstance(t, torch.nn.Parameter):
                setattr(m, key, torch.nn.Parameter(new, requires_grad=False))
            else:
                m.register_buffer(key, new, persistent=key != "cos_sin")
    if shard.lm_head_tied():
        shard.lm_head.weight = shard.embed_tokens.weight
    return shard


# -- reading engines -------------------------------------------------------------

def read_engine(path: str) -> dict:
    with open(os.path.join(path, "engine.json")) as f:
        meta = json.load(f)
    if meta.get("format") != "kiln-engine":
        raise ValueError(f"{path}/engine.json is not a kiln engine description")
    return meta


def check_engine(meta: dict, path: str, device: torch.device, tp: int, pp: int) -> None:
    """Refuse an engine built for another GPU, layout or kiln version, saying how to rebuild."""
    build = meta["build"]
    rebuild = (f"kiln build {meta.get('checkpoint') or 'CHECKPOINT'} -o {path} --tp {tp} --pp {pp} "
               f"--quant {build['quant']['mode']} --kv-cache-dtype {build['quant']['kv_cache_dtype']}"
               f" --quant-lm-head {build['quant'].get('lm_head', 'auto')}")
    problems = []
    if meta.get("format_version") != ENGINE_FORMAT:
        problems.append(f"engine format {meta.get('format_version')} (this kiln reads {ENGINE_FORMAT})")
    if meta["kiln_version"].split(".")[:2] != kiln_version().split(".")[:2]:
        problems.append(f"kiln {meta['kiln_version']} (this is kiln {kiln_version()})")
    here = target_of(device)
    there = meta["target"]
    if here["device"] != there["device"]:
        problems.append(f"device {there['device']} (this is {here['device']})")
    elif here["capability"] != there["capability"]:
        problems.append(f"{there['gpu_name']} (compute capability {there['capability']}; this is "
                        f"{here['gpu_name']}, {here['capability']})")
    if (build["tensor_parallel_size"], build["pipeline_parallel_size"]) != (tp, pp):
        problems.append(f"tp={build['tensor_parallel_size']} pp={build['pipeline_parallel_size']} "
                        f"(asked for tp={tp} pp={pp})")
    if problems:
        raise ValueError(f"engine {path} was built for " + "; ".join(problems) + f". Rebuild it: {rebuild}")


def load_engine_model(meta: dict, path: str, ctx: ParallelContext, device: torch.device, max_positions: int):
    """The rank's model, read straight from its engine file onto `device`."""
    from kiln.workers.loaders.fastload import load_to_device

    mc = ModelConfig(**meta["model"])
    q = QuantConfig(**meta["build"]["quant"])
    dtype = getattr(torch, meta["build"]["dtype"])
    from kiln.kernels.rope import rope_cos_sin

    # Built on the meta device: the file's tensors become the parameters (no second copy).
    meta_dev = torch.device("meta")
    with meta_dev:
        model = LlamaForCausalLM(mc, ctx, dtype, meta_dev, 1, q.mode, q.group_size, q.lm_head)
    model.register_buffer("cos_sin", rope_cos_sin(mc.head_dim, max_positions, mc.rope_theta, mc.rope_scaling,
                                                  device), persistent=False)
    file = os.path.join(path, meta["files"][str(ctx.rank)])
    state = load_to_device(file, device)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = model.lm_head_tied()
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"engine file {file} does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.sync_kv_scales()
    return model, q, dtype


# -- the build cache ---------------------------------------------------------------

def cache_dir() -> str:
    return os.environ.get("KILN_ENGINE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kiln", "engines"))


def cached_engine(config: EngineConfig, source: ModelSource, verbose: bool = False) -> str:
    """The engine for (checkpoint, build settings, device), built on first use. The key holds the
    kiln version and engine format, so a cache filled by an older kiln is rebuilt, not refused."""
    from kiln.workers.engine import resolve_device

    device = resolve_device(config.device)
    stat = []
    p = source.path
    for root, _, names in (os.walk(p) if os.path.isdir(p) else [(os.path.dirname(p), [], [os.path.basename(p)])]):
        for n in sorted(names):
            st = os.stat(os.path.join(root, n))
            stat.append((n, st.st_size, int(st.st_mtime)))
    key = json.dumps({"path": os.path.abspath(p), "files": stat, "quant": dataclasses.asdict(config.quant),
                      "dtype": config.dtype, "tp": config.parallel.tensor_parallel_size,
                      "pp": config.parallel.pipeline_parallel_size, "target": target_of(device),
                      "kiln": kiln_version(), "format": ENGINE_FORMAT}, sort_keys=True)
    out = os.path.join(cache_dir(), hashlib.sha256(key.encode()).hexdigest()[:20])
    if not os.path.exists(os.path.join(out, "engine.json")):
        tmp = out + f".tmp{os.getpid()}"
        Builder(config, verbose=verbose).build(tmp, source)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out
