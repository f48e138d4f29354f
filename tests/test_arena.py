"""The arena through a real gateway, Redis and echo workers: anonymous battles, one vote that reveals the
names, the leaderboard folded incrementally from the vote stream, feedback, the conversation log and
moderation on every path a prompt takes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
from support import sse_events

from broker.keys import Keys
from gateway.arena.ratings import Tally
from gateway.arena.store import draw_pair

MODELS = ("alpha-model", "beta-model")


async def arena(stack, **overrides):  # noqa: ANN001, ANN201
    for name in MODELS:
        await stack.worker([name], worker_id=f"w-{name}")
    gw = await stack.gateway(**overrides)
    return gw, httpx.AsyncClient(base_url=gw.url, timeout=30)


async def turn(http: httpx.AsyncClient, battle: str, content: str, path: str = "turns") -> tuple[list[dict], str]:
    """Every event of a battle turn, and the raw bytes (to look for names in)."""
    events, raw = [], []
    body = {"content": content} if path == "turns" else {}
    async with http.stream("POST", f"/api/arena/battles/{battle}/{path}", json=body) as r:
        assert r.status_code == 200, await r.aread()
        raw.append(str(r.headers))
        async for _, data in sse_events(r):
            raw.append(data)
            events.append(json.loads(data))
    return events, "\n".join(raw)


def texts(events: list[dict]) -> dict[str, str]:
    return {s: "".join(e.get("text", "") for e in events if e.get("side") == s) for s in "ab"}


async def test_a_battle_names_no_model_until_its_one_vote(stack):
    gw, http = await arena(stack)
    async with http:
        created = await http.post("/api/arena/battles")
        assert created.status_code == 201
        battle = created.json()["id"]
        seen = [created.text]
        events, raw = await turn(http, battle, "hello arena world")
        seen.append(raw)
        said = texts(events)
        assert said["a"] == said["b"] and said["a"].startswith("hello arena world")  # echo workers, both sides
        assert events[-1] == {"state": "open", "error": None}
        again, raw = await turn(http, battle, "second turn please")  # multi-turn on both sides
        seen.append(raw)
        state = await http.get(f"/api/arena/battles/{battle}")
        seen.append(state.text)
        assert [m["role"] for m in state.json()["messages"]["a"]] == ["user", "assistant"] * 2
        regen, raw = await turn(http, battle, "", path="regenerate")
        seen.append(raw)
        assert len((await http.get(f"/api/arena/battles/{battle}")).json()["messages"]["b"]) == 4
        for text in seen:
            assert not any(name in text for name in MODELS), text
        voted = await http.post(f"/api/arena/battles/{battle}/vote", json={"winner": "a"})
        assert voted.status_code == 200 and set(voted.json()["models"].values()) == set(MODELS)
        second = await http.post(f"/api/arena/battles/{battle}/vote", json={"winner": "b"})
        assert second.status_code == 409 and second.json()["error"]["code"] == "battle_voted"
        late = await http.post(f"/api/arena/battles/{battle}/turns", json={"content": "more"})
        assert late.status_code == 409
        board = (await http.get("/api/arena/leaderboard")).json()
        assert board["votes"] == 1 and {r["model"] for r in board["rows"]} == set(MODELS)
        winner = voted.json()["models"]["a"]
        assert board["rows"][0]["model"] == winner and board["rows"][0]["votes"] == 1


async def test_a_failing_side_ends_the_battle_without_naming_it(stack, redis, keys):
    gw, http = await arena(stack)
    async with http:
        battle = (await http.post("/api/arena/battles")).json()["id"]
        await redis.delete(keys.seat("beta-model", "w-beta-model"))  # beta's worker is gone: its side fails
        events, raw = await turn(http, battle, "anyone there")
        assert not any(name in raw for name in MODELS), raw
        errors = [e for e in events if "error" in e and e.get("side")]
        assert len(errors) == 1 and "model_" in errors[0]["error"]["message"]
        assert events[-1]["state"] == "ended"
        refused = await http.post(f"/api/arena/battles/{battle}/vote", json={"winner": "tie"})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "battle_ended"
        assert await redis.xlen(keys.arena_votes()) == 0


async def test_battles_need_two_models_and_belong_to_their_browser(stack):
    await stack.worker(["solo"])
    gw = await stack.gateway()
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/api/arena/battles")
        assert r.status_code == 503 and r.json()["error"]["code"] == "arena_unavailable"
        assert (await http.get("/api/arena/battles/" + "0" * 32)).status_code == 404
        assert (await http.post("/api/arena/battles/nope/vote", json={"winner": "a"})).status_code == 404
        bad = await http.post("/api/arena/battles/" + "0" * 32 + "/vote", json={"winner": "left"})
        assert bad.status_code == 400


async def test_the_leaderboard_folds_only_new_votes_and_leaves_flagged_ones_out(stack, redis, keys):
    gw, http = await arena(stack)
    async with http:
        for winner in ("a", "a", "tie"):
            battle = (await http.post("/api/arena/battles")).json()["id"]
            await turn(http, battle, "who wins")
            await http.post(f"/api/arena/battles/{battle}/vote", json={"winner": winner})
        assert (await http.get("/api/arena/leaderboard")).json()["votes"] == 3
        state = await redis.hgetall(keys.leaderboard())
        last = state["last_id"]
        await redis.xadd(keys.arena_votes(), {"battle": "x", "model_a": "alpha-model", "model_b": "beta-model",
                                              "winner": "b", "flagged": "1"})
        assert (await http.get("/api/arena/leaderboard")).json()["votes"] == 3  # flagged: kept, not counted
        assert (await redis.hgetall(keys.leaderboard()))["last_id"] > last  # but folded past


def test_pairs_with_fewer_votes_are_drawn_more_often():
    import random

    tally = Tally()
    for _ in range(50):
        tally.add("a", "b", "a")
    rng = random.Random(1)
    drawn = [frozenset(draw_pair(["a", "b", "c"], tally, rng)) for _ in range(3000)]
    ab = drawn.count(frozenset("ab")) / len(drawn)
    assert ab < 0.05  # 1/51 of the weight of each other pair


async def test_feedback_is_stored_with_its_conversation(stack, redis, keys):
    await stack.worker(["echo"])
    gw = await stack.gateway()
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/api/feedback", json={"model": "echo", "rating": "down", "reply": "meh",
                                                   "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 201
        bad = await http.post("/api/feedback", json={"model": "echo", "rating": "meh", "reply": "x",
                                                     "messages": [{"role": "user", "content": "hi"}]})
        assert bad.status_code == 400
    [(_, entry)] = await redis.xrange(keys.feedback())
    assert entry["rating"] == "down" and json.loads(entry["messages"])[0]["content"] == "hi"


async def test_the_conversation_log_keeps_requests_and_replies_never_the_key(stack, redis, keys, tmp_path):
    from broker.tenants import tenant_id

    await stack.worker(["echo"])
    gw = await stack.gateway(log_conversations=True, api_keys=["sk-secret-one"])
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="sk-secret-one", max_retries=0)
    await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "log me please"}],
                                         temperature=0.5)
    stream = await client.completions.create(model="echo", prompt="and me too", stream=True)
    [c async for c in stream]
    entries = await _wait_entries(redis, keys, 2)
    chat, completion = (e for _, e in entries)
    assert chat["model"] == "echo" and json.loads(chat["reply"])[0].startswith("log me please")
    assert json.loads(chat["params"]) == {"temperature": 0.5} and chat["finish_reason"] == "stop"
    assert chat["tenant"] == tenant_id(b"sk-secret-one") and int(chat["completion_tokens"]) > 0
    assert completion["stream"] == "1" and json.loads(completion["input"]) == "and me too"
    dump = json.dumps(entries)
    assert "sk-secret-one" not in dump


async def _wait_entries(redis, keys, n):  # noqa: ANN001, ANN202
    for _ in range(100):  # the log is written in the background, after the reply
        if await redis.xlen(keys.conversations()) >= n:
            break
        await asyncio.sleep(0.05)
    return await redis.xrange(keys.conversations())


async def test_a_log_that_cannot_be_written_fails_no_request(stack, redis, keys):
    await stack.worker(["echo"])
    gw = await stack.gateway(log_conversations=True)
    await redis.set(keys.conversations(), "not a stream")  # every XADD to it now fails
    client = gw.client()
    r = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "still fine"}])
    assert r.choices[0].message.content
    async with httpx.AsyncClient(base_url=gw.url) as http:
        for _ in range(100):
            metrics = (await http.get("/metrics")).text
            if "redserve_conversation_log_misses_total 1.0" in metrics:
                break
            await asyncio.sleep(0.05)
    assert "redserve_conversation_log_misses_total 1.0" in metrics


RULES = "# test rules\n[violence] forbidden phrase\nre:bad\\w+word\n"


async def test_moderation_refuses_a_flagged_prompt_on_every_path(stack, tmp_path, redis, keys):
    rules = tmp_path / "rules.txt"
    rules.write_text(RULES)
    gw, http = await arena(stack, moderation=True, moderation_rules=str(rules))
    client = gw.client()
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=MODELS[0], messages=[{"role": "user",
                                                                         "content": "a Forbidden Phrase here"}])
    assert err.value.code == "content_filter" and "Forbidden" not in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model=MODELS[0], prompt=["fine", "badXYZword"])
    assert err.value.code == "content_filter"
    ok = await client.completions.create(model=MODELS[0], prompt="a perfectly fine prompt")
    assert ok.choices[0].text
    async with http:
        battle = (await http.post("/api/arena/battles")).json()["id"]
        await turn(http, battle, "a clean turn")
        r = await http.post(f"/api/arena/battles/{battle}/turns", json={"content": "forbidden phrase"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
        assert (await http.post(f"/api/arena/battles/{battle}/vote", json={"winner": "a"})).status_code == 200
        [(_, vote)] = await redis.xrange(keys.arena_votes())
        assert vote["flagged"] == "1"  # kept, and left out of the leaderboard
        assert (await http.get("/api/arena/leaderboard")).json()["votes"] == 0


def test_keys_of_the_arena_are_namespaced():
    k = Keys("t")
    assert {k.battle("x"), k.arena_votes(), k.leaderboard(), k.feedback(), k.conversations()} == {
        "t:{arena}:battle:x", "t:{arena}:votes", "t:{arena}:leaderboard", "t:feedback", "t:conversations"}


def test_rules_file_path_is_checked_at_startup(tmp_path: Path):
    from broker.settings import Settings
    from gateway.app import create_app

    with pytest.raises(ValueError):
        create_app("redis://unused", Settings(moderation=True, moderation_rules=str(tmp_path / "missing.txt")))


def test_up_with_two_models_battles_them_and_the_terminal_prints_the_leaderboard(redis_url):
    """`redserve up --model alpha --model beta`, a battle and its vote over HTTP, then `redserve leaderboard` and
    `redserve export votes` read the same Redis."""
    from support import run_redserve, shut_down, spawn_redserve, wait_models

    from redserve.redis_server import free_port

    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url}
    proc = spawn_redserve("up", "--port", str(port), "--model", "alpha", "--model", "beta", "--no-batch-runner",
                          "--log-level", "warning", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_models(base, lambda seen: seen.get("alpha") == 1 and seen.get("beta") == 1, watch=proc)
        with httpx.Client(base_url=base, timeout=30) as http:
            battle = http.post("/api/arena/battles").json()["id"]
            with http.stream("POST", f"/api/arena/battles/{battle}/turns", json={"content": "hi both"}) as r:
                assert r.status_code == 200 and '"state": "open"' in r.read().decode()
            assert set(http.post(f"/api/arena/battles/{battle}/vote", json={"winner": "b"}).json()["models"].values()) \
                == {"alpha", "beta"}
        board = run_redserve("leaderboard", env=env)
        assert board.returncode == 0, board.stderr
        lines = board.stdout.splitlines()
        assert "95% CI" in lines[0] and len(lines) == 3 and {ln.split()[1] for ln in lines[1:]} == {"alpha", "beta"}
        exported = run_redserve("export", "votes", "--since", "2020-01-01", env=env)
        [vote] = [json.loads(line) for line in exported.stdout.splitlines()]
        assert vote["battle"] == battle and vote["winner"] == "b" and vote["messages_a"][0]["content"] == "hi both"
        assert run_redserve("export", "votes", "--since", "next tuesday", env=env).returncode == 2
    finally:
        (done,) = shut_down(proc, timeout=60)
    assert "/#arena" in done.stdout


async def test_moderation_refuses_a_flagged_batch_line(stack, settings, tmp_path):
    from batchkit import jsonl, running_runner

    rules = tmp_path / "rules.txt"
    rules.write_text(RULES)
    await stack.worker(["echo"])
    client = (await stack.gateway()).client()
    rows = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "echo", "messages": [{"role": "user", "content": text}], "max_tokens": 2}}
            for cid, text in (("clean", "a fine line"), ("flagged", "some forbidden phrase"))]
    uploaded = await client.files.create(file=("b.jsonl", "\n".join(map(json.dumps, rows)).encode()), purpose="batch")
    async with running_runner(settings, moderation=True, moderation_rules=str(rules)):
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        for _ in range(600):
            if batch.status in ("completed", "failed"):
                break
            await asyncio.sleep(0.05)
            batch = await client.batches.retrieve(batch.id)
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    [error] = jsonl((await client.files.content(batch.error_file_id)).content)
    assert error["custom_id"] == "flagged" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["code"] == "content_filter"


async def test_a_battle_takes_no_vote_and_no_second_turn_while_a_turn_streams(stack):
    for name in MODELS:
        await stack.worker([name], echo_delay=0.2)
    gw = await stack.gateway()
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        battle = (await http.post("/api/arena/battles")).json()["id"]
        await turn(http, battle, "first")
        async with http.stream("POST", f"/api/arena/battles/{battle}/turns", json={"content": "slow one"}) as r:
            async for _ in sse_events(r):  # the turn is streaming now
                vote = await http.post(f"/api/arena/battles/{battle}/vote", json={"winner": "a"})
                assert vote.status_code == 409 and vote.json()["error"]["code"] == "battle_busy"
                other = await http.post(f"/api/arena/battles/{battle}/turns", json={"content": "me too"})
                assert other.status_code == 409 and other.json()["error"]["code"] == "battle_busy"
                break
        # the browser left mid-turn: the turn is released, and the battle takes its vote
        for _ in range(100):
            vote = await http.post(f"/api/arena/battles/{battle}/vote", json={"winner": "a"})
            if vote.status_code != 409:
                break
            await asyncio.sleep(0.05)
        assert vote.status_code == 200


def test_export_parses_only_the_fields_that_hold_json():
    from gateway.conversations import entries_as_json
    from redserve.arena_cli import EXPORTS

    _, json_fields = EXPORTS["feedback"]
    entry = ("1700000000000-0", {"reply": "[1, 2]", "messages": '[{"role": "user", "content": "hi"}]'})
    [line] = entries_as_json([entry], json_fields)
    row = json.loads(line)
    assert row["reply"] == "[1, 2]" and row["messages"][0]["content"] == "hi" and row["time"] == 1700000000.0
