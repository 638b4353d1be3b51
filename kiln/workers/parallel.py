"""Where this rank sits in its replica's tensor- and pipeline-parallel groups.

Ranks are laid out pipeline-stage-major: rank = pp_rank * tp + tp_rank, so a
TP group is a run of neighbouring GPUs. With one rank every collective is a
no-op, so the model code is the same for tp=1 and tp=N.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


_HEAD = 4096  # bytes in a control broadcast's first message


@dataclass
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: Any = None  # torch.distributed ProcessGroup of this rank's TP peers
    cpu_group: Any = None  # gloo group of all ranks: control messages (msgpack bytes)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def sampler_rank(self) -> int:
        """The rank that samples: TP rank 0 of the last stage."""
        return (self.pp_size - 1) * self.tp_size

    def shard(self, size: int) -> tuple[int, int]:
        """(start, length) of this rank's even share of `size` rows."""
        if size % self.tp_size:
            raise ValueError(f"dimension {size} does not split evenly over tensor_parallel_size={self.tp_size}")
        n = size // self.tp_size
        return self.tp_rank * n, n

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    # -- control plane (CPU group) ------------------------------------------

    def broadcast_bytes(self, data: bytes | None, src: int) -> bytes:
        """Send `data` from rank `src` to every rank.

        One fixed-size message (an 8-byte length, then up to 4 KiB) covers a
        step's usual traffic in a single collective; longer data follows in a second.
        """
        if self.world_size == 1:
            return data or b""
        head = torch.zeros(_HEAD, dtype=torch.uint8)
        if self.rank == src:
            head[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
            first = data[:_HEAD - 8]
            if first:
                head[8:8 + len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
        dist.broadcast(head, src, group=self.cpu_group)
        if self.rank == src:
            rest = data[_HEAD - 8:]
            if rest:
                dist.broadcast(torch.frombuffer(bytearray(rest), dtype=torch.uint8), src, group=self.cpu_group)
            return data
        size = int(head[:8].view(torch.int64))
        out = head[8:8 + size].numpy().tobytes()
        if size > _HEAD - 8:
            rest = torch.empty(size - (_HEAD - 8), dtype=torch.uint8)
            dist.broadcast(rest, src, group=self.cpu_group)
            out += rest.numpy().tobytes()
        return out

    def all_min(self, value: int) -> int:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t)

    # -- pipeline (stage to stage) ------------------------------------------

    def send_next(self, tensors: list[torch.Tensor]) -> None:
        """Non-blocking: the next stage receives these during its next tick, after this
        rank has already moved on (a blocking send would deadlock with the control broadcast)."""
        self.wait_sends()
        dst = self.rank + self.tp_size
        tensors = [t.contiguous() for t in tensors]
        self._sends = (tensors, [dist.isend(t, dst) for t in tensors])

    def wait_sends(self) -> None:
        sends = getattr(self, "_sends", None)
        if sends is not None:
            for work in sends[1]:
                work.wait()
            self._sends = None

    def recv_prev(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        src = self.rank - self.tp_size
        out = []
        for shape in shapes:
            t = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(t, src)
            out.append(t)
        return out


def init_distributed(rank: int, tp: int, pp: int, init_method: str, device: torch.device,
                     timeout_s: float) -> ParallelContext:
    """Join the replica's process group and build its TP and CPU groups.

    NCCL carries tensors between GPUs (gloo on CPU); a gloo group carries the
    control messages. Every collective times out after `timeout_s`, so a dead
    rank turns into an error instead of a hang.
    """
    world = tp * pp
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout,
                            **({"device_id": device} if device.type == "cuda" else {}))
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
    tp_group = None
    for stage in range(pp):  # every rank creates every group, in the same order
        ranks = list(range(stage * tp, (stage + 1) * tp))
        group = dist.new_group(ranks, timeout=timeout) if tp > 1 else None
        if rank in ranks:
            tp_group = group
    return ParallelContext(tp_rank=rank % tp, tp_size=tp, pp_rank=rank // tp, pp_size=pp,
                           tp_group=tp_group, cpu_group=cpu_group)


def layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """Contiguous layers of one pipeline stage; earlier stages take the remainder."""
    if pp_size > num_layers:
        raise ValueError(f"pipeline_parallel_size={pp_size} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)
