"""Turning a generation's text into tool calls, the same way for every engine that produces text.

- ``tool_choice: "required"`` or a named function: the output is *constrained*
  (``constraint``) to calls whose arguments match the functions' parameter
  schemas, so every call is valid; a named function's arguments stream as
  they are generated.
- ``"auto"``: the worker's ``--tool-parser`` finds calls in free text.

Either way the choice ends with ``finish_reason: "tool_calls"`` when it made a call.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Collection
from typing import Any

from broker.protocol import ChoiceEnd, Delta, Event, Generate, Structured, ToolCall
from workers.tools.base import Call, Piece, ToolParser, calls_of


def functions(params: Generate) -> dict[str, dict[str, Any]]:
    """The request's functions by name: their parameter schemas (an empty object when none is given)."""
    out = {}
    for tool in params.tools or []:
        fn = tool.get("function") or {}
        out[fn.get("name", "")] = fn.get("parameters") or {"type": "object", "properties": {}}
    return out


def constraint(params: Generate) -> Structured | None:
    """The output a forced tool choice must produce: a named function's arguments, or a list of calls."""
    fns = functions(params)
    if params.tool_choice == "function" and params.tool_name in fns:
        return Structured(json=json.dumps(fns[params.tool_name]))
    if params.tool_choice != "required":
        return None
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                      "required": ["name", "parameters"]} for name, schema in fns.items()]}
    array: dict[str, Any] = {"type": "array", "items": one, "minItems": 1}
    if not params.parallel_tool_calls:
        array["maxItems"] = 1
    return Structured(json=json.dumps(array))


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


async def tool_events(events: AsyncIterator[Event], params: Generate, parser: type[ToolParser]
                      ) -> AsyncIterator[Event]:
    """``events`` with each choice's text turned into content and ``ToolCall`` events."""
    choices: dict[int, _Choice] = {}
    async for ev in events:
        match ev:
            case Delta(index=i):
                c = choices.get(i) or choices.setdefault(i, _Choice.of(params, parser))
                for out in c.feed(ev):
                    yield out
            case ChoiceEnd(index=i, finish_reason=reason):
                c = choices.get(i) or choices.setdefault(i, _Choice.of(params, parser))
                for out in c.close(i):
                    yield out
                yield ChoiceEnd(i, "tool_calls" if c.calls and reason == "stop" else reason)
            case _:
                yield ev


class _Choice:
    """One choice's text on its way to calls: streamed arguments (named), a list (required), or parsed (auto)."""

    def __init__(self, mode: str, params: Generate, parser: ToolParser | None) -> None:
        self.mode, self.name, self.parser = mode, params.tool_name, parser
        self.names = functions(params).keys()
        self.parallel = params.parallel_tool_calls
        self.calls = 0
        self.text = ""  # a required choice's whole output, parsed once it ends
        self.space = ""  # whitespace content held back: between or after calls it is not content

    @classmethod
    def of(cls, params: Generate, parser: type[ToolParser]) -> _Choice:
        if params.tool_choice == "function":
            return cls("named", params, None)
        if params.tool_choice == "required":
            return cls("required", params, None)
        return cls("auto", params, parser(functions(params).keys()))

    def feed(self, ev: Delta) -> list[Event]:
        if self.mode == "named":  # the text *is* the arguments: stream it as such
            first = self.calls == 0
            self.calls = 1
            return [ToolCall(ev.index, 0, ev.text, call_id() if first else None, self.name if first else None)]
        if self.mode == "required":
            self.text += ev.text
            return []
        assert self.parser is not None
        return self._pieces(ev.index, self.parser.feed(ev.text), ev)

    def close(self, index: int) -> list[Event]:
        if self.mode == "named":
            return [] if self.calls else [ToolCall(index, 0, "{}", call_id(), self.name)]
        if self.mode == "required":
            calls = _required_calls(self.text, self.names)
            return self._pieces(index, calls if calls is not None else [self.text], None)
        assert self.parser is not None
        out = self._pieces(index, self.parser.close(), None)
        if self.space and not self.calls:
            out.append(Delta(index, self.space, 0))
        return out

    def _pieces(self, index: int, pieces: list[Piece], source: Delta | None) -> list[Event]:
        out: list[Event] = []
        for piece in pieces:
            if isinstance(piece, Call):
                self.space = ""
                if self.calls and not self.parallel:  # parallel_tool_calls false: the first call only
                    continue
                out.append(ToolCall(index, self.calls, piece.arguments, call_id(), piece.name))
                self.calls += 1
            elif piece and not piece.strip():
                self.space += piece
            elif piece:  # content keeps what the text it came from carried
                piece, self.space = self.space + piece, ""
                out.append(Delta(index, piece, source.tokens, source.logprobs) if source and not out
                           else Delta(index, piece, 0))
        return out


def _required_calls(text: str, names: Collection[str]) -> list[Piece] | None:
    """The constrained ``[{"name", "parameters"}, ...]`` output as calls."""
    calls = calls_of(text, names)
    return list(calls) if calls is not None else None
