"""The real SmolLM2 gives the same greedy tokens through the Triton kernels as
through the torch references (Triton's interpreter on CPU; natively on GPU)."""
import pytest

from kiln import SamplingParams
from kiln.kernels import backend

pytestmark = pytest.mark.skipif(not backend.HAS_TRITON, reason="needs triton")


def test_triton_path_matches_reference(llm):
    long = "One two three four five six seven eight nine ten eleven twelve thirteen fourteen, and then " * 2
    prompts = [long, "The capital of France is"]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with backend.use("torch"):
        ref = llm.generate(prompts, params)
    with backend.use("triton"):
        got = llm.generate(prompts, params)
        # A prefix-cache hit exercises the extend path (new chunk after cached blocks).
        again = llm.generate([long + " fifteen sixteen"], params)[0]
    with backend.use("torch"):
        again_ref = llm.generate([long + " fifteen sixteen"], params)[0]
    assert again.num_cached_tokens >= 16
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    assert again.outputs[0].token_ids == again_ref.outputs[0].token_ids


def _save_tiny_llama(path, layers: int, std: float | None = 0.1) -> None:
    """A small HF Llama checkpoint; `std` redraws its matrices so logits are well separated
    (bf16 rounding must not flip a greedy choice), None keeps transformers' init."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg)
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, std)
    model.save_pretrained(path)


def _assert_same_greedy(refs, gots) -> None:
    """Equal greedy tokens; where bf16 rounding in two different kernels flips a near-tie, the
    two candidates must be within rounding of each other, and the rest is not compared."""
    for ref, got in zip(refs, gots):
        for i, (a, b) in enumerate(zip(ref.token_ids, got.token_ids)):
            if a != b:
                top = ref.logprobs[i]
                assert b in top and abs(top[a].logprob - top[b].logprob) < 0.05, (i, a, b, top)
                break


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_gpu_kernels_and_cuda_graphs_match_reference(tmp_path, kv_cache_dtype):
    """bf16 on the GPU: Triton kernels + decode CUDA graphs vs the eager torch path; with an FP8
    KV cache too (calibrated smoothing, Hadamard-rotated K)."""
    import torch

    from kiln import LLM

    _save_tiny_llama(tmp_path, layers=4)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (1, 7, 40, 300, 17)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    outs = {}
    for name in ("torch", "triton"):
        with backend.use("auto" if name == "triton" else "torch"):
            llm = LLM(str(tmp_path), kv_cache_bytes=1 << 28, max_num_batched_tokens=256,
                      kv_cache_dtype=kv_cache_dtype)
            assert bool(llm.executor.engine.graphs) == (name == "triton")
            if kv_cache_dtype == "fp8":
                assert llm.executor.engine.kv_cache.dtype == torch.float8_e4m3fn
                assert not torch.all(llm.executor.engine.model.layers[0].self_attn.k_smooth == 1)
            outs[name] = [o.outputs[0] for o in llm.generate(prompts, params)]
            del llm
    _assert_same_greedy(outs["torch"], outs["triton"])


@pytest.mark.gpu
def test_programmatic_dependent_launch_changes_nothing(tmp_path):
    """Kernels launched with PDL (each waits for its predecessor's results) compute exactly what
    they compute without it: a tiny model's decode through CUDA graphs, and a chain of int4
    GEMVs and norms replayed from a graph."""
    import torch

    from kiln import LLM
    from kiln.kernels import quant, quant_triton
    from kiln.kernels.norm import rms_norm

    _save_tiny_llama(tmp_path, layers=3, std=None)
    prompts = [[1, 2, 3], list(range(5, 300))]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)
    w = [quant.quantize_int4(torch.randn(4096, 4096, device="cuda") * 0.02, 128) for _ in range(4)]
    norm_w = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)

    def chain():
        h = x
        for p, s, z in w:
            h = rms_norm(quant_triton.gemv(h, p, s, z, 4, 128), norm_w, 1e-5)
        return h

    outs = {}
    for on in (False, True):
        old = backend.set_pdl(on)
        try:
            llm = LLM(str(tmp_path), kv_cache_bytes=1 << 28, max_num_batched_tokens=256)
            res = llm.generate(prompts, params)
            outs[on] = [([o.outputs[0].token_ids], [{k: v.logprob for k, v in lp.items()} for lp in o.outputs[0].logprobs])
                        for o in res]
            del llm
            chain()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = chain()
            g.replay()
            torch.cuda.synchronize()
            outs[on].append(out.clone())
        finally:
            backend.set_pdl(old)
    assert outs[True][:-1] == outs[False][:-1]
    assert torch.equal(outs[True][-1], outs[False][-1])


@pytest.mark.gpu
def test_gpu_int4_engine_matches_reference(tmp_path, monkeypatch):
    """int4-awq on the GPU (GEMVs with the fused SwiGLU up to 3 rows, the int8 LM head, the int4
    tensor-core GEMM past that) against the torch references on the same engine."""
    import torch

    from kiln import LLM

    monkeypatch.setenv("KILN_ENGINE_CACHE", str(tmp_path / "engines"))
    _save_tiny_llama(tmp_path / "ckpt", layers=3)
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    outs = {}
    for name in ("torch", "triton"):
        with backend.use("auto" if name == "triton" else "torch"):
            llm = LLM(str(tmp_path / "ckpt"), quant="int4-awq", kv_cache_bytes=1 << 28)
            prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (5, 30, 9, 70, 3)]
            gen.manual_seed(1)
            # One request alone (1-row GEMVs), two (2-row GEMVs), then all five (the 6-row graph:
            # the int4 GEMM).
            outs[name] = [o.outputs[0] for n in (1, 2, 5) for o in llm.generate(prompts[:n], params)]
            del llm
    _assert_same_greedy(outs["torch"], outs["triton"])


@pytest.mark.gpu
def test_no_kernel_compiles_once_started(tmp_path, monkeypatch):
    """After the engine's start-up warm-up, steps of any mix (prompts of many lengths, chunked,
    beside decodes of short and long contexts) compile no Triton kernel: a compile met under load
    stalls every running request for seconds (the engine's _warmup; the kernels' do_not_specialize)."""
    from kiln import LLM

    cache = tmp_path / "triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    _save_tiny_llama(tmp_path / "m", layers=2)
    llm = LLM(str(tmp_path / "m"), kv_cache_bytes=1 << 28, max_model_len=2048, max_num_seqs=64,
              max_num_batched_tokens=512)
    started = set(cache.rglob("*.json"))
    lengths = [3, 17, 40, 300, 700, 1500, 5, 64, 250, 1100, 1, 33]
    prompts = [[1 + (i * 7 + j) % 900 for j in range(n)] for i, n in enumerate(lengths * 3)]
    llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True), use_tqdm=False)
    llm.generate(prompts[5:6], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert set(cache.rglob("*.json")) - started == set()
