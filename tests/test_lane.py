"""The hot lane (broker/lane.py) against a real Redis: order, errors, scripts, a lost connection, a cancelled caller."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError, ResponseError

from broker import lane as lane_module
from broker.connection import connect
from broker.lane import Lane


@pytest.fixture
async def lane(redis_url):
    client = connect(redis_url, decode=False)
    lane = Lane(client)
    yield lane
    await lane.close()
    await client.aclose()


async def test_commands_sent_together_get_their_own_replies_in_order(lane, redis):
    got = await asyncio.gather(*(lane.execute("INCR", "n") for _ in range(500)))
    assert got == list(range(1, 501))  # one write for many commands, each reply to its own caller
    assert await redis.get("n") == "500"


async def test_an_error_reply_fails_its_command_only(lane):
    bad, good = await asyncio.gather(lane.execute("INCR", "k", "extra"), lane.execute("PING"),
                                     return_exceptions=True)
    assert isinstance(bad, ResponseError) and good == b"PONG"
    assert await lane.execute("SET", "k", "v") == b"OK"


async def test_a_script_redis_does_not_know_is_loaded_and_run(lane, redis):
    script = redis.register_script("return ARGV[1] .. KEYS[1]")
    await redis.script_flush()
    assert await lane.evalsha(script, ["k"], ["x"]) == b"xk"
    await redis.script_flush()  # Redis restarted, say
    assert await lane.evalsha(script, ["k"], ["y"]) == b"yk"


async def test_a_killed_connection_fails_what_waits_and_the_next_command_reconnects(lane, redis):
    assert await lane.execute("CLIENT", "SETNAME", "lane") == b"OK"
    waiting = asyncio.ensure_future(lane.execute("BLPOP", "never", 0))
    await asyncio.sleep(0.1)
    killed = await redis.execute_command("CLIENT", "KILL", "SKIPME", "yes", "TYPE", "normal")
    assert killed >= 1
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(waiting, 5)
    assert await lane.execute("PING") == b"PONG"  # a fresh connection


async def test_a_caller_that_stops_waiting_does_not_shift_the_replies(lane, redis):
    slow = asyncio.ensure_future(lane.execute("BLPOP", "list", 1))
    await asyncio.sleep(0.05)
    after = asyncio.ensure_future(lane.execute("ECHO", "mine"))
    slow.cancel()
    await redis.rpush("list", "x")
    assert await asyncio.wait_for(after, 5) == b"mine"  # not the BLPOP's reply


async def test_an_argument_it_cannot_send_fails_its_command_only(lane):
    with pytest.raises(TypeError):
        await lane.execute("SET", "k", None)
    assert await asyncio.gather(lane.execute("SET", "k", "v"), lane.execute("GET", "k")) == [b"OK", b"v"]


async def test_a_command_unanswered_past_the_deadline_drops_the_connection(lane, monkeypatch):
    monkeypatch.setattr(lane_module, "REPLY_DEADLINE", 0.3)  # a peer gone silent: no reset, no reply
    with pytest.raises(ConnectionError, match="no reply"):
        await asyncio.wait_for(lane.execute("BLPOP", "never", 0), 5)
    assert await lane.execute("PING") == b"PONG"  # a fresh connection
