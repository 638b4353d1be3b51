"""The control-plane broadcast between ranks, short and long messages (gloo, 2 processes)."""
import random

import torch.multiprocessing as mp

MESSAGES = [b"", b"x" * 10, bytes(range(256)) * 16 + b"tail", random.Random(0).randbytes(100_000)]


def _run(rank, port, results):
    import torch

    from kiln.workers.parallel import init_distributed

    ctx = init_distributed(rank, 2, 1, f"tcp://127.0.0.1:{port}", torch.device("cpu"), 30)
    results[rank] = [ctx.broadcast_bytes(m if rank == 0 else None, 0) == m for m in MESSAGES]


def test_broadcast_bytes_round_trips():
    results = mp.Manager().dict()
    mp.spawn(_run, args=(29700 + random.randrange(200), results), nprocs=2)
    assert results[0] == results[1] == [True] * len(MESSAGES)
