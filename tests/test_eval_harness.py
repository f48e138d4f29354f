"""Completions and embeddings as evaluation harnesses use them (lm-evaluation-harness and the like): several
prompts per request, token-id prompts, prompt scoring with ``echo`` + ``logprobs`` + ``max_tokens: 0``, token-id
embedding inputs and Matryoshka ``dimensions``."""

from __future__ import annotations

import json
import math
import shutil

import openai
import pytest
from test_hf_worker import MINILM, SENTENCES, serve

from workers.echo import echo_tokens


async def test_several_prompts_get_n_choices_each_in_order(stack):
    await stack.worker(["echo"], echo_tokens=3)
    client = (await stack.gateway()).client()
    prompts = ["one two three", "four five six"]
    r = await client.completions.create(model="echo", prompt=prompts, n=2, max_tokens=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == ["".join(echo_tokens(p, 3)) for p in prompts for _ in range(2)]
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == 6
    stream = await client.completions.create(model="echo", prompt=prompts, n=2, max_tokens=3, stream=True)
    texts: dict[int, str] = {}
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [texts[i] for i in range(4)] == [c.text for c in r.choices]
    with pytest.raises(openai.BadRequestError) as err:  # n counts every prompt's choices against max_n
        await client.completions.create(model="echo", prompt=["a"] * 9, n=2)
    assert err.value.param == "n"


async def test_token_id_prompts_read_as_their_text(stack, tiny_dir):
    worker, client = await serve(stack, tiny_dir)
    ids = worker.held["tiny"].loaded.tokenizer("Hello there")["input_ids"]
    as_text = await client.completions.create(model="tiny", prompt="Hello there", max_tokens=6, temperature=0)
    as_ids = await client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert as_ids.choices[0].text == as_text.choices[0].text
    assert as_ids.usage.prompt_tokens == as_text.usage.prompt_tokens == len(ids)
    both = await client.completions.create(model="tiny", prompt=[ids, ids[:2]], max_tokens=2, temperature=0)
    assert both.choices[0].text == as_text.choices[0].text[:len(both.choices[0].text)]
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model="tiny", prompt=[10**6], max_tokens=2)
    assert err.value.param == "prompt"


async def test_echo_with_logprobs_and_no_tokens_scores_the_prompt(stack, tiny_dir):
    """The loglikelihood lm-eval asks for: the prompt's own token logprobs, nothing generated; they agree with
    the logprobs the same tokens get when the model generates them."""
    worker, client = await serve(stack, tiny_dir)
    made = await client.completions.create(model="tiny", prompt="Hello there", max_tokens=3, temperature=0,
                                           logprobs=1)
    generated = made.choices[0].logprobs
    scored = await client.completions.create(model="tiny", prompt="Hello there" + made.choices[0].text,
                                             max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    lp = choice.logprobs
    assert choice.text == "Hello there" + made.choices[0].text and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and len(lp.tokens) == scored.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert lp.tokens[-3:] == generated.tokens
    for mine, theirs in zip(lp.token_logprobs[-3:], generated.token_logprobs):
        assert math.isclose(mine, theirs, abs_tol=1e-3)
    echoed = await client.completions.create(model="tiny", prompt="Hello there", max_tokens=2, echo=True,
                                             temperature=0)
    assert echoed.choices[0].text == "Hello there" + made.choices[0].text[:len(echoed.choices[0].text) - 11]
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert "echo" in err.value.message


async def test_echo_engine_refuses_prompt_scoring_by_name(stack):
    await stack.worker(["echo"])
    client = (await stack.gateway()).client()
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model="echo", prompt="a b", max_tokens=0, echo=True, logprobs=1)
    assert err.value.param in ("echo", "logprobs")


async def test_embeddings_take_token_ids_and_matryoshka_dimensions(stack, tmp_path):
    worker, client = await serve(stack, MINILM, name="minilm")
    ids = [worker.held["minilm"].loaded.tokenizer(s)["input_ids"] for s in SENTENCES]
    by_text = await client.embeddings.create(model="minilm", input=SENTENCES)
    by_ids = await client.embeddings.create(model="minilm", input=ids)
    for a, b in zip(by_text.data, by_ids.data):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-5)
    with pytest.raises(openai.BadRequestError) as err:  # MiniLM was not trained to be cut short
        await client.embeddings.create(model="minilm", input="x", dimensions=64)
    assert err.value.param == "dimensions"
    matryoshka = shutil.copytree(MINILM, tmp_path / "matryoshka")
    config = json.loads((matryoshka / "config.json").read_text())
    (matryoshka / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [64, 128, 384]}))
    await serve(stack, matryoshka, name="mat")
    full = (await client.embeddings.create(model="mat", input=SENTENCES[0])).data[0].embedding
    short = (await client.embeddings.create(model="mat", input=SENTENCES[0], dimensions=64)).data[0].embedding
    norm = math.sqrt(sum(x * x for x in full[:64]))
    assert len(short) == 64 and short == pytest.approx([x / norm for x in full[:64]], abs=1e-5)
