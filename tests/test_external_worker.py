"""The external-API worker against a real upstream: a second redserve gateway.

The chain: client -> gateway A -> ExternalAPIWorker -> gateway B -> echo worker.
Stack B lives under its own key prefix in the same Redis, so the two are as
separate as two deployments.
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from faults.faultkit import stream_chat
from support import wait_for

from workers.echo import echo_tokens
from workers.openai_api import ExternalAPIWorker, load_upstreams


@pytest.fixture
async def chain(stack, tmp_path, monkeypatch):
    upstream_worker = await stack.worker(["echo"], key_prefix="upstream", worker_id="up-echo",
                                         echo_delay=0.05, echo_tokens=40)
    gw_b = await stack.gateway(key_prefix="upstream")
    config = tmp_path / "upstreams.toml"
    config.write_text(f'''
[models.remote-echo]
base_url = "{gw_b.url}/v1"
model = "echo"
api_key_env = "UPSTREAM_KEY"

[models.remote-missing]
base_url = "{gw_b.url}/v1"
model = "no-such-model"
''')
    monkeypatch.setenv("UPSTREAM_KEY", "sk-test")
    await stack.worker(["remote-echo", "remote-missing"], cls=ExternalAPIWorker, api_config=str(config))
    gw_a = await stack.gateway()
    return gw_a, upstream_worker


async def test_streamed_chat_relays_deltas_through_two_gateways(chain):
    gw_a, _ = chain
    stream = await gw_a.client().chat.completions.create(
        model="remote-echo", messages=[{"role": "user", "content": "over the bridge"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas == echo_tokens("over the bridge", 6)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens > 0


async def test_completions_and_non_streaming(chain):
    gw_a, _ = chain
    r = await gw_a.client().completions.create(model="remote-echo", prompt="far away", max_tokens=3)
    assert r.choices[0].text == "".join(echo_tokens("far away", 3))
    r = await gw_a.client().chat.completions.create(
        model="remote-echo", messages=[{"role": "user", "content": "far away"}], max_tokens=3)
    assert r.choices[0].message.content == "".join(echo_tokens("far away", 3))


async def test_upstream_errors_keep_status_and_message(chain):
    gw_a, _ = chain
    with pytest.raises(openai.NotFoundError) as exc:
        await gw_a.client().chat.completions.create(
            model="remote-missing", messages=[{"role": "user", "content": "hi"}])
    assert "no-such-model" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:  # the upstream echo engine refuses embeddings
        await gw_a.client().embeddings.create(model="remote-echo", input="hi")
    assert "embeddings" in exc.value.message


async def test_cancel_propagates_to_the_upstream_worker(chain):
    gw_a, upstream_worker = chain
    seen = await stream_chat(gw_a.url, "cancel me", model="remote-echo", stop_after=2)  # then hang up
    assert seen.chunks == 2
    assert upstream_worker.tasks  # the upstream job was running (40 tokens x 50 ms = 2 s)
    hung_up = time.monotonic()
    await wait_for(lambda: not upstream_worker.tasks, timeout=3)
    assert time.monotonic() - hung_up < 1.5
    assert upstream_worker.record.tokens_out < 20


def test_config_requires_its_api_key_variable(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[models.m]\nbase_url = "http://x/v1"\napi_key_env = "NOT_SET_ANYWHERE"\n')
    with pytest.raises(ValueError, match="NOT_SET_ANYWHERE"):
        load_upstreams(cfg, environ={})
    ups = load_upstreams(cfg, environ={"NOT_SET_ANYWHERE": "k"})
    assert ups["m"].model == "m" and ups["m"].headers() == {"Authorization": "Bearer k"}


async def test_concurrent_relayed_streams(chain):
    gw_a, _ = chain
    client = gw_a.client()

    async def one(i: int) -> str:
        r = await client.chat.completions.create(
            model="remote-echo", messages=[{"role": "user", "content": f"parallel {i}"}], max_tokens=4)
        return r.choices[0].message.content

    assert await asyncio.gather(*(one(i) for i in range(12))) == [
        "".join(echo_tokens(f"parallel {i}", 4)) for i in range(12)]
