"""Structured outputs, tool calls and vLLM's sampling extras, end to end: the official openai client, a real
gateway and Redis, and the tiny random-weight model on the transformers engine.

The model's weights are random, so whatever it produces under a constraint is the constraint's doing: every
output must validate, with no retries and no repairs.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from test_hf_worker import serve

#: Schemas of the kinds applications send: nested objects, bounded arrays, enums, ranged integers, required
#: and optional fields, anyOf. Free strings carry a maxLength: a random model would otherwise ramble.
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 130}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "shade": {"type": "integer", "minimum": -5, "maximum": 5}},
     "required": ["colour"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                                  "admin": {"type": "boolean"}},
                 "required": ["id", "admin"], "additionalProperties": False},
        "note": {"type": "string", "maxLength": 8}},
     "required": ["user"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                                                          {"type": "boolean"},
                                                          {"type": "string", "maxLength": 5}]}},
     "required": ["value"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0,
                                                                      "maximum": 9}},
                                "required": ["x"], "additionalProperties": False},
     "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0,
                                                                          "maximum": 50},
                                      "kind": {"enum": ["a", "b"]}},
     "required": ["ok", "count", "kind"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 3}}}},
     "required": ["matrix"], "additionalProperties": False},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
    {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 4},
                                      "confidence": {"enum": ["low", "high"]},
                                      "sources": {"type": "array", "maxItems": 2,
                                                  "items": {"type": "string", "maxLength": 5}}},
     "required": ["answer", "confidence"], "additionalProperties": False},
]


async def constrained(client: openai.AsyncOpenAI, schema: dict, i: int) -> tuple[str, str]:
    """One request under ``schema``, streamed every other time; its text and finish reason."""
    kw = dict(model="tiny", max_tokens=600, messages=[{"role": "user", "content": f"Fill it in, case {i}."}],
              response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": schema,
                                                                      "strict": True}})
    if i % 3:  # sampled as well as greedy: the constraint holds either way
        kw |= {"temperature": 1.0, "seed": i}
    else:
        kw |= {"temperature": 0}
    if i % 2:
        stream = await client.chat.completions.create(stream=True, **kw)
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
    r = await client.chat.completions.create(**kw)
    return r.choices[0].message.content, r.choices[0].finish_reason


async def test_two_hundred_constrained_outputs_all_validate(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir, max_concurrency=16)
    room = asyncio.Semaphore(16)

    async def one(i: int) -> tuple[dict, str, str]:
        schema = SCHEMAS[i % len(SCHEMAS)]
        async with room:
            text, finish = await constrained(client, schema, i)
        return schema, text, finish

    results = await asyncio.gather(*(one(i) for i in range(200)))
    invalid = []
    for schema, text, finish in results:
        try:
            jsonschema.validate(json.loads(text), schema)
            assert finish == "stop"
        except (ValueError, jsonschema.ValidationError, AssertionError) as exc:
            invalid.append((text, finish, str(exc)[:80]))
    assert invalid == [], invalid[:3]
    assert len({text for _, text, _ in results}) > 50  # varied outputs, not one answer repeated


class Weather(BaseModel):
    city: str = Field(max_length=10)
    celsius: int = Field(ge=-40, le=50)
    sky: Literal["clear", "cloudy", "rain"]


async def test_the_official_clients_parse_returns_a_model(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    r = await client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                            response_format=Weather, max_tokens=200, temperature=0)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Weather) and -40 <= parsed.celsius <= 50


async def test_json_object_regex_choice_and_grammar(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Go."}], max_tokens=300, temperature=0)
    r = await client.chat.completions.create(response_format={"type": "json_object"}, **ask)
    assert r.choices[0].finish_reason == "length" or json.loads(r.choices[0].message.content) is not None
    r = await client.chat.completions.create(extra_body={"structured_outputs": {"regex": r"[A-Z][a-z]{2,5}-\d{3}"}},
                                             **ask)
    import re

    assert re.fullmatch(r"[A-Z][a-z]{2,5}-\d{3}", r.choices[0].message.content)
    r = await client.completions.create(model="tiny", prompt="Pick one:", max_tokens=20, temperature=0,
                                        extra_body={"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}})
    assert r.choices[0].text in {"alpha", "beta", "gamma"}
    grammar = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'
    r = await client.chat.completions.create(extra_body={"structured_outputs": {"grammar": grammar}}, **ask)
    text = r.choices[0].message.content
    assert text.startswith("(") and text.endswith(")") and all(c in "0123456789+()" for c in text)


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "response_format"),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= "}}}, "response_format"),
])
async def test_a_constraint_that_cannot_compile_is_a_400_naming_it(stack, tiny_dir, body, param):
    worker, client = await serve(stack, tiny_dir)
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                             max_tokens=5, **body)
    assert err.value.code == "invalid_constraint" and err.value.param == param
    assert "cannot be compiled" in err.value.message and "/project/" not in err.value.message
    assert worker.held["tiny"].batcher.tokens_generated == 0  # refused before it joined the batch


async def test_structured_outputs_take_exactly_one_constraint(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                             extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}})
    assert "exactly one" in err.value.message


# --- tools ----------------------------------------------------------------------------------------------
def tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"the {name} tool",
                                             "parameters": parameters}}


TOOLS = [
    tool("get_weather", {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                          "unit": {"enum": ["c", "f"]}},
                         "required": ["city", "unit"], "additionalProperties": False}),
    tool("add", {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                  "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                 "required": ["a", "b"], "additionalProperties": False}),
    tool("search", {"type": "object", "properties": {"q": {"type": "string", "maxLength": 8},
                                                     "top": {"type": "integer", "minimum": 1, "maximum": 5}},
                    "required": ["q"], "additionalProperties": False}),
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def check_calls(calls) -> None:  # noqa: ANN001
    assert calls
    for call in calls:
        assert call.id and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


async def test_required_and_named_tool_choices_always_make_valid_calls(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir, max_concurrency=8)
    msgs = [{"role": "user", "content": "Use a tool."}]

    async def required(i: int):  # noqa: ANN202
        r = await client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, tool_choice="required",
                                                 max_tokens=400, temperature=1.0, seed=i)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        check_calls(r.choices[0].message.tool_calls)

    async def named(i: int):  # noqa: ANN202
        name = TOOLS[i % 3]["function"]["name"]
        r = await client.chat.completions.create(
            model="tiny", messages=msgs, tools=TOOLS, max_tokens=300, temperature=1.0, seed=i,
            tool_choice={"type": "function", "function": {"name": name}})
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and [c.function.name for c in calls] == [name]
        check_calls(calls)

    await asyncio.gather(*(required(i) for i in range(12)), *(named(i) for i in range(12)))
    r = await client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, max_tokens=400, temperature=0)
    assert len(r.choices[0].message.tool_calls) == 1


async def test_streamed_tool_calls_arrive_in_openais_shape(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    stream = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Add."}], tools=TOOLS, stream=True, max_tokens=300,
        temperature=0, tool_choice={"type": "function", "function": {"name": "add"}})
    pieces = [c.choices[0] async for c in stream if c.choices]
    calls = [tc for p in pieces for tc in p.delta.tool_calls or []]
    assert calls[0].id and calls[0].function.name == "add" and calls[0].type == "function"
    assert all(tc.index == 0 and tc.id is None for tc in calls[1:])  # the rest: argument fragments
    assert len(calls) > 2  # the arguments stream as they are generated
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    jsonschema.validate(json.loads(arguments), PARAMS["add"])
    assert not any(p.delta.content for p in pieces)  # nothing leaks as content
    assert pieces[-1].finish_reason == "tool_calls"


async def test_a_tool_round_trip(stack, tiny_dir):
    """user -> assistant tool_calls -> tool result -> assistant answer, through the chat template."""
    _, client = await serve(stack, tiny_dir)
    msgs: list[dict] = [{"role": "user", "content": "What is 2 + 3?"}]
    r = await client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=200,
                                             temperature=0, tool_choice={"type": "function",
                                                                         "function": {"name": "add"}})
    call = r.choices[0].message.tool_calls[0]
    msgs.append(r.choices[0].message.model_dump(exclude_none=True))
    args = json.loads(call.function.arguments)
    msgs.append({"role": "tool", "tool_call_id": call.id, "content": str(args["a"] + args["b"])})
    r2 = await client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=12,
                                              temperature=0, tool_choice="none")
    assert r2.choices[0].finish_reason == "length" and r2.choices[0].message.content
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result reached the prompt


async def test_auto_tool_calls_are_parsed_from_text_streamed_and_not(stack):
    """The echo engine repeats the prompt, so a Hermes call in the prompt comes back as model text: the
    worker's parser turns it into a call, whatever engine produced it."""
    await stack.worker(["echo"], echo_tokens=2)  # exactly the prompt's two words, once
    client = (await stack.gateway()).client()
    said = 'Sure. <tool_call>{"name":"add","arguments":{"a":2,"b":3}}</tool_call>'
    msgs = [{"role": "user", "content": said}]
    r = await client.chat.completions.create(model="echo", messages=msgs, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."  # the space is the call's
    [call] = choice.message.tool_calls
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 2, "b": 3}
    stream = await client.chat.completions.create(model="echo", messages=msgs, tools=TOOLS, stream=True)
    pieces = [c.choices[0] async for c in stream if c.choices]
    assert "".join(p.delta.content or "" for p in pieces) == "Sure."
    [streamed] = [tc for p in pieces for tc in p.delta.tool_calls or []]
    assert streamed.function.name == "add" and pieces[-1].finish_reason == "tool_calls"
    r = await client.chat.completions.create(model="echo", messages=msgs, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.content.startswith("Sure.") and not r.choices[0].message.tool_calls


async def test_a_forced_tool_choice_needs_constrained_decoding(stack):
    await stack.worker(["echo"])
    client = (await stack.gateway()).client()
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}],
                                             tools=TOOLS, tool_choice="required")
    assert err.value.param == "tool_choice"
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}],
                                             response_format={"type": "json_object"})
    assert err.value.param == "structured" and err.value.code == "unsupported_parameter"


# --- vLLM's sampling extras -----------------------------------------------------------------------------
async def test_vllm_sampling_extras_are_honoured(stack, tiny_dir):
    worker, client = await serve(stack, tiny_dir)
    tok = worker.held["tiny"].loaded.tokenizer
    ask = dict(model="tiny", prompt="Hello there", temperature=0, max_tokens=8)
    plain = (await client.completions.create(**ask)).choices[0].text
    # logit_bias: a +100 bias makes one token the greedy choice every time.
    target = tok.convert_tokens_to_ids("Ġthe")
    biased = await client.completions.create(**ask, logit_bias={str(target): 100})
    assert biased.choices[0].text == " the" * 8
    # stop_token_ids: the biased token ends the choice at once.
    r = await client.completions.create(**ask, extra_body={"stop_token_ids": [target]}, logit_bias={str(target): 100})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    # include_stop_str_in_output: the stop string stays.
    r = await client.completions.create(**ask, logit_bias={str(target): 100}, stop=["the"],
                                        extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == " the"
    # min_p 1.0 keeps only the most likely token: sampling becomes greedy.
    r = await client.completions.create(**{**ask, "temperature": 1.0}, seed=3, extra_body={"min_p": 1.0})
    assert r.choices[0].text == plain
    # repetition_penalty changes what greedy decoding picks once tokens repeat.
    r = await client.completions.create(**{**ask, "max_tokens": 24}, extra_body={"repetition_penalty": 1.8})
    assert r.choices[0].text != (await client.completions.create(**{**ask, "max_tokens": 24})).choices[0].text


async def test_min_tokens_and_ignore_eos_hold_the_end_back(stack, tmp_path):
    from workers.tiny_model import build_tiny_model

    eos_friendly = build_tiny_model(tmp_path / "eos", context_length=512, suppress_eos=False)
    worker, client = await serve(stack, eos_friendly)
    eos = worker.held["tiny"].loaded.tokenizer.eos_token_id
    ask = dict(model="tiny", prompt="Hello there", temperature=0, max_tokens=20, logit_bias={str(eos): 100})
    r = await client.completions.create(**ask)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1  # EOS, at once
    r = await client.completions.create(**ask, extra_body={"min_tokens": 5})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 6
    r = await client.completions.create(**ask, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20


async def test_chat_template_options_and_chat_echo(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well, hello"}]
    r = await client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0,
                                             extra_body={"continue_final_message": True,
                                                         "add_generation_prompt": False, "echo": True})
    assert r.choices[0].message.content.startswith("Well, hello")
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4,
                                             extra_body={"chat_template_kwargs": {"tools": []}})
    assert err.value.param == "chat_template_kwargs"


async def test_an_engine_refuses_each_extra_it_cannot_honour_by_name(stack):
    await stack.worker(["echo"])
    client = (await stack.gateway()).client()
    for extra in ({"min_p": 0.1}, {"repetition_penalty": 1.2}, {"min_tokens": 2}, {"ignore_eos": True},
                  {"stop_token_ids": [3]}, {"logit_bias": {"3": 1}}, {"chat_template_kwargs": {"x": 1}}):
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}],
                                                 extra_body=extra)
        assert err.value.param == next(iter(extra)) and err.value.code == "unsupported_parameter", extra




async def test_the_openai_engine_relays_calls_constraints_and_logprobs(stack, tiny_dir, tmp_path):
    """client -> gateway A -> openai engine -> gateway B -> tiny model: the upstream makes the calls."""
    from workers.hf import HFWorker
    from workers.openai_api import ExternalAPIWorker

    await stack.worker(["tiny"], cls=HFWorker, model_path=str(tiny_dir), key_prefix="upstream")
    gw_b = await stack.gateway(key_prefix="upstream")
    config = tmp_path / "upstreams.toml"
    config.write_text(f'[models.remote-tiny]\nbase_url = "{gw_b.url}/v1"\nmodel = "tiny"\n')
    await stack.worker(["remote-tiny"], cls=ExternalAPIWorker, api_config=str(config))
    client = (await stack.gateway()).client()
    ask = dict(model="remote-tiny", messages=[{"role": "user", "content": "Add."}], tools=TOOLS, max_tokens=200,
               temperature=0, tool_choice={"type": "function", "function": {"name": "add"}})
    r = await client.chat.completions.create(**ask)
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "add"
    check_calls([call])
    stream = await client.chat.completions.create(stream=True, **ask)
    calls = [tc for c in [c async for c in stream] if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].function.name == "add" and calls[0].id
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == json.loads(call.function.arguments)
    r = await client.chat.completions.create(
        model="remote-tiny", messages=[{"role": "user", "content": "Weather?"}], max_tokens=200, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMAS[0]}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[0])
    r = await client.chat.completions.create(model="remote-tiny", messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(len(e.top_logprobs) == 2 for e in content)  # relayed, not dropped


async def test_constraints_combine_with_min_tokens_and_logprobs(stack, tiny_dir):
    """A grammar decides where its output may end (min_tokens does not fight it), and logprobs are the model's
    own (finite, as JSON needs), not the masked ones."""
    _, client = await serve(stack, tiny_dir)
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Pick."}], max_tokens=20)
    for temperature in (0, 1.0):
        r = await client.chat.completions.create(**ask, temperature=temperature, seed=1, extra_body={
            "structured_outputs": {"choice": ["yes", "no"]}, "min_tokens": 5})
        assert r.choices[0].message.content in ("yes", "no") and r.choices[0].finish_reason == "stop"
    r = await client.chat.completions.create(**ask, temperature=0, logprobs=True, top_logprobs=3,
                                             response_format={"type": "json_schema", "json_schema": {
                                                 "name": "s", "schema": SCHEMAS[1]}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[1])
    values = [t.logprob for e in r.choices[0].logprobs.content for t in [e, *e.top_logprobs]]
    assert values and all(-1e9 < v <= 0 for v in values)


async def test_json_object_is_a_compact_object(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    r = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON."}],
                                             max_tokens=400, temperature=0, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{") and "\n" not in text
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


async def test_bad_constraint_and_input_shapes_are_400s(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                             extra_body={"structured_outputs": {"json": "{not json"}})
    assert "not a JSON schema" in err.value.message
    with pytest.raises(openai.BadRequestError):
        await client.embeddings.create(model="tiny", input=[[]])
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="tiny", prompt="x", extra_body={"stop_token_ids": [-1]})
