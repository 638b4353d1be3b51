"""Multiplexed token streams (kiln/cluster/streams.py): a replica's Outbox feeding the ingress's Demux.

The two sides talk here through `Outbox.stream` directly, in one event loop: what
Serve carries between them is the same bytes.
"""
import asyncio
import time

import pytest

from kiln.cluster.protocol import Chunk
from kiln.cluster.streams import Demux, Mailbox, Outbox


def row(rid: str, token: int, reason: str | None = None) -> list:
    return [rid, 0, token, None, reason, None, 0]


async def drain(box: Mailbox) -> list[int]:
    tokens, last = [], False
    while not last:
        chunk, last = await box.take()
        assert chunk.error is None
        tokens += [r[2] for r in chunk.events]
    return tokens


def wire(outbox: Outbox, linger_s: float = 0.05):
    opened = []

    def open_stream(replica: str):
        opened.append(replica)
        return outbox.stream("ingress-1", linger_s)

    return Demux(open_stream), opened


def test_one_stream_carries_many_requests_in_order():
    async def main():
        outbox = Outbox("r1")
        demux, opened = wire(outbox)
        ids = [f"q{i}" for i in range(8)]
        boxes = {rid: demux.open(rid) for rid in ids}
        waits = {rid: outbox.register(rid, "ingress-1") for rid in ids}
        for rid in ids:
            demux.attach(rid, "r1")
        for step in range(20):  # one publish per engine step, every request in it
            last = step == 19
            outbox.publish([row(rid, step, "length" if last else None) for rid in ids], [], ids if last else [])
            await asyncio.sleep(0)
        got = await asyncio.gather(*(drain(boxes[rid]) for rid in ids))
        assert all(tokens == list(range(20)) for tokens in got)
        assert all(w.done() and w.result() is None for w in waits.values())  # their `generate` calls may end
        assert opened == ["r1"]

    asyncio.run(main())


def test_a_slow_reader_gets_batches_and_the_end_at_once():
    async def main():
        outbox = Outbox("r1")
        demux, _ = wire(outbox)
        box = demux.open("a")
        outbox.register("a", "ingress-1")
        demux.attach("a", "r1")
        outbox.publish([row("a", 0)], [], [])
        first, _ = await box.take()
        assert [r[2] for r in first.events] == [0]
        hold = time.monotonic() + 10  # held back for 10 s, unless the request ends
        for t in range(1, 6):
            outbox.publish([row("a", t, "length" if t == 5 else None)], [], ["a"] if t == 5 else [])
        t0 = time.monotonic()
        chunk, last = await box.take(hold)
        assert last and [r[2] for r in chunk.events] == [1, 2, 3, 4, 5] and time.monotonic() - t0 < 1

    asyncio.run(main())


def test_held_output_goes_out_when_the_hold_ends():
    async def main():
        box = Mailbox()
        box.put("r1", [row("a", 0)])
        t0 = time.monotonic()
        chunk, last = await box.take(t0 + 0.2)
        assert not last and len(chunk.events) == 1 and time.monotonic() - t0 >= 0.19

    asyncio.run(main())


def test_idle_stream_ends_and_reopens_for_the_next_request():
    async def main():
        outbox = Outbox("r1")
        demux, opened = wire(outbox, linger_s=0.05)
        for n, rid in enumerate(["a", "b"]):
            box = demux.open(rid)
            outbox.register(rid, "ingress-1")
            demux.attach(rid, "r1")
            outbox.publish([row(rid, 7, "stop")], [], [rid])
            assert await drain(box) == [7]
            demux.close(rid)
            await asyncio.sleep(0.2)  # past the linger: the replica ends the stream (it can drain and stop)
            assert opened == ["r1"] * (n + 1) and not outbox._channels

    asyncio.run(main())


@pytest.mark.parametrize("failure", [ConnectionError("replica died"), asyncio.CancelledError()])
def test_a_failed_stream_fails_its_requests_and_a_gone_caller_frees_its_place(failure):
    async def main():
        async def broken(replica):
            raise failure  # a dead replica, or Serve cancelling the stream under us
            yield b""  # noqa: unreachable - an async generator

        demux = Demux(broken)
        box = demux.open("a")
        demux.attach("a", "r1")
        chunk, last = await box.take()
        assert last and chunk.error["status"] == 503 and "replica r1" in chunk.error["message"]

        outbox = Outbox("r1")
        done = outbox.register("x", "c")
        outbox.drop("x")  # the client went away before any output
        outbox.publish([row("x", 1)], [], [])  # late tokens of an aborted request go nowhere
        assert not outbox._channels and not done.done()
        done = outbox.register("y", "c")
        outbox.fail("y", {"status": 400, "message": "bad"})
        assert done.result()["status"] == 400

    asyncio.run(main())


def test_a_request_whose_stream_nobody_opens_is_orphaned():
    async def main():
        outbox = Outbox("r1")
        outbox.register("a", "c")
        outbox.publish([row("a", 1)], [], [])
        assert not outbox.orphaned("a", 0.05)
        await asyncio.sleep(0.1)
        assert outbox.orphaned("a", 0.05)  # the ingress that sent it is gone
        stream = outbox.stream("c")
        assert Chunk.unpack(await stream.__anext__()).events == [row("a", 1)]
        assert not outbox.orphaned("a", 0.05)  # read now
        await stream.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("chunk", [Chunk("r", [row("a", 1)], [["a", 0]], None, ["a"]),
                                   Chunk("r", error={"status": 503, "message": "x"})])
def test_chunk_round_trip(chunk):
    assert Chunk.unpack(chunk.pack()) == chunk
