"""Prompts as token ids, shared by the engines that tokenize themselves (hf, vllm).

Kept free of torch so an engine module that must import without it (vLLM's,
on a machine with no GPU stack) can still use it.
"""

from __future__ import annotations

import json
from typing import Any

import jinja2

from broker.protocol import Generate, Job, Message, Tokenize
from workers.errors import JobError
from workers.params import in_vocabulary

#: What the template call itself passes: ``chat_template_kwargs`` may not override these.
_TEMPLATE_ARGS = frozenset({"conversation", "messages", "tools", "add_generation_prompt", "continue_final_message",
                            "tokenize", "return_dict", "return_tensors", "chat_template"})


def prompt_ids(tokenizer: Any, job: Job) -> list[int]:
    """Token ids of a chat (through the model's chat template) or completion prompt."""
    params = job.params
    assert isinstance(params, (Generate, Tokenize))
    if params.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise JobError(f"The model `{job.model}` has no chat template; use /v1/completions.",
                           param="messages", code="unsupported")
        ids = tokenizer(chat_prompt(tokenizer, params), add_special_tokens=False)["input_ids"]
    else:
        ids = _token_ids(tokenizer, params.prompt) if isinstance(params.prompt, list) \
            else tokenizer(params.prompt or "")["input_ids"]
    if not ids:
        raise JobError("The prompt is empty.", param="messages" if params.messages is not None else "prompt")
    return list(ids)


def _token_ids(tokenizer: Any, ids: list[int]) -> list[int]:
    """A token-id prompt, as given (``add_special_tokens`` is the client's business then)."""
    in_vocabulary(ids, len(tokenizer), "prompt")
    return ids


def chat_prompt(tokenizer: Any, params: Generate | Tokenize) -> str:
    """The chat as the model's template renders it, with the request's tools and template options."""
    options: dict[str, Any] = {"add_generation_prompt": True}
    if isinstance(params, Generate):
        if bad := sorted(params.chat_template_kwargs.keys() & _TEMPLATE_ARGS):
            raise JobError(f"chat_template_kwargs may not set `{bad[0]}`.", param="chat_template_kwargs")
        options = {**params.chat_template_kwargs, "add_generation_prompt": params.add_generation_prompt}
        if params.continue_final_message:
            options["continue_final_message"] = True
        if params.tools:
            options["tools"] = params.tools
    try:
        text: str = tokenizer.apply_chat_template([_message(m) for m in params.messages or []], tokenize=False,
                                                  **options)
    except jinja2.TemplateError as exc:  # templates raise on, say, roles out of order
        raise JobError(f"The model's chat template refused the messages: {exc}", param="messages") from exc
    except ValueError as exc:  # continue_final_message without a final assistant message, say
        raise JobError(f"The chat cannot be rendered: {exc}", param="messages") from exc
    return text


def _message(m: Message) -> dict[str, Any]:
    """OpenAI message -> template message: text parts joined, ``developer`` read as ``system``; a call's
    JSON arguments as the object templates expect."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [_call(c) for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _call(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    try:
        fn["arguments"] = json.loads(fn.get("arguments") or "{}")
    except ValueError:
        pass  # not JSON: the template gets the text as sent
    return {**call, "function": fn}
