"""The tool-call parsers over streamed text, without a model: what is a call, what stays content."""

from __future__ import annotations

import pytest

from workers.tools import PARSERS, Call

NAMES = {"add", "get_weather"}


def parse(name: str, chunks: list[str]) -> list:
    p = PARSERS[name](NAMES)
    out = []
    for c in chunks:
        out += p.feed(c)
    return out + p.close()


def test_hermes_calls_split_across_deltas_with_content_around():
    out = parse("hermes", ["Sure <to", 'ol_call>{"name": "add", "argu', 'ments": {"a": 1}}</tool_call> done'])
    assert out == ["Sure ", Call("add", '{"a": 1}'), " done"]


@pytest.mark.parametrize("name,chunks", [
    ("hermes", ["a < b, <tool"]),  # a partial marker that never completes is content, once the text ends
    ("hermes", ['<tool_call>{"name": "add", "arguments": {</tool_call>']),  # does not parse: given back
    ("llama3_json", ['{"name": "Alice", "age": 3}']),  # a JSON answer is not a call to "Alice"
    ("llama3_json", ['{"name": "add"}']),  # no arguments key: not a call either
    ("pythonic", ["[len(x=1)]"]),  # not one of the request's functions
    ("mistral", ['[TOOL_CALLS][{"name": "nope", "arguments": {}}]']),
])
def test_what_is_not_a_call_stays_content_word_for_word(name, chunks):
    out = parse(name, chunks)
    assert all(isinstance(p, str) for p in out) and "".join(out) == "".join(chunks)


def test_each_format_finds_its_calls():
    assert parse("mistral", ['[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, ',
                             '{"name": "get_weather", "arguments": {}}]']) == [
        Call("add", '{"a": 1}'), Call("get_weather", "{}")]
    assert parse("llama3_json", ['<|python_tag|>{"name": "add", "parameters": {"b": 2}}; ',
                                 '{"name": "add", "parameters": {}}']) == [Call("add", '{"b": 2}'), Call("add", "{}")]
    assert parse("pythonic", ['[add(a=1, b="x"), get_weather()]']) == [
        Call("add", '{"a": 1, "b": "x"}'), Call("get_weather", "{}")]
    assert PARSERS["mistral"].needs_special_tokens and not PARSERS["hermes"].needs_special_tokens
