"""VLLMWorker through a real gateway, Redis and the official openai client, against a stand-in for vLLM.

The ``test_contract_*`` tests run the real worker on a stand-in for vLLM's
AsyncLLM (``tests/vllm_standin.py``); vLLM needs a GPU which CI lacks. The
stand-in implements exactly the vLLM surface ``workers.vllm.VLLMEngine`` uses,
so these tests pin down what the worker sends vLLM (token-id prompts,
``SamplingParams`` values, aborts) and what it makes of vLLM's answers (DELTA
outputs, finish reasons, logprobs, pooled vectors). Whether real vLLM keeps
that contract is checked by the last test, which runs only where vLLM is
installed, and by running the worker on a GPU machine.

The stand-in is the only stand-in: Redis, the gateway and the HTTP client are real.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import openai
import pytest
from support import wait_for
from vllm_standin import RequestOutputKind, StandInAsyncLLM, standin_classes, toy_embedding

from broker.protocol import Failure, Generate, Job, JobKind, pack
from broker.settings import Settings
from workers.base import JobError
from workers.tiny_model import CHAT_TEMPLATE, train_tokenizer
from workers.vllm import VLLMEngine, VLLMWorker, vllm_classes

USER = [{"role": "user", "content": "hello there, how are you today?"}]
MODEL_PATH = "/models/toy"


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The tiny model's real byte-level BPE tokenizer and chat template (no weights: the stand-in is the model)."""
    tok = train_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def standin_worker(tokenizer: Any, **llm_options: Any) -> type[VLLMWorker]:
    """VLLMWorker whose engine factory builds the stand-in for vLLM's AsyncLLM instead of starting vLLM."""

    class StandInVLLMWorker(VLLMWorker):
        def start_engine(self, engine_args: Any) -> VLLMEngine:
            self.started_with = dict(engine_args)
            return VLLMEngine(StandInAsyncLLM(tokenizer, **llm_options), **standin_classes())

    return StandInVLLMWorker


async def serve(stack, tokenizer, *, settings: dict[str, Any] | None = None, **llm_options):  # noqa: ANN001, ANN201
    """A stand-in-backed worker and a gateway; returns the worker, the stand-in and an openai client."""
    worker = await stack.worker(["toy"], cls=standin_worker(tokenizer, **llm_options), model_path=MODEL_PATH,
                                **(settings or {}))
    gw = await stack.gateway()
    return worker, worker.vllm.llm, gw.client()


def reply(llm: StandInAsyncLLM, start: int, count: int) -> str:
    """What the toy model says: ``count`` tokens of REPLY from token ``start`` on."""
    ids = llm.reply_ids
    return llm.tokenizer.decode([ids[(start + i) % len(ids)] for i in range(count)])


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def only_request(llm: StandInAsyncLLM) -> tuple[str, Any]:
    assert len(llm.requests) == 1
    return next(iter(llm.requests.items()))


# --- generation --------------------------------------------------------------------------
async def test_contract_streamed_chat_sends_mapped_sampling_params(stack, tokenizer):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): the SamplingParams vLLM gets, and the deltas."""
    worker, llm, client = await serve(stack, tokenizer, max_model_len=512,
                                      settings={"vllm_engine_args": '{"gpu_memory_utilization": 0.5}'})
    stream = await client.chat.completions.create(
        model="toy", messages=USER, stream=True, temperature=0.5, seed=7, max_tokens=8, stop=["zzz"],
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply(llm, 7, 8)  # sampled: choice 0 starts seed + 0 tokens in
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.prompt_tokens == len(chat_ids(tokenizer, USER))
    assert chunks[-1].usage.completion_tokens == 8

    _, got = only_request(llm)
    assert got.prompt == {"prompt_token_ids": chat_ids(tokenizer, USER)}  # vllm.inputs.TokensPrompt
    p = got.params
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.n, p.max_tokens, p.logprobs) == (
        0.5, 1.0, -1, 7, ["zzz"], 1, 8, None)
    assert (p.presence_penalty, p.frequency_penalty) == (0.0, 0.0)
    assert p.output_kind is RequestOutputKind.DELTA

    # AsyncEngineArgs: the model and the vllm_engine_args setting; no runner, so vLLM picks it from the model.
    assert worker.started_with == {"model": MODEL_PATH, "gpu_memory_utilization": 0.5}
    models = await client.models.list()
    assert models.data[0].model_extra["context_length"] == 512 == worker.record.context_length


async def test_contract_top_k_penalties_seed_and_default_max_tokens_map(stack, tokenizer):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): the remaining SamplingParams fields."""
    _, llm, client = await serve(stack, tokenizer, max_model_len=512)
    await client.chat.completions.create(model="toy", messages=USER, presence_penalty=0.5, frequency_penalty=-0.5,
                                         top_p=0.9, seed=2**62 + 3, extra_body={"top_k": 5})
    _, got = only_request(llm)
    p = got.params
    assert (p.top_k, p.top_p, p.presence_penalty, p.frequency_penalty) == (5, 0.9, 0.5, -0.5)
    assert p.seed == 3  # folded into vLLM's int64 seeds
    assert p.max_tokens == 512 - len(chat_ids(tokenizer, USER))  # no max_tokens: the room the context leaves


async def test_contract_completions_finish_reasons_stops_and_echo(stack, tokenizer):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): finish reasons and text as vLLM sends them."""
    _, llm, client = await serve(stack, tokenizer, reply_tokens=12)
    r = await client.completions.create(model="toy", prompt="The quick brown fox", max_tokens=5, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (reply(llm, 0, 5), "length", 5)
    assert r.usage.prompt_tokens == len(tokenizer("The quick brown fox")["input_ids"])

    r = await client.completions.create(model="toy", prompt="The quick brown fox", max_tokens=100, temperature=0)
    # The model ended by itself: EOS is a token (counted) but no text.
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (
        reply(llm, 0, 12), "stop", 13)

    r = await client.completions.create(model="toy", prompt="The quick brown fox", max_tokens=100, temperature=0,
                                        stop=[" over"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (" the quick brown fox jumps", "stop")

    stream = await client.completions.create(model="toy", prompt="The quick brown fox", max_tokens=5,
                                             temperature=0, stream=True, echo=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == "The quick brown fox" + reply(llm, 0, 5)


async def test_contract_n_choices_and_vllm_refusing_greedy_n(stack, tokenizer):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): n=2 choices by index; vLLM's refusal is a 400."""
    _, llm, client = await serve(stack, tokenizer)
    r = await client.chat.completions.create(model="toy", messages=USER, n=2, temperature=1.0, seed=3, max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == [reply(llm, 3, 6), reply(llm, 4, 6)]  # vLLM: seed + i
    assert [c.finish_reason for c in r.choices] == ["length", "length"]
    assert r.usage.completion_tokens == 12

    stream = await client.chat.completions.create(model="toy", messages=USER, n=2, temperature=1.0, seed=3,
                                                  max_tokens=6, stream=True)
    texts: dict[int, str] = {0: "", 1: ""}
    finish: dict[int, str] = {}
    async for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert texts == {0: reply(llm, 3, 6), 1: reply(llm, 4, 6)} and finish == {0: "length", 1: "length"}

    with pytest.raises(openai.BadRequestError) as err:  # vLLM: "n must be 1 when using greedy sampling"
        await client.chat.completions.create(model="toy", messages=USER, n=2, temperature=0)
    assert "greedy" in err.value.message


async def test_contract_logprobs_in_the_transformers_engines_shape(stack, tokenizer):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): vLLM's {token_id: Logprob} maps, rendered."""
    _, _, client = await serve(stack, tokenizer)
    r = await client.chat.completions.create(model="toy", messages=USER, temperature=0, max_tokens=4,
                                             logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content and len(content) == 4
    for e in content:
        assert [t.logprob for t in e.top_logprobs] == [-0.5, -1.0]
        assert e.logprob == e.top_logprobs[0].logprob and e.token == e.top_logprobs[0].token  # greedy: the best

    # Sampled: the chosen token may lie outside the top ones; vLLM then sends top + 1 entries, we keep the top.
    r = await client.completions.create(model="toy", prompt="Hello", temperature=1.0, seed=1, max_tokens=3,
                                        logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and lp.token_logprobs == [-1.5, -1.5, -1.5]
    assert all(sorted(top.values(), reverse=True) == [-0.5, -1.0] for top in lp.top_logprobs)

    # Tokens without text (EOS here) still get their logprobs, in the last delta.
    r = await client.completions.create(model="toy", prompt="Hello", temperature=0, max_tokens=100, logprobs=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].finish_reason == "stop" and len(lp.tokens) == r.usage.completion_tokens == 13
    assert "".join(lp.tokens[:12]) == r.choices[0].text


async def test_contract_context_length_is_enforced_with_a_400_naming_it(stack, tokenizer):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): max_model_len is the context length."""
    _, llm, client = await serve(stack, tokenizer, max_model_len=64)
    for kw in ({"max_tokens": 64}, {"messages": [{"role": "user", "content": "word " * 64}]}):
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="toy", **({"messages": USER} | kw))
        assert err.value.code == "context_length_exceeded" and err.value.param == "messages"
        assert "maximum context length is 64 tokens" in err.value.message
    assert not llm.requests  # refused before vLLM saw them


async def test_contract_bad_parameters_are_400s_before_vllm(stack, tokenizer):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): redserve's own validation comes first."""
    worker, llm, _ = await serve(stack, tokenizer)
    for payload, param in (({"prompt": "x", "frobnicate": []}, "frobnicate"),
                           ({"prompt": ["not", "a string"]}, "prompt")):
        job = Job.from_fields("0-1", {**Job("bad", "toy", JobKind.COMPLETION, "nowhere", Generate()).to_fields(),
                                      "payload": pack(payload)})
        [failure] = [ev async for ev in worker._events(job)]
        assert isinstance(failure, Failure) and (failure.status, failure.param) == (400, param)
    job = Job("bad-3", "toy", JobKind.COMPLETION, "nowhere", Generate(prompt="x", max_tokens=10**6))
    with pytest.raises(JobError) as err:
        [ev async for ev in worker.generate(job)]
    assert err.value.code == "context_length_exceeded"
    assert not llm.requests


async def test_contract_client_disconnect_aborts_the_vllm_request(stack, tokenizer):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): hanging up calls abort(request_id) at once."""
    worker, llm, client = await serve(stack, tokenizer, reply_tokens=10**6, step_delay=0.01)
    stream = await client.chat.completions.create(model="toy", messages=USER, stream=True)
    got = 0
    async for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got == 5:
            break
    (request_id,) = worker.tasks  # the job is still running when we hang up
    assert request_id in llm.requests and not llm.aborted
    await stream.close()
    hung_up = time.monotonic()
    await wait_for(lambda: request_id in llm.aborted, timeout=2)
    assert time.monotonic() - hung_up < 1.0
    assert llm.aborted == [request_id]
    await wait_for(lambda: not worker.tasks, timeout=1)
    made = llm.tokens_generated
    await asyncio.sleep(0.1)
    assert llm.tokens_generated == made  # and the stream was not read any further


async def test_contract_drain_shuts_vllm_down(stack, tokenizer):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): a drained worker stops its engine."""
    worker, llm, _ = await serve(stack, tokenizer)
    worker.drain()
    await asyncio.wait_for(stack.workers[0][1], 10)
    assert llm.shut_down


async def test_contract_tokenizer_from_old_and_new_vllm(tokenizer):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): get_tokenizer was a coroutine before 0.11."""
    for coroutine in (False, True):
        engine = VLLMEngine(StandInAsyncLLM(tokenizer, tokenizer_is_coroutine=coroutine), **standin_classes())
        assert await engine.tokenizer() is tokenizer


# --- embeddings ------------------------------------------------------------------------------
async def test_contract_embeddings_on_a_pooling_model(stack, tokenizer):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): encode() per input, L2-normalised."""
    worker, llm, client = await serve(stack, tokenizer, runner_type="pooling", max_model_len=32)
    inputs = ["hello there", "The quick brown fox jumps over the lazy dog"]
    r = await client.embeddings.create(model="toy", input=inputs)
    ids = [tokenizer(t)["input_ids"] for t in inputs]
    for d, prompt in zip(r.data, ids):
        raw = toy_embedding(prompt)
        norm = math.sqrt(sum(x * x for x in raw))
        assert d.embedding == pytest.approx([x / norm for x in raw])
    assert r.usage.prompt_tokens == sum(map(len, ids))
    assert sorted(got.prompt["prompt_token_ids"] for got in llm.requests.values()) == sorted(ids)
    assert {got.params.task for got in llm.requests.values()} == {"embed"}
    assert len({rid.rsplit("-", 1)[0] for rid in llm.requests}) == 1  # one vLLM request per input, ids <job>-<i>

    with pytest.raises(openai.BadRequestError) as err:
        await client.embeddings.create(model="toy", input=["short", "word " * 40])
    assert err.value.code == "context_length_exceeded" and err.value.param == "input"
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="toy", messages=USER)
    assert "embeddings only" in err.value.message
    assert worker.record.context_length == 32


async def test_contract_generating_model_refuses_embeddings(stack, tokenizer):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): a generate runner cannot encode."""
    _, llm, client = await serve(stack, tokenizer)
    with pytest.raises(openai.BadRequestError) as err:
        await client.embeddings.create(model="toy", input="hello")
    assert err.value.code == "unsupported" and not llm.requests


# --- the module and real vLLM ------------------------------------------------------------------
def test_module_imports_without_vllm_or_torch():
    """Where vLLM (and torch) are missing, the engine is still listed and its module imports."""
    code = "import sys, workers.vllm; print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"


def test_real_vllm_builds_the_mapped_requests():
    """The contract on the real classes: vLLM accepts the SamplingParams and PoolingParams the worker builds."""
    vllm = pytest.importorskip(
        "vllm", reason="vLLM is not installed: it needs a GPU (CUDA) build; the contract tests above cover the worker")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind as VLLMRequestOutputKind

    engine = VLLMEngine(None, **vllm_classes())
    p = engine.sampling_params(Generate(max_tokens=8, temperature=0.5, top_p=0.9, top_k=0, seed=7,
                                        presence_penalty=0.5, frequency_penalty=-0.5, stop=["zzz"], n=2, logprobs=2))
    assert isinstance(p, vllm.SamplingParams)
    assert (p.temperature, p.top_p, p.seed, p.stop, p.n, p.max_tokens, p.logprobs) == (
        0.5, 0.9, 7, ["zzz"], 2, 8, 2)
    assert p.top_k in (-1, 0)  # both mean "no cut"; recent vLLM may normalise -1 to 0
    assert (p.presence_penalty, p.frequency_penalty) == (0.5, -0.5)
    assert p.output_kind == VLLMRequestOutputKind.DELTA
    with pytest.raises(JobError) as err:
        engine.sampling_params(Generate(max_tokens=8, temperature=0, n=2))
    assert err.value.status == 400
    assert isinstance(engine.pooling_params(), vllm.PoolingParams) and engine.pooling_params().task == "embed"
    worker = VLLMWorker("redis://unused", Settings(), [MODEL_PATH], engine_args={"max_model_len": 64})
    assert AsyncEngineArgs(**worker.engine_args).max_model_len == 64


async def test_contract_structured_outputs_and_sampling_extras_map(stack, tokenizer):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): constraints become
    StructuredOutputsParams and vLLM's extras reach SamplingParams under their own names."""
    _, llm, client = await serve(stack, tokenizer, max_model_len=512)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    await client.chat.completions.create(
        model="toy", messages=USER, max_tokens=8, temperature=0.7, logit_bias={"5": -3},
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        extra_body={"min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 2, "ignore_eos": True,
                    "stop_token_ids": [7], "skip_special_tokens": False, "include_stop_str_in_output": True})
    _, got = only_request(llm)
    p = got.params
    assert (p.min_p, p.repetition_penalty, p.min_tokens, p.ignore_eos, p.stop_token_ids) == (0.1, 1.2, 2, True, [7])
    assert (p.skip_special_tokens, p.include_stop_str_in_output, p.logit_bias) == (False, True, {5: -3.0})
    assert json.loads(p.structured_outputs.json) == schema and p.structured_outputs.regex is None
    llm.requests.clear()
    await client.completions.create(model="toy", prompt="x", max_tokens=4,
                                    extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    _, got = only_request(llm)
    assert got.params.structured_outputs.choice == ["yes", "no"] and got.params.structured_outputs.json is None


async def test_contract_a_vllm_validation_error_is_a_400_naming_the_parameter(stack, tokenizer):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): vLLM 0.33's VLLMValidationError is no
    ValueError; it still becomes a 400, never a 500."""
    _, llm, client = await serve(stack, tokenizer, max_model_len=512)
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model="toy", prompt="x", max_tokens=3, extra_body={"min_tokens": 5})
    assert "min_tokens must be less than or equal to max_tokens" in err.value.message
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="toy", prompt="x", max_tokens=3, n=2, temperature=0)


async def test_contract_a_full_vllm_queue_is_a_503_with_vllms_message(stack, tokenizer):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): QueueOverflowError carries its own HTTP
    status (503), which reaches the client, never a 500."""
    _, llm, client = await serve(stack, tokenizer, max_model_len=512, reply_tokens=200, step_delay=0.01,
                                 max_num_queued_reqs=1)
    first = asyncio.create_task(client.chat.completions.create(model="toy", messages=USER, max_tokens=100))
    await wait_for(lambda: llm.live == 1)
    with pytest.raises(openai.InternalServerError) as err:
        await client.chat.completions.create(model="toy", messages=USER, max_tokens=5)
    assert err.value.status_code == 503 and "engine is currently busy" in err.value.message
    await first


async def test_contract_lora_adapters_are_models_sent_as_lora_requests(stack, tokenizer, tmp_path):
    """Stand-in for vLLM's AsyncLLM (vLLM needs a GPU which CI lacks): an adapter is its own model; its requests
    carry vLLM's LoRARequest (a stable id per adapter), the base model's carry none, and LoRA is enabled."""
    worker, llm, client = await serve(stack, tokenizer, max_model_len=512,
                                      settings={"lora": [f"sql={tmp_path}/sql", f"chat={tmp_path}/chat"]})
    assert worker.started_with["enable_lora"] is True and worker.started_with["max_loras"] == 2
    assert {m.id for m in (await client.models.list()).data} == {"toy", "sql", "chat"}
    for model in ("chat", "toy", "chat"):
        llm.requests.clear()
        await client.chat.completions.create(model=model, messages=USER, max_tokens=2)
        _, got = only_request(llm)
        if model == "toy":
            assert got.lora_request is None
        else:
            assert (got.lora_request.lora_name, got.lora_request.lora_int_id) == ("chat", 2)
            assert got.lora_request.lora_path == f"{tmp_path}/chat"
