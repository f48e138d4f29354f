"""Several models in one hf worker (``--model NAME=PATH``, repeatable): each answers with its own weights and
context, keeps its own queue count, and they share the one compute thread fairly."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest
from support import wait_for

from workers.hf import HFWorker
from workers.hf.worker import model_sources
from workers.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model: other random weights, a shorter context."""
    return build_tiny_model(tmp_path_factory.mktemp("other"), context_length=512, seed=99)


async def serve_two(stack, tiny_dir: Path, other_dir: Path, **overrides):  # noqa: ANN001, ANN201
    worker = await stack.worker([f"tiny={tiny_dir}", f"other={other_dir}"], cls=HFWorker, **overrides)
    gw = await stack.gateway()
    return worker, gw.client()


async def say(client, model: str, max_tokens: int = 12) -> str:  # noqa: ANN001
    r = await client.completions.create(model=model, prompt="Hello there", max_tokens=max_tokens, temperature=0)
    return r.choices[0].text


async def test_two_models_in_one_worker_answer_each_with_its_own_weights(stack, tiny_dir, other_dir):
    worker, client = await serve_two(stack, tiny_dir, other_dir, max_concurrency=16)
    listed = {m.id: m.model_extra for m in (await client.models.list()).data}
    assert set(listed) == {"tiny", "other"}
    assert (listed["tiny"]["root"], listed["other"]["root"]) == (str(tiny_dir), str(other_dir))
    assert listed["other"]["max_model_len"] == 512 and listed["tiny"]["max_model_len"] != 512
    alone = {m: await say(client, m) for m in ("tiny", "other")}
    assert alone["tiny"] != alone["other"]
    models = ["tiny", "other"] * 6
    together = await asyncio.gather(*(say(client, m) for m in models))
    assert together == [alone[m] for m in models]  # concurrency never crosses the models' answers
    with pytest.raises(openai.BadRequestError) as err:  # each model's own context limit
        await client.completions.create(model="other", prompt="Hello there", max_tokens=600)
    assert err.value.code == "context_length_exceeded"


async def test_each_model_keeps_its_own_queue_count(stack, redis, keys, tiny_dir, other_dir):
    worker, client = await serve_two(stack, tiny_dir, other_dir, max_concurrency=8)
    long = [asyncio.create_task(client.completions.create(model="tiny", prompt="Hello", max_tokens=4000,
                                                          extra_body={"ignore_eos": True}))
            for _ in range(3)]
    await wait_for(lambda: worker.held["tiny"].batcher.active == 3, timeout=30)
    assert await redis.zscore(keys.model_workers("tiny"), worker.id) == 3
    assert await redis.zscore(keys.model_workers("other"), worker.id) == 0
    for task in long:
        task.cancel()
    await asyncio.gather(*long, return_exceptions=True)
    await wait_for(lambda: not worker.tasks, timeout=30)
    assert await redis.zscore(keys.model_workers("tiny"), worker.id) == 0


async def test_a_busy_model_does_not_starve_the_other(stack, tiny_dir, other_dir):
    """Eight endless generations of one model hold the compute thread's rounds, yet a request for the other
    model finishes about as fast as a short request of the busy one: each round steps both."""
    worker, client = await serve_two(stack, tiny_dir, other_dir, max_concurrency=16)
    busy = [asyncio.create_task(client.completions.create(model="tiny", prompt="Hello", max_tokens=4000,
                                                          extra_body={"ignore_eos": True}))
            for _ in range(8)]
    try:
        await wait_for(lambda: worker.held["tiny"].batcher.active == 8, timeout=30)
        made = worker.held["tiny"].batcher.tokens_generated
        start = time.perf_counter()
        assert len(await say(client, "other", max_tokens=32)) > 0
        elapsed = time.perf_counter() - start
        steps = (worker.held["tiny"].batcher.tokens_generated - made) / 8
        # 32 tokens of `other` took about 32 rounds: `tiny` made about as many steps meanwhile, not hundreds.
        assert steps < 32 * 3, (steps, elapsed)
        assert worker.held["other"].batcher.tokens_generated == 32
    finally:
        for task in busy:
            task.cancel()
        await asyncio.gather(*busy, return_exceptions=True)


def test_model_flags_name_their_directories(tmp_path):
    assert model_sources(["a=/x/a", "b=/x/b"], None) == {"a": Path("/x/a"), "b": Path("/x/b")}
    assert model_sources(["tiny"], "/m/tiny") == {"tiny": Path("/m/tiny")}
    with pytest.raises(ValueError, match="twice"):
        model_sources(["a=/x", "a=/y"], None)
    with pytest.raises(ValueError, match="NAME=PATH"):
        model_sources(["=/x"], None)


def test_lora_needs_a_single_base(tiny_dir, other_dir):
    from broker.settings import Settings

    with pytest.raises(ValueError, match="one base model"):
        HFWorker("redis://unused", Settings(lora=["a=/x"]), [f"tiny={tiny_dir}", f"other={other_dir}"])
