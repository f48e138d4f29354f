"""The wire format between gateways and workers (msgpack payloads).

A **job** is one stream entry. Its routing fields are plain strings so a person
can read them with ``XRANGE``; the request body travels msgpack-encoded in
``payload``.

A **reply** is one pub/sub message on the requesting gateway's channel:
``{"rid": request_id, "seq": n, "a": attempt, "ev": [event, ...]}``. ``seq``
counts messages per attempt from 0, so a gap or a duplicate is detectable. One message may
carry several events: a worker that produces tokens faster than it can ship
them coalesces the waiting deltas into one message.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack


class JobKind(StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    TOKENIZE = "tokenize"


@dataclass(slots=True)
class Job:
    request_id: str
    model: str
    kind: JobKind
    reply_to: str
    params: dict[str, Any]
    #: Epoch seconds after which nobody waits for the answer (0 = no deadline).
    deadline: float = 0.0
    #: 0 for the first try; a gateway that re-dispatches after a worker died counts up.
    attempt: int = 0
    #: How long (ms) the worker keeps its replies in the request's replay log; 0 = no log.
    replay_ms: int = 0
    #: Stream entry id, set once the job was read from a worker's stream.
    entry_id: str = ""

    def to_fields(self) -> dict[str, str | bytes]:
        return {
            "request_id": self.request_id,
            "model": self.model,
            "kind": str(self.kind),
            "reply_to": self.reply_to,
            "deadline": f"{self.deadline:.3f}",
            "attempt": str(self.attempt),
            "replay": str(self.replay_ms),
            "payload": pack(self.params),
        }

    @classmethod
    def from_fields(cls, entry_id: str, fields: Mapping[Any, bytes | str]) -> Job:
        f = {as_str(k): v for k, v in fields.items()}
        return cls(
            request_id=as_str(f["request_id"]),
            model=as_str(f["model"]),
            kind=JobKind(as_str(f["kind"])),
            reply_to=as_str(f["reply_to"]),
            params=unpack(f["payload"]),
            deadline=float(as_str(f.get("deadline", "0"))),
            attempt=int(as_str(f.get("attempt", "0"))),
            replay_ms=int(as_str(f.get("replay", "0"))),
            entry_id=entry_id,
        )

    def expired(self, now: float | None = None) -> bool:
        return bool(self.deadline) and (now or time.time()) > self.deadline


# --- reply events ------------------------------------------------------------
# Events are small dicts keyed by "t" (type). Constructors below are the only
# place that spells their shape.


def delta(index: int, text: str, tokens: int = 1, logprobs: list[Any] | None = None) -> dict[str, Any]:
    """New text for choice ``index`` (a delta, never cumulative text)."""
    ev: dict[str, Any] = {"t": "d", "i": index, "x": text, "k": tokens}
    if logprobs is not None:
        ev["lp"] = logprobs
    return ev


def choice_end(index: int, finish_reason: str) -> dict[str, Any]:
    return {"t": "end", "i": index, "fr": finish_reason}


def done(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """Terminal event: the request succeeded."""
    return {"t": "done", "u": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}


def embeddings(vectors: list[list[float]], prompt_tokens: int) -> dict[str, Any]:
    """Terminal event of an embedding job."""
    return {"t": "emb", "v": vectors, "u": {"prompt_tokens": prompt_tokens}}


def token_count(count: int, ids: list[int] | None, context_length: int) -> dict[str, Any]:
    """Terminal event of a tokenize job (``ids`` is None for an engine without real token ids)."""
    return {"t": "tok", "n": count, "ids": ids, "ctx": context_length}


def lost() -> dict[str, Any]:
    """Sent by a janitor for a job that was running on a worker that died: retry it or fail it."""
    return {"t": "lost"}


def error(
    message: str, *, status: int = 500, type: str = "server_error", code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """Terminal event: the request failed; carries an HTTP status for the gateway."""
    return {"t": "err", "status": status, "message": message, "type": type, "code": code, "param": param}


TERMINAL_EVENTS = frozenset({"done", "emb", "tok", "err"})


@dataclass(slots=True)
class Reply:
    rid: str
    seq: int
    events: list[dict[str, Any]] = field(default_factory=list)
    #: The job attempt that produced it: replies of a superseded attempt are dropped.
    attempt: int = 0

    def encode(self) -> bytes:
        return pack({"rid": self.rid, "seq": self.seq, "ev": self.events, "a": self.attempt})

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        return cls.from_map(unpack(data))

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Reply:
        return cls(rid=m["rid"], seq=m["seq"], events=m["ev"], attempt=m.get("a", 0))

    @staticmethod
    def decode_all(data: bytes) -> list[Reply]:
        """The replies in one channel message: a single reply, or a bundle of them."""
        m = unpack(data)
        return [Reply.from_map(x) for x in m] if isinstance(m, list) else [Reply.from_map(m)]

    @property
    def terminal(self) -> bool:
        return any(ev["t"] in TERMINAL_EVENTS for ev in self.events)


def bundle(encoded: list[bytes]) -> bytes:
    """Several encoded replies as one channel message: a msgpack array of reply maps.

    Built from the already-encoded replies (an array header, then the maps
    back to back), so bundling costs no second encoding.
    """
    n = len(encoded)
    if n < 16:
        header = bytes((0x90 | n,))
    elif n < 1 << 16:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    return header + b"".join(encoded)


def pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def unpack(data: bytes | str) -> Any:
    if isinstance(data, str):
        data = data.encode()
    return msgpack.unpackb(data, raw=False)


def as_str(v: bytes | str) -> str:
    """A Redis reply field as text (raw clients return bytes, decoding ones str)."""
    return v.decode() if isinstance(v, bytes) else v
