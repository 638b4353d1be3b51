"""Kernel speed against the GPU's measured ceilings, beside the torch alternatives.

Run on one GPU (the device tool's nvidia-h100-x1):

    python benchmarks/kernels.py            # writes benchmarks/results/kernels-h100.json

Ceilings (measured on the H100 of the device tool): copy 3.02 TB/s counting
bytes read plus written, bf16 matmul 777 TFLOP/s. Each figure is the median of
`triton.testing.do_bench` over fresh random inputs (never zeros); bytes count
each input read once and each output written once.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_result  # noqa: E402
from kiln.kernels import activation_triton, attention_triton, norm_triton  # noqa: E402
from kiln.kernels.attention import AttentionMetadata  # noqa: E402

COPY_TBS = 3.02
MATMUL_TFLOPS = 777.0
DT = torch.bfloat16


def bench(fn) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def paged_cache(batch: int, ctx: int, hkv: int, d: int, page: int = 16):
    nblk = -(-ctx // page)
    pool = batch * nblk
    bt = torch.randperm(pool, device="cuda", dtype=torch.int64).to(torch.int32).view(batch, nblk)
    kc = torch.randn(pool, page, hkv, d, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    return kc, vc, bt


def decode(batch: int, ctx: int, hq=32, hkv=8, d=128) -> dict:
    kc, vc, bt = paged_cache(batch, ctx, hkv, d)
    q = torch.randn(batch, hq, d, device="cuda", dtype=DT)
    out = torch.empty_like(q)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    ms = bench(lambda: attention_triton.paged_decode(q, kc, vc, bt, lens, ctx, d ** -0.5, out))
    kv_bytes = 2 * batch * ctx * hkv * d * 2
    row = {"batch": batch, "context": ctx, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "kiln_ms": ms,
           "kiln_kv_TBps": kv_bytes / ms / 1e9, "kiln_frac_of_copy": kv_bytes / ms / 1e9 / COPY_TBS,
           "splits": attention_triton.decode_splits(batch, hkv, ctx, q.device)}
    # SDPA on a dense (unpaged) cache of the same size: what PyTorch alone offers.
    kd = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=DT)
    vd = torch.randn_like(kd)
    qd = q.view(batch, hq, 1, d)
    try:
        sdpa = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True))
        row.update(sdpa_dense_ms=sdpa, sdpa_kv_TBps=kv_bytes / sdpa / 1e9)
    except RuntimeError as e:
        row["sdpa_error"] = str(e)[:200]
    row.update(_flex_decode(qd, kd, vd, kv_bytes))
    return row


def _flex_decode(q, k, v, kv_bytes) -> dict:
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        flex(q, k, v, enable_gqa=True)
        ms = bench(lambda: flex(q, k, v, enable_gqa=True))
        return {"flex_dense_ms": ms, "flex_kv_TBps": kv_bytes / ms / 1e9}
    except Exception as e:  # flex_attention may not run for every shape / version
        return {"flex_error": f"{type(e).__name__}: {str(e)[:160]}"}


def prefill(n_seqs: int, seq: int, hq=32, hkv=8, d=128) -> dict:
    kc, vc, bt = paged_cache(n_seqs, seq, hkv, d)
    q = torch.randn(n_seqs * seq, hq, d, device="cuda", dtype=DT)
    out = torch.empty_like(q)
    qsl = torch.arange(0, n_seqs * seq + 1, seq, dtype=torch.int32, device="cuda")
    lens = torch.full((n_seqs,), seq, dtype=torch.int32, device="cuda")
    ms = bench(lambda: attention_triton.paged_prefill(q, kc, vc, bt, qsl, lens, d ** -0.5, out))
    flops = n_seqs * 2 * 2 * seq * seq / 2 * hq * d
    row = {"seqs": n_seqs, "seq_len": seq, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "kiln_ms": ms,
           "kiln_TFLOPs": flops / ms / 1e9, "kiln_frac_of_matmul": flops / ms / 1e9 / MATMUL_TFLOPS}
    qd = torch.randn(n_seqs, hq, seq, d, device="cuda", dtype=DT)
    kd = torch.randn(n_seqs, hkv, seq, d, device="cuda", dtype=DT)
    vd = torch.randn_like(kd)
    sdpa = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True))
    row.update(sdpa_dense_ms=sdpa, sdpa_TFLOPs=flops / sdpa / 1e9)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, seq, seq)
        flex = torch.compile(flex_attention, dynamic=False)
        flex(qd, kd, vd, block_mask=mask, enable_gqa=True)
        fms = bench(lambda: flex(qd, kd, vd, block_mask=mask, enable_gqa=True))
        row.update(flex_dense_ms=fms, flex_TFLOPs=flops / fms / 1e9)
    except Exception as e:
        row["flex_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    return row


def elementwise(tokens=8192, hidden=4096, inter=14336) -> dict:
    x = torch.randn(tokens, hidden, device="cuda", dtype=DT)
    res = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=DT)
    norm_bytes = 4 * tokens * hidden * 2  # read x, residual; write residual, out
    ms = bench(lambda: norm_triton.fused_add_rms_norm(x, res, w, 1e-5))

    def torch_norm():
        r = res + x
        return (r.float() * torch.rsqrt(r.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(DT) * w

    tms = bench(torch_norm)
    g = torch.randn(tokens, 2 * inter, device="cuda", dtype=DT)
    act_bytes = 3 * tokens * inter * 2
    ams = bench(lambda: activation_triton.silu_and_mul(g))
    tams = bench(lambda: F.silu(g[:, :inter]) * g[:, inter:])
    return {
        "add_rmsnorm": {"tokens": tokens, "hidden": hidden, "kiln_ms": ms, "kiln_TBps": norm_bytes / ms / 1e9,
                        "kiln_frac_of_copy": norm_bytes / ms / 1e9 / COPY_TBS, "torch_eager_ms": tms},
        "silu_mul": {"tokens": tokens, "intermediate": inter, "kiln_ms": ams, "kiln_TBps": act_bytes / ams / 1e9,
                     "kiln_frac_of_copy": act_bytes / ams / 1e9 / COPY_TBS, "torch_eager_ms": tams},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="kernels-h100")
    ap.add_argument("--sweep", action="store_true", help="time prefill tile shapes first and use the best")
    args = ap.parse_args()
    torch.manual_seed(0)
    sweep = None
    if args.sweep:
        sweep = {}
        for bm, bn, w, st in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (128, 32, 4, 3),
                              (128, 64, 4, 4), (128, 128, 4, 3), (128, 32, 8, 4), (256, 32, 8, 3), (256, 64, 8, 3)]:
            attention_triton.PREFILL_CONFIG = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
            try:
                sweep[f"{bm}x{bn}-w{w}-s{st}"] = prefill(8, 4096)["kiln_TFLOPs"]
            except Exception as e:  # e.g. out of shared memory
                sweep[f"{bm}x{bn}-w{w}-s{st}"] = f"{type(e).__name__}"
            print("prefill", f"{bm}x{bn}-w{w}-s{st}", sweep[f"{bm}x{bn}-w{w}-s{st}"], flush=True)
        best = max((k for k, v in sweep.items() if isinstance(v, float)), key=sweep.get)
        bm, bn = map(int, best.split("-")[0].split("x"))
        w, st = int(best.split("-w")[1].split("-")[0]), int(best.split("-s")[1])
        attention_triton.PREFILL_CONFIG = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
    figures = {
        "decode_b64_ctx4096": decode(64, 4096),
        "decode_b1_ctx32768": decode(1, 32768),
        "prefill_8x4096_causal": prefill(8, 4096),
        **elementwise(),
    }
    targets = {"decode_b64_ctx4096": ("kiln_frac_of_copy", 0.80), "decode_b1_ctx32768": ("kiln_frac_of_copy", 0.60),
               "prefill_8x4096_causal": ("kiln_frac_of_matmul", 0.50), "add_rmsnorm": ("kiln_frac_of_copy", 0.80),
               "silu_mul": ("kiln_frac_of_copy", 0.80)}
    print(f"{'kernel':26s} {'kiln ms':>9s} {'fraction':>9s} {'target':>7s} {'torch ms':>9s}")
    for name, (key, target) in targets.items():
        r = figures[name]
        r["target"] = {key: target, "met": r[key] >= target}
        other = r.get("sdpa_dense_ms", r.get("torch_eager_ms"))
        print(f"{name:26s} {r['kiln_ms']:9.4f} {r[key]:9.3f} {target:7.2f} {other:9.4f}")
    if sweep:
        figures["prefill_config_sweep_TFLOPs"] = sweep
    figures["prefill_config"] = attention_triton.PREFILL_CONFIG
    print("wrote", write_result(args.name, figures, ceilings={"copy_TBps": COPY_TBS, "bf16_matmul_TFLOPs": MATMUL_TFLOPS},
                                triton=triton.__version__))


if __name__ == "__main__":
    main()
