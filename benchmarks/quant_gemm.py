"""Quantized GEMM kernels at Llama-3.1-8B shapes: tile sweep, then every path by batch rows.

    python benchmarks/quant_gemm.py --sweep    # writes benchmarks/results/quant-gemm-h100.json

Decode reads every weight once per step, so at a few rows the measure is the
fraction of the copy ceiling (3.02 TB/s) the weight bytes (codes, scales,
mins) stream at; at more rows, time against bf16 cuBLAS. Shapes are the four
linears of one layer (fused QKV, O, fused gate/up, down), timed as one sum
under CUDA graphs (launch cost excluded, as in the engine). Each path is
checked against the torch reference before it is timed.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_result  # noqa: E402
from kiln.kernels import int4_gemm_triton, int4_gemv_triton, quant, quant_triton  # noqa: E402

COPY_TBS = 3.02
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
DT = torch.bfloat16


def ms(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_weights() -> dict:
    out = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda") * 0.02
        p, sc, mn = quant.quantize_int4(w, 128)
        f8, fs = quant.quantize_fp8(w)
        out[name] = {"bf16": w.to(DT), "int4": (p, sc, mn), "fp8": (f8, fs)}
    return out


def weight_bytes(ws: dict, fmt: str) -> int:
    return sum(sum(t.numel() * t.element_size() for t in (w[fmt] if isinstance(w[fmt], tuple) else (w[fmt],)))
               for w in ws.values())


def layer_ms(ws: dict, M: int, path: str, tiles=None, check: bool = False) -> float:
    """Sum over the four shapes of one path at M rows."""
    xs = {name: torch.randn(M, k, device="cuda", dtype=DT) for name, (_, k) in SHAPES.items()}

    def call(name):
        w, x = ws[name], xs[name]
        if path == "bf16":
            return F.linear(x, w["bf16"])
        if path == "int4-gemv":
            return quant_triton.gemv(x, *w["int4"], bits=4, group=128, tiles=tiles)
        if path == "int4-gemm":
            return int4_gemm_triton.int4_gemm(x, *w["int4"], 128, tiles=tiles)
        if path == "int4-dequant":
            return F.linear(x, quant_triton.dequantize_int4(*w["int4"], DT, 128))
        if path == "fp8-gemv":
            return quant_triton.gemv(x, *w["fp8"], None, bits=8, group=128, tiles=tiles)
        if path == "fp8-tc":
            return quant_triton.tensor_core_linear(x, *w["fp8"])
        if path == "fp8-scaled-mm":
            xq, xsc = quant_triton.quantize_fp8_per_token(x)
            return torch._scaled_mm(xq, w["fp8"][0].t(), scale_a=xsc, scale_b=w["fp8"][1][None, :], out_dtype=DT,
                                    use_fast_accum=True)
        raise ValueError(path)

    if check:
        for name in SHAPES:
            w, x = ws[name], xs[name]
            if path.startswith("int4"):
                ref = quant.int4_linear_ref(x.float(), *w["int4"], None)
            elif path.startswith("fp8"):
                ref = F.linear(x.float(), w["fp8"][0].float() * w["fp8"][1][:, None])
            else:
                continue
            err = rel_err(call(name), ref)
            assert err < 3e-2, f"{path} M={M} {name}: rel. error {err:.3g}"
    return ms(lambda: [call(name) for name in SHAPES])


def sweep(ws: dict, path: str, M: int, grid) -> dict:
    """grid: (BLOCK_N, BLOCK_K, num_warps, num_stages) for the GEMVs; (BLOCK_M, BLOCK_N,
    num_warps, num_stages, SPLIT_PER_SM) for int4-gemm."""
    res = {}
    for tiles in grid:
        key = "-".join(f"{c}{int(v)}" for c, v in zip("nkws" if len(tiles) == 4 else "mnwsp", tiles))
        try:
            res[key] = round(layer_ms(ws, M, path, tiles=tiles, check=True), 4)
        except Exception as e:  # e.g. out of registers or shared memory
            res[key] = f"{type(e).__name__}: {str(e)[:80]}"
        print(path, M, key, res[key], flush=True)
    return res


def best(res: dict) -> tuple[int, ...]:
    key = min((k for k, v in res.items() if isinstance(v, float) and not k.startswith("best")), key=res.get)
    return tuple(int(p[1:]) for p in key.split("-"))


def int4_gemm_grid(M: int) -> list[tuple[int, int, int, int, int]]:
    """Tiles of the int4 tensor-core GEMM worth timing at M rows: narrow weight tiles on one or
    two warps (mma.sync, many programs to hide latency) for a few rows, wgmma-sized ones past."""
    bm = min(max(16, triton.next_power_of_2(M)), 64)
    if M <= 64:
        return [(bm, bn, w, st, 4) for bn, w in ((16, 1), (16, 2), (32, 1), (32, 2), (64, 2), (64, 4))
                for st in (2, 3, 4)]
    return [(bm_, bn, w, st, 4) for bm_ in (64, 128) for bn in (64, 128) for w in (4, 8) for st in (3, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="quant-gemm-h100")
    ap.add_argument("--sweep", action="store_true", help="sweep the GEMV tiles first and use the best")
    ap.add_argument("--sweep-fp8", action="store_true", help="with --sweep: the 8-bit GEMV's tiles too")
    ap.add_argument("--sweep-shapes", action="store_true", help="the int4 GEMV's tiles per layer shape")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
    ap.add_argument("--sweep-int4-gemm", action="store_true",
                    help="time the int4 tensor-core GEMM's tiles at each of --rows past the GEMV's, and use the best")
    ap.add_argument("--int4-gemv-rows", type=int, default=None,
                    help="time the int4 GEMV up to this many rows, past the engine's INT4_GEMV_MAX_M")
    args = ap.parse_args()
    if args.int4_gemv_rows:  # the GEMV checks its row count against this at each call
        int4_gemv_triton.INT4_GEMV_MAX_M = args.int4_gemv_rows
    torch.manual_seed(0)
    ws = make_weights()
    bytes_ = {"bf16": weight_bytes(ws, "bf16"), "int4": weight_bytes(ws, "int4"), "fp8": weight_bytes(ws, "fp8")}
    figures: dict = {"weight_bytes_per_layer": bytes_}
    if args.sweep:
        # int4: BLOCK_K = 1024 * warps gives each thread one 16-byte load of every row (see the kernel)
        g4 = [(bn, 1024 * w, w, st) for bn in (2, 4, 8) for w in (1, 2, 4) for st in (1, 2)]
        figures["sweep_int4_m1_ms"] = s4 = sweep(ws, "int4-gemv", 1, g4)
        int4_gemv_triton.TILES = bn, bk, w, st = best(s4)
        if args.sweep_fp8:
            g8 = list(itertools.product((4, 8, 16), (256, 512, 1024), (2, 4, 8), (2, 4)))
            figures["sweep_fp8_m1_ms"] = s8 = sweep(ws, "fp8-gemv", 1, g8)
            quant_triton.GEMV_TILES[8] = best(s8)
    if args.sweep_shapes:  # each shape alone: waves and tails differ with the row count
        by_shape = figures["sweep_int4_m1_by_shape_ms"] = {}
        for name, (n, k) in SHAPES.items():
            x = torch.randn(1, k, device="cuda", dtype=DT)
            for bn, bk, w, st in [(bn, 1024 * w, w, 1) for bn in (2, 4, 8) for w in (1, 2)]:
                key = f"{name}-n{bn}-k{bk}-w{w}"
                by_shape[key] = round(ms(lambda: quant_triton.gemv(x, *ws[name]["int4"], bits=4, group=128,
                                                                   tiles=(bn, bk, w, st))), 4)
                print(key, by_shape[key], flush=True)
    if args.sweep_int4_gemm:
        figures["sweep_int4_gemm_ms"] = by_m = {}
        for M in (m for m in args.rows if m > int4_gemv_triton.INT4_GEMV_MAX_M):
            by_m[str(M)] = res = sweep(ws, "int4-gemm", M, int4_gemm_grid(M))
            bm, bn, w, st, _ = best(res)
            split_ms = {4: res[f"m{bm}-n{bn}-w{w}-s{st}-p4"]}
            for per_sm in (0, 2, 8, 16):  # how far K is split, at the best tiles
                tiles = (bm, bn, w, st, per_sm)
                split_ms[per_sm] = res[f"best-split{per_sm}"] = round(layer_ms(ws, M, "int4-gemm", tiles, True), 4)
                print("int4-gemm", M, f"split {per_sm}", split_ms[per_sm], flush=True)
            int4_gemm_triton.TILES[M] = (bm, bn, w, st, min(split_ms, key=split_ms.get))
        figures["int4_gemm_tiles"] = {str(m): t for m, t in sorted(int4_gemm_triton.TILES.items())}
    figures["gemv_tiles"] = {"4": int4_gemv_triton.TILES, "8": quant_triton.GEMV_TILES[8]}
    rows = {}
    for M in args.rows:
        row = {"bf16_ms": layer_ms(ws, M, "bf16")}
        paths = ["int4-gemm", "fp8-tc", "fp8-scaled-mm", "int4-dequant"]
        # The GEMVs where they may run (the 8-bit one up to 4 rows, to show where it stops paying).
        paths = ((["int4-gemv"] if M <= int4_gemv_triton.INT4_GEMV_MAX_M else []) + (["fp8-gemv"] if M <= 4 else [])
                 + [p for p in paths if p != "int4-gemm" or M > int4_gemv_triton.INT4_GEMV_MAX_M])
        for p in paths:
            try:
                row[p + "_ms"] = layer_ms(ws, M, p, check=True)
            except Exception as e:
                row[p + "_ms"] = f"{type(e).__name__}: {str(e)[:120]}"
        for p, fmt in (("bf16", "bf16"), ("int4-gemv", "int4"), ("fp8-gemv", "fp8")):
            if isinstance(row.get(p + "_ms"), float):
                row[p + "_frac_of_copy"] = round(bytes_[fmt] / row[p + "_ms"] / 1e9 / COPY_TBS, 3)
        rows[str(M)] = row
        print(M, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    figures["by_rows"] = rows
    cols = ("bf16", "int4-gemv", "int4-gemm", "int4-dequant", "fp8-gemv", "fp8-tc", "fp8-scaled-mm")
    print("\nrows " + " ".join(f"{p:>14s}" for p in cols))
    for M, row in rows.items():
        cells = [row.get(p + "_ms") for p in cols]
        print(f"{M:>4s} " + " ".join(f"{c:14.4f}" if isinstance(c, float) else f"{'-':>14s}" for c in cells))
    print("wrote", write_result(args.name, figures, ceilings={"copy_TBps": COPY_TBS}, triton=triton.__version__))


if __name__ == "__main__":
    main()
