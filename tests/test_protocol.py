"""The wire codec: every message round-trips, keeps its short keys (what ``docs/redis.md`` shows), and a job
a worker cannot read is a 400 naming the parameter, never a crash."""

from __future__ import annotations

import msgpack
import pytest

from broker.protocol import (
    Cancel,
    ChoiceEnd,
    Delta,
    Done,
    Embed,
    Embeddings,
    Failure,
    Generate,
    Job,
    JobKind,
    Message,
    Reply,
    Resend,
    StreamMeta,
    TokenCount,
    TokenLogprob,
    TopLogprob,
    Usage,
    bundle,
    control,
    pack,
    replay_head,
    replay_reply,
)
from broker.settings import Settings
from workers.echo import EchoWorker


def test_reply_events_round_trip_with_their_short_keys():
    lp = [TokenLogprob("a", -0.5, [TopLogprob("a", -0.5), TopLogprob("b", -1.0)])]
    events = [Delta(0, "hi", 2, lp), ChoiceEnd(0, "stop"), Done(Usage(3, 4))]
    data = Reply("r1", 5, events, attempt=1).encode()
    assert msgpack.unpackb(data) == {"rid": "r1", "seq": 5, "a": 1, "ev": [
        {"t": "d", "i": 0, "x": "hi", "k": 2, "lp": [
            {"token": "a", "logprob": -0.5, "top_logprobs": [{"token": "a", "logprob": -0.5},
                                                             {"token": "b", "logprob": -1.0}]}]},
        {"t": "end", "i": 0, "fr": "stop"},
        {"t": "done", "u": {"prompt_tokens": 3, "completion_tokens": 4}}]}
    assert Reply.decode(data) == Reply("r1", 5, events, attempt=1)


@pytest.mark.parametrize("event", [
    Embeddings([[0.5, -0.5]], Usage(2)), TokenCount(7, [1, 2, 3], 64), TokenCount(7, None),
    Failure("no", 429, "rate_limit_error", "queue_full", "model")])
def test_terminal_events_round_trip_and_end_the_reply(event):
    reply = Reply.decode(Reply("r", 0, [event]).encode())
    assert reply.events == [event] and reply.terminal


def test_a_bundle_decodes_to_its_replies_and_a_lost_notice_is_no_event():
    one, two = Reply("a", 0, [Delta(0, "x")]), Reply.worker_lost("b", 2)
    assert Reply.decode_all(bundle([one.encode(), two.encode()])) == [one, two]
    assert msgpack.unpackb(two.encode()) == {"rid": "b", "seq": -1, "a": 2, "lost": True}
    assert not two.events and not two.terminal


def test_control_messages_are_tagged():
    assert msgpack.unpackb(pack(Cancel("r"))) == {"t": "cancel", "rid": "r"}
    assert msgpack.unpackb(pack(Resend("r", 3, 1, "ch"))) == {"t": "resend", "rid": "r", "from": 3, "a": 1, "to": "ch"}
    assert control(pack(Resend("r", 3, 1, "ch"))) == Resend("r", 3, 1, "ch")


@pytest.mark.parametrize("kind,params", [
    (JobKind.CHAT, Generate(messages=[Message("user", "hi"), Message("tool", "42", tool_call_id="c1")], n=2,
                            stop=["\n"], logprobs=0)),
    (JobKind.COMPLETION, Generate(prompt="once", max_tokens=3, temperature=0)),
    (JobKind.EMBEDDING, Embed(["a", "b"]))])
def test_jobs_round_trip_through_their_stream_fields(kind, params):
    job = Job("r", "m", kind, "replies", params, deadline=12.5, attempt=1, replay_ms=900)
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in job.to_fields().items()}  # as XRANGE
    back = Job.from_fields("1-0", fields)
    assert back == Job("r", "m", kind, "replies", params, 12.5, 1, 900, "1-0")
    assert msgpack.unpackb(fields[b"payload"]) == {k: v for k, v in msgpack.unpackb(pack(params)).items()}


@pytest.mark.parametrize("payload,param", [
    ({"prompt": "x", "frobnicate": []}, "frobnicate"), ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x", "mood": "sunny"}]}, "mood")])
async def test_a_job_the_worker_cannot_read_is_a_400_naming_the_parameter(payload, param):
    fields = {**Job("r", "echo", JobKind.CHAT, "replies", Generate()).to_fields(), "payload": msgpack.packb(payload)}
    job = Job.from_fields("1-0", fields)
    assert job.invalid
    assert job.to_fields()["payload"] == fields["payload"]  # moved or dead-lettered as it was sent
    worker = EchoWorker("redis://unused", Settings(), ["echo"])
    [failure] = [ev async for ev in worker._events(job)]
    assert isinstance(failure, Failure)
    assert (failure.status, failure.code, failure.param) == (400, "unsupported_parameter", param)


async def test_an_engine_refuses_a_feature_it_does_not_declare():
    worker = EchoWorker("redis://unused", Settings(), ["echo"])
    job = Job("r", "echo", JobKind.COMPLETION, "replies", Generate(prompt="x", logprobs=1))
    [failure] = [ev async for ev in worker._events(job)]
    assert isinstance(failure, Failure) and (failure.status, failure.param) == (400, "logprobs")


def test_a_replay_log_reads_back_its_meta_owner_and_replies():
    meta = StreamMeta("echo", "chat", 2, True, "", 1700000000)
    head = {b"meta": pack(meta), b"owner": b"0123456789abcdef"}  # as dispatch.lua writes it
    assert replay_head(head) == (meta, "0123456789abcdef")
    assert replay_head({b"r": b""}) is None  # a log that lost its head is no log
    reply = Reply("r", 0, [Delta(0, "x")])
    assert replay_reply({b"r": reply.encode()}) == reply  # as emit.lua appends it
    assert Job.request_id_of({b"request_id": b"abc", b"payload": b"\xc1"}) == "abc"  # no payload decoding
