"""Prompts as token ids, shared by the engines that tokenize themselves (hf, vllm).

Kept free of torch so an engine module that must import without it (vLLM's,
on a machine with no GPU stack) can still use it.
"""

from __future__ import annotations

from typing import Any

import jinja2

from broker.protocol import Generate, Job, Message, Tokenize
from workers.base import JobError


def prompt_ids(tokenizer: Any, job: Job) -> list[int]:
    """Token ids of a chat (through the model's chat template) or completion prompt."""
    params = job.params
    assert isinstance(params, (Generate, Tokenize))
    if params.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise JobError(f"The model `{job.model}` has no chat template; use /v1/completions.",
                           param="messages", code="unsupported")
        try:
            text = tokenizer.apply_chat_template([_message(m) for m in params.messages],
                                                 add_generation_prompt=True, tokenize=False)
        except jinja2.TemplateError as exc:  # templates raise on, say, roles out of order
            raise JobError(f"The model's chat template refused the messages: {exc}", param="messages") from exc
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(params.prompt or "")["input_ids"]
    if not ids:
        raise JobError("The prompt is empty.", param="messages" if params.messages is not None else "prompt")
    return list(ids)


def _message(m: Message) -> dict[str, str]:
    """OpenAI message -> template message: text parts joined, ``developer`` read as ``system``."""
    return {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
