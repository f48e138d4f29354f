"""EchoWorker: a deterministic synthetic engine, the reference for tests and benchmarks.

The reply is the words of the prompt (the last user message for chat),
cycled until ``echo_tokens`` tokens or ``max_tokens``, whichever is smaller,
with ``echo_delay`` seconds between tokens. Same prompt, same reply: tests
can compute what they must receive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from broker.protocol import ChoiceEnd, Delta, Done, Event, Generate, Job, Tokenize, Usage
from workers.base import BaseModelWorker


def prompt_text(params: Generate | Tokenize) -> str:
    """The text an echo reply is derived from: the last user message of a chat, or the prompt."""
    if params.messages is not None:
        users = [m for m in params.messages if m.role == "user"]
        last = (users or params.messages)[-1:]
        return last[0].text(" ") if last else ""
    if isinstance(params.prompt, list):  # token ids: the echo engine's "words" are their numbers
        return " ".join(map(str, params.prompt))
    return params.prompt or ""


def echo_tokens(text: str, count: int) -> list[str]:
    """The reply's tokens: the prompt's words cycled, each after the first with a leading space."""
    words = text.split() or ["echo"]
    return [(" " if i else "") + words[i % len(words)] for i in range(count)]


def prompt_token_count(params: Generate | Tokenize) -> int:
    """Whitespace words (+1 per chat message), the echo engine's idea of a token."""
    if params.messages is not None:
        return sum(len(m.text(" ").split()) + 1 for m in params.messages)
    return len(prompt_text(params).split())


class EchoWorker(BaseModelWorker):
    engine = "echo"
    #: Its text can hold tool calls (the worker's parser finds them); it has no constrained decoding.
    features = frozenset({"tools"})

    async def generate(self, job: Job) -> AsyncIterator[Event]:
        params = job.params
        assert isinstance(params, Generate)
        max_tokens = params.max_tokens
        limit = self.settings.echo_tokens if max_tokens is None else min(max_tokens, self.settings.echo_tokens)
        tokens = echo_tokens(prompt_text(params), limit)
        finish = "length" if max_tokens is not None and max_tokens < self.settings.echo_tokens else "stop"
        delay = self.settings.echo_delay
        for tok in tokens:
            if delay:
                await asyncio.sleep(delay)
            for i in range(params.n):
                yield Delta(i, tok)
        for i in range(params.n):
            yield ChoiceEnd(i, finish)
        yield Done(Usage(prompt_token_count(params), len(tokens) * params.n))

    async def tokenize(self, job: Job) -> tuple[int, list[int] | None]:
        assert isinstance(job.params, (Tokenize, Generate))
        return prompt_token_count(job.params), None

    def prompt_text(self, model: str, params: Generate) -> str:
        return prompt_text(params)

