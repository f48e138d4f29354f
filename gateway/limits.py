"""Input limits: each violation is a 400 that names the limit (and the setting that raises it)."""

from __future__ import annotations

from broker.settings import Settings
from gateway.errors import APIError
from gateway.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest


def check(body: SamplingRequest, settings: Settings) -> None:
    if body.max_tokens is not None and body.max_tokens > settings.max_tokens_cap:
        _over("max_tokens", body.max_tokens, settings.max_tokens_cap, "max_tokens_cap")
    if body.n > settings.max_n:
        _over("n", body.n, settings.max_n, "max_n")
    if isinstance(body, ChatCompletionRequest):
        if len(body.messages) > settings.max_messages:
            _over("messages", len(body.messages), settings.max_messages, "max_messages")
        chars = sum(_chars(m.content) for m in body.messages)
        if chars > settings.max_prompt_chars:
            _over("messages", chars, settings.max_prompt_chars, "max_prompt_chars", unit=" characters")
    elif isinstance(body, CompletionRequest) and len(body.prompt) > settings.max_prompt_chars:
        _over("prompt", len(body.prompt), settings.max_prompt_chars, "max_prompt_chars", unit=" characters")


def estimate_tokens(body: SamplingRequest) -> int:
    """What a request may spend against a token budget: its prompt, estimated, plus all the tokens it may generate.

    The prompt estimate is about four characters a token plus a few for each
    message's template; the reservation is settled to the true usage when the
    request ends, so the estimate only decides admission.
    """
    if isinstance(body, ChatCompletionRequest):
        prompt = sum(_chars(m.content) for m in body.messages) // 4 + 4 * len(body.messages)
    elif isinstance(body, CompletionRequest):
        prompt = len(body.prompt) // 4 + 1
    else:
        prompt = 0
    return prompt + (body.max_tokens or 0) * body.n


def estimate_text_tokens(texts: list[str]) -> int:
    return sum(len(t) // 4 + 1 for t in texts)


def check_texts(texts: list[str], param: str, settings: Settings) -> None:
    chars = sum(len(t) for t in texts)
    if chars > settings.max_prompt_chars:
        _over(param, chars, settings.max_prompt_chars, "max_prompt_chars", unit=" characters")


def _chars(content: object) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(getattr(p, "text", None) or "") for p in content)
    return 0


def _over(param: str, value: int, limit: int, setting: str, unit: str = "") -> None:
    raise APIError(400, f"`{param}` is {value}{unit}, over this server's limit of {limit}{unit} ({setting}).",
                   param=param, code="limit_exceeded")
