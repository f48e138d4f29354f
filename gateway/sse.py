"""Turning reply messages into SSE events with ids, the same way live and on resume.

Event ids are ``p.<j>`` for the opening chunks and ``<attempt>.<seq>.<j>``
for the ``j``-th chunk rendered from reply message ``seq``: given the replay
log, a client's ``Last-Event-ID`` names exactly where it stopped.

The events of one reply message leave as one pre-encoded write (``encode``):
sse-starlette passes bytes through untouched, so a message costs one ASGI
send however many chunks it renders to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sse_starlette.sse import EventSourceResponse

from broker.errors import ServeError
from broker.protocol import ChoiceEnd, Delta, Done, Event, Failure, JobKind, StreamMeta, ToolCall
from gateway.errors import APIError
from gateway.render import Shape, dumps


@dataclass
class StreamFormat:
    """Everything a stream's chunks depend on besides the events (kept in the replay log's meta)."""

    shape: Shape
    n: int = 1
    include_usage: bool = False
    prefix: str = ""

    def meta(self, kind: JobKind) -> StreamMeta:
        return StreamMeta(self.shape.model, kind, self.n, self.include_usage, self.prefix, self.shape.created)

    @classmethod
    def from_meta(cls, meta: StreamMeta, response_id: str) -> StreamFormat:
        shape = Shape(chat=meta.kind is JobKind.CHAT, model=meta.model, id=response_id, created=meta.created)
        return cls(shape, meta.n, meta.include_usage, meta.prefix)


class SSE(NamedTuple):
    """One SSE event. ``data`` is compact JSON or ``[DONE]``: never a line break, so one ``data:`` line."""

    data: str
    id: str | None = None


#: A keep-alive: an SSE comment line, which clients ignore. With no blank line after it: a blank line dispatches
#: an event, and the openai client, which keeps the last event id as the spec says, then parses an event with an
#: id and no data as JSON, and fails. The next event's own blank line ends it.
PING = b": ping\r\n"


def response(events: AsyncIterator[bytes], send_timeout: float,
             on_close: Callable[[Any], Awaitable[None]] | None = None) -> EventSourceResponse:
    """The SSE response of a stream that writes ``encode``'d events and its own keep-alive (``PING``): no ping
    task of sse-starlette's (its ping ends with a blank line, see ``PING``, and costs every stream a task).
    ``on_close``: called the moment the client disconnects."""
    return EventSourceResponse(events, ping=0, send_timeout=send_timeout, client_close_handler_callable=on_close,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def encode(events: list[SSE]) -> bytes:
    """Events in SSE wire form (what sse-starlette writes for a ``ServerSentEvent``), as one write."""
    return "".join(f"data: {e.data}\r\n\r\n" if e.id is None else f"id: {e.id}\r\ndata: {e.data}\r\n\r\n"
                   for e in events).encode()


class EventId(NamedTuple):
    attempt: int
    seq: int
    chunk: int

    @classmethod
    def parse(cls, text: str | None) -> EventId | None:
        """``None`` for a missing id or an opening chunk's (``p.j``): resume from the first message."""
        if not text or text.startswith("p."):
            return None
        try:
            a, s, j = (int(x) for x in text.split("."))
        except ValueError:
            raise APIError(400, f"Malformed Last-Event-ID {text!r}.", param="Last-Event-ID") from None
        return cls(a, s, j)


def opening(fmt: StreamFormat) -> list[SSE]:
    """The role chunks (chat) and echoed prompt (completions) that precede any reply message."""
    data = []
    for i in range(fmt.n):
        if fmt.shape.chat:
            data.append(fmt.shape.chunk(i, role=True, include_usage=fmt.include_usage))
        if fmt.prefix:
            data.append(fmt.shape.chunk(i, fmt.prefix, include_usage=fmt.include_usage))
    return [SSE(d, f"p.{j}") for j, d in enumerate(data)]


def render(fmt: StreamFormat, events: Sequence[Event], attempt: int, seq: int) -> tuple[list[SSE], bool]:
    """The SSE events of one reply message, and whether it ended the stream."""
    out: list[str] = []
    ended = False
    shape = fmt.shape
    for ev in events:
        match ev:
            case Delta(index=index, text=text, logprobs=logprobs):
                out.append(shape.chunk(index, text, include_usage=fmt.include_usage, lp=logprobs))
            case ToolCall():
                out.append(shape.tool_chunk(ev, include_usage=fmt.include_usage))
            case ChoiceEnd(index=index, finish_reason=finish_reason):
                out.append(shape.chunk(index, None, finish_reason, include_usage=fmt.include_usage))
            case Done(usage=usage):
                if fmt.include_usage:
                    out.append(shape.usage_chunk(usage))
                out.append("[DONE]")
                ended = True
            case Failure():
                out += [dumps(ServeError.from_event(ev).body()), "[DONE]"]
                ended = True
    return [SSE(d, f"{attempt}.{seq}.{j}") for j, d in enumerate(out)], ended


def failure(body: dict[str, Any]) -> list[SSE]:
    """An error that is not a worker's message (a lost worker, a timeout): no id, nothing to resume."""
    return [SSE(dumps(body)), SSE("[DONE]")]
