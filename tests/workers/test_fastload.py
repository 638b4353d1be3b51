"""The engine-file reader: every tensor comes back bit-exact, whatever its dtype or offset."""
import pytest
import torch
from safetensors.torch import save_file

from kiln.workers.loaders.fastload import load_to_device, read_header


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.int8_odd": torch.randint(-128, 127, (3, 7), dtype=torch.int8, generator=g),  # 21 bytes: misaligns the next
        "b.f32": torch.randn(5, 9, generator=g),
        "c.bf16": torch.randn(64, 33, generator=g).to(torch.bfloat16),
        "d.fp8": torch.randn(16, 16, generator=g).to(torch.float8_e4m3fn),
        "e.i32": torch.randint(0, 1 << 30, (11,), dtype=torch.int32, generator=g),
        "f.f16_scalar_row": torch.randn(1, 1, generator=g).to(torch.float16),
    }


def _check(path: str, device: str) -> None:
    ref = _tensors()
    got = load_to_device(path, torch.device(device))
    assert set(got) == set(ref)
    for k, t in ref.items():
        g = got[k]
        assert g.dtype == t.dtype and g.shape == t.shape and g.device.type == device
        assert torch.equal(g.cpu().view(torch.uint8), t.view(torch.uint8)), k
        if device == "cuda":
            assert g.data_ptr() % 256 == 0, f"{k} is not aligned for cuBLAS"


def test_header_and_cpu_load(tmp_path):
    path = str(tmp_path / "w.safetensors")
    save_file(_tensors(), path)
    header, base = read_header(path)
    assert set(header) == set(_tensors()) and base > 8
    _check(path, "cpu")


@pytest.mark.gpu
def test_gpu_load_is_exact_across_chunks(tmp_path, monkeypatch):
    from kiln.workers.loaders import fastload

    path = str(tmp_path / "w.safetensors")
    save_file(_tensors(), path)
    monkeypatch.setattr(fastload, "CHUNK_BYTES", 100)  # many chunks, both buffers reused, odd boundaries
    _check(path, "cuda")
    monkeypatch.setattr(fastload, "CHUNK_BYTES", 1 << 20)  # the whole file in one chunk
    _check(path, "cuda")
