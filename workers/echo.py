"""EchoWorker: a deterministic synthetic engine, the reference for tests and benchmarks.

The reply is the words of the prompt (the last user message for chat),
cycled until ``echo_tokens`` tokens or ``max_tokens``, whichever is smaller,
with ``echo_delay`` seconds between tokens. Same prompt, same reply: tests
can compute what they must receive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from broker.protocol import Job, JobKind, choice_end, delta, done
from workers.base import BaseModelWorker


def prompt_text(job: Job) -> str:
    """The text an echo reply is derived from."""
    if job.kind is JobKind.CHAT or "messages" in job.params:
        messages = job.params.get("messages") or []
        users = [m for m in messages if m.get("role") == "user"]
        content = (users or messages or [{"content": ""}])[-1].get("content") or ""
        if isinstance(content, list):  # OpenAI content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content)
    prompt = job.params.get("prompt", "")
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


def echo_tokens(text: str, count: int) -> list[str]:
    """The reply's tokens: the prompt's words cycled, each after the first with a leading space."""
    words = text.split() or ["echo"]
    return [(" " if i else "") + words[i % len(words)] for i in range(count)]


def prompt_token_count(job: Job) -> int:
    """Whitespace words (+1 per chat message), the echo engine's idea of a token."""
    if job.kind is JobKind.CHAT or "messages" in job.params:
        return sum(len(str(m.get("content") or "").split()) + 1 for m in job.params.get("messages") or [])
    return len(prompt_text(job).split())


class EchoWorker(BaseModelWorker):
    engine = "echo"

    async def generate(self, job: Job) -> AsyncIterator[dict[str, Any]]:
        max_tokens = job.params.get("max_tokens")
        limit = self.settings.echo_tokens if max_tokens is None else min(max_tokens, self.settings.echo_tokens)
        tokens = echo_tokens(prompt_text(job), limit)
        finish = "length" if max_tokens is not None and max_tokens < self.settings.echo_tokens else "stop"
        n = int(job.params.get("n") or 1)
        delay = self.settings.echo_delay
        for tok in tokens:
            if delay:
                await asyncio.sleep(delay)
            for i in range(n):
                yield delta(i, tok)
        for i in range(n):
            yield choice_end(i, finish)
        yield done(prompt_token_count(job), len(tokens) * n)

    async def tokenize(self, job: Job) -> tuple[int, list[int] | None]:
        return prompt_token_count(job), None

