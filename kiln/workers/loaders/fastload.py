"""Read a safetensors file onto a GPU at the speed of the disk (or page cache).

safetensors' own `device="cuda"` path copies tensor by tensor from pageable
memory, about 1.5 GB/s on an H100 host. Here the file's data region streams
through two pinned buffers into one device allocation (reads overlap the
host-to-device copies), each tensor at an aligned place, and every tensor is
a view into it: no second copy.
"""
from __future__ import annotations

import json
import struct

import torch

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I8": torch.int8, "U8": torch.uint8,
    "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}
CHUNK_BYTES = 64 << 20
ALIGN = 256


def read_header(path: str) -> tuple[dict, int]:
    """(tensor entries, byte offset of the data region)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def load_to_device(path: str, device: torch.device) -> dict[str, torch.Tensor]:
    if device.type != "cuda":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as f:  # mmap: pages load on first touch
            return {k: f.get_tensor(k) for k in f.keys()}
    header, base = read_header(path)
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    # Tensors sit back to back in the file (a 4-byte scale shifts everything after it), but
    # cuBLAS needs aligned operands: each tensor gets a 256-byte aligned place in the blob.
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    place, size = {}, 0
    for name, info in entries:
        s, e = info["data_offsets"]
        place[name] = size
        size += -(-(e - s) // ALIGN) * ALIGN
    total = max((info["data_offsets"][1] for info in header.values()), default=0)
    blob = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
    bufs = [torch.empty(min(CHUNK_BYTES, max(total, 1)), dtype=torch.uint8).pin_memory() for _ in range(2)]
    done: list[torch.cuda.Event | None] = [None, None]
    first = 0  # entries before this one lie wholly in earlier chunks
    with open(path, "rb", buffering=0) as f:
        f.seek(base)
        off, i = 0, 0
        while off < total:
            n = min(CHUNK_BYTES, total - off)
            slot = i % 2
            if done[slot] is not None:
                done[slot].synchronize()  # the copies out of this buffer have finished
            view = memoryview(bufs[slot].numpy())[:n]
            got = 0
            while got < n:
                r = f.readinto(view[got:])
                if not r:
                    raise ValueError(f"{path} is truncated: expected {total} data bytes, got {off + got}")
                got += r
            for name, info in entries[first:]:  # each tensor's part of this chunk, to its place
                s, e = info["data_offsets"]
                if s >= off + n:
                    break
                lo, hi = max(s, off), min(e, off + n)
                if hi > lo:
                    dst = place[name] + lo - s
                    blob[dst:dst + hi - lo].copy_(bufs[slot][lo - off:hi - off], non_blocking=True)
                if e <= off + n:
                    first += 1
            done[slot] = torch.cuda.Event()
            done[slot].record()
            off += n
            i += 1
    torch.cuda.synchronize(device)
    out = {}
    for name, info in header.items():
        s, e = info["data_offsets"]
        raw = blob[place[name]:place[name] + e - s]
        out[name] = raw.view(_DTYPES[info["dtype"]]).view(info["shape"])
    return out
