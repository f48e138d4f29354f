"""Every message that crosses Redis, as a declared type, and the one codec that puts it on the wire.

Three channels carry them (``docs/redis.md`` shows each as ``redis-cli`` sees it):

- **Jobs** (gateway or batch runner → a worker's stream): ``Job``. Its routing
  fields are plain strings so a person can read them with ``XRANGE``; its
  parameters (``Generate``, ``Embed`` or ``Tokenize``, by ``JobKind``) travel
  msgpack-encoded in ``payload``.
- **Replies** (worker → the requesting gateway's channel, and the request's
  replay log): ``Reply``, a numbered message of ``Event``s. ``seq`` counts
  messages per attempt from 0, so a gap or a duplicate is detectable; a
  worker that produces faster than it ships coalesces waiting deltas into one
  message, and its outbox may ``bundle`` several replies into one channel
  message. A janitor (or a worker asked about a job it never got) sends a
  ``Reply`` with ``lost`` set and no events: that attempt's worker is gone.
- **Control** (gateway → a worker's control channel): ``Cancel`` and ``Resend``.

Short keys (``t``, ``i``, ``x``...) keep messages small; only this module
spells them. Consumers ``match`` on the classes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import Struct, field

# --- jobs --------------------------------------------------------------------


class JobKind(StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    TOKENIZE = "tokenize"
    DETOKENIZE = "detokenize"


class Message(Struct, omit_defaults=True, forbid_unknown_fields=True):
    """One chat message as the engines read it (content parts stay OpenAI's ``{"type", "text"}`` maps)."""

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    #: An assistant turn's calls, in OpenAI's shape (``{"id", "type": "function", "function": {...}}``).
    tool_calls: list[dict[str, Any]] | None = None

    def text(self, sep: str = "") -> str:
        """The content as plain text (text parts joined with ``sep``)."""
        if isinstance(self.content, list):
            return sep.join(p.get("text") or "" for p in self.content if isinstance(p, dict))
        return self.content or ""


class Generate(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A chat or completion job: the prompt and the sampling parameters, as every engine receives them.

    The gateway validated each value against its caps; an engine maps them onto
    its own sampling and checks only what depends on its model (context room).
    ``logprobs`` is the number of alternatives reported per token (``None``: no
    logprobs), whichever endpoint asked.
    """

    messages: list[Message] | None = None
    #: A completion's prompt: text, or token ids.
    prompt: str | list[int] | None = None
    #: Several completion prompts in one request: each gets ``n`` choices, numbered prompt by prompt.
    prompts: list[str | list[int]] | None = None
    #: A completion that starts with its prompt (with the prompt tokens' logprobs when ``logprobs`` is set).
    echo: bool = False
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    #: 0 = no top-k cut.
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = []
    n: int = 1
    logprobs: int | None = None
    #: The output must match this (``response_format``, vLLM's ``structured_outputs``).
    structured: Structured | None = None
    #: OpenAI tool definitions (``{"type": "function", "function": {"name", "description", "parameters"}}``).
    tools: list[dict[str, Any]] | None = None
    #: ``auto``, ``required``, ``none``, or ``function`` (then ``tool_name`` says which).
    tool_choice: str = "auto"
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    # vLLM's sampling extras.
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = []
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    #: Token id -> bias added to its logit (OpenAI's ``logit_bias``, in [-100, 100]).
    logit_bias: dict[int, float] = {}
    # How chat messages become a prompt (vLLM's extras).
    chat_template_kwargs: dict[str, Any] = {}
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def asks(self) -> set[str]:
        """The optional engine features this job needs, each named by the parameter that asks for it."""
        wanted = {name for name, default in _FEATURE_DEFAULTS.items() if getattr(self, name) != default}
        if self.tools and self.tool_choice != "none":
            wanted.add("tools")
        return wanted


class Structured(Struct, omit_defaults=True, forbid_unknown_fields=True):
    """A constraint on the whole output: exactly one field is set."""

    #: A JSON schema, as JSON text (text, so equal schemas are equal keys for a grammar cache).
    json: str | None = None
    #: Any JSON object (``response_format: {"type": "json_object"}``).
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    #: An EBNF (GBNF) grammar.
    grammar: str | None = None

    def key(self) -> tuple[str, str]:
        """What kind of constraint, and its text: a cache key and a description for errors."""
        if self.json is not None:
            return "json", self.json
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", "\x00".join(self.choice)
        if self.grammar is not None:
            return "grammar", self.grammar
        return "json_object", ""


#: The optional features (besides ``tools``) a ``Generate`` asks for by leaving a field off its default.
_FEATURE_DEFAULTS: dict[str, Any] = {
    "logprobs": None, "structured": None, "min_p": 0.0, "repetition_penalty": 1.0, "min_tokens": 0,
    "ignore_eos": False, "stop_token_ids": [], "skip_special_tokens": True, "include_stop_str_in_output": False,
    "logit_bias": {}, "chat_template_kwargs": {}, "add_generation_prompt": True, "continue_final_message": False,
}


#: Every optional feature a ``Generate`` may ask for: what an engine that honours them all declares.
FEATURES = frozenset(_FEATURE_DEFAULTS) | {"tools"}


class Embed(Struct, omit_defaults=True, forbid_unknown_fields=True):
    """An embedding job: the inputs to embed (texts or token ids), at least one."""

    input: Annotated[list[str | list[int]], msgspec.Meta(min_length=1)]
    #: Keep only the first ``dimensions`` of each vector (renormalised): for Matryoshka-trained models only.
    dimensions: int | None = None


class Tokenize(Struct, omit_defaults=True, forbid_unknown_fields=True):
    """A tokenize job: a completion ``prompt`` or chat ``messages`` (through the model's template)."""

    messages: list[Message] | None = None
    prompt: str | None = None


class Detokenize(Struct, forbid_unknown_fields=True):
    """A detokenize job: token ids back to text."""

    tokens: list[int]


Params = Generate | Embed | Tokenize | Detokenize


@dataclass(slots=True)
class Job:
    request_id: str
    model: str
    kind: JobKind
    reply_to: str
    params: Params
    #: Epoch seconds after which nobody waits for the answer (0 = no deadline).
    deadline: float = 0.0
    #: 0 for the first try; a gateway that re-dispatches after a worker died counts up.
    attempt: int = 0
    #: How long (ms) the worker keeps its replies in the request's replay log; 0 = no log.
    replay_ms: int = 0
    #: Stream entry id, set once the job was read from a worker's stream.
    entry_id: str = ""
    #: Why ``payload`` did not decode as this kind's parameters (a newer gateway's field, say); the worker
    #: answers it as a 400 instead of running it.
    invalid: str = ""
    #: The payload as read, kept when it did not decode: a job moved or dead-lettered keeps what was sent.
    raw_payload: bytes = b""

    def to_fields(self) -> dict[str, str | bytes]:
        return {
            "request_id": self.request_id,
            "model": self.model,
            "kind": str(self.kind),
            "reply_to": self.reply_to,
            "deadline": f"{self.deadline:.3f}",
            "attempt": str(self.attempt),
            "replay": str(self.replay_ms),
            "payload": self.raw_payload if self.invalid else pack(self.params),
        }

    @classmethod
    def from_fields(cls, entry_id: str, fields: Mapping[Any, bytes | str]) -> Job:
        f = {as_str(k): v for k, v in fields.items()}
        kind = JobKind(as_str(f["kind"]))
        payload, invalid, raw = _as_bytes(f["payload"]), "", b""
        try:
            params: Params = _PARAMS[kind].decode(payload)
        except msgspec.ValidationError as exc:  # never run: the worker refuses it, saying this
            params, invalid, raw = _BLANK[kind], str(exc), payload
        return cls(
            request_id=as_str(f["request_id"]),
            model=as_str(f["model"]),
            kind=kind,
            reply_to=as_str(f["reply_to"]),
            params=params,
            deadline=float(as_str(f.get("deadline", "0"))),
            attempt=int(as_str(f.get("attempt", "0"))),
            replay_ms=int(as_str(f.get("replay", "0"))),
            entry_id=entry_id,
            invalid=invalid,
            raw_payload=raw,
        )

    def expired(self, now: float | None = None) -> bool:
        return bool(self.deadline) and (now or time.time()) > self.deadline

    @staticmethod
    def request_id_of(fields: Mapping[Any, bytes | str]) -> str:
        """The request id of a stream entry, without decoding the rest of it."""
        return as_str(fields.get(b"request_id") or fields.get("request_id") or b"")


# --- the replay log ------------------------------------------------------------


class StreamMeta(Struct):
    """What a resumed stream needs to render exactly as the live one did: the first entry of its replay log
    (``dispatch.lua`` writes it with the ``owner``; the worker's ``emit.lua`` appends each ``Reply``)."""

    model: str
    kind: JobKind
    n: int
    include_usage: bool
    prefix: str
    created: int


def replay_head(fields: Mapping[bytes, bytes]) -> tuple[StreamMeta, str] | None:
    """A replay log's first entry as its meta and owner; None if the entry is not a meta entry."""
    if b"meta" not in fields:
        return None
    return _META.decode(fields[b"meta"]), as_str(fields.get(b"owner", b""))


def replay_reply(fields: Mapping[bytes, bytes]) -> Reply:
    """A later replay log entry: one reply message, as published."""
    return _REPLY.decode(fields[b"r"])


# --- reply events ------------------------------------------------------------


class Usage(Struct, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int = 0


class TopLogprob(Struct):
    token: str
    logprob: float


class TokenLogprob(Struct):
    """One generated token's logprob and its best alternatives, as every engine reports it."""

    token: str
    #: None for a prompt's first token (nothing comes before it to predict it).
    logprob: float | None
    top_logprobs: list[TopLogprob] = []


class _Event(Struct, tag_field="t", omit_defaults=True):
    #: Whether this event ends the request's reply.
    terminal: ClassVar[bool] = False


class Delta(_Event, tag="d"):
    """New text for choice ``index`` (a delta, never cumulative text) and the tokens it took."""

    index: int = field(name="i")
    text: str = field(name="x")
    tokens: int = field(default=1, name="k")
    logprobs: list[TokenLogprob] | None = field(default=None, name="lp")

    def merged(self, later: Delta) -> Delta:
        """This delta followed by ``later`` (same choice) as one."""
        lp = None if self.logprobs is None and later.logprobs is None else \
            (self.logprobs or []) + (later.logprobs or [])
        return Delta(self.index, self.text + later.text, self.tokens + later.tokens, lp)


class ToolCall(_Event, tag="tc"):
    """A piece of tool call number ``call`` of choice ``index``: its first piece names the call (``id``,
    ``name``); ``arguments`` (JSON text) may follow in pieces, as OpenAI streams them."""

    index: int = field(name="i")
    call: int = field(name="c")
    arguments: str = field(default="", name="x")
    id: str | None = None
    name: str | None = None


class ChoiceEnd(_Event, tag="end"):
    index: int = field(name="i")
    finish_reason: str = field(name="fr")


class Done(_Event, tag="done"):
    """The request succeeded."""

    terminal = True
    usage: Usage = field(name="u")


class Embeddings(_Event, tag="emb"):
    """An embedding job's answer."""

    terminal = True
    vectors: list[list[float]] = field(name="v")
    usage: Usage = field(name="u")


class TokenCount(_Event, tag="tok"):
    """A tokenize job's answer (``ids`` is None for an engine without real token ids; ``strs`` each id's text)."""

    terminal = True
    count: int = field(name="n")
    ids: list[int] | None = None
    context_length: int = field(default=0, name="ctx")
    strs: list[str] | None = None


class Text(_Event, tag="txt"):
    """A detokenize job's answer."""

    terminal = True
    text: str = field(name="x")


class Failure(_Event, tag="err"):
    """The request failed; ``broker.errors.ServeError`` builds it and reads it back."""

    terminal = True
    message: str
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    param: str | None = None


Event = Delta | ToolCall | ChoiceEnd | Done | Embeddings | TokenCount | Text | Failure


class Reply(Struct, omit_defaults=True):
    rid: str
    seq: int
    events: list[Event] = field(default_factory=list, name="ev")
    #: The job attempt that produced it: replies of a superseded attempt are dropped.
    attempt: int = field(default=0, name="a")
    #: Not a reply but a notice: the worker of this attempt is gone (its janitor saw it die, or it never got
    #: the job): retry it, or fail it if the client saw part.
    lost: bool = False

    @classmethod
    def worker_lost(cls, rid: str, attempt: int) -> Reply:
        return cls(rid, -1, [], attempt, lost=True)

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        return _REPLY.decode(data)

    @staticmethod
    def decode_all(data: bytes) -> list[Reply]:
        """The replies in one channel message: a single reply, or a bundle of them."""
        m = _REPLIES.decode(data)
        return m if isinstance(m, list) else [m]

    @property
    def terminal(self) -> bool:
        return any(ev.terminal for ev in self.events)


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


# --- control -----------------------------------------------------------------


class _Control(Struct, tag_field="t"):
    pass


class Cancel(_Control, tag="cancel"):
    """Stop request ``rid`` (its client left, or asked), or skip it if it has not started."""

    rid: str


class Resend(_Control, tag="resend"):
    """Publish request ``rid``'s messages again from ``from_seq`` on (the gateway missed them) to ``to``."""

    rid: str
    from_seq: int = field(name="from")
    attempt: int = field(name="a")
    to: str


Control = Cancel | Resend


def control(data: bytes) -> Control:
    return _CONTROL.decode(data)


# --- batch tasks (arq jobs on the batch queue) --------------------------------------


class _BatchTask(Struct, tag_field="t"):
    pass


class RunRequest(_BatchTask, tag="request"):
    """A Python API job (``BatchClient.enqueue``): one request; its result is stored under the job id."""

    url: str
    body: dict[str, Any]


class RunLine(_BatchTask, tag="line"):
    """One line of an OpenAI batch, run as the batch's ``owner``."""

    batch: str
    index: int
    custom_id: str
    method: str
    url: str
    body: dict[str, Any]
    owner: str = ""


class StartBatch(_BatchTask, tag="start"):
    """Validate an OpenAI batch's input file and enqueue its lines."""

    batch: str


class FinishBatch(_BatchTask, tag="finish"):
    """Write an OpenAI batch's output and error files and end it."""

    batch: str


BatchTask = RunRequest | RunLine | StartBatch | FinishBatch


def batch_task(payload: Any) -> BatchTask:
    """A batch task back from arq's job (arq decodes its job with ``unpack``: plain values)."""
    task: BatchTask = msgspec.convert(payload, BatchTask)
    return task


# --- the codec ---------------------------------------------------------------

_ENCODER = msgspec.msgpack.Encoder()
_REPLY = msgspec.msgpack.Decoder(Reply)
_REPLIES = msgspec.msgpack.Decoder(Reply | list[Reply])
_CONTROL = msgspec.msgpack.Decoder(Control)
_META = msgspec.msgpack.Decoder(StreamMeta)
_ANY = msgspec.msgpack.Decoder()
_GENERATE, _EMBED, _TOKENIZE, _DETOKENIZE = (msgspec.msgpack.Decoder(t) for t in (Generate, Embed, Tokenize,
                                                                                  Detokenize))
_PARAMS: dict[JobKind, msgspec.msgpack.Decoder[Any]] = {
    JobKind.CHAT: _GENERATE, JobKind.COMPLETION: _GENERATE, JobKind.EMBEDDING: _EMBED, JobKind.TOKENIZE: _TOKENIZE,
    JobKind.DETOKENIZE: _DETOKENIZE}
#: What a job that did not decode holds instead (it is refused, never run).
_BLANK: dict[JobKind, Params] = {JobKind.CHAT: Generate(), JobKind.COMPLETION: Generate(),
                                 JobKind.EMBEDDING: Embed(["-"]), JobKind.TOKENIZE: Tokenize(),
                                 JobKind.DETOKENIZE: Detokenize([])}


def pack(obj: Any) -> bytes:
    """Anything msgpack carries, declared types included."""
    return _ENCODER.encode(obj)


def unpack(data: bytes | str) -> Any:
    """msgpack back to plain Python values."""
    return _ANY.decode(_as_bytes(data))


def as_str(v: bytes | str) -> str:
    """A Redis reply field as text (raw clients return bytes, decoding ones str)."""
    return v.decode() if isinstance(v, bytes) else v


def _as_bytes(v: bytes | str) -> bytes:
    return v.encode() if isinstance(v, str) else v
