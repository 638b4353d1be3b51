"""Every Triton kernel against its torch reference, on fresh random inputs.

On CPU the kernels run in Triton's interpreter at small shapes (fp32/fp16:
the interpreter has no bf16); with CUDA, the `gpu` tests run real shapes in
bf16. Outputs are poisoned first, so an unwritten element fails the check.
"""
import os

import pytest
import torch

from kiln.kernels import backend
from kiln.kernels.activation import silu_and_mul_ref
from kiln.kernels.attention import AttentionMetadata, paged_attention_ref, write_kv_ref
from kiln.kernels.norm import fused_add_rms_norm_ref, rms_norm_ref
from kiln.kernels.rope import apply_rope_ref, rope_cos_sin

pytestmark = pytest.mark.skipif(not backend.HAS_TRITON, reason="needs triton")

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # rel. L2 error


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "NaN in output"
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan"))


# -- norms and activation --------------------------------------------------

def _norm_cases():
    cpu = [(5, 96, torch.float32), (3, 576, torch.float16)]
    gpu = [(8192, 4096, torch.bfloat16), (7, 576, torch.bfloat16)]
    return [pytest.param(*c, id=f"{c[0]}x{c[1]}-{c[2]}") for c in cpu] + \
        [pytest.param(*c, id=f"gpu-{c[0]}x{c[1]}-{c[2]}", marks=pytest.mark.gpu) for c in gpu]


@pytest.mark.parametrize("rows, hidden, dtype", _norm_cases())
def test_rms_norm_and_fused_add(rows, hidden, dtype):
    from kiln.kernels import norm_triton

    x = torch.randn(rows, hidden, dtype=dtype, device=DEV)
    w = torch.randn(hidden, dtype=dtype, device=DEV)
    res = torch.randn(rows, hidden, dtype=dtype, device=DEV)
    assert rel_err(norm_triton.rms_norm(x, w, 1e-5), rms_norm_ref(x.float(), w.float(), 1e-5)) < TOL[dtype]
    r_kernel, r_ref = res.clone(), res.clone().float()
    out, r_out = norm_triton.fused_add_rms_norm(x, r_kernel, w, 1e-6)
    ref, _ = fused_add_rms_norm_ref(x.float(), r_ref, w.float(), 1e-6)
    assert r_out.data_ptr() == r_kernel.data_ptr()  # the residual is updated in place
    assert rel_err(r_kernel, r_ref) < TOL[dtype] and rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("rows, hidden, dtype", _norm_cases())
def test_silu_and_mul(rows, hidden, dtype):
    from kiln.kernels import activation_triton

    inter = hidden * 7 // 2 if hidden == 4096 else hidden  # 14336 for the Llama-8B shape
    x = torch.randn(rows, 2 * inter, dtype=dtype, device=DEV)
    assert rel_err(activation_triton.silu_and_mul(x), silu_and_mul_ref(x.float())) < TOL[dtype]


# -- RoPE + cache write ----------------------------------------------------

@pytest.mark.parametrize("hq, hkv, d, dtype, scaling", [
    (4, 2, 64, torch.float32, None),
    (8, 1, 128, torch.float16, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    pytest.param(32, 8, 128, torch.bfloat16, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                 marks=pytest.mark.gpu),
])
def test_rope_and_cache(hq, hkv, d, dtype, scaling):
    from kiln.kernels import rope_triton

    T, page, nblocks = (4096, 16, 300) if dtype is torch.bfloat16 else (9, 4, 8)
    cs = rope_cos_sin(d, 20000, 500000.0, scaling, DEV)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, dtype=dtype, device=DEV)
    pos = torch.randint(0, 20000, (T,), device=DEV)
    slots = torch.randperm(nblocks * page, device=DEV)[:T]
    slots[1] = -1  # padding: must write nothing
    outs = []
    for kernel in (True, False):
        x = qkv.clone()
        q, k, v = (t.view(T, -1, d) for t in x.split([hq * d, hkv * d, hkv * d], -1))
        kc = poison(torch.empty(nblocks, page, hkv, d, dtype=dtype, device=DEV))
        vc = poison(torch.empty_like(kc))
        if kernel:
            rope_triton.rope_and_cache(q, k, v, pos, cs, kc, vc, slots)
        else:
            q.copy_(apply_rope_ref(q, pos, cs))
            k.copy_(apply_rope_ref(k, pos, cs))
            keep = slots >= 0
            write_kv_ref(k[keep], v[keep], kc, vc, slots[keep])
        outs.append((x, kc, vc))
    (x1, k1, v1), (x2, k2, v2) = outs
    assert rel_err(x1, x2) < TOL[dtype]
    written = ~torch.isnan(k2)
    assert torch.equal(written, ~torch.isnan(k1)) and torch.equal(written, ~torch.isnan(v1))
    assert rel_err(k1[written], k2[written]) < TOL[dtype] and torch.equal(v1[written], v2[written])


# -- paged attention -------------------------------------------------------

def make_batch(q_lens, ctx_lens, hq, hkv, d, page, dtype, seed):
    """Random paged cache and queries; blocks scattered over a larger pool."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    nblk = [-(-s // page) for s in seq_lens]
    pool = sum(nblk) + 5
    perm = torch.randperm(pool, generator=g)
    bt = torch.zeros(len(q_lens), max(nblk), dtype=torch.int32)
    i = 0
    for b, n in enumerate(nblk):
        bt[b, :n] = perm[i:i + n]
        i += n
    kc = torch.randn(pool, page, hkv, d, generator=g).to(dtype)
    vc = torch.randn(pool, page, hkv, d, generator=g).to(dtype)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    nd = next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens))
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(q), dtype=torch.int64), query_start_loc=qsl.to(DEV),
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
                             block_tables=bt.to(DEV), num_decodes=nd, max_query_len=max(q_lens),
                             max_seq_len=max(seq_lens))
    return q.to(DEV), kc.to(DEV), vc.to(DEV), meta


CPU_ATTN = [
    # (q lens, cached context lens, query heads, kv heads, head dim, block size)
    ([1, 1, 1], [5, 40, 130], 4, 1, 64, 16),        # decodes, GQA 4, crossing block edges
    ([1, 1], [700, 3], 8, 8, 64, 16),               # MHA, long + short context (split-KV)
    ([1, 7, 20], [70, 0, 33], 8, 1, 64, 4),         # GQA 8, mixed decode + prefill + prefix hit, block 4
    ([12, 30], [0, 16], 4, 4, 128, 8),              # head dim 128, pure prefill, one extends a prefix
]
GPU_ATTN = [
    ([1] * 64, [4095] * 64, 32, 8, 128, 16),
    ([1], [32767], 32, 8, 128, 16),
    ([1] * 5 + [300, 1000, 37], [10, 200, 4000, 17, 9000, 0, 500, 1234], 32, 8, 128, 16),
    ([513, 64], [0, 4031], 32, 32, 128, 32),
    ([1] * 3 + [77], [100, 5000, 33, 640], 28, 4, 128, 16),   # GQA 7 (Qwen2-7B)
    ([1] * 4 + [200], [64, 1, 999, 4000, 50], 9, 3, 64, 16),  # SmolLM2 heads
    ([1], [200], 32, 8, 128, 16),                       # batch 1, short: most splits empty
]


def naive_attention(q, kc, vc, meta, scale):
    """Each sequence on its own, straight from its block table, in float64: the oracle."""
    out = torch.empty(q.shape, dtype=torch.float64)
    qsl, page = meta.query_start_loc.tolist(), kc.shape[1]
    for b, n in enumerate(meta.seq_lens.tolist()):
        blocks = meta.block_tables[b, :-(-n // page)].long().cpu()
        k = kc.cpu().double()[blocks].flatten(0, 1)[:n]  # [n, Hkv, d]
        v = vc.cpu().double()[blocks].flatten(0, 1)[:n]
        rows = q[qsl[b]:qsl[b + 1]].cpu().double()  # [m, Hq, d]
        m, group = rows.shape[0], q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        s = torch.einsum("mhd,nhd->hmn", rows, k) * scale
        visible = torch.arange(n)[None, :] <= (n - m + torch.arange(m))[:, None]
        s = s.masked_fill(~visible, float("-inf"))
        out[qsl[b]:qsl[b + 1]] = torch.einsum("hmn,nhd->mhd", s.softmax(-1), v)
    return out


def test_reference_attention_groups_decodes_by_length():
    """The reference pads decodes per length-sorted group; every row still gets its own keys."""
    q_lens = [1] * 37 + [9, 3]
    ctx = [int(x) for x in torch.randint(1, 300, (37,), generator=torch.Generator().manual_seed(3))] + [0, 50]
    q, kc, vc, meta = make_batch(q_lens, ctx, 6, 2, 32, 16, torch.float32, 4)
    from kiln.kernels import attention

    cpu_meta = _to_cpu(meta)
    got = paged_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), cpu_meta, 32 ** -0.5)
    assert len(cpu_meta.cache[("ref_plan", 16)]) == attention.DECODE_GROUPS + 1  # 4 decode groups, 1 prefill
    assert rel_err(got, naive_attention(q, kc, vc, meta, 32 ** -0.5)) < 1e-6


def _to_cpu(meta):
    return AttentionMetadata(slot_mapping=meta.slot_mapping.cpu(), query_start_loc=meta.query_start_loc.cpu(),
                             seq_lens=meta.seq_lens.cpu(), block_tables=meta.block_tables.cpu(),
                             num_decodes=meta.num_decodes, max_query_len=meta.max_query_len,
                             max_seq_len=meta.max_seq_len)


@pytest.mark.parametrize("q_lens, ctx, hq, hkv, d, page", CPU_ATTN)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_attention_small(q_lens, ctx, hq, hkv, d, page, dtype):
    _check_attention(q_lens, ctx, hq, hkv, d, page, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens, ctx, hq, hkv, d, page", GPU_ATTN)
def test_paged_attention_real_shapes(q_lens, ctx, hq, hkv, d, page):
    _check_attention(q_lens, ctx, hq, hkv, d, page, torch.bfloat16)


def _check_attention(q_lens, ctx, hq, hkv, d, page, dtype):
    from kiln.kernels import attention_triton

    for seed in (0, 1):
        q, kc, vc, meta = make_batch(q_lens, ctx, hq, hkv, d, page, dtype, seed)
        ref = paged_attention_ref(q.float(), kc.float(), vc.float(), meta, d ** -0.5)
        got = attention_triton.paged_attention(q, kc, vc, meta, d ** -0.5)
        assert rel_err(got, ref) < max(TOL[dtype], 1e-4), (seed, rel_err(got, ref))


def test_decode_ignores_padding_rows():
    """Graph padding: seq_len 0 rows produce zeros, not NaN, and touch nothing else."""
    from kiln.kernels import attention_triton

    q, kc, vc, meta = make_batch([1, 1, 1], [20, 0, 9], 4, 2, 64, 16, torch.float32, 3)
    meta.seq_lens[1] = 0
    out = attention_triton.paged_attention(q, kc, vc, meta, 0.125)
    assert torch.all(out[1] == 0) and not torch.isnan(out).any()


# -- greedy argmax and compilation ----------------------------------------------

@pytest.mark.parametrize("rows, cols", [(1, 49152), (3, 1000), (2, 4097),
                                        pytest.param(1, 128256, marks=pytest.mark.gpu),
                                        pytest.param(256, 128256, marks=pytest.mark.gpu)])
def test_argmax_matches_torch(rows, cols):
    """Greedy's argmax split over chunks of the row: torch's index, the first one on ties (also
    across chunks), on fp32 and bf16 logits and a row slice of a wider tensor."""
    from kiln.kernels import argmax_triton
    from kiln.kernels.argmax import argmax_ref

    x = torch.randn(rows, cols + 3, device=DEV)[:, :cols]
    x[0, cols // 2] = x[0, cols - 1] = x[0, 7] = 50.0  # a tie in three places: the first wins
    if rows > 1:
        x[-1, cols - 1] = 60.0  # the last column, in a partial chunk
    for t in (x, x.to(torch.bfloat16)):
        assert torch.equal(argmax_triton.argmax(t), argmax_ref(t))
    assert argmax_triton.argmax(x)[0] == 7


@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_gpus(arch):
    """Every kernel variant compiles for Hopper (PDL, FP8) and Ampere: the interpreter, which
    runs the other tests here, skips Triton's compiler and its type checks (see compile_check)."""
    import importlib.util
    import subprocess
    import sys

    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton has no ptxas to compile with")
    assert importlib.util.find_spec("tests.kernels.compile_check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.compile_check", str(arch)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok  ") >= (20 if arch >= 89 else 12), proc.stdout
