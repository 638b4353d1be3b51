"""The native CPU kernels (kiln/kernels/csrc) against the torch references, and their fallback."""
import os

import pytest
import torch

from kiln.kernels import attention, attention_cpu, backend, cpu_native, linear_cpu
from kiln.kernels.attention import paged_attention, paged_attention_ref
from tests.kernels.test_kernels import _to_cpu, make_batch, naive_attention, rel_err

pytestmark = pytest.mark.skipif(cpu_native.load("attention_cpu") is None, reason="no C compiler here")

CASES = [
    # (q lens, cached context lens, query heads, kv heads, head dim, block size)
    ([1] * 6, [5, 40, 130, 0, 15, 16], 9, 3, 64, 16),  # SmolLM2's heads; block edges; a first token
    ([1, 1], [700, 3], 8, 8, 128, 16),                 # MHA, head dim 128
    ([1, 7, 20], [70, 0, 33], 8, 1, 64, 4),            # GQA 8, decodes + prompt chunks (several rows each)
    ([3, 1, 5], [9, 2, 0], 6, 2, 40, 8),               # head dim 40: the generic (not unrolled) path
]


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("q_lens, ctx, hq, hkv, d, page", CASES)
def test_native_attention_matches_reference(q_lens, ctx, hq, hkv, d, page, threads, monkeypatch):
    """Every row, decode or prompt chunk, against the float64 oracle; q read through a strided view.
    One thread takes each row's KV heads together, four split them while rows are few."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    q, kc, vc, meta = make_batch(q_lens, ctx, hq, hkv, d, page, torch.float32, 0)
    q, kc, vc, meta = q.cpu(), kc.cpu(), vc.cpu(), _to_cpu(meta)
    wide = torch.randn(q.shape[0], hq + 2, d)  # q as a column slice of a wider tensor, as the QKV split gives
    wide[:, :hq] = q
    out = torch.full_like(q, float("nan"))
    attention_cpu.paged_attention(out, wide[:, :hq], kc, vc, meta.query_start_loc, meta.seq_lens,
                                  meta.block_tables, d ** -0.5)
    assert rel_err(out, naive_attention(q, kc, vc, meta, d ** -0.5)) < 1e-6


def test_dispatcher_sends_decodes_to_the_native_kernel():
    """Under "auto" a CPU step (decodes, a fresh prompt, a chunk extending cached context) runs the
    native kernel; under "torch" the padded reference."""
    q, kc, vc, meta = make_batch([1, 1, 1, 12, 5], [30, 200, 7, 0, 40], 9, 3, 64, 16, torch.float32, 1)
    q, kc, vc, meta = q.cpu(), kc.cpu(), vc.cpu(), _to_cpu(meta)
    want = naive_attention(q, kc, vc, meta, 0.125)
    assert attention._native_cpu(q, kc)
    got = paged_attention(q, kc, vc, meta, 0.125)
    assert ("ref_plan", 16) not in meta.cache
    assert rel_err(got, want) < 1e-6
    with backend.use("torch"):
        assert not attention._native_cpu(q, kc)
        assert rel_err(paged_attention(q, kc, vc, meta, 0.125), want) < 1e-6
    assert not attention_cpu.supported(q.half(), kc.half())  # fp16 / fp8 caches: the reference


def test_padding_row_gives_zeros():
    q, kc, vc, meta = make_batch([1, 1], [20, 0], 4, 2, 64, 16, torch.float32, 3)
    q, kc, vc, meta = q.cpu(), kc.cpu(), vc.cpu(), _to_cpu(meta)
    lens = meta.seq_lens.clone()
    lens[1] = 0
    out = torch.full_like(q, float("nan"))
    attention_cpu.paged_attention(out, q, kc, vc, meta.query_start_loc, lens, meta.block_tables, 0.125)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and not out[0].isnan().any()


def test_build_is_cached_and_failure_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KILN_CPU_KERNEL_CACHE", str(tmp_path))
    assert cpu_native.load.__wrapped__("attention_cpu") is not None
    built = os.listdir(tmp_path)
    assert len(built) == 1 and built[0].startswith("attention_cpu-") and built[0].endswith(".so")
    mtime = os.path.getmtime(tmp_path / built[0])
    assert cpu_native.load.__wrapped__("attention_cpu") is not None  # found, not rebuilt
    assert os.path.getmtime(tmp_path / built[0]) == mtime
    # A compiler that fails: a warning, no library, and the dispatchers use the reference.
    monkeypatch.setenv("KILN_CPU_KERNEL_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CC", "false")
    with caplog.at_level("WARNING", logger="kiln.kernels"):
        assert cpu_native.load.__wrapped__("attention_cpu") is None
    assert "torch reference" in caplog.text
    # A cache directory that cannot be made: the same.
    monkeypatch.delenv("CC")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("KILN_CPU_KERNEL_CACHE", str(tmp_path / "a-file" / "cache"))
    assert cpu_native.load.__wrapped__("attention_cpu") is None
    monkeypatch.setenv("KILN_CPU_NATIVE", "0")
    assert cpu_native.load.__wrapped__("attention_cpu") is None


@pytest.mark.parametrize("m", [1, 5, 6, 7, 13, 48, 100])
@pytest.mark.parametrize("n, k, bias", [(16, 3, False), (48, 96, True), (960, 576, False)])
def test_native_linear_matches_torch(m, n, k, bias):
    """Every row count's register blocking (chunks of 6, row blocks of 48); x as a strided view."""
    g = torch.Generator().manual_seed(m * n)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(m, k + 5, generator=g)[:, 2:k + 2]
    panels = linear_cpu.pack(w)
    assert panels.shape == (n // 16, k, 16)
    got = linear_cpu.linear(x, panels, b)
    assert rel_err(got, torch.nn.functional.linear(x.double(), w.double(), b.double() if bias else None)) < 1e-6
    got3 = linear_cpu.linear(x.reshape(1, m, k), panels, b)
    assert got3.shape == (1, m, n) and torch.equal(got3[0], got)


def test_native_linear_declines_what_it_cannot_take():
    assert linear_cpu.pack(torch.randn(40, 8)) is None  # N not a multiple of 16
    assert linear_cpu.pack(torch.randn(32, 8, dtype=torch.float16)) is None
    with pytest.raises(ValueError, match="features"):
        linear_cpu.linear(torch.randn(2, 7), linear_cpu.pack(torch.randn(32, 8)))


def test_native_norms_activation_rope_match_references():
    from kiln.kernels import ops_cpu
    from kiln.kernels.activation import silu_and_mul_ref
    from kiln.kernels.norm import fused_add_rms_norm_ref, rms_norm_ref
    from kiln.kernels.rope import apply_rope_ref, rope_cos_sin

    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 70, generator=g)[:, 3:67]  # rows 70 apart
    w = torch.randn(64, generator=g)
    assert ops_cpu.usable(x)
    assert rel_err(ops_cpu.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)) < 1e-6
    res, res_ref = torch.randn(37, 64, generator=g), None
    res_ref = res.clone()
    got = ops_cpu.rms_norm(x, w, 1e-6, res)
    want, _ = fused_add_rms_norm_ref(x, res_ref, w, 1e-6)
    assert rel_err(res, res_ref) < 1e-7 and rel_err(got, want) < 1e-6

    gu = torch.randn(9, 2 * 48, generator=g) * 6  # gates far into both tails of the sigmoid
    gu[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -87.5])
    assert rel_err(ops_cpu.silu_and_mul(gu), silu_and_mul_ref(gu)) < 1e-6

    T, hq, hk, d = 11, 6, 2, 32
    qkv = torch.randn(T, (hq + 2 * hk) * d, generator=g)
    q, k, v = (t.view(T, -1, d) for t in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    pos = torch.randint(0, 500, (T,), generator=g)
    cos_sin = rope_cos_sin(d, 512, 10000.0, None)
    kc, vc = torch.zeros(40, 4, hk, d), torch.zeros(40, 4, hk, d)
    slots = torch.randperm(160, generator=g)[:T]
    want_q, want_k = apply_rope_ref(q, pos, cos_sin), apply_rope_ref(k, pos, cos_sin)
    want_v = v.clone()
    ops_cpu.rope_and_cache(q, k, v, pos, cos_sin, kc, vc, slots)
    assert rel_err(q, want_q) < 1e-6 and rel_err(k, want_k) < 1e-6
    assert torch.equal(kc.view(-1, hk, d)[slots], k) and torch.equal(vc.view(-1, hk, d)[slots], want_v)
    untouched = torch.ones(160, dtype=torch.bool)
    untouched[slots] = False
    assert not kc.view(-1, hk, d)[untouched].any()
    with backend.use("torch"):
        assert not ops_cpu.usable(x)
    assert not ops_cpu.usable(x.double()) and not ops_cpu.usable(torch.randn(3, 12))


def test_sources_ship_in_the_package():
    """Every C source and header is package data: a wheel install compiles the same kernels."""
    import fnmatch
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["kiln"]
    sources = os.listdir(root / "kiln" / "kernels" / "csrc")
    assert {"simd.h", "attention_cpu.c", "linear_cpu.c", "ops_cpu.c"} <= set(sources)
    for name in sources:
        assert any(fnmatch.fnmatch(f"kernels/csrc/{name}", g) for g in globs), name
