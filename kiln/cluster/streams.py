"""Token streams from replicas to the ingress, multiplexed per (ingress, replica) pair.

Per engine step a replica has new tokens for many requests. Sending each
request its own message per token would cost one Ray object per token per
stream (thousands a second), so instead:

- the replica's engine thread hands the step's token rows to `Outbox` in one
  call; `Outbox.stream(channel)` (the replica's `outputs` method) yields
  everything pending for one ingress as one msgpack `Chunk`: the cost is per
  step, not per stream, and a slow reader gets fewer, larger messages;
- the ingress holds one such stream per replica (`Demux`), and splits each
  chunk into per-request `Mailbox`es; a request's consumer takes all it has
  pending at once, and may hold output back until its share of a
  messages-per-second budget allows the next message, so a server-sent event
  carries several tokens when streams are many or the consumer falls behind.

Each request still has its own Serve call (`generate`): it says which replica
accepted the request, carries errors, keeps Serve's per-replica request count
(autoscaling, draining) true, and aborts the request when cancelled. It ends
once the request's last tokens have gone out on the channel stream.

Pure asyncio, no Ray: deployment.py wires these to Serve calls.
"""
from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Callable

from kiln.cluster.protocol import Chunk

LINGER_S = 1.0  # an idle channel stream stays open this long for the next burst, then ends (lets replicas drain)


class _Channel:
    """What one replica holds for one ingress."""

    def __init__(self) -> None:
        self.rows: list[list] = []
        self.aborted: list[list] = []
        self.done: list[str] = []
        self.waiters: dict[str, asyncio.Future] = {}  # request id -> resolved when its last rows went out
        self.wake = asyncio.Event()
        self.reader: object | None = None  # the stream now draining this channel
        self.last_read = time.monotonic()

    def pending(self) -> bool:
        return bool(self.rows or self.aborted or self.done)


class Outbox:
    """The replica side. Every method runs on the replica's event loop (the engine thread posts here)."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self._channels: dict[str, _Channel] = {}
        self._channel_of: dict[str, str] = {}  # request id -> channel

    def _channel(self, channel: str) -> _Channel:
        ch = self._channels.get(channel)
        if ch is None:
            ch = self._channels[channel] = _Channel()
        return ch

    def register(self, request_id: str, channel: str) -> asyncio.Future:
        """A request from `channel`; the future resolves (to None or an error dict) once its output is out."""
        ch = self._channel(channel)
        fut = asyncio.get_running_loop().create_future()
        ch.waiters[request_id] = fut
        self._channel_of[request_id] = channel
        return fut

    def drop(self, request_id: str) -> None:
        """Nobody waits for this request any more (its caller went away)."""
        channel = self._channel_of.pop(request_id, None)
        ch = self._channels.get(channel) if channel is not None else None
        if ch is not None:
            ch.waiters.pop(request_id, None)
            ch.wake.set()  # an idle stream may now end
            self._forget_if_idle(channel)

    def _forget_if_idle(self, channel: str) -> None:
        ch = self._channels.get(channel)
        if ch is not None and ch.reader is None and not ch.waiters and not ch.pending():
            del self._channels[channel]

    def publish(self, rows: list[list], aborted: list[list], done: list[str]) -> None:
        """One engine step's output: TokenEvent rows, [request id, index] aborts, and requests now complete."""
        touched = set()
        channel_of = self._channel_of
        for row in rows:
            c = channel_of.get(row[0])
            if c is not None:
                self._channels[c].rows.append(row)
                touched.add(c)
        for item in aborted:
            c = channel_of.get(item[0])
            if c is not None:
                self._channels[c].aborted.append(item)
                touched.add(c)
        for rid in done:
            c = channel_of.get(rid)
            if c is not None:
                self._channels[c].done.append(rid)
                touched.add(c)
        for c in touched:
            self._channels[c].wake.set()

    def fail(self, request_id: str, error: dict) -> None:
        """The request ends with an error (its `generate` call reports it)."""
        channel = self._channel_of.pop(request_id, None)
        ch = self._channels.get(channel) if channel is not None else None
        fut = ch.waiters.pop(request_id, None) if ch is not None else None
        if fut is not None and not fut.done():
            fut.set_result(error)
        if ch is not None:
            ch.wake.set()
            self._forget_if_idle(channel)

    def fail_all(self, error: dict) -> None:
        for rid in list(self._channel_of):
            self.fail(rid, error)

    def orphaned(self, request_id: str, after_s: float) -> bool:
        """True when the request's channel has had no reader for `after_s`: the ingress that sent it is gone
        (a live one opens the stream as soon as the request is accepted, and keeps it while requests wait)."""
        ch = self._channels.get(self._channel_of.get(request_id, ""))
        return ch is not None and ch.reader is None and time.monotonic() - ch.last_read > after_s

    async def stream(self, channel: str, linger_s: float = LINGER_S) -> AsyncIterator[bytes]:
        """Everything pending for `channel`, one packed Chunk at a time; ends when idle for `linger_s`."""
        ch = self._channel(channel)
        me = object()
        if ch.reader is not None:
            ch.wake.set()  # a newer stream takes over; the old one ends
        ch.reader = me
        try:
            while ch.reader is me:
                if ch.pending():
                    chunk = Chunk(self.replica, ch.rows, ch.aborted, done=ch.done)
                    ch.rows, ch.aborted, ch.done = [], [], []
                    yield chunk.pack()
                    ch.last_read = time.monotonic()
                    for rid in chunk.done:  # their last tokens are out: their `generate` calls may return
                        self._channel_of.pop(rid, None)
                        fut = ch.waiters.pop(rid, None)
                        if fut is not None and not fut.done():
                            fut.set_result(None)
                    continue
                ch.wake.clear()
                if ch.waiters:
                    await ch.wake.wait()
                    continue
                try:
                    await asyncio.wait_for(ch.wake.wait(), linger_s)
                except asyncio.TimeoutError:
                    if not ch.waiters and not ch.pending():
                        return
        finally:
            if ch.reader is me:
                ch.reader = None
                ch.last_read = time.monotonic()
                self._forget_if_idle(channel)


class Mailbox:
    """One request's output at the ingress, as it arrives; `take()` returns all of it since the last take."""

    __slots__ = ("rows", "aborted", "error", "replica", "done", "_wake", "_hold_until", "_timer")

    def __init__(self) -> None:
        self.rows: list[list] = []
        self.aborted: list[list] = []
        self.error: dict | None = None
        self.replica = ""
        self.done = False
        self._wake = asyncio.Event()
        self._hold_until = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def put(self, replica: str, rows: list[list] | None = None, aborted: list[list] | None = None,
            done: bool = False, error: dict | None = None) -> None:
        self.replica = replica or self.replica
        if rows:
            self.rows.extend(rows)
        if aborted:
            self.aborted.extend(aborted)
        if error is not None and self.error is None:
            self.error = error
        self.done = self.done or done
        self._ready()

    def _ready(self) -> None:
        """Wake the consumer now, or (while it holds output back) when the hold ends."""
        if self.done or self.error is not None:
            self._wake.set()
        elif self._timer is None and (self.rows or self.aborted):
            delay = self._hold_until - time.monotonic()
            if delay <= 0:
                self._wake.set()
            else:
                self._timer = asyncio.get_running_loop().call_later(delay, self._wake.set)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def take(self, hold_until: float = 0.0) -> tuple[Chunk, bool]:
        """Everything that arrived since the last take, and whether that was the end of it.

        Output arriving before `hold_until` (time.monotonic()) waits for it, unless the request
        ends: a busy stream then sends fewer, larger messages.
        """
        self._hold_until = hold_until
        self._wake.clear()  # what arrived since the last take decides anew, against this hold
        self._cancel_timer()
        self._ready()
        await self._wake.wait()
        self._cancel_timer()
        chunk = Chunk(self.replica, self.rows, self.aborted, self.error)
        self.rows, self.aborted = [], []
        return chunk, self.done or self.error is not None


class Demux:
    """The ingress side: one output stream per replica that has requests of ours, split into mailboxes.

    `open_stream(replica)` starts that replica's `outputs` call (a Serve streaming call routed to it).
    """

    def __init__(self, open_stream: Callable[[str], AsyncIterator[bytes]]) -> None:
        self._open_stream = open_stream
        self._boxes: dict[str, Mailbox] = {}
        self._on_replica: dict[str, set[str]] = {}  # replica -> request ids it runs for us
        self._replica_of: dict[str, str] = {}
        self._pumps: dict[str, asyncio.Task] = {}

    @property
    def active(self) -> int:
        """Requests with an open mailbox."""
        return len(self._boxes)

    def open(self, request_id: str) -> Mailbox:
        box = self._boxes[request_id] = Mailbox()
        return box

    def attach(self, request_id: str, replica: str) -> None:
        """`replica` accepted the request: make sure its output stream is open."""
        if request_id not in self._boxes:
            return
        self._replica_of[request_id] = replica
        self._on_replica.setdefault(replica, set()).add(request_id)
        if replica not in self._pumps:
            # A fresh context, not the request's: the stream outlives it and serves other requests
            # (Serve would cancel calls made in a request's context along with that request).
            self._pumps[replica] = asyncio.create_task(self._pump(replica), context=contextvars.Context())

    def close(self, request_id: str) -> None:
        self._boxes.pop(request_id, None)
        replica = self._replica_of.pop(request_id, None)
        if replica is not None:
            ids = self._on_replica.get(replica)
            if ids is not None:
                ids.discard(request_id)
                if not ids:
                    del self._on_replica[replica]

    def dispatch(self, chunk: Chunk) -> None:
        """Split one replica chunk into the mailboxes of its requests."""
        boxes = self._boxes
        by_box: dict[str, list[list]] = {}
        for row in chunk.events:
            if row[0] in boxes:
                by_box.setdefault(row[0], []).append(row)
        aborted: dict[str, list[list]] = {}
        for item in chunk.aborted:
            if item[0] in boxes:
                aborted.setdefault(item[0], []).append(item)
        for rid in by_box.keys() | aborted.keys() | set(chunk.done):
            box = boxes.get(rid)
            if box is not None:
                box.put(chunk.replica, by_box.get(rid), aborted.get(rid), rid in chunk.done)

    async def _pump(self, replica: str) -> None:
        error = None
        try:
            # Reopen while requests remain: an idle stream ends on its own (see Outbox.stream).
            while self._on_replica.get(replica):
                async for data in self._open_stream(replica):
                    self.dispatch(Chunk.unpack(data))
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # we are closing
            error = "its output stream was cancelled"
        except Exception as e:  # noqa: BLE001 - the replica died or cannot be reached
            error = f"failed: {e}"
        finally:
            self._pumps.pop(replica, None)
        if error is None:
            return
        # Output may have been lost with the stream: its requests fail rather than miss tokens.
        for rid in list(self._on_replica.get(replica, ())):
            box = self._boxes.get(rid)
            if box is not None:
                box.put(replica, error={"status": 503, "message": f"replica {replica}: {error}"})
