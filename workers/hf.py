"""HFWorker: serves a local Hugging Face model directory, batching whatever runs at the same time.

Why a hand-written decode loop rather than ``model.generate``: every request
must stream token by token, stop within one step when its client goes away,
and share *one* batched forward pass with every other running request
(continuous batching). One compute thread owns the model; the event loop only
tokenises, validates and relays events, so heartbeats and job reads never wait
on compute.

A directory whose architecture is not a causal LM (a BERT sentence encoder,
say) is served for embeddings only; chat and completions then answer 400.

The sections below, in the order a request meets them: loading, prompts,
sampling, token-to-text, the batched KV cache, the compute thread, and the
worker that ties them to the broker. Parameter validation is shared with the
other engines, in ``workers/params.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from broker.protocol import Job, JobKind, choice_end, delta, done, embeddings
from broker.settings import Settings
from workers.base import BaseModelWorker, JobError
from workers.params import SamplingParams, sampling_params
from workers.prompts import prompt_ids
from workers.stops import StopMatcher

log = logging.getLogger(__name__)

#: Architecture name endings that mean "decoder-only LM we can generate with".
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
#: Inputs embedded per forward pass, to bound memory on long input lists.
EMBED_CHUNK = 32


# --- loading -------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model directory in memory, with what serving it needs to know."""

    path: Path
    tokenizer: Any
    model: Any
    causal: bool
    device: torch.device
    #: Longest prompt + completion (or embedding input) in tokens.
    context_length: int
    eos_ids: frozenset[int] = frozenset()


def is_causal_lm(config: Any) -> bool:
    return any(a.endswith(CAUSAL_SUFFIXES) for a in getattr(config, "architectures", None) or [])


def load_model(path: Path) -> LoadedModel:
    """Load tokenizer and model (blocking: call it in a thread)."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    causal = is_causal_lm(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:  # batched embedding pads; any token will do under the mask
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model_cls = AutoModelForCausalLM if causal else AutoModel
    # transformers types .to() through PreTrainedModel's decorator, which mypy reads as wanting a model
    model = model_cls.from_pretrained(path, local_files_only=True, dtype="auto").to(device).eval()  # type: ignore[arg-type]
    return LoadedModel(
        path=path, tokenizer=tokenizer, model=model, causal=causal, device=device,
        context_length=model_context_length(path, config, tokenizer),
        eos_ids=frozenset(_ids(getattr(config, "eos_token_id", None), tokenizer.eos_token_id,
                               getattr(getattr(model, "generation_config", None), "eos_token_id", None))),
    )


def model_context_length(path: Path, config: Any, tokenizer: Any) -> int:
    """The model's window; a sentence-transformers directory may declare a shorter one it was trained for."""
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        declared = json.loads(st_config.read_text()).get("max_seq_length")
        if declared:
            return int(declared)
    for n in (getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)):
        if isinstance(n, int) and 0 < n < 10**7:  # tokenizers say 1e30 when they do not know
            return n
    raise ValueError(f"cannot tell the context length of {path}: no max_position_embeddings in config.json")


def _ids(*values: int | list[int] | None) -> Iterable[int]:
    for v in values:
        if isinstance(v, int):
            yield v
        elif v:
            yield from v


# --- sampling ---------------------------------------------------------------------------
def choose_token(logits: torch.Tensor, counts: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """One token from one row of logits: penalties, then greedy (temperature 0) or top-k/top-p sampling."""
    if p.presence_penalty or p.frequency_penalty:  # OpenAI's formula, on the counts generated so far
        logits = logits - counts * p.frequency_penalty - (counts > 0).to(logits.dtype) * p.presence_penalty
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
    return int(torch.multinomial(probs, 1, generator=gen))


def logprob_entry(logits: torch.Tensor, token: int, top: int, text: Callable[[int], str]) -> dict[str, Any]:
    """The chosen token's log-probability (under the model, before penalties) and the ``top`` best ones."""
    logprobs = torch.log_softmax(logits, dim=-1)
    alternatives = torch.topk(logprobs, top) if top else None
    return {
        "token": text(token), "logprob": float(logprobs[token]),
        "top_logprobs": [] if alternatives is None else [
            {"token": text(int(i)), "logprob": float(v)} for v, i in zip(alternatives.values, alternatives.indices)],
    }


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own RNG: the same seed gives the same samples whatever else runs."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed % 2**64)
    return gen


# --- token ids -> text ---------------------------------------------------------------------
class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that never split a character.

    Byte-level tokens may hold part of a UTF-8 character; text is released
    only once it decodes without a trailing replacement character. Decoding
    from a short window (``prefix``) keeps each step O(1) and lets tokenizers
    that depend on the left context (leading spaces) decode correctly.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is left, even an incomplete character, once the sequence ended."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        seen = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(seen) and (final or not text.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(seen):]
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


# --- the batched KV cache --------------------------------------------------------------------
class KVBatch:
    """The running sequences' KV cache, left-padded to one length so one forward serves them all.

    Rows join after their own prefill (padded on the left to the batch's
    length) and leave when they finish; columns that became padding in every
    row are trimmed, so the cache stays as long as its longest live sequence.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.clear()

    def clear(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # 1 = a real cached token
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # next position of each row
        self.tokens = torch.zeros(0, dtype=torch.long, device=self.device)  # next input token of each row

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def add(self, cache: DynamicCache, length: int, tokens: list[int]) -> None:
        """Append ``len(tokens)`` rows that share one prefilled single-row ``cache`` of ``length`` tokens."""
        rows = len(tokens)
        _map_kv(cache, lambda t: t.expand(rows, *t.shape[1:]).contiguous())
        mask = torch.ones(rows, length, dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            width = max(self.mask.shape[1], length)
            # The layers are DynamicLayers, filled: keys and values are tensors (their type says maybe not).
            for old, new in zip(self.cache.layers, cache.layers):
                old.keys = torch.cat([_pad_kv(old.keys, width), _pad_kv(new.keys, width)])  # type: ignore[union-attr,arg-type]
                old.values = torch.cat([_pad_kv(old.values, width), _pad_kv(new.values, width)])  # type: ignore[union-attr,arg-type]
            self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(mask, width)])
        self.positions = torch.cat([self.positions, torch.full((rows,), length, device=self.device)])
        self.tokens = torch.cat([self.tokens, torch.tensor(tokens, dtype=torch.long, device=self.device)])

    def forward(self, model: Any) -> torch.Tensor:
        """One decode step for every row; returns the next-token logits, one row each."""
        mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        out = model(input_ids=self.tokens[:, None], attention_mask=mask, position_ids=self.positions[:, None],
                    past_key_values=self.cache, use_cache=True)
        self.mask, self.positions = mask, self.positions + 1
        return out.logits[:, -1].float()

    def set_tokens(self, tokens: list[int]) -> None:
        self.tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order), then drop the columns no row uses any more."""
        if not rows:
            self.clear()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.mask, self.positions, self.tokens = self.mask[index], self.positions[index], self.tokens[index]
        unused = int(self.mask.any(dim=0).long().argmax())  # leading all-padding columns
        self.mask = self.mask[:, unused:]
        _map_kv(self.cache, lambda t: t[index, :, unused:])  # type: ignore[arg-type]


def _map_kv(cache: DynamicCache, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    # The layers are DynamicLayers, filled: keys and values are tensors (their type says maybe not).
    for layer in cache.layers:
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)  # type: ignore[union-attr,arg-type]


def _pad_kv(t: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(t, (0, 0, width - t.shape[-2], 0))  # [batch, heads, seq, dim]: pad seq on the left


def _pad_mask(t: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(t, (width - t.shape[-1], 0))


# --- the compute thread --------------------------------------------------------------------
Emit = Callable[[Any], None]


@dataclass(eq=False)
class Generation:
    """One request as the compute thread sees it; ``cancel`` is the event loop's way to stop it."""

    prompt_ids: list[int]
    params: SamplingParams
    #: Thread-safe: hands a protocol event (or an exception) to the request's task.
    emit: Emit
    generator: torch.Generator
    cancelled: threading.Event = field(default_factory=threading.Event)
    running: int = 0
    completion_tokens: int = 0

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class _Choice:
    """One sequence of the batch: choice ``index`` of a request."""

    gen: Generation
    index: int
    decoder: IncrementalDecoder
    stops: StopMatcher
    counts: torch.Tensor
    tokens: int = 0
    #: Tokens and logprobs produced since the last delta (text may be held back).
    pending: int = 0
    pending_lp: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


class BatchEngine:
    """One thread that owns the model and runs every live sequence in one forward pass per step.

    Each step: admit (prefill) what arrived, drop what was cancelled, one
    batched decode forward, sample each row with its own parameters, retire
    what finished. A request waits at most one step to join.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._inbox: queue.SimpleQueue[Generation | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"hf-engine-{loaded.path.name}", daemon=True)
        self._batch = KVBatch(loaded.device)
        self._choices: list[_Choice] = []
        forward = inspect.signature(loaded.model.forward).parameters
        self._prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        #: Observability (read from the event loop): sequences running now, the most at once, tokens made.
        self.active = 0
        self.max_batch_size = 0
        self.tokens_generated = 0

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the thread after its current step (blocking: call it in a thread)."""
        self._inbox.put(None)
        self._thread.join()

    def submit(self, prompt_ids: list[int], params: SamplingParams, emit: Emit) -> Generation:
        gen = Generation(prompt_ids, params, emit, new_generator(params.seed, self.loaded.device))
        self._inbox.put(gen)
        return gen

    # --- the loop ----------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                for gen in self._arrivals(wait=not self._choices):
                    if gen is None:
                        return
                    self._guarded([gen], self._admit, gen)
                self._retire([i for i, c in enumerate(self._choices) if not c.gen.cancelled.is_set()])
                if self._choices:
                    self._guarded(list({c.gen: None for c in self._choices}), self._step)

    def _arrivals(self, *, wait: bool) -> list[Generation | None]:
        arrived = [self._inbox.get()] if wait else []
        while not self._inbox.empty():
            arrived.append(self._inbox.get_nowait())
        return arrived

    def _guarded(self, gens: list[Generation], fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn``; if it fails, fail ``gens`` (and drop them) rather than the thread."""
        try:
            fn(*args)
        except Exception as exc:
            log.exception("engine step failed")
            if len(self._batch) != len(self._choices):  # the batch itself broke: nothing in it can go on
                gens = [*gens, *(c.gen for c in self._choices)]
                self._batch.clear()
                self._choices = []
            failed = set(gens)
            for g in failed:
                g.cancel()
                g.emit(exc)
            self._retire([i for i, c in enumerate(self._choices) if c.gen not in failed])
            self._observe()

    def _admit(self, gen: Generation) -> None:
        """Prefill one request, sample each choice's first token, and join the batch with what is left."""
        if gen.cancelled.is_set():
            return
        cache = DynamicCache()
        ids = torch.tensor([gen.prompt_ids], dtype=torch.long, device=self.loaded.device)
        out = self.loaded.model(input_ids=ids, past_key_values=cache, use_cache=True, **self._prefill_kwargs)
        logits = out.logits[0, -1].float()
        choices = [self._new_choice(gen, i, logits.numel()) for i in range(gen.params.n)]
        gen.running = len(choices)
        tokens = [self._advance(c, logits) for c in choices]
        live = [(c, t) for c, t in zip(choices, tokens) if not c.finished]
        if live:
            self._batch.add(cache, len(gen.prompt_ids), [t for _, t in live])
            self._choices += [c for c, _ in live]
            self._observe()

    def _new_choice(self, gen: Generation, index: int, vocab: int) -> _Choice:
        return _Choice(gen, index, IncrementalDecoder(self.loaded.tokenizer), StopMatcher(gen.params.stop),
                       torch.zeros(vocab, device=self.loaded.device))

    def _step(self) -> None:
        logits = self._batch.forward(self.loaded.model)
        self._batch.set_tokens([self._advance(c, logits[row]) for row, c in enumerate(self._choices)])
        self._retire([i for i, c in enumerate(self._choices) if not c.finished])

    def _retire(self, keep: list[int]) -> None:
        if len(keep) != len(self._choices):
            self._batch.keep(keep)
            self._choices = [self._choices[i] for i in keep]
            self._observe()

    def _observe(self) -> None:
        self.active = len(self._choices)
        self.max_batch_size = max(self.max_batch_size, self.active)

    # --- one token of one sequence ------------------------------------------------
    def _advance(self, c: _Choice, logits: torch.Tensor) -> int:
        """Sample ``c``'s next token and emit what it makes safe to show; returns the token."""
        p = c.gen.params
        token = choose_token(logits, c.counts, p, c.gen.generator)
        c.counts[token] += 1
        c.tokens += 1
        c.pending += 1
        c.gen.completion_tokens += 1
        self.tokens_generated += 1
        if p.logprobs is not None:
            c.pending_lp.append(logprob_entry(logits, token, p.logprobs, self._token_text))
        finish: str | None
        if token in self.loaded.eos_ids:
            piece, finish = c.decoder.flush(), "stop"
        else:
            piece = c.decoder.push(token)
            finish = "length" if c.tokens >= p.max_tokens else None
            piece += c.decoder.flush() if finish else ""
        text, stopped = c.stops.feed(piece)
        if stopped:
            finish = "stop"
        elif finish:
            text += c.stops.flush()
        if text or (finish and c.pending_lp):  # the last tokens' logprobs go out even without text
            c.gen.emit(delta(c.index, text, c.pending, c.pending_lp if p.logprobs is not None else None))
            c.pending, c.pending_lp = 0, []
        if finish:
            self._finish(c, finish)
        return token

    def _finish(self, c: _Choice, reason: str) -> None:
        c.finished = True
        c.gen.emit(choice_end(c.index, reason))
        c.gen.running -= 1
        if c.gen.running == 0:
            c.gen.emit(done(len(c.gen.prompt_ids), c.gen.completion_tokens))

    def _token_text(self, token: int) -> str:
        return self.loaded.tokenizer.decode([token])


# --- embeddings ------------------------------------------------------------------------------
def mean_pooled(loaded: LoadedModel, texts: list[str]) -> tuple[list[list[float]], int]:
    """L2-normalised mean of the last hidden states (blocking); returns vectors and input tokens."""
    vectors: list[list[float]] = []
    tokens = 0
    with torch.inference_mode():
        for start in range(0, len(texts), EMBED_CHUNK):
            enc = loaded.tokenizer(texts[start:start + EMBED_CHUNK], padding=True, return_tensors="pt")
            if enc["input_ids"].shape[1] > loaded.context_length:
                raise JobError(f"An input is longer than this model's maximum of {loaded.context_length} tokens.",
                               param="input", code="context_length_exceeded")
            enc = enc.to(loaded.device)
            hidden = loaded.model.base_model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
            vectors += F.normalize(mean, dim=-1).cpu().tolist()
            tokens += int(enc["attention_mask"].sum())
    return vectors, tokens


# --- the worker ---------------------------------------------------------------------------------
class HFWorker(BaseModelWorker):
    engine = "hf"

    def __init__(self, settings: Settings, models: list[str], *, worker_id: str | None = None,
                 model_path: str | None = None) -> None:
        super().__init__(settings, models, worker_id=worker_id)
        # The directory: the argument, else the settings field, else the served name read as a path.
        self.model_path = Path(model_path or getattr(settings, "model_path", None) or models[0]).expanduser()
        self.loaded: LoadedModel | None = None
        self.batcher: BatchEngine | None = None

    async def setup(self) -> None:
        self.loaded = await asyncio.to_thread(load_model, self.model_path)
        self.record.context_length = self.loaded.context_length
        if self.loaded.causal:
            self.batcher = BatchEngine(self.loaded)
            self.batcher.start()
        log.info("hf worker loaded %s (%s, context %d, %s)", self.model_path,
                 "causal LM" if self.loaded.causal else "embeddings only", self.loaded.context_length,
                 self.loaded.device)

    async def teardown(self) -> None:
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.close)

    async def generate(self, job: Job) -> AsyncIterator[dict[str, Any]]:
        loaded, batcher = self.loaded, self.batcher
        assert loaded is not None
        if batcher is None:
            raise JobError(f"The model `{job.model}` serves embeddings only.", param="model", code="unsupported")
        ids = await asyncio.to_thread(prompt_ids, loaded.tokenizer, job)
        params = sampling_params(job.params, job.kind, len(ids), loaded.context_length)
        events: asyncio.Queue[Any] = asyncio.Queue()
        gen = batcher.submit(ids, params, _threadsafe_put(asyncio.get_running_loop(), events))
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if ev["t"] == "done":
                    return
        finally:  # cancelled, closed early or done: the compute thread drops it within a step
            gen.cancel()

    async def tokenize(self, job: Job) -> tuple[int, list[int] | None]:
        assert self.loaded is not None
        as_prompt = dataclasses.replace(job, kind=JobKind.CHAT if "messages" in job.params else JobKind.COMPLETION)
        ids = await asyncio.to_thread(prompt_ids, self.loaded.tokenizer, as_prompt)
        return len(ids), ids

    async def embed(self, job: Job) -> dict[str, Any]:
        assert self.loaded is not None
        texts = job.params.get("input")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise JobError("`input` must be a string or a non-empty list of strings.", param="input")
        vectors, tokens = await asyncio.to_thread(mean_pooled, self.loaded, texts)
        return embeddings(vectors, tokens)


def _threadsafe_put(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Any]) -> Emit:
    """What the compute thread calls to hand an event to a task on ``loop``."""

    def put(ev: Any) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, ev)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    return put
