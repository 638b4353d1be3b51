"""The quantized kernels against their torch references: weight-only and fp8 GEMMs, the int4
GEMV and its fused epilogues, and the FP8 KV cache (helpers and conventions as in
test_kernels.py)."""
import pytest
import torch
import torch.nn.functional as F

from kiln.kernels import backend
from kiln.kernels.activation import silu_and_mul_ref
from kiln.kernels.attention import paged_attention_ref
from kiln.kernels.norm import fused_add_rms_norm_ref, rms_norm_ref
from kiln.kernels.rope import rope_cos_sin
from tests.kernels.test_kernels import CUDA, DEV, GPU_ATTN, TOL, make_batch, rel_err

pytestmark = pytest.mark.skipif(not backend.HAS_TRITON, reason="needs triton")


# -- quantized GEMMs and the FP8 KV cache --------------------------------------------

@pytest.mark.parametrize("m, n, k, dtype", [
    (1, 96, 256, torch.float32), (2, 40, 512, torch.float16), (5, 64, 512, torch.float16), (1, 24, 1024, torch.float32),
    (2, 27, 512, torch.float32),  # N not a whole number of GEMV tiles: rows past N read row 0
    pytest.param(1, 1001, 14336, torch.bfloat16, marks=pytest.mark.gpu),
    (33, 48, 256, torch.float32), pytest.param(1, 4096, 4096, torch.bfloat16, marks=pytest.mark.gpu),
    pytest.param(16, 14336 * 2, 4096, torch.bfloat16, marks=pytest.mark.gpu),
    pytest.param(256, 4096, 14336, torch.bfloat16, marks=pytest.mark.gpu),
    pytest.param(3, 6144, 4096, torch.bfloat16, marks=pytest.mark.gpu),
    pytest.param(1000, 1024, 4096, torch.bfloat16, marks=pytest.mark.gpu),
])
def test_weight_only_gemm(m, n, k, dtype):
    from kiln.kernels import quant, quant_triton

    x = torch.randn(m, k, dtype=dtype, device=DEV)
    w = torch.randn(n, k, device=DEV) * 0.02
    q8, s8 = quant.quantize_int8(w)
    ref8 = quant.int8_linear_ref(x.float(), q8, s8, None)
    assert rel_err(quant_triton.woq_linear(x, q8, s8, None, bits=8), ref8) < TOL[dtype]
    f8, fs = quant.quantize_fp8(w)
    ref_f8 = F.linear(x.float(), f8.float() * fs[:, None])
    assert rel_err(quant_triton.woq_linear(x, f8, fs, None, bits=8), ref_f8) < TOL[dtype]
    # The int4 GEMV sums (256 + q) x and subtracts 256 sum x after (no int->float converts):
    # fp32 keeps q x to ~2^-16 of x, about 1e-5 relative over a 32-product chunk.
    tol4 = max(TOL[dtype], 5e-5)
    for group in (128, 64, 32):
        p, sc, mn = quant.quantize_int4(w, group)
        ref4 = quant.int4_linear_ref(x.float(), p, sc, mn, None)
        assert rel_err(quant_triton.woq_linear(x, p, sc, mn, bits=4, group=group), ref4) < tol4


@pytest.mark.parametrize("m", [1, 2, 7])
def test_int4_gemm_groups_not_a_power_of_two_per_row(m):
    """SmolLM2's K = 576 is 18 groups of 32 (9 of 64): the GEMV's tiles must still cover K exactly."""
    from kiln.kernels import quant, quant_triton

    x = torch.randn(m, 576, device=DEV)
    w = torch.randn(24, 576, device=DEV) * 0.02
    for group in (32, 64):
        p, sc, mn = quant.quantize_int4(w, group)
        got = quant_triton.woq_linear(x, p, sc, mn, bits=4, group=group)
        assert rel_err(got, quant.int4_linear_ref(x, p, sc, mn, None)) < 1e-4


@pytest.mark.parametrize("m, n, k, group, dtype", [
    (7, 48, 256, 128, torch.float16), (20, 40, 256, 32, torch.float16),  # N not a whole number of tiles
    (33, 32, 192, 64, torch.float16),  # three M tiles, three groups
    pytest.param(7, 6144, 4096, 128, torch.bfloat16, marks=pytest.mark.gpu),
    pytest.param(64, 28672, 4096, 128, torch.bfloat16, marks=pytest.mark.gpu),
    pytest.param(256, 4096, 14336, 128, torch.bfloat16, marks=pytest.mark.gpu),
    pytest.param(100, 3072, 576, 32, torch.bfloat16, marks=pytest.mark.gpu),  # SmolLM2's gate/up
    pytest.param(48, 4096, 4096, 128, torch.float16, marks=pytest.mark.gpu),
])
def test_int4_tensor_core_gemm(m, n, k, group, dtype):
    """The int4 GEMM (codes as 128 + q or 1024 + q on the tensor cores, scale and min applied per
    group to the partial products) against dequantize + matmul, with K whole or split over
    programs. The interpreter's dot is wrong for bf16, so CPU runs fp16."""
    from kiln.kernels import int4_gemm_triton, quant

    x = torch.randn(m, k, dtype=dtype, device=DEV)
    w = torch.randn(n, k, device=DEV) * 0.02
    p, sc, mn = quant.quantize_int4(w, group)
    ref = quant.int4_linear_ref(x.float(), p, sc, mn, None)
    block_m = 16 if DEV == "cpu" else (16 if m <= 16 else 64)
    variants = [None] + [(block_m, 16 if DEV == "cpu" else 64, 1 if DEV == "cpu" else 4, 1 if DEV == "cpu" else 3,
                          split) for split in (0, 4)]
    for tiles in variants:
        got = int4_gemm_triton.int4_gemm(x, p, sc, mn, group, tiles=tiles)
        assert got.dtype == dtype and rel_err(got, ref) < TOL[dtype], tiles
    with pytest.raises(ValueError, match="bf16 or fp16"):
        int4_gemm_triton.int4_gemm(x.float(), p, sc, mn, group)


def test_quantizers_round_trip():
    from kiln.kernels import quant

    w = torch.randn(64, 256)
    q, s = quant.quantize_int8(w)
    assert rel_err(q.float() * s[:, None], w) < 0.01
    p, sc, mn = quant.quantize_int4(w, 32)
    assert rel_err(quant.dequantize_int4(p, sc, mn, torch.float32), w) < 0.12
    codes = torch.randint(0, 16, (8, 64), dtype=torch.int32)
    for group in (16, 32, 64):
        assert torch.equal(quant.unpack_int4(quant.pack_int4(codes, group), group), codes)
    # Plane-major within a group: nibble j of word i holds k = j * group/8 + i (group 16: k = 2j + i).
    ramp = torch.arange(16, dtype=torch.int32)[None, :]
    words = quant.pack_int4(ramp, 16)
    expect = [sum((2 * j + i) << (4 * j) for j in range(8)) for i in range(2)]
    assert words.tolist() == [[v - (1 << 32) if v >= 1 << 31 else v for v in expect]]
    f, fs = quant.quantize_fp8(w)
    assert rel_err(f.float() * fs[:, None], w) < 0.05


@pytest.mark.parametrize("m", [3, 40])
def test_fp8_linear_triton_path_matches_reference(m):
    """Small batches take the weight-only kernel (x unquantized), larger ones quantize x per token."""
    from kiln.kernels import quant

    x = torch.randn(m, 256, device=DEV)
    q, s = quant.quantize_fp8(torch.randn(48, 256, device=DEV) * 0.02)
    with backend.use("triton"):
        y = quant.fp8_linear(x, q, s, None)
    # Weight-only: x is not rounded, the reference rounds it. Else the same codes; on a GPU the
    # GEMM is _scaled_mm with fast accumulation, in the interpreter the reference's own GEMM.
    tol = 5e-2 if m <= quant.FP8_WEIGHT_ONLY_MAX_M else (1e-2 if CUDA else 1e-5)
    assert rel_err(y, quant.fp8_linear_ref(x, q, s, None)) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 300])
def test_fp8_linear_matches_reference(m):
    from kiln.kernels import quant, quant_triton

    x = torch.randn(m, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(1024, 4096, device="cuda") * 0.02
    q, s = quant.quantize_fp8(w)
    tol = 5e-2 if m <= quant.FP8_WEIGHT_ONLY_MAX_M else 1e-2
    assert rel_err(quant.fp8_linear(x, q, s, None), quant.fp8_linear_ref(x, q, s, None).float()) < tol
    xq, xs = quant_triton.quantize_fp8_per_token(x)
    rq, rs = quant.quantize_fp8_per_token(x)
    assert torch.allclose(xs, rs)
    assert (xq.float() != rq.float()).float().mean() < 1e-4  # same codes bar rare rounding ties


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 40, 300])
def test_norm_and_activation_quantize_for_fp8_linears(rows):
    """The fused per-token quantization gives the codes and scales of norm/activation then quantize."""
    from kiln.kernels import activation_triton, norm_triton
    from kiln.kernels.quant import quantize_fp8_per_token

    def same(got, ref_y):
        rq, rs = quantize_fp8_per_token(ref_y)
        assert got.dtype == ref_y.dtype and torch.allclose(got.scale, rs)
        assert (got.q.float() != rq.float()).float().mean() < 1e-4  # bar rare rounding ties

    x = torch.randn(rows, 4096, dtype=torch.bfloat16, device="cuda") * 3
    w = torch.randn(4096, dtype=torch.bfloat16, device="cuda")
    same(norm_triton.rms_norm(x, w, 1e-5, fp8=True), rms_norm_ref(x, w, 1e-5))
    res, res_ref = torch.randn_like(x), None
    res_ref = res.clone()
    got, _ = norm_triton.fused_add_rms_norm(x, res, w, 1e-5, fp8=True)
    ref, _ = fused_add_rms_norm_ref(x, res_ref, w, 1e-5)
    same(got, ref)
    assert torch.equal(res, res_ref)
    for width in (14336, 28672):  # Llama-8B's rows in one pass, Llama-70B's in two
        gu = torch.randn(rows, 2 * width, dtype=torch.bfloat16, device="cuda") * 2
        same(activation_triton.silu_and_mul(gu, fp8=True), silu_and_mul_ref(gu))


def test_int4_dequantize_kernel_matches_reference():
    from kiln.kernels import quant, quant_triton

    w = torch.randn(40, 256, device=DEV)
    for group in (32, 128):
        p, sc, mn = quant.quantize_int4(w, group)
        with backend.use("triton"):
            got = quant_triton.dequantize_int4(p, sc, mn, torch.float32, group)
        assert torch.allclose(got, quant.dequantize_int4(p, sc, mn, torch.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("q_lens, ctx", [([1, 1], [300, 17]), ([9, 1], [0, 40])])
def test_fp8_kv_reference_close_to_full_precision(q_lens, ctx):
    from kiln.kernels.quant import to_kv_cache

    q, kc, vc, meta = make_batch(q_lens, ctx, 8, 2, 64, 16, torch.float32, 4)
    ks, vs = float(kc.abs().max()) / 400, float(vc.abs().max()) / 400
    kq, vq = to_kv_cache(kc, torch.float8_e4m3fn, ks), to_kv_cache(vc, torch.float8_e4m3fn, vs)
    full = paged_attention_ref(q, kc, vc, meta, 0.125)
    assert rel_err(paged_attention_ref(q, kq, vq, meta, 0.125, ks, vs), full) < 0.06


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens, ctx, hq, hkv, d, page", GPU_ATTN[:4])
def test_fp8_kv_triton_matches_reference(q_lens, ctx, hq, hkv, d, page):
    from kiln.kernels import attention_triton
    from kiln.kernels.quant import to_kv_cache

    q, kc, vc, meta = make_batch(q_lens, ctx, hq, hkv, d, page, torch.bfloat16, 5)
    ks, vs = 0.02, 0.015
    kq, vq = to_kv_cache(kc, torch.float8_e4m3fn, ks), to_kv_cache(vc, torch.float8_e4m3fn, vs)
    ref = paged_attention_ref(q.float(), kq, vq, meta, d ** -0.5, ks, vs)
    got = attention_triton.paged_attention(q, kq, vq, meta, d ** -0.5, ks, vs)
    assert rel_err(got, ref) < 1e-2


@pytest.mark.parametrize("T, hq, hkv, d, dtype, smooth", [
    (5, 9, 3, 64, torch.float32, True), (4, 8, 2, 32, torch.float16, True), (3, 4, 2, 32, torch.float32, False),
    (300, 4, 2, 32, torch.float32, True),  # prefill-sized: several tokens a program
    pytest.param(64, 32, 8, 128, torch.bfloat16, True, marks=pytest.mark.gpu),
    pytest.param(7, 9, 3, 64, torch.bfloat16, False, marks=pytest.mark.gpu),
    pytest.param(600, 32, 8, 128, torch.bfloat16, True, marks=pytest.mark.gpu)])
def test_rope_writes_fp8_cache(T, hq, hkv, d, dtype, smooth):
    """With an FP8 cache the kernel leaves q and k RoPE'd, smoothed and Hadamard-rotated as the
    reference does, so scores are those of the plain q and k; K and V go to the cache scaled.
    (The interpreter casts to e4m3 its own way, so the cache bytes are compared on a GPU only.)"""
    from kiln.kernels import rope_triton
    from kiln.kernels.rope import apply_rope_ref, hadamard_ref, rope_and_cache_ref

    cs = rope_cos_sin(d, 4096, 500000.0, None, DEV)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, device=DEV).to(dtype)
    pos = torch.randint(0, 4096, (T,), device=DEV)
    slots = torch.randperm(40 * 16, device=DEV)[:T]

    def run(fn):
        q, k, v = (t.view(T, -1, d) for t in qkv.clone().split([hq * d, hkv * d, hkv * d], -1))
        kc = torch.zeros(40, 16, hkv, d, dtype=torch.float8_e4m3fn, device=DEV)
        vc = torch.zeros_like(kc)
        fn(q, k, v, pos, cs, kc, vc, slots, 0.05, 0.03, k_smooth)
        return q, k, kc.view(-1, hkv, d)[slots].float(), vc.view(-1, hkv, d)[slots].float()

    k_smooth = torch.rand(hkv, d, device=DEV) * 3 + 0.25 if smooth else None

    q, k, kc, vc = run(rope_triton.rope_and_cache)
    rq, rk, rkc, rvc = run(rope_and_cache_ref)
    tol = TOL[dtype]
    assert rel_err(q, rq) < tol and rel_err(k, rk) < tol
    q0, k0, _ = (t.view(T, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], -1))
    q0, k0 = apply_rope_ref(q0, pos, cs).float(), apply_rope_ref(k0, pos, cs).float()
    g = hq // hkv
    scores = torch.einsum("tkgd,tkd->tkg", q.float().view(T, hkv, g, d), k.float())
    assert rel_err(scores, torch.einsum("tkgd,tkd->tkg", q0.view(T, hkv, g, d), k0)) < 4 * tol
    unrotated = hadamard_ref(k.float())  # the rotation is its own inverse
    assert rel_err(unrotated * (1 if k_smooth is None else k_smooth), k0) < 4 * tol
    if CUDA:
        assert rel_err(kc, rkc) < 1e-2 and rel_err(vc, rvc) < 1e-2
        assert rel_err(vc * 0.03, qkv[:, (hq + hkv) * d:].float().view(T, hkv, d)) < 0.05


@pytest.mark.parametrize("m, n, k, dtype", [(1, 40, 256, torch.float32), (3, 24, 576, torch.float32),
                                            (1, 27, 512, torch.float32),  # rows past N in a program
                                            pytest.param(1, 14336, 4096, torch.bfloat16, marks=pytest.mark.gpu),
                                            pytest.param(1, 1001, 4096, torch.bfloat16, marks=pytest.mark.gpu),
                                            pytest.param(2, 14336, 4096, torch.bfloat16, marks=pytest.mark.gpu)])
def test_int4_gemv_swiglu_matches_unfused(m, n, k, dtype):
    """The GEMV's SwiGLU epilogue gives silu_and_mul of the plain product (rounded the same way)."""
    from kiln.kernels import quant, quant_triton
    from kiln.kernels.activation import silu_and_mul

    x = torch.randn(m, k, dtype=dtype, device=DEV)
    w = torch.randn(2 * n, k, device=DEV) * 0.05
    group = 64 if k % 128 else 128
    p, sc, mn = quant.quantize_int4(w, group)
    plain = quant_triton.gemv(x, p, sc, mn, 4, group)
    fused = quant_triton.gemv(x, p, sc, mn, 4, group, up_offset=n)
    assert fused.shape == (m, n)
    assert rel_err(fused, silu_and_mul(plain)) < TOL[dtype]


@pytest.mark.parametrize("m, hq, hkv, d, k, rows", [
    (1, 2, 1, 32, 256, 8), (2, 2, 1, 32, 128, 4), (3, 2, 1, 32, 128, 8),
    pytest.param(1, 32, 8, 128, 4096, 8, marks=pytest.mark.gpu),
    pytest.param(2, 32, 8, 128, 4096, 8, marks=pytest.mark.gpu),
    pytest.param(1, 32, 8, 128, 4096, 4, marks=pytest.mark.gpu)])
def test_int4_qkv_rope_matches_unfused(m, hq, hkv, d, k, rows):
    """The QKV GEMV with RoPE and the cache write in its epilogue equals the GEMV followed by
    rope_and_cache: the same q, the same cache bytes (a -1 slot writes nothing), with 4 or 8
    weight rows a program. An FP8 cache is refused (its K rotation needs whole heads), and the
    dispatcher then takes the unfused path."""
    from kiln.kernels import int4_gemv_triton, quant, rope_triton
    from kiln.kernels.rope import rope_cos_sin

    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    w = torch.randn((hq + 2 * hkv) * d, k, device=DEV) * 0.05
    group = 64 if k % 128 else 128
    p, sc, mn = quant.quantize_int4(w, group)
    cos_sin = rope_cos_sin(d, 64, 10000.0, None, torch.device(DEV))
    positions = torch.tensor([5, 40, 63][:m], device=DEV)
    slots = torch.tensor([3, -1, 12][:m], device=DEV)
    caches = [torch.zeros(2, 8, hkv, d, dtype=dtype, device=DEV) for _ in range(4)]
    # The plain GEMV with the same tile: its row sums then add up in the same order.
    tiles = (rows,) + (int4_gemv_triton.QKV_TILES if DEV == "cuda" else int4_gemv_triton.INTERPRETER_QKV_TILES)[1:]
    q, kk, v = int4_gemv_triton.gemv(x, p, sc, mn, group, tiles=tiles).split([hq * d, hkv * d, hkv * d], dim=-1)
    q = q.contiguous().view(m, hq, d)
    rope_triton.rope_and_cache(q, kk.contiguous().view(m, hkv, d), v.contiguous().view(m, hkv, d), positions, cos_sin,
                               caches[0], caches[1], slots)
    fused = int4_gemv_triton.qkv_rope(x, p, sc, mn, hq, hkv, d, positions, cos_sin, caches[2], caches[3], slots,
                                      tiles=tiles)
    assert torch.equal(fused.view(m, hq, d), q)
    assert torch.equal(caches[2].view(torch.uint8), caches[0].view(torch.uint8))
    assert torch.equal(caches[3].view(torch.uint8), caches[1].view(torch.uint8))
    fp8 = torch.zeros(2, 8, hkv, d, dtype=torch.float8_e4m3fn, device=DEV)
    with pytest.raises(ValueError, match="KV cache"):
        int4_gemv_triton.qkv_rope(x, p, sc, mn, hq, hkv, d, positions, cos_sin, fp8, fp8.clone(), slots)
    with backend.use("triton"):
        assert quant.int4_qkv_rope(x, p, sc, mn, hq, hkv, d, positions, cos_sin, fp8, fp8.clone(), slots) is None


def test_fp8_refused_before_compute_capability_8_9(monkeypatch):
    """e4m3 weights or KV cache on an A100 get a clear error, not a Triton compile failure."""
    from kiln.kernels.quant import check_fp8_kv_cache_supported, check_fp8_supported

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    gpu = torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"kv_cache_dtype 'fp8'.*A100-SXM4-80GB is 8\.0.*--kv-cache-dtype auto"):
        check_fp8_kv_cache_supported(gpu)
    with pytest.raises(ValueError, match=r"quant 'fp8'.*--quant int8-wo"):
        check_fp8_supported(gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_kv_cache_supported(gpu)
    check_fp8_supported(gpu)
    # The K rotation of an FP8 cache needs a power-of-two head_dim.
    with pytest.raises(ValueError, match=r"power-of-two head_dim.*head_dim is 80.*--kv-cache-dtype auto"):
        check_fp8_kv_cache_supported(gpu, 80)
    check_fp8_kv_cache_supported(torch.device("cpu"), 128)
