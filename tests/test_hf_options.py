"""The hf engine's loading options: --dtype, --max-model-len, --device and --load-in, and what vLLM gets of them.
Options this CPU-only machine cannot honour must stop the worker with a clear error, before it registers."""

from __future__ import annotations

import openai
import pytest
import torch
from test_hf_worker import serve

from broker.settings import Settings
from workers.vllm import VLLMWorker


async def test_dtype_and_max_model_len(stack, tiny_dir):
    worker, client = await serve(stack, tiny_dir, dtype="bfloat16", max_model_len=64)
    assert worker.held["tiny"].loaded.model.dtype == torch.bfloat16
    [model] = (await client.models.list()).data
    assert model.model_extra["max_model_len"] == 64
    r = await client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model="tiny", prompt="Hello", max_tokens=100)
    assert err.value.code == "context_length_exceeded" and "64 tokens" in err.value.message


@pytest.mark.parametrize("options,problem", [
    ({"device": "cuda"}, "CUDA device"),
    ({"device": "cuda:3"}, "CUDA device"),
    ({"load_in": "8bit"}, "bitsandbytes"),
    ({"max_model_len": 10**6}, "over"),
])
async def test_what_this_machine_cannot_do_stops_the_worker_clearly(stack, tiny_dir, options, problem):
    if torch.cuda.is_available():
        pytest.skip("the machine has a GPU: these options would load")  # CI has none; a lent GPU runs the rest
    with pytest.raises(ValueError, match=problem):
        await serve(stack, tiny_dir, **options)


def test_vllm_gets_dtype_and_max_model_len_as_engine_args():
    worker = VLLMWorker("redis://unused", Settings(dtype="bfloat16", max_model_len=2048), ["m"])
    assert worker.engine_args == {"model": "m", "dtype": "bfloat16", "max_model_len": 2048}
    assert VLLMWorker("redis://unused", Settings(), ["m"]).engine_args == {"model": "m"}


def test_a_device_setting_must_name_a_device():
    with pytest.raises(ValueError):
        Settings(device="gpu-please")
