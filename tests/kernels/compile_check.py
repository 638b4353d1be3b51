"""Compile every Triton kernel of kiln for a GPU architecture, on a machine without a GPU.

    python -m tests.kernels.compile_check 90     # Hopper, with programmatic dependent launch
    python -m tests.kernels.compile_check 80     # Ampere

The interpreter (TRITON_INTERPRET=1, how CI runs the kernels) executes kernels as numpy and
never runs Triton's compiler, whose checks it does not share: a @triton.jit helper returning
different types from two branches passes under it and fails to compile on a GPU. CPU tests
also run in fp32, where GPUs run bf16 and FP8. So this compiles (through ptxas) each kernel
launch of the wrappers in kiln/kernels with bf16 inputs, FP8 caches and activations, and the
PDL variants, against a stand-in driver that names the target; nothing is launched.
Run it without TRITON_INTERPRET (it removes it); tests/kernels/test_kernels.py runs it in a
subprocess. Prints one line per launch and exits 1 if any failed.
"""
from __future__ import annotations

import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # before triton.jit decorates kiln's kernels

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver, jit  # noqa: E402

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


class _TargetOnly:
    """The part of a Triton driver that compiling needs: which GPU, no device behind it."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def _compile_only() -> None:
    """Every kernel[grid](...) compiles and returns instead of launching."""
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kwargs.pop("launch_pdl", None)  # a launch setting, not a compile one
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    jit.JITFunction.run = compile_only


def launches(pdl: bool) -> dict:
    """Name -> a call of a kiln kernel wrapper, with the dtypes and variants a GPU runs. Names
    with "fp8" need e4m3, which kiln refuses before compute capability 8.9."""
    from kiln.kernels import (activation_triton, argmax_triton, attention_triton, backend, int4_gemm_triton,
                              int4_gemv_triton, norm_triton, quant, quant_triton, rope_triton)
    from kiln.kernels.attention import AttentionMetadata
    from kiln.kernels.rope import rope_cos_sin

    # The wrappers only ask for PDL on CUDA tensors; these are CPU tensors standing in for them.
    backend.pdl_launch = (lambda t: {"PDL": True}) if pdl else (lambda t: {})
    x = torch.randn(3, 256, dtype=BF16)
    res = torch.randn(3, 256, dtype=BF16)
    nw = torch.ones(256, dtype=BF16)
    cs = rope_cos_sin(64, 64, 10000.0, None, torch.device("cpu"))
    pos, slots = torch.tensor([1, 2]), torch.tensor([1, -1])

    def rope(cache_dtype, tokens=2, smooth=None):
        q, k, v = (torch.randn(tokens, h, 64, dtype=BF16) for h in (4, 2, 2))
        kc, vc = torch.zeros(4, 8, 2, 64, dtype=cache_dtype), torch.zeros(4, 8, 2, 64, dtype=cache_dtype)
        p, sl = torch.zeros(tokens, dtype=torch.int64), torch.full((tokens,), -1, dtype=torch.int64)
        rope_triton.rope_and_cache(q, k, v, p, cs, kc, vc, sl, 0.5, 0.5, smooth)

    def attention(cache_dtype, decode_only, long):
        q_lens, ctx = ([1, 1], [900 if long else 20, 5]) if decode_only else ([1, 9], [20, 4])
        seq_lens = [a + b for a, b in zip(q_lens, ctx)]
        kc = torch.zeros(64, 16, 2, 64, dtype=cache_dtype)
        meta = AttentionMetadata(slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64),
                                 query_start_loc=torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32),
                                 seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                                 block_tables=torch.arange(128, dtype=torch.int32).view(2, 64) % 64,
                                 num_decodes=2 if decode_only else 1, max_query_len=max(q_lens),
                                 max_seq_len=max(seq_lens))
        attention_triton.paged_attention(torch.randn(sum(q_lens), 8, 64, dtype=BF16), kc, kc.clone(), meta, 0.125,
                                         0.5, 0.5)

    w4, s4, m4 = quant.quantize_int4(torch.randn(64, 256), 128)
    s4, m4 = s4.to(BF16), m4.to(BF16)
    w8 = torch.randint(-127, 127, (64, 256), dtype=torch.int8)
    w8f = torch.randn(64, 256).to(FP8)
    s8 = torch.rand(64, dtype=torch.float32)
    wqkv, sqkv, mqkv = quant.quantize_int4(torch.randn((4 + 2 * 2) * 64, 256), 128)

    def qkv_rope(cache_dtype):
        kc, vc = torch.zeros(4, 8, 2, 64, dtype=cache_dtype), torch.zeros(4, 8, 2, 64, dtype=cache_dtype)
        int4_gemv_triton.qkv_rope(x[:2], wqkv, sqkv.to(BF16), mqkv.to(BF16), 4, 2, 64, pos, cs, kc, vc, slots)

    return {
        "rms_norm": lambda: norm_triton.rms_norm(x, nw, 1e-5),
        "rms_norm fp8 out": lambda: norm_triton.rms_norm(x, nw, 1e-5, fp8=True),
        "add + rms_norm": lambda: norm_triton.fused_add_rms_norm(x, res, nw, 1e-5),
        "add + rms_norm fp8 out": lambda: norm_triton.fused_add_rms_norm(x, res, nw, 1e-5, fp8=True),
        "silu_and_mul": lambda: activation_triton.silu_and_mul(x),
        "silu_and_mul fp8 out": lambda: activation_triton.silu_and_mul(x, fp8=True),
        "silu_and_mul fp8 out, two passes": lambda: activation_triton.silu_and_mul(
            torch.randn(1, 2 * (activation_triton.ONE_PASS_MAX_COLS + 64), dtype=BF16), fp8=True),
        "rope + cache bf16": lambda: rope(BF16),
        "rope + cache fp8": lambda: rope(FP8),
        # What the engine runs: smoothing rows, and the wider programs of a prefill-sized step.
        "rope + cache fp8, smoothed": lambda: rope(FP8, smooth=torch.ones(2, 64)),
        "rope + cache fp8, smoothed, prefill rows": lambda: rope(FP8, rope_triton.ROPE_FP8_WIDE_T, torch.ones(2, 64)),
        "decode, one split": lambda: attention(BF16, True, False),
        "decode, splits": lambda: attention(BF16, True, True),
        "decode, splits, fp8 cache": lambda: attention(FP8, True, True),
        "decode + prefill": lambda: attention(BF16, False, False),
        "decode + prefill, fp8 cache": lambda: attention(FP8, False, False),
        "int4 gemv 1-3 rows": lambda: [int4_gemv_triton.gemv(x[:m], w4, s4, m4, 128) for m in (1, 2, 3)],
        "int4 gemv GPU tiles": lambda: int4_gemv_triton.gemv(x[:1], w4, s4, m4, 128, tiles=int4_gemv_triton.TILES),
        "int4 gemv + swiglu": lambda: int4_gemv_triton.gemv(x[:1], w4, s4, m4, 128, up_offset=32),
        "int4 qkv + rope": lambda: qkv_rope(BF16),
        "int4 gemm, every tile": lambda: [int4_gemm_triton.int4_gemm(x, w4, s4, m4, 128, tiles=t)
                                          for t in sorted(set(int4_gemm_triton.TILES.values()))],
        "int4 gemm, K whole": lambda: int4_gemm_triton.int4_gemm(x, w4, s4, m4, 128,
                                                                tiles=int4_gemm_triton.TILES[16][:4] + (0,)),
        "int4 gemm fp16": lambda: int4_gemm_triton.int4_gemm(x.half(), w4, s4.half(), m4.half(), 128,
                                                            tiles=int4_gemm_triton.TILES[16]),
        "int4 dequantize": lambda: quant_triton.dequantize_int4(w4, s4, m4, BF16, 128),
        "argmax fp32 logits": lambda: argmax_triton.argmax(torch.randn(2, 5000)),
        "int8 gemv": lambda: quant_triton.gemv(x[:1], w8, s8, None, 8, 0),
        "fp8 gemv": lambda: quant_triton.gemv(x[:1], w8f, s8, None, 8, 0),
        "int8 tensor cores": lambda: quant_triton.tensor_core_linear(x, w8, s8),
        "fp8 weights, tensor cores": lambda: quant_triton.tensor_core_linear(x, w8f, s8),
        # Its wrapper takes the reference on CPU tensors (the interpreter's e4m3 cast is wrong).
        "fp8 per-token quantize": lambda: quant_triton._fp8_per_token_kernel[(3,)](
            x, torch.empty(3, 256, dtype=FP8), torch.empty(3, 1), 256, x.stride(0), 256, BLOCK=256, num_warps=8),
    }


def main(arch: int) -> int:
    driver.set_active(_TargetOnly(arch))
    _compile_only()
    failed = 0
    for name, call in launches(pdl=arch >= 90).items():
        if "fp8" in name and arch < 89:
            continue
        try:
            call()
            print(f"ok      sm_{arch} {name}")
        except Exception as e:  # report every kernel, not just the first failure
            failed += 1
            cause = e.__cause__ or e
            print(f"FAILED  sm_{arch} {name}: {type(cause).__name__}: {cause}\n{traceback.format_exc(limit=3)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
