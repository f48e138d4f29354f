"""Prompts as token ids, shared by the engines that tokenize themselves (hf, vllm).

Kept free of torch so an engine module that must import without it (vLLM's,
on a machine with no GPU stack) can still use it.
"""

from __future__ import annotations

from typing import Any

import jinja2

from broker.protocol import Job, JobKind
from workers.base import JobError


def prompt_ids(tokenizer: Any, job: Job) -> list[int]:
    """Token ids of a chat (through the model's chat template) or completion prompt."""
    if job.kind is JobKind.CHAT:
        if not getattr(tokenizer, "chat_template", None):
            raise JobError(f"The model `{job.model}` has no chat template; use /v1/completions.",
                           param="messages", code="unsupported")
        try:
            text = tokenizer.apply_chat_template([_message(m) for m in job.params.get("messages") or []],
                                                 add_generation_prompt=True, tokenize=False)
        except jinja2.TemplateError as exc:  # templates raise on, say, roles out of order
            raise JobError(f"The model's chat template refused the messages: {exc}", param="messages") from exc
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        prompt = job.params.get("prompt", "")
        if not isinstance(prompt, str):
            raise JobError("`prompt` must be a string.", param="prompt")
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise JobError("The prompt is empty.", param="messages" if job.kind is JobKind.CHAT else "prompt")
    return list(ids)


def _message(m: dict[str, Any]) -> dict[str, str]:
    """OpenAI message -> template message: text parts joined, ``developer`` read as ``system``."""
    content = m.get("content") or ""
    if isinstance(content, list):
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    role = "system" if m.get("role") == "developer" else m.get("role", "user")
    return {"role": role, "content": content}
