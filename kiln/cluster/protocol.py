"""msgpack messages between the router (ingress) and the replicas.

Plain lists and dicts of ints, floats and strings: nothing is pickled on the
request path, and either side can be written in another language.

Request  {"id", "prompt": [token ids], "params": SamplingParams dict}
Chunk    {"replica": id, "events": [TokenEvent rows], "aborted": [[request id, index]],
          "error": {"status": HTTP status, "message": str} | None, "done": [request ids]}
         A replica's output stream to one ingress carries chunks of many requests (rows and
         aborts name their request; "done" lists those whose output is complete); a request's
         own `generate` call yields an empty chunk on acceptance and, if it fails, one with "error".
Report   {"replica": id, "seq": n, "kv": [KV events], "load": {...}}  (replica -> router, in order by seq)
KV event ["stored", hash, parent hash | None] or ["evicted", hash]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import msgpack

from kiln.config import SamplingParams


def pack_request(request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> bytes:
    return msgpack.packb({"id": request_id, "prompt": prompt_token_ids, "params": params.to_dict()})


def unpack_request(data: bytes) -> tuple[str, list[int], SamplingParams]:
    d = msgpack.unpackb(data)
    return d["id"], d["prompt"], SamplingParams.from_dict(d["params"])


@dataclass
class Chunk:
    replica: str
    events: list[list] = field(default_factory=list)
    aborted: list[list] = field(default_factory=list)
    error: dict | None = None
    done: list[str] = field(default_factory=list)

    def pack(self) -> bytes:
        return msgpack.packb({"replica": self.replica, "events": self.events, "aborted": self.aborted,
                              "error": self.error, "done": self.done})

    @classmethod
    def unpack(cls, data: bytes) -> "Chunk":
        return cls(**msgpack.unpackb(data, strict_map_key=False))


@dataclass
class Report:
    """A replica's KV events and load, numbered so the router applies them in order."""

    replica: str
    seq: int
    kv: list[list] = field(default_factory=list)
    load: dict = field(default_factory=dict)

    def pack(self) -> bytes:
        return msgpack.packb({"replica": self.replica, "seq": self.seq, "kv": self.kv, "load": self.load})

    @classmethod
    def unpack(cls, data: bytes) -> "Report":
        return cls(**msgpack.unpackb(data, strict_map_key=False))
