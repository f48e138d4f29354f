"""Input limits: each violation is a 400 that names the limit (and the setting that raises it)."""

from __future__ import annotations

from broker.settings import Settings
from gateway.errors import APIError
from gateway.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest


def check(body: SamplingRequest, settings: Settings) -> None:
    if body.max_tokens is not None and body.max_tokens > settings.max_tokens_cap:
        _over("max_tokens", body.max_tokens, settings.max_tokens_cap, "max_tokens_cap")
    choices = body.n * (len(body.prompts) if isinstance(body, CompletionRequest) else 1)
    if choices > settings.max_n:
        _over("n", choices, settings.max_n, "max_n", unit=" choices" if choices != body.n else "")
    if isinstance(body, ChatCompletionRequest):
        if len(body.messages) > settings.max_messages:
            _over("messages", len(body.messages), settings.max_messages, "max_messages")
        chars = sum(_chars(m.content) for m in body.messages)
        if chars > settings.max_prompt_chars:
            _over("messages", chars, settings.max_prompt_chars, "max_prompt_chars", unit=" characters")
    elif isinstance(body, CompletionRequest) and (size := _prompt_size(body)) > settings.max_prompt_chars:
        _over("prompt", size, settings.max_prompt_chars, "max_prompt_chars", unit=" characters")


def estimate_tokens(body: SamplingRequest) -> int:
    """What a request may spend against a token budget: its prompt, estimated, plus all the tokens it may generate.

    The prompt estimate is about four characters a token plus a few for each
    message's template; the reservation is settled to the true usage when the
    request ends, so the estimate only decides admission.
    """
    if isinstance(body, ChatCompletionRequest):
        prompt = sum(_chars(m.content) for m in body.messages) // 4 + 4 * len(body.messages)
    elif isinstance(body, CompletionRequest):
        prompt = sum(len(p) // 4 + 1 if isinstance(p, str) else len(p) for p in body.prompts)
        return prompt + (body.max_tokens or 0) * body.n * len(body.prompts)
    else:
        prompt = 0
    return prompt + (body.max_tokens or 0) * body.n


def estimate_text_tokens(texts: list[str | list[int]]) -> int:
    """About four characters a token; token ids count as themselves."""
    return sum(len(t) // 4 + 1 if isinstance(t, str) else len(t) for t in texts)


def check_texts(texts: list[str | list[int]], param: str, settings: Settings) -> None:
    chars = sum(len(t) for t in texts)
    if chars > settings.max_prompt_chars:
        _over(param, chars, settings.max_prompt_chars, "max_prompt_chars", unit=" characters")


def _prompt_size(body: CompletionRequest) -> int:
    """Characters of text prompts, and a token-id prompt's ids counted as characters (a token is at least one)."""
    return sum(len(p) for p in body.prompts)


def _chars(content: object) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(getattr(p, "text", None) or "") for p in content)
    return 0


def _over(param: str, value: int, limit: int, setting: str, unit: str = "") -> None:
    raise APIError(400, f"`{param}` is {value}{unit}, over this server's limit of {limit}{unit} ({setting}).",
                   param=param, code="limit_exceeded")
