"""Streamed chunks: the pre-built delta templates give exactly the JSON the general path builds."""

from __future__ import annotations

import json

import pytest

from gateway.render import Shape
from gateway.sse import SSE, encode

TEXTS = ["hi", 'a "quoted" \\ back\nslash\ttab', "\0 nul", "é ü 😀 \u2028", "</script>"]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("include_usage", [True, False])
def test_delta_chunks_are_the_full_objects(chat, include_usage):
    shape = Shape(chat=chat, model='m"\0odel', id="x-1", created=7)  # a hole-like model name must not confuse it
    for index in (0, 2):
        for text in TEXTS:
            got = json.loads(shape.chunk(index, text, include_usage=include_usage))
            choice = {"index": index, "logprobs": None, "finish_reason": None}
            choice |= {"delta": {"content": text}} if chat else {"text": text}
            want = {"id": "x-1", "object": "chat.completion.chunk" if chat else "text_completion", "created": 7,
                    "model": 'm"\0odel', "choices": [choice]}
            if include_usage:
                want["usage"] = None
            assert got == want
            assert list(got) == list(want)  # same key order as the general path


def test_events_of_one_message_encode_as_sse_that_parses_back():
    events = [SSE('{"a":1}', "0.3.0"), SSE('{"b":"x\\ny"}', "0.3.1"), SSE("[DONE]")]
    wire = encode(events).decode()
    blocks = [b for b in wire.split("\r\n\r\n") if b]
    parsed = []
    for block in blocks:
        fields = dict(line.split(": ", 1) for line in block.split("\r\n"))
        parsed.append(SSE(fields["data"], fields.get("id")))
    assert parsed == events
