"""``redserve chat``: a terminal chat with one model through a gateway's OpenAI API.

Replies stream as they are generated. Ctrl-C stops the reply being written by
closing its HTTP stream (the gateway notices and cancels the job on its worker)
and returns to the prompt; Ctrl-D or ``/exit`` leaves. The whole conversation
is sent with every message, as the OpenAI API expects.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

PROMPT = "you> "
MORE = "...> "
BLOCK = '"""'
HELP = f"""commands:
  /model [NAME]   switch to model NAME; alone, list the live models
  /reset          forget the conversation (the system prompt stays)
  /save FILE      write the conversation to FILE as JSON
  /load FILE      continue a conversation saved with /save (or a JSON list of messages)
  /help           this text
  /exit           leave (Ctrl-D too)
multi-line input: end a line with \\ to go on on the next line, or type {BLOCK} alone
on a line to start a block and again to end it.
Ctrl-C stops the reply being written (and cancels it on the worker); at the prompt it
clears the line."""

#: What a refused request means, for the statuses a person can do something about.
HINTS = {
    401: "the gateway needs a valid API key (--api-key or REDSERVE_API_KEY)",
    403: "the gateway refused this API key",
    404: "no worker has ever served this model (/model lists the live ones)",
    429: "too busy right now; try again shortly",
    503: "no worker is serving this model right now",
    504: "the worker stopped answering in time",
}
ROLES = ("system", "user", "assistant")


class ChatError(Exception):
    """A request that failed, in words a person can act on."""


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``chat`` subcommand and its flags."""
    p = subparsers.add_parser(
        "chat", parents=[common], help="Chat with a model in the terminal, through a gateway.",
        description="A terminal chat with one model through a gateway's OpenAI API: streamed replies, "
                    "multi-turn history, commands.", epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("REDSERVE_URL", "http://127.0.0.1:8000"),
                   help="Gateway to talk to [env REDSERVE_URL; default http://127.0.0.1:8000].")
    p.add_argument("--model", default=None, help="Model to chat with [default: the first live model].")
    p.add_argument("--api-key", default=os.environ.get("REDSERVE_API_KEY"),
                   help="Sent as `Authorization: Bearer KEY` [env REDSERVE_API_KEY; default none].")
    p.add_argument("--system", default=None, help="System prompt sent first in every request.")
    p.add_argument("--temperature", type=float, default=None, help="Sampling temperature [default: the model's].")
    p.add_argument("--top-p", type=float, default=None, help="Nucleus sampling mass [default: the model's].")
    p.add_argument("--max-tokens", type=int, default=None, help="Longest reply, in tokens [default: the model's].")
    return p


@dataclass
class Conversation:
    """What is sent with every request, and what /save writes."""

    model: str
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def request_messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "messages": self.request_messages()}

    def load(self, data: Any) -> None:
        """Take the messages of a saved conversation (a leading system message becomes the system prompt)."""
        messages = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
            raise ChatError("not a conversation: expected a list of {role, content} messages")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if messages and messages[0]["role"] == "system":
            self.system = messages.pop(0)["content"]
        self.messages = messages


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data:`` payloads of a server-sent event stream, one per event."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def explain(response: httpx.Response) -> str:
    """An error response as one readable line."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip() or response.reason_phrase
    hint = HINTS.get(response.status_code)
    return f"{hint} ({response.status_code}: {message})" if hint else f"error {response.status_code}: {message}"


def stream_reply(client: httpx.Client, body: dict[str, Any]) -> Generator[str, None, None]:
    """The reply's text as it arrives. Closing the generator closes the stream, which cancels the job."""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            response.read()
            raise ChatError(explain(response))
        for data in sse_data(response.iter_lines()):
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise ChatError(f"the reply failed: {chunk['error'].get('message')}")
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece


def read_message(read: Callable[[str], str] = input) -> str:
    """One message: a line ending in ``\\`` continues on the next; a line of \"\"\" opens and closes a block."""
    first = read(PROMPT)
    if first.strip() == BLOCK:
        block: list[str] = []
        while (line := read(MORE)).strip() != BLOCK:
            block.append(line)
        return "\n".join(block)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read(MORE))
    return "\n".join(lines)


class ChatSession:
    """One terminal conversation: messages go to the model, lines starting with / are commands."""

    def __init__(self, client: httpx.Client, conversation: Conversation, sampling: dict[str, Any]) -> None:
        self.client = client
        self.conv = conversation
        self.sampling = sampling

    def say(self, text: str) -> None:
        """Send one user message and stream the reply; Ctrl-C keeps what arrived and goes back to the prompt."""
        self.conv.messages.append({"role": "user", "content": text})
        body = {"model": self.conv.model, "messages": self.conv.request_messages(), **self.sampling}
        parts: list[str] = []
        print(f"{self.conv.model}> ", end="", flush=True)
        try:
            with contextlib.closing(stream_reply(self.client, body)) as pieces:
                for piece in pieces:
                    print(piece, end="", flush=True)
                    parts.append(piece)
            print()
        except KeyboardInterrupt:
            print(" [stopped]", flush=True)
        except (ChatError, httpx.HTTPError) as exc:
            reason = exc if isinstance(exc, ChatError) else f"cannot reach {self.client.base_url}: {exc}"
            print(f"\n[{reason}; the message was not added to the history]", flush=True)
            self.conv.messages.pop()
            return
        if parts:
            self.conv.messages.append({"role": "assistant", "content": "".join(parts)})

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line[1:].strip().partition(" ")
        handler = getattr(self, f"cmd_{name}", None)
        if handler is None:
            print(f"unknown command /{name}; /help lists them")
            return True
        try:
            return handler(arg.strip()) is not False
        except (ChatError, httpx.HTTPError, OSError) as exc:
            print(f"/{name} failed: {exc}")
            return True

    def cmd_help(self, _: str) -> None:
        print(HELP)

    def cmd_exit(self, _: str) -> bool:
        return False

    def cmd_reset(self, _: str) -> None:
        self.conv.messages.clear()
        print("conversation cleared")

    def cmd_save(self, path: str) -> None:
        if not path:
            raise ChatError("usage: /save FILE")
        Path(path).expanduser().write_text(json.dumps(self.conv.to_json(), indent=2, ensure_ascii=False) + "\n")
        print(f"saved {len(self.conv.messages)} messages to {path}")

    def cmd_load(self, path: str) -> None:
        if not path:
            raise ChatError("usage: /load FILE")
        try:
            data = json.loads(Path(path).expanduser().read_text())
        except ValueError as exc:
            raise ChatError(f"{path} is not JSON: {exc}") from None
        self.conv.load(data)
        print(f"loaded {len(self.conv.messages)} messages from {path}")

    def cmd_model(self, name: str) -> None:
        live = live_models(self.client)
        if not name:
            print("\n".join(f"{'*' if m == self.conv.model else ' '} {m}" for m in live) or "no live model")
            return
        if name not in live:
            raise ChatError(f"no live worker serves {name!r}; live models: {', '.join(live) or 'none'}")
        self.conv.model = name
        print(f"now chatting with {name}")


def live_models(client: httpx.Client) -> list[str]:
    response = client.get("/v1/models")
    if response.status_code != 200:
        raise ChatError(explain(response))
    return [m["id"] for m in response.json()["data"]]


def run(args: argparse.Namespace) -> int:
    """The chat loop; returns the exit status."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # request lines would interleave with the chat
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                  ("max_tokens", args.max_tokens)) if v is not None}
    # No read timeout: a reply may wait its turn in a queue; the gateway's reply timeout bounds it.
    with httpx.Client(base_url=args.url, headers=headers, timeout=httpx.Timeout(10.0, read=None)) as client:
        try:
            model = args.model or next(iter(live_models(client)), None)
        except (ChatError, httpx.HTTPError) as exc:
            print(f"redserve chat: cannot list the models at {args.url}: {exc}", file=sys.stderr)
            return 1
        if not model:
            print(f"redserve chat: no live model at {args.url}: start a worker, or pass --model", file=sys.stderr)
            return 1
        session = ChatSession(client, Conversation(model, args.system), sampling)
        print(f"chatting with {model} at {args.url}; /help lists the commands, /exit leaves", flush=True)
        while True:
            try:
                text = read_message()
            except KeyboardInterrupt:
                print()
                continue
            except EOFError:
                print()
                return 0
            if text.startswith("/"):
                if not session.command(text):
                    return 0
            elif text.strip():
                session.say(text)
