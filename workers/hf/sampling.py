"""Choosing one token from one row of logits with a request's own parameters and RNG, and its logprobs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from broker.protocol import Generate, TokenLogprob, TopLogprob


def penalised(p: Generate) -> bool:
    """Whether a request's penalties read the counts of what it generated so far."""
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def choose_token(logits: torch.Tensor, counts: torch.Tensor | None, p: Generate, gen: torch.Generator,
                 prompt_ids: Sequence[int] = ()) -> int:
    """One token from one row of logits: penalties, then greedy (temperature 0) or top-k/top-p/min-p sampling.
    ``counts`` (how often each token was generated) is needed only when ``penalised(p)``."""
    if penalised(p):
        assert counts is not None, "a penalised request keeps its counts"
        logits = _penalties(logits, counts, p, prompt_ids)
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if 0 < p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= p.top_p  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0))
    if p.min_p > 0:  # drop tokens less likely than min_p times the most likely one
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0)
    return int(torch.multinomial(probs, 1, generator=gen))


def _penalties(logits: torch.Tensor, counts: torch.Tensor, p: Generate, prompt_ids: Sequence[int]) -> torch.Tensor:
    if p.repetition_penalty != 1.0:  # vLLM's (and HF's): on every token of prompt and output so far
        seen = counts > 0
        seen[[t for t in prompt_ids if t < seen.numel()]] = True
        scaled = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, scaled, logits)
    if p.presence_penalty or p.frequency_penalty:  # OpenAI's formula, on the counts generated so far
        logits = logits - counts * p.frequency_penalty - (counts > 0).to(logits.dtype) * p.presence_penalty
    return logits


def logprob_entry(logits: torch.Tensor, token: int, top: int, text: Callable[[int], str]) -> TokenLogprob:
    """The chosen token's log-probability (under the model, before penalties) and the ``top`` best ones."""
    logprobs = torch.log_softmax(logits, dim=-1)
    best = torch.topk(logprobs, top) if top else None
    return TokenLogprob(text(token), float(logprobs[token]), [] if best is None else [
        TopLogprob(text(int(i)), float(v)) for v, i in zip(best.values, best.indices)])


#: Prompt positions scored per step (their logits over the vocabulary are held at once).
PROMPT_CHUNK = 256


def prompt_logprobs(model: Any, ids: list[int], top: int, text: Callable[[int], str]) -> list[TokenLogprob]:
    """Each prompt token's logprob given the tokens before it, and the ``top`` best alternatives (blocking: one
    forward pass over the prompt). The first token has nothing before it: its logprob is None."""
    entries = [TokenLogprob(text(ids[0]), None)]
    head = model.get_output_embeddings()
    with torch.inference_mode():
        hidden = model.base_model(input_ids=torch.tensor([ids], device=model.device)).last_hidden_state[0]
        for start in range(0, len(ids) - 1, PROMPT_CHUNK):  # a chunk of positions at a time: never L x vocab
            logits = head(hidden[start:start + PROMPT_CHUNK]).float()
            entries += [logprob_entry(logits[i], ids[start + i + 1], top, text)
                        for i in range(min(PROMPT_CHUNK, len(ids) - 1 - start))]
    return entries


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own RNG: the same seed gives the same samples whatever else runs."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed % 2**64)
    return gen


