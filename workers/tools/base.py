"""What every tool-call parser shares: the pieces it yields, and parsing between markers."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Call:
    """One complete call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


#: What a parser yields, in order: content text, or a complete call.
Piece = str | Call


class ToolParser:
    """Streams text through: ``feed`` each delta, then ``close`` once the choice ends.

    ``names`` are the request's functions: an object naming anything else is
    text, not a call (a JSON answer is not a call because it has a ``name``).
    """

    #: The format's markers are special tokens: the engine must not strip them from the text.
    needs_special_tokens: bool = False

    def __init__(self, names: Collection[str]) -> None:
        self.names = frozenset(names)

    def feed(self, text: str) -> list[Piece]:
        raise NotImplementedError

    def close(self) -> list[Piece]:
        raise NotImplementedError


def call_of(obj: Any, names: Collection[str], *, arguments_keys: tuple[str, ...] = ("arguments", "parameters")
            ) -> Call | None:
    """``{"name": ..., "arguments": {...}}`` (or ``parameters``) naming one of ``names`` as a Call; None if it has
    not that shape."""
    if not isinstance(obj, dict) or obj.get("name") not in names or not any(k in obj for k in arguments_keys):
        return None
    args: Any = next(obj[k] for k in arguments_keys if k in obj)
    if isinstance(args, str):  # some models emit the arguments already encoded
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return Call(obj["name"], json.dumps(args, ensure_ascii=False))


def calls_of(payload: str, names: Collection[str]) -> list[Call] | None:
    """A JSON object or array of call objects; None unless every one is a call."""
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    calls = []
    for item in value if isinstance(value, list) else [value]:
        call = call_of(item, names)
        if call is None:
            return None
        calls.append(call)
    return calls or None


class MarkerParser(ToolParser):
    """Content until ``start``; then a payload until ``end`` (or until the choice ends, when ``end`` is None).

    A payload that does not parse goes back out as content, markers included:
    the model's words are never dropped.
    """

    start: str = ""
    end: str | None = None

    def __init__(self, names: Collection[str]) -> None:
        super().__init__(names)
        self.buf = ""
        self.inside = False

    def parse(self, payload: str) -> list[Call] | None:
        return calls_of(payload, self.names)

    def feed(self, text: str) -> list[Piece]:
        self.buf += text
        out: list[Piece] = []
        while True:
            if not self.inside:
                at = self.buf.find(self.start)
                if at < 0:
                    keep = _partial_suffix(self.buf, self.start)
                    if len(self.buf) > keep:
                        out.append(self.buf[:len(self.buf) - keep])
                        self.buf = self.buf[len(self.buf) - keep:]
                    return out
                if at:
                    out.append(self.buf[:at])
                self.buf, self.inside = self.buf[at + len(self.start):], True
            if self.end is None:
                return out
            at = self.buf.find(self.end)
            if at < 0:
                return out
            out += self._payload(self.buf[:at], closed=True)
            self.buf, self.inside = self.buf[at + len(self.end):], False

    def close(self) -> list[Piece]:
        rest, self.buf = self.buf, ""
        if not self.inside:
            return [rest] if rest else []
        self.inside = False
        return self._payload(rest, closed=self.end is None)

    def _payload(self, payload: str, *, closed: bool) -> list[Piece]:
        calls = self.parse(payload.strip()) if closed else None
        if calls is None:
            return [self.start + payload + (self.end or "" if closed else "")]
        return list(calls)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker`` (it may be a marker's start)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class WholeOutputParser(ToolParser):
    """Calls that are the whole output (it starts with ``opener``): held to the end, parsed once."""

    opener: tuple[str, ...] = ()

    def __init__(self, names: Collection[str]) -> None:
        super().__init__(names)
        self.buf = ""
        self.decided: bool | None = None  # None: not enough text yet to tell

    def parse(self, payload: str) -> list[Call] | None:
        raise NotImplementedError

    def feed(self, text: str) -> list[Piece]:
        if self.decided is False:
            return [text] if text else []
        self.buf += text
        head = self.buf.lstrip()
        if not head:
            return []
        if any(head.startswith(o) for o in self.opener):
            self.decided = True
            return []
        if any(o.startswith(head) for o in self.opener):  # still possibly a call
            return []
        self.decided = False
        out, self.buf = self.buf, ""
        return [out]

    def close(self) -> list[Piece]:
        payload, self.buf = self.buf, ""
        if not payload:
            return []
        calls = self.parse(payload.strip()) if self.decided else None
        return list(calls) if calls is not None else [payload]
