"""Rendering reply events as OpenAI objects: chunks while streaming, one object when not.

Chat and text completions differ only in a few names and in where the text
sits in a choice; ``Shape`` captures exactly that difference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from broker.protocol import TokenLogprob, ToolCall, TopLogprob, Usage

#: One encoder for the process (it holds no state between calls).
_JSON = msgspec.json.Encoder()


def dumps(obj: Any) -> str:
    """Compact JSON with UTF-8 text as is. msgspec, not the json module: every streamed chunk is encoded here,
    and it is about eight times faster on a chunk. (It writes some floats differently, ``1e16`` for ``1e+16``,
    and non-finite ones as null: valid JSON where the json module's ``NaN`` was not.)"""
    return _JSON.encode(obj).decode()


#: Stands in for the text while a delta chunk's template is built (``dumps`` writes it as ``"\u0000"``).
_HOLE = "\0"


def usage(u: Usage) -> dict[str, int]:
    p, c = u.prompt_tokens, u.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@dataclass
class Shape:
    """One response's identity and the chat/completion naming differences."""

    chat: bool
    model: str
    #: The response id: known once the request is dispatched (``broker.ids.response_id``).
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    #: Completions' ``text_offset`` runs across chunks: characters emitted so far, per choice.
    offsets: dict[int, int] = field(default_factory=dict)
    #: A plain text delta's chunk around its text, per (choice, include_usage): the hot path.
    templates: dict[tuple[int, bool], tuple[str, str]] = field(default_factory=dict)

    def logprobs(self, index: int, lp: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """Worker logprob entries in the endpoint's own shape (they differ between chat and completions)."""
        if lp is None:
            return None
        if self.chat:
            return {"content": [{**_with_bytes(e), "top_logprobs": [_with_bytes(t) for t in e.top_logprobs]}
                                for e in lp]}
        start = self.offsets.get(index, 0)
        offsets = []
        for e in lp:
            offsets.append(start)
            start += len(e.token)
        self.offsets[index] = start
        return {"tokens": [e.token for e in lp], "token_logprobs": [e.logprob for e in lp],
                "top_logprobs": [None if e.logprob is None else {t.token: t.logprob for t in e.top_logprobs}
                                 for e in lp],
                "text_offset": offsets}

    def _obj(self, object_: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    # --- streaming -----------------------------------------------------------
    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None, *,
              role: bool = False, include_usage: bool = False, lp: list[TokenLogprob] | None = None) -> str:
        if text and lp is None and finish_reason is None and not role:
            return self._delta(index, text, include_usage)
        return self._chunk(index, text, finish_reason, role=role, include_usage=include_usage, lp=lp)

    def _chunk(self, index: int, text: str | None, finish_reason: str | None, *, role: bool, include_usage: bool,
               lp: list[TokenLogprob] | None) -> str:
        logprobs = self.logprobs(index, lp)
        if self.chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                d["content"] = text
            choice = {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish_reason}
            extra = {"usage": None} if include_usage else {}
            return dumps(self._obj("chat.completion.chunk", [choice], **extra))
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        extra = {"usage": None} if include_usage else {}
        return dumps(self._obj("text_completion", [choice], **extra))

    def _delta(self, index: int, text: str, include_usage: bool) -> str:
        """A plain text delta: the same JSON as the general path, but only the text is encoded per chunk."""
        template = self.templates.get((index, include_usage))
        if template is None:
            chunk = self._chunk(index, _HOLE, None, role=False, include_usage=include_usage, lp=None)
            head, _, tail = chunk.rpartition(dumps(_HOLE))  # the text is the last string in a chunk
            template = self.templates[index, include_usage] = (head, tail)
        return template[0] + dumps(text) + template[1]

    def tool_chunk(self, call: ToolCall, include_usage: bool = False) -> str:
        """A piece of a tool call in ``delta.tool_calls`` (chat only: completions have no tools)."""
        fn: dict[str, Any] = {"arguments": call.arguments}
        entry: dict[str, Any] = {"index": call.call}
        if call.id is not None:
            entry |= {"id": call.id, "type": "function"}
            fn = {"name": call.name, **fn}
        entry["function"] = fn
        choice = {"index": call.index, "delta": {"tool_calls": [entry]}, "logprobs": None, "finish_reason": None}
        extra = {"usage": None} if include_usage else {}
        return dumps(self._obj("chat.completion.chunk", [choice], **extra))

    def usage_chunk(self, u: Usage) -> str:
        return dumps(self._obj("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage(u)))

    # --- whole ---------------------------------------------------------------
    def whole(self, texts: dict[int, str], finish: dict[int, str], u: Usage,
              lps: dict[int, list[TokenLogprob]] | None = None,
              calls: dict[int, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
        choices = []
        for i in sorted(texts.keys() | finish.keys()):
            text = texts.get(i, "")
            body: dict[str, Any] = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            if calls and calls.get(i):
                body["message"] |= {"content": text or None, "tool_calls": calls[i]}
            logprobs = self.logprobs(i, (lps or {}).get(i))
            choices.append({"index": i, **body, "logprobs": logprobs, "finish_reason": finish.get(i, "stop")})
        return self._obj("chat.completion" if self.chat else "text_completion", choices, usage=usage(u))


def _with_bytes(entry: TokenLogprob | TopLogprob) -> dict[str, Any]:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.token.encode())}
