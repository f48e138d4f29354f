"""LoRA adapters on the transformers engine: each adapter is a model of its own on the base's worker, and one
batch mixes requests for the base and for adapters, each answered by its own weights."""

from __future__ import annotations

import asyncio

import pytest
from test_hf_worker import serve

from workers.tiny_model import build_tiny_lora


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("lora")
    return {name: build_tiny_lora(tiny_dir, root / name, seed=seed) for name, seed in (("alpha", 1), ("beta", 2))}


async def test_adapters_are_models_answering_with_their_own_weights(stack, tiny_dir, adapters):
    worker, client = await serve(stack, tiny_dir, lora=[f"{n}={p}" for n, p in adapters.items()])
    listed = {m.id: m.model_extra for m in (await client.models.list()).data}
    assert set(listed) == {"tiny", "alpha", "beta"} and listed["alpha"]["root"] == str(tiny_dir)

    async def say(model: str, seed: int | None = None) -> str:
        kw = {"temperature": 0} if seed is None else {"temperature": 1.0, "seed": seed}
        r = await client.completions.create(model=model, prompt="Hello there", max_tokens=12, **kw)
        return r.choices[0].text

    alone = {m: await say(m) for m in ("tiny", "alpha", "beta")}
    assert len(set(alone.values())) == 3  # the adapters change the answers measurably
    assert await say("alpha", seed=5) == await say("alpha", seed=5)  # deterministic with a seed
    # 24 requests at once over the base and both adapters share batches: each gets its own model's answer.
    models = ["tiny", "alpha", "beta"] * 8
    together = await asyncio.gather(*(say(m) for m in models))
    assert together == [alone[m] for m in models]
    assert worker.held["tiny"].batcher.max_batch_size > 3  # they really ran together


def test_a_lora_flag_names_its_adapter(tiny_dir):
    from broker.settings import Settings
    from workers.hf import HFWorker

    with pytest.raises(ValueError, match="NAME=PATH"):
        HFWorker("redis://unused", Settings(lora=["just-a-path"]), ["tiny"], model_path=str(tiny_dir))


def test_tiny_model_builds_an_adapter_too(tmp_path):
    from redserve.cli import main

    assert main(["tiny-model", str(tmp_path / "m"), "--lora", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter_config.json").is_file() and (tmp_path / "m" / "config.json").is_file()
