"""Validating a generation job's parameters, once for every engine that samples.

The gateway checks shapes; this checks what an engine can honour against the
model it serves (context length above all) and turns a bad value into a 400
that names it. The vLLM and transformers engines map the result onto their
own sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.protocol import JobKind
from workers.base import JobError

#: What a chat or completion job may carry; anything else is refused, never ignored.
KNOWN_PARAMS = frozenset({
    "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
    "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "response_format",
})


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    #: 0 = no top-k cut.
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    n: int = 1
    #: Alternatives reported per token; None = no logprobs at all.
    logprobs: int | None = None


def sampling_params(params: dict[str, Any], kind: JobKind, prompt_tokens: int, context: int) -> SamplingParams:
    """Validate a job's parameters; a bad one is a 400 naming it."""
    unknown = sorted(set(params) - KNOWN_PARAMS)
    if unknown:
        raise JobError(f"Unsupported parameter: `{unknown[0]}`.", param=unknown[0], code="unsupported_parameter")
    if (params.get("response_format") or {}).get("type", "text") != "text":
        raise JobError("Only response_format {'type': 'text'} is supported.", param="response_format")
    top_k = _number(params, "top_k", int, 0, lo=-1)
    return SamplingParams(
        max_tokens=_max_tokens(params, kind, prompt_tokens, context),
        temperature=_number(params, "temperature", float, 1.0, lo=0, hi=2),
        top_p=_number(params, "top_p", float, 1.0, lo=0, hi=1, open_lo=True),
        top_k=max(top_k, 0),
        seed=_number(params, "seed", int, None),
        presence_penalty=_number(params, "presence_penalty", float, 0.0, lo=-2, hi=2),
        frequency_penalty=_number(params, "frequency_penalty", float, 0.0, lo=-2, hi=2),
        stop=_stops(params.get("stop")),
        n=_number(params, "n", int, 1, lo=1),  # capped once, by the gateway's max_n
        logprobs=_logprobs(params, kind),
    )


def _number(params: dict[str, Any], name: str, kind: type, default: Any, *, lo: float | None = None,
            hi: float | None = None, open_lo: bool = False) -> Any:
    value = params.get(name)
    if value is None:
        return default
    allowed = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise JobError(f"`{name}` must be {'a number' if kind is float else 'an integer'}.", param=name)
    if (lo is not None and (value <= lo if open_lo else value < lo)) or (hi is not None and value > hi):
        bounds = f"in {'(' if open_lo else '['}{lo}, {hi}]" if hi is not None else f"at least {lo}"
        raise JobError(f"`{name}` must be {bounds}.", param=name)
    return kind(value)


def _max_tokens(params: dict[str, Any], kind: JobKind, prompt_tokens: int, context: int) -> int:
    """``max_tokens`` defaults to whatever room the context leaves; asking for more is a 400."""
    room = context - prompt_tokens
    wanted = _number(params, "max_tokens", int, None, lo=1)
    if room < 1 or (wanted is not None and wanted > room):
        asked = prompt_tokens + (wanted or 1)
        what = "messages" if kind is JobKind.CHAT else "prompt"
        raise JobError(
            f"This model's maximum context length is {context} tokens. However, you requested {asked} tokens "
            f"({prompt_tokens} in the {what}, {wanted or 1} for the completion). "
            f"Please reduce the length of the {what} or the completion.",
            param=what, code="context_length_exceeded",
        )
    return room if wanted is None else wanted


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value or []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise JobError("`stop` must be a non-empty string or a list of at most 4 of them.", param="stop")
    return tuple(stops)


def _logprobs(params: dict[str, Any], kind: JobKind) -> int | None:
    """Chat asks with ``logprobs: true`` + ``top_logprobs``; completions with ``logprobs: <int>``."""
    if kind is JobKind.CHAT:
        if not params.get("logprobs"):
            if params.get("top_logprobs") is not None:
                raise JobError("`top_logprobs` requires `logprobs: true`.", param="top_logprobs")
            return None
        return _number(params, "top_logprobs", int, 0, lo=0, hi=20)
    return _number(params, "logprobs", int, None, lo=0, hi=5)
