"""OpenAI request bodies: the one place a request is validated. Unknown arguments are a 400, never ignored.

A valid body becomes its job's typed parameters (``job_params``): what
workers receive is already checked, so they judge only what depends on their
model (context room) and what their engine supports.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from broker import protocol
from broker.errors import printable

#: What msgpack and every engine can carry: 64-bit signed integers.
_INT_RANGE = range(-(2**63), 2**63)
#: How deep a request body may nest (a chat request needs about 6).
MAX_DEPTH = 32


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BadInput(ValueError):
    """A value no model field rejects but nothing downstream can carry; names the field (the error's ``param``)."""

    def __init__(self, param: str, problem: str) -> None:
        param = printable(param)  # a field name may itself hold the bad text
        super().__init__(f"'{param}' {problem}")
        self.param = param


class RequestBody(StrictModel):
    """A whole request body: checked once, at the boundary, for values that cannot travel.

    A lone surrogate (``"\\ud800"`` in JSON) is a valid Python string that no
    UTF-8 codec encodes; an integer past 64 bits or a non-finite float has no
    msgpack or JSON form. Each is a 400 naming the field, never a 500 later.
    """

    @model_validator(mode="before")
    @classmethod
    def _carriable(cls, data: Any) -> Any:
        _check_carriable(data, "")
        return data


def _check_carriable(data: Any, root: str) -> None:
    """Walk a JSON value without recursion (a deeply nested body must be a 400, not a RecursionError)."""
    todo: list[tuple[Any, str, int]] = [(data, root, 0)]
    while todo:
        value, path, depth = todo.pop()
        if isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise BadInput(path or "body", f"nests deeper than {MAX_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                name = f"{path}.{k}" if path else str(k)
                todo.append((k, name, depth + 1))
                todo.append((v, name, depth + 1))
        elif problem := _uncarriable(value):
            raise BadInput(path or "body", problem)


def _uncarriable(value: Any) -> str | None:
    """What keeps a scalar from travelling, if anything."""
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid Unicode text (it holds a lone surrogate)"
    elif isinstance(value, int) and not isinstance(value, bool) and value not in _INT_RANGE:
        return "is out of range (integers must fit in 64 bits)"
    elif isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    return None


class StreamOptions(StrictModel):
    include_usage: bool = False
    #: Extension: keep generating if the client drops, and keep a replay log so it can resume
    #: with ``GET /v1/streams/{id}`` and ``Last-Event-ID``.
    resumable: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[AssistantToolCall] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if isinstance(v, list):
            bad = [p.type for p in v if p.type != "text"]
            if bad:
                raise ValueError(f"only text content parts are supported, got {bad[0]!r}")
        return v


class CalledFunction(StrictModel):
    name: str = Field(min_length=1)
    arguments: str


class AssistantToolCall(StrictModel):
    """A call an earlier assistant turn made (the client sends it back with the ``tool`` result)."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class JSONSchemaFormat(StrictModel):
    name: str = Field(default="schema", max_length=64)
    description: str | None = None
    #: ``schema`` shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self


class StructuredOutputs(StrictModel):
    """vLLM's ``structured_outputs``: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = Field(default=None, min_length=1)
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = Field(default=None, min_length=1)
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [n for n in ("json_", "regex", "choice", "grammar") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar or json_object")
        if isinstance(self.json_, str):
            try:
                parsed = json.loads(self.json_)
            except ValueError as exc:
                raise ValueError(f"json is not a JSON schema: {exc}") from None
            if not isinstance(parsed, dict | bool):
                raise ValueError("json must be a JSON schema (an object)")
        return self

    def constraint(self) -> protocol.Structured:
        if self.json_ is not None:
            return protocol.Structured(json=self.json_ if isinstance(self.json_, str) else _schema_text(self.json_))
        if self.json_object:
            return protocol.Structured(json_object=True)
        return protocol.Structured(regex=self.regex, choice=self.choice, grammar=self.grammar)


def _schema_text(schema: dict[str, Any]) -> str:
    """Compact, in the order given: a schema's property order is the order the output is written in."""
    return json.dumps(schema, separators=(",", ":"))


class FunctionDef(StrictModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(StrictModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class SamplingRequest(RequestBody):
    """Parameters shared by chat and completions; their meaning is the engine's to honour."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1,
                              description="Extension: sample from the k most likely tokens.")
    n: int = Field(default=1, ge=1, description="Choices to generate; capped by the server's max_n setting.")
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(
        default=None, description="vLLM's extension: constrain the output to a JSON schema, regex, choice or grammar.")
    # vLLM's sampling extensions.
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = Field(default=None, max_length=64)
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None:
            if len(stops) > 4:
                raise ValueError("at most 4 stop sequences are allowed")
            if any(not s for s in stops):
                raise ValueError("stop sequences must not be empty")
        return stops or None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (v or {}).items():
            if not token.isdigit() or int(token) >= 2**31:
                raise ValueError(f"logit_bias keys are token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return v or None

    @model_validator(mode="after")
    def _one_constraint(self) -> SamplingRequest:
        if self.structured_outputs is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise ValueError("give response_format or structured_outputs, not both")
        return self

    def job_params(self) -> protocol.Generate:
        """What travels to the worker: the prompt and the sampling parameters, not transport options."""
        given: dict[str, Any] = {
            "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k if self.top_k and self.top_k > 0 else None, "seed": self.seed,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "stop": self.stop, "logprobs": self.logprob_alternatives(), "structured": self.constraint(),
            "min_p": self.min_p, "repetition_penalty": self.repetition_penalty, "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos, "stop_token_ids": self.stop_token_ids,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "logit_bias": {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
        }
        return protocol.Generate(n=self.n, **self.prompt_params(), **{k: v for k, v in given.items() if v is not None})

    def constraint(self) -> protocol.Structured | None:
        if self.structured_outputs is not None:
            return self.structured_outputs.constraint()
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object" or fmt.json_schema is None:
            return protocol.Structured(json_object=True)
        return protocol.Structured(json=_schema_text(fmt.json_schema.schema_))

    def prompt_params(self) -> dict[str, Any]:
        raise NotImplementedError

    def logprob_alternatives(self) -> int | None:
        """Alternatives to report per token; None for no logprobs (chat and completions ask differently)."""
        raise NotImplementedError

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def resumable(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.resumable)


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ToolDef] | None = Field(default=None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's chat extensions.
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    echo: bool = Field(default=False, description="vLLM's extension: the reply starts with the last message's "
                                                  "content when that message is the assistant's.")

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens if self.max_tokens is None else min(
                self.max_tokens, self.max_completion_tokens)
            self.max_completion_tokens = None
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
                t.function.name for t in self.tools or []}:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        return self

    def prompt_params(self) -> dict[str, Any]:
        named = self.tool_choice if isinstance(self.tool_choice, NamedToolChoice) else None
        out: dict[str, Any] = {"messages": wire_messages(self.messages)}
        if self.tools:
            out["tools"] = [t.model_dump(exclude_none=True) for t in self.tools]
            out["tool_choice"] = "function" if named else (self.tool_choice or "auto")
            if named:
                out["tool_name"] = named.function.name
            if self.parallel_tool_calls is not None:
                out["parallel_tool_calls"] = self.parallel_tool_calls
        for name in ("chat_template_kwargs", "add_generation_prompt", "continue_final_message"):
            if (value := getattr(self, name)) is not None:
                out[name] = value
        if self.continue_final_message and self.add_generation_prompt is None:
            out["add_generation_prompt"] = False
        return out

    @property
    def echoed(self) -> str:
        """What the reply starts with under ``echo``: the last message's text, if the assistant wrote it."""
        last = self.messages[-1]
        if not self.echo or last.role != "assistant":
            return ""
        return wire_messages([last])[0].text()

    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = list[Annotated[int, Field(ge=0, lt=2**31)]]


def _each(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """OpenAI's one-or-many text-or-token-ids field (``prompt``, ``input``) as a list of texts and id lists."""
    if isinstance(value, str):
        return [value]
    if all(isinstance(x, int) for x in value):
        return [value]  # type: ignore[list-item]  # one token-id sequence
    return list(value)  # type: ignore[arg-type]  # texts, or token-id sequences


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="A prompt (text or token ids) or a list of them; each prompt gets n choices.")
    max_tokens: int | None = Field(default=16, ge=0, description="0 only with echo: score the prompt, generate "
                                                                  "nothing.")
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, v: str | list[Any]) -> str | list[Any]:
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("a prompt list (and each token-id prompt in it) must not be empty")
        return v

    @model_validator(mode="after")
    def _nothing_without_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 needs echo (it scores the prompt and generates nothing)")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Every prompt of the request: text, or token ids."""
        return _each(self.prompt)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> None:
        if v:
            raise ValueError("suffix is not supported")
        return None

    def prompt_params(self) -> dict[str, Any]:
        prompts = self.prompts
        out: dict[str, Any] = {"prompt": prompts[0]} if len(prompts) == 1 else {"prompts": prompts}
        return out | ({"echo": True} if self.echo else {})

    def logprob_alternatives(self) -> int | None:
        return self.logprobs


class EmbeddingRequest(RequestBody):
    model: str = Field(min_length=1)
    input: str | list[str] | TokenIds | list[TokenIds] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, description="Cut vectors short (Matryoshka models only).")
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _no_empty_ids(cls, v: Any) -> Any:
        if isinstance(v, list) and any(isinstance(i, list) and not i for i in v):
            raise ValueError("a token-id input must not be empty")
        return v

    @property
    def inputs(self) -> list[str | list[int]]:
        """Every input: a text, or token ids."""
        return _each(self.input)


class DetokenizeRequest(RequestBody):
    model: str = Field(min_length=1)
    tokens: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(max_length=1_000_000)

    def job_params(self) -> protocol.Detokenize:
        return protocol.Detokenize(self.tokens)


class TokenizeRequest(RequestBody):
    """Either ``prompt`` (completions) or ``messages`` (chat, through the model's template)."""

    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1)
    max_tokens: int | None = Field(default=None, ge=0, description="Completion room to reserve when judging fit.")

    @model_validator(mode="after")
    def _one_of(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    def job_params(self) -> protocol.Tokenize:
        return protocol.Tokenize(messages=None if self.messages is None else wire_messages(self.messages),
                                 prompt=self.prompt)


def wire_messages(messages: list[Message]) -> list[protocol.Message]:
    return [protocol.Message(**m.model_dump(exclude_none=True)) for m in messages]
