"""`redserve chat` as a person uses it: a real process on a pseudo-terminal, typed into, against a live gateway."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable

import pexpect
import pytest
from support import redserve_argv, wait_for

from workers.echo import echo_tokens


class Terminal:
    """One `redserve chat` on a pty. pexpect blocks, so waits run in a thread: the gateway lives in this loop."""

    def __init__(self, url: str, *args: str) -> None:
        command, *argv = redserve_argv("chat", "--url", url, *args)
        self.child = pexpect.spawn(command, argv, encoding="utf-8", timeout=10, dimensions=(50, 250),
                                   env=os.environ | {"TERM": "dumb"})

    async def expect(self, pattern: str, timeout: float = 10) -> str:
        """Wait for `pattern` (a regex); returns what matched."""
        await asyncio.to_thread(self.child.expect, pattern, timeout=timeout)
        return self.child.after

    async def prompt(self) -> None:
        await self.expect(r"you> ")

    async def say(self, *lines: str) -> None:
        """Type `lines` at a fresh prompt, each followed by Enter."""
        await self.prompt()
        for line in lines:
            self.child.sendline(line)

    async def reply(self, model: str, text: str) -> None:
        await self.expect(re.escape(f"{model}> {text}") + r"\r\n")


@pytest.fixture
async def terminal() -> AsyncIterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def start(url: str, *args: str) -> Terminal:
        opened.append(Terminal(url, *args))
        return opened[-1]

    yield start
    for t in opened:
        t.child.close(force=True)


def saved(path) -> dict:  # noqa: ANN001
    return json.loads(path.read_text())


def turn(user: str, count: int = 8) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(echo_tokens(user, count))}]


async def test_streams_keeps_history_and_saves_resets_loads(stack, terminal, tmp_path):
    await stack.worker(["echo"], echo_delay=0.05, echo_tokens=8)
    gw = await stack.gateway()
    chat = terminal(gw.url, "--model", "echo")
    await chat.expect("chatting with echo")

    await chat.say("hello world")
    await chat.expect(r"echo> hello")
    first_token = time.monotonic()
    rest = "".join(echo_tokens("hello world", 8)).removeprefix("hello")
    await chat.expect(re.escape(rest) + r"\r\n")
    assert time.monotonic() - first_token > 0.2  # the rest arrived token by token, not at once

    await chat.say("second \\")  # a trailing backslash continues the message on the next line
    await chat.expect(r"\.\.\.> ")
    chat.child.sendline("turn")
    await chat.reply("echo", "".join(echo_tokens("second \nturn", 8)))
    await chat.say('"""', "block line", "", "more", '"""')  # a block keeps its blank lines
    await chat.reply("echo", "".join(echo_tokens("block line\n\nmore", 8)))

    first = tmp_path / "first.json"
    await chat.say(f"/save {first}")
    await chat.expect("saved 6 messages")
    history = turn("hello world") + turn("second \nturn") + turn("block line\n\nmore")
    assert saved(first) == {"model": "echo", "messages": history}

    await chat.say("/reset")
    await chat.expect("conversation cleared")
    await chat.say(f"/save {tmp_path / 'empty.json'}")
    await chat.expect("saved 0 messages")
    assert saved(tmp_path / "empty.json")["messages"] == []

    await chat.say(f"/load {first}")
    await chat.expect("loaded 6 messages")
    await chat.say("after load")
    await chat.reply("echo", "".join(echo_tokens("after load", 8)))
    await chat.say(f"/save {tmp_path / 'continued.json'}")
    await chat.expect("saved 8 messages")
    assert saved(tmp_path / "continued.json")["messages"] == history + turn("after load")

    await chat.say("/exit")
    await chat.expect(pexpect.EOF)
    chat.child.wait()
    assert chat.child.exitstatus == 0


async def test_ctrl_c_stops_the_reply_on_the_worker_and_the_chat_goes_on(stack, terminal, tmp_path):
    await stack.worker(["echo"], echo_tokens=8)
    slow = await stack.worker(["slow"], echo_delay=0.05, echo_tokens=400)
    gw = await stack.gateway()
    chat = terminal(gw.url)  # no --model: the first live model
    await chat.expect("chatting with echo")

    await chat.say("/model nope")
    await chat.expect("no live worker serves 'nope'; live models: echo, slow")
    await chat.say("/model slow")
    await chat.expect("now chatting with slow")

    await chat.say("a long story")
    await chat.expect(r"slow> a long story a long")
    assert slow.tasks, "the reply should be generating on the worker"
    chat.child.sendintr()  # Ctrl-C, typed on the terminal
    await chat.expect(r"\[stopped\]")
    await wait_for(lambda: not slow.tasks, timeout=5)
    produced = slow.record.tokens_out
    await asyncio.sleep(0.5)
    assert slow.record.tokens_out == produced < 400  # the worker stopped generating

    await chat.say("/model echo")
    await chat.expect("now chatting with echo")
    await chat.say("still here")
    await chat.reply("echo", "".join(echo_tokens("still here", 8)))
    path = tmp_path / "chat.json"
    await chat.say(f"/save {path}")
    await chat.expect("saved 4 messages")
    messages = saved(path)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["content"].startswith("a long story a long")  # what had arrived stays in the history
    assert messages[2:] == turn("still here")

    await chat.prompt()
    chat.child.sendeof()  # Ctrl-D leaves too
    await chat.expect(pexpect.EOF)
    chat.child.wait()
    assert chat.child.exitstatus == 0


async def test_a_refused_request_is_explained_and_left_out_of_the_history(stack, terminal, tmp_path):
    ghost = await stack.worker(["ghost"])
    gw = await stack.gateway()
    chat = terminal(gw.url, "--model", "ghost")
    await chat.expect("chatting with ghost")
    ghost.drain()
    await stack.workers[0][1]  # gone: the model is known, but no worker is alive

    await chat.say("anyone?")
    await chat.expect(r"no worker is serving this model right now \(503: .*\); the message was not added")
    await chat.say(f"/save {tmp_path / 'chat.json'}")
    await chat.expect("saved 0 messages")
