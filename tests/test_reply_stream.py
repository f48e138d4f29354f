"""The reply path's pure logic, without Redis: ordering, duplicates, gaps and resends, restarts, timeouts,
bundle splitting and delta coalescing.

A ReplyRouter is built over a client that never connects (nothing here does I/O); replies are fed in as
the subscription would, through ``_route``.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from broker import replies
from broker.errors import WorkerLost, WorkerTimeout
from broker.keys import Keys
from broker.protocol import ChoiceEnd, Delta, Done, Event, Reply, TokenLogprob, Usage, bundle
from broker.replies import RESTART, ReplyRouter, ReplyStream
from workers.publish import coalesce


@pytest.fixture
def asks() -> list[list[str]]:
    return []


@pytest.fixture
def router(asks: list[list[str]]) -> ReplyRouter:
    return ReplyRouter(aioredis.Redis(), Keys(), "unit", on_gap=lambda streams: asks.append([s.rid for s in streams]))


def feed(router: ReplyRouter, stream: ReplyStream, seq: int, *events: Event, attempt: int = 0) -> None:
    router._route(Reply(stream.rid, seq, list(events), attempt).encode())


def text(events: object) -> str:
    assert isinstance(events, list)
    return "".join(ev.text for ev in events if isinstance(ev, Delta))


async def test_messages_come_out_in_order_and_the_terminal_one_ends_the_stream(router):
    s = router.open(1.0)
    feed(router, s, 0, Delta(0, "a"))
    feed(router, s, 1, Delta(0, "b"), ChoiceEnd(0, "stop"), Done(Usage(1, 2)))
    assert text(await s.next_events()) == "a"
    assert not s.finished
    assert text(await s.next_events()) == "b" and s.finished and s.last_seq == 1


async def test_a_duplicate_is_dropped(router):
    s = router.open(1.0)
    feed(router, s, 0, Delta(0, "a"))
    feed(router, s, 0, Delta(0, "a"))  # a resend of what already arrived
    feed(router, s, 1, Delta(0, "b"))
    assert [text(await s.next_events()) for _ in range(2)] == ["a", "b"]


async def test_a_gap_holds_early_messages_and_asks_once_until_it_is_filled(router, asks):
    s = router.open(1.0)
    feed(router, s, 0, Delta(0, "a"))
    feed(router, s, 2, Delta(0, "c"))
    feed(router, s, 3, Delta(0, "d"))
    assert text(await s.next_events()) == "a"
    waiting = asyncio.create_task(s.next_events())
    await asyncio.sleep(0.01)
    assert asks == [[s.rid]] and not waiting.done()  # asked for what is missing, once, and waits
    feed(router, s, 1, Delta(0, "b"))  # the resend
    assert text(await waiting) == "b"
    assert [text(await s.next_events()) for _ in range(2)] == ["c", "d"]
    assert not s.ahead


async def test_an_open_gap_is_asked_for_again_until_filled(router, asks, monkeypatch):
    monkeypatch.setattr(replies, "GAP_RETRY", 0.05)
    s = router.open(2.0)
    feed(router, s, 1, Delta(0, "b"))
    waiting = asyncio.create_task(s.next_events())
    await asyncio.sleep(0.18)
    assert len(asks) >= 3  # the first ask, then one per GAP_RETRY: a lost request for a resend is repeated
    feed(router, s, 0, Delta(0, "a"))
    assert text(await waiting) == "a" and text(await s.next_events()) == "b"


async def test_after_a_resubscription_a_stream_asks_until_a_message_of_its_arrives(router, asks, monkeypatch):
    monkeypatch.setattr(replies, "GAP_RETRY", 0.05)
    s = router.open(2.0)
    s.unsure = True  # what the router sets on every open stream when its subscription comes back
    waiting = asyncio.create_task(s.next_events())
    await asyncio.sleep(0.12)
    assert len(asks) >= 2
    feed(router, s, 0, Delta(0, "a"))
    assert text(await waiting) == "a" and not s.unsure


async def test_silence_is_a_timeout_not_a_hang(router):
    s = router.open(0.05)
    with pytest.raises(WorkerTimeout):
        await s.next_events()


async def test_a_lost_worker_before_anything_was_sent_restarts_the_stream(router):
    s = router.open(1.0)
    retried = []

    async def retry(stream: ReplyStream) -> None:  # what the client does: dispatch the job again
        retried.append(stream.rid)

    s.retry = retry
    feed(router, s, 0, Delta(0, "a"))
    feed(router, s, 2, Delta(0, "c"))
    assert text(await s.next_events()) == "a"
    router._route(Reply.worker_lost(s.rid, 0).encode())
    assert await s.next_events() is RESTART
    assert retried == [s.rid] and s.next_seq == 0 and not s.ahead


async def test_a_lost_worker_after_the_client_saw_text_is_an_error(router):
    s = router.open(1.0)
    s.retry = lambda stream: asyncio.sleep(0)
    s.committed = True
    router._route(Reply.worker_lost(s.rid, 0).encode())
    with pytest.raises(WorkerLost):
        await s.next_events()


async def test_replies_of_a_superseded_attempt_are_ignored(router):
    s = router.open(1.0)
    feed(router, s, 0, Delta(0, "old"), attempt=1)  # the stream is on attempt 0 (no job: attempt 0)
    feed(router, s, 0, Delta(0, "new"))
    assert text(await s.next_events()) == "new"


async def test_a_bundle_is_split_to_its_streams(router):
    a, b = router.open(1.0), router.open(1.0)
    router._route(bundle([Reply(a.rid, 0, [Delta(0, "for a")]).encode(),
                          Reply(b.rid, 0, [Delta(0, "for b")]).encode(),
                          Reply("unknown-request", 0, [Delta(0, "nobody")]).encode()]))
    assert text(await a.next_events()) == "for a" and text(await b.next_events()) == "for b"


def test_coalescing_merges_runs_of_one_choice_and_keeps_order():
    lp1, lp2 = TokenLogprob("a", -0.1), TokenLogprob("b", -0.2)
    events = [Delta(0, "a", 1, [lp1]), Delta(0, "b", 1, [lp2]), Delta(1, "x"), Delta(0, "c"),
              ChoiceEnd(0, "stop"), Done(Usage(1, 4))]
    out = coalesce(events)
    assert out[0] == Delta(0, "ab", 2, [lp1, lp2])
    assert [type(ev) for ev in out] == [Delta, Delta, Delta, ChoiceEnd, Done]
    assert [ev.text for ev in out[:3] if isinstance(ev, Delta)] == ["ab", "x", "c"]


async def test_idle_returns_while_waiting_but_the_reply_timeout_runs_from_the_first_wait(router):
    s = router.open(0.5)
    loop = asyncio.get_running_loop()
    start = loop.time()
    idles = 0
    with pytest.raises(WorkerTimeout):
        while True:
            assert await s.next_events(0.1) is replies.IDLE  # nothing arrives: a keep-alive is due each 0.1 s
            idles += 1
    assert 3 <= idles <= 5 and 0.45 < loop.time() - start < 0.9  # not reset by each IDLE


async def test_a_message_after_idle_waits_is_returned_and_restarts_the_timeout(router):
    s = router.open(0.5)
    assert await s.next_events(0.1) is replies.IDLE
    feed(router, s, 0, Delta(0, "a"))
    assert text(await s.next_events(0.1)) == "a"
    await asyncio.sleep(0.3)  # the next message's 0.5 s start from this wait, not the first one
    assert await s.next_events(0.25) is replies.IDLE
