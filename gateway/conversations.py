"""The conversation log (opt-in, ``--log-conversations``): each chat or completion and its reply, in a stream.

An entry holds what a person auditing or building a dataset needs, as plain
strings: the model, the request's input and sampling parameters (JSON), the
reply text of each choice, finish reasons, token counts, time to first reply
and duration, and the tenant id (a hash of the API key, never the key).

Logging never slows or fails a request: the write is a background task after
the reply is complete, bounded by a short timeout, and a write that fails
only increments ``redserve_conversation_log_misses_total``. The stream is
trimmed to ``conversations_max_entries``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter
from redis.asyncio import Redis

from broker.protocol import ChoiceEnd, Delta, Event, JobKind, Usage
from gateway.schemas import ChatCompletionRequest, SamplingRequest

#: Seconds a log write may take before it counts as a miss.
WRITE_TIMEOUT = 2.0
#: What of a request is its input, not its sampling.
_INPUT = {"messages", "prompt", "model", "stream", "stream_options", "user"}


@dataclass
class Transcript:
    """One logged request: filled as its reply arrives, written once it is complete."""

    body: SamplingRequest
    kind: JobKind
    tenant: str
    started: float = field(default_factory=time.perf_counter)
    first: float | None = None
    texts: dict[int, list[str]] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)

    def feed(self, events: Sequence[Event]) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        for ev in events:
            match ev:
                case Delta(index=index, text=text):
                    self.texts.setdefault(index, []).append(text)
                case ChoiceEnd(index=index, finish_reason=reason):
                    self.finish[index] = reason

    def restart(self) -> None:
        """The job starts over on another worker: what came so far is not the reply."""
        self.texts, self.finish = {}, {}

    def fields(self, response_id: str, usage: Usage) -> dict[str, str]:
        body = self.body
        given = body.model_dump(exclude_unset=True, exclude=_INPUT)  # what the client asked for
        said = [m.model_dump(exclude_none=True) for m in body.messages] \
            if isinstance(body, ChatCompletionRequest) else getattr(body, "prompt", "")
        now = time.perf_counter()
        return {
            "id": response_id, "kind": str(self.kind), "model": body.model, "tenant": self.tenant,
            "input": json.dumps(said), "params": json.dumps(given, sort_keys=True),
            "reply": json.dumps(["".join(self.texts[i]) for i in sorted(self.texts)]),
            "finish_reason": ",".join(self.finish[i] for i in sorted(self.finish)),
            "prompt_tokens": str(usage.prompt_tokens), "completion_tokens": str(usage.completion_tokens),
            "ttft_ms": f"{((self.first or now) - self.started) * 1000:.1f}",
            "duration_ms": f"{(now - self.started) * 1000:.1f}", "stream": "1" if body.stream else "0",
        }


class ConversationLog:
    """Writes transcripts to the conversations stream in the background; a failed write is counted, not raised."""

    def __init__(self, redis: Redis, stream: str, max_entries: int, misses: Counter) -> None:
        self.redis = redis
        self.stream = stream
        self.max_entries = max_entries
        self.misses = misses
        self._writes: set[asyncio.Task[None]] = set()

    def write(self, transcript: Transcript, response_id: str, usage: Usage) -> None:
        try:
            fields = transcript.fields(response_id, usage)
        except Exception:  # never the request's problem
            self.misses.inc()
            return
        task = asyncio.create_task(self._write(fields))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, fields: dict[str, str]) -> None:
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await self.redis.xadd(self.stream, fields, maxlen=self.max_entries,  # type: ignore[arg-type]  # redis-py's field type is invariant
                                      approximate=True)
        except Exception:
            self.misses.inc()

    async def close(self) -> None:
        """Let the writes under way finish (each is bounded by its timeout)."""
        await asyncio.gather(*self._writes, return_exceptions=True)


#: The fields of a conversation entry that hold JSON.
JSON_FIELDS = frozenset({"input", "params", "reply"})


def entries_as_json(entries: Iterable[tuple[str, dict[str, str]]], json_fields: frozenset[str]) -> Iterable[str]:
    """Stream entries as JSON lines for ``redserve export``: the entry id, its time, and its fields with the
    ones named in ``json_fields`` parsed back."""
    for entry_id, fields in entries:
        row: dict[str, Any] = {"entry": entry_id, "time": int(entry_id.split("-")[0]) / 1000}
        for name, value in fields.items():
            row[name] = _parsed(value) if name in json_fields else value
        yield json.dumps(row, ensure_ascii=False)


def _parsed(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:  # an entry written by hand, say: kept as the text it is
        return value
