"""The compute thread: one thread owns the model and runs every live sequence in one forward pass per step."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from broker.protocol import ChoiceEnd, Delta, Done, Generate, TokenLogprob, Usage
from workers.hf.grammar import Masks, matcher
from workers.hf.kv import KVBatch, cache_keyword, forward_parameters
from workers.hf.loading import LoadedModel
from workers.hf.sampling import choose_token, logprob_entry, new_generator, penalised
from workers.hf.text import IncrementalDecoder
from workers.params import max_tokens
from workers.stops import StopMatcher

log = logging.getLogger(__name__)

Emit = Callable[[Any], None]


@dataclass(eq=False)
class Generation:
    """One request as the compute thread sees it; ``cancel`` is the event loop's way to stop it."""

    prompt_ids: list[int]
    #: Fitted: ``max_tokens`` is set.
    params: Generate
    #: Called on the compute thread with each protocol event (or an exception) for the request's task.
    emit: Emit
    generator: torch.Generator
    #: The compiled constraint every choice's output must match (xgrammar), if any.
    grammar: Any = None
    #: The LoRA adapter this request runs through (None: the base model).
    adapter: str | None = None
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
    #: How often each token was generated: kept only for a request whose penalties read it.
    counts: torch.Tensor | None
    #: Where ``grammar`` allows this sequence to go next (one matcher per sequence).
    matcher: Any = None
    tokens: int = 0
    #: Tokens and logprobs produced since the last delta (text may be held back).
    pending: int = 0
    pending_lp: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False


class Relay:
    """Events from the compute thread to one event loop, gathered over a round and handed over at its end.

    One ``call_soon_threadsafe`` a round rather than one an event: each
    wakes the loop through its self-pipe, which at eight sequences cost
    more than sampling them. Events are delivered in the order they were made.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._held: list[tuple[asyncio.Queue[Any], Any]] = []

    def outlet(self, events: asyncio.Queue[Any]) -> Emit:
        """What the compute thread calls with each event of one request (called on that thread only)."""
        return lambda ev: self._held.append((events, ev))

    def flush(self) -> None:
        """Hand the round's events to the loop (on the compute thread, at the end of each round)."""
        if not self._held:
            return
        held, self._held = self._held, []
        try:
            self.loop.call_soon_threadsafe(_deliver, held)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _deliver(held: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for events, ev in held:
        events.put_nowait(ev)


class ComputeThread:
    """The one thread that owns the models of a worker and runs their steps.

    Each round: admit (prefill) what arrived, then one step of each model
    that has live sequences, in turn, then hand the round's events to their
    loops. A worker serving several models shares this thread fairly, one
    decode step per busy model per round; a request waits at most one round
    to join. ``threads``: torch's intra-op threads for this thread's work
    (None: torch's default, one per core), set on the thread itself, where
    OpenMP keeps it.
    """

    def __init__(self, name: str, threads: int | None = None) -> None:
        self._inbox: queue.SimpleQueue[tuple[BatchEngine, Generation] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._engines: list[BatchEngine] = []
        self._relays: tuple[Relay, ...] = ()
        self._relays_lock = threading.Lock()
        self._threads = threads

    def attach(self, engine: BatchEngine) -> None:
        """Before ``start``: one more model whose steps this thread runs."""
        self._engines.append(engine)

    def relay(self, loop: asyncio.AbstractEventLoop) -> Relay:
        """The relay to ``loop`` (made on first use; call it on that loop)."""
        with self._relays_lock:
            for r in self._relays:
                if r.loop is loop:
                    return r
            made = Relay(loop)
            self._relays = (*self._relays, made)  # one assignment: the compute thread reads either tuple whole
            return made

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the thread after its current round (blocking: call it in a thread)."""
        self._inbox.put(None)
        self._thread.join()

    def submit(self, engine: BatchEngine, gen: Generation) -> None:
        self._inbox.put((engine, gen))

    def _run(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        with torch.inference_mode():
            while self._round():
                pass

    def _round(self) -> bool:
        """Admit what arrived, one step of each busy model, hand over the events; False once closed. A round that
        admitted something hands over its first tokens before the steps too, so they wait for no decode step."""
        try:
            arrivals = self._arrivals(wait=not any(e.busy for e in self._engines))
            for item in arrivals:
                if item is None:
                    return False
                engine, gen = item
                engine._guarded([gen], engine._admit, gen)
            if arrivals:
                self._flush()
            for engine in self._engines:
                engine._tick()
            return True
        finally:
            self._flush()

    def _flush(self) -> None:
        for relay in self._relays:
            relay.flush()

    def _arrivals(self, *, wait: bool) -> list[tuple[BatchEngine, Generation] | None]:
        arrived = [self._inbox.get()] if wait else []
        while not self._inbox.empty():
            arrived.append(self._inbox.get_nowait())
        return arrived


class BatchEngine:
    """One model's batch: every live sequence of it runs in one forward pass per step.

    Each step: drop what was cancelled, one batched decode forward, sample
    each row with its own parameters, retire what finished. The steps run on
    ``thread``, shared with the other models of the worker; its owner starts
    and closes it.
    """

    def __init__(self, loaded: LoadedModel, thread: ComputeThread) -> None:
        self.loaded = loaded
        self.thread = thread
        thread.attach(self)
        self._batch = KVBatch(loaded.device, cache_keyword(loaded.model))
        self._choices: list[_Choice] = []
        self._prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(loaded.model) else {}
        #: Observability (read from the event loop): sequences running now, the most at once, tokens made.
        self.active = 0
        self.max_batch_size = 0
        self.tokens_generated = 0
        self._masks = Masks(loaded.vocab_size)
        self._eos = torch.tensor(sorted(loaded.eos_ids), dtype=torch.long, device=loaded.device)

    @property
    def busy(self) -> bool:
        """Whether a sequence of this model is live (the thread must not sleep)."""
        return bool(self._choices)

    def submit(self, prompt_ids: list[int], params: Generate, emit: Emit, grammar: Any = None,
               adapter: str | None = None) -> Generation:
        gen = Generation(prompt_ids, params, emit, new_generator(params.seed, self.loaded.device), grammar, adapter)
        self.thread.submit(self, gen)
        return gen

    # --- one round of the compute thread ------------------------------------------
    def _tick(self) -> None:
        """Drop what was cancelled, then one decode step of what is left."""
        self._retire([i for i, c in enumerate(self._choices) if not c.gen.cancelled.is_set()])
        if self._choices:
            self._guarded(list({c.gen: None for c in self._choices}), self._step)

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
        out = self.loaded.model(input_ids=ids, use_cache=True, **{self._batch.cache_keyword: cache},
                                **self._prefill_kwargs, **self._adapters([gen]))
        raw = out.logits[:, -1].float()  # one row
        choices = [self._new_choice(gen, i, raw.shape[-1]) for i in range(gen.params.n)]
        logits = raw
        if gen.grammar is not None:  # every choice starts in the same state: one mask for all
            logits = raw.clone()
            self._masks.apply(logits, [(0, choices[0].matcher)])
        gen.running = len(choices)
        tokens = [self._advance(c, self._choose(c, logits[0]), raw, 0) for c in choices]
        live = [(c, t) for c, t in zip(choices, tokens) if not c.finished]
        if live:
            self._batch.add(cache, len(gen.prompt_ids), [t for _, t in live])
            self._choices += [c for c, _ in live]
            self._observe()

    def _new_choice(self, gen: Generation, index: int, vocab: int) -> _Choice:
        p = gen.params
        return _Choice(gen, index, IncrementalDecoder(self.loaded.tokenizer, skip_special=p.skip_special_tokens),
                       StopMatcher(p.stop, include=p.include_stop_str_in_output),
                       torch.zeros(vocab, device=self.loaded.device) if penalised(p) else None,
                       None if gen.grammar is None else matcher(gen.grammar))

    def _step(self) -> None:
        logits = self._batch.forward(self.loaded.model, **self._adapters([c.gen for c in self._choices]))
        constrained = [(row, c.matcher) for row, c in enumerate(self._choices) if c.matcher is not None]
        # Logprobs are the model's, before the grammar masks a row: kept aside only when a constrained row wants them.
        raw = logits.clone() if any(self._choices[row].gen.params.logprobs is not None for row, _ in constrained) \
            else logits
        self._masks.apply(logits, constrained)
        # Rows whose choice is the row's argmax as it stands (greedy, nothing to adjust): one argmax for them all.
        plain = [self._plain(c) for c in self._choices]
        best = logits.argmax(dim=-1).tolist() if any(plain) else []
        self._batch.set_tokens([self._advance(c, best[row] if plain[row] else self._choose(c, logits[row]), raw, row)
                                for row, c in enumerate(self._choices)])
        self._retire([i for i, c in enumerate(self._choices) if not c.finished])

    def _adapters(self, gens: list[Generation]) -> dict[str, Any]:
        """PEFT's mixed-adapter batch: each row names its LoRA adapter (``__base__`` for none), so requests for
        different adapters and the base model share one forward pass."""
        if not self.loaded.adapters:
            return {}
        return {"adapter_names": [g.adapter or "__base__" for g in gens]}

    def _retire(self, keep: list[int]) -> None:
        if len(keep) != len(self._choices):
            self._batch.keep(keep)
            self._choices = [self._choices[i] for i in keep]
            self._observe()

    def _observe(self) -> None:
        self.active = len(self._choices)
        self.max_batch_size = max(self.max_batch_size, self.active)

    # --- one token of one sequence ------------------------------------------------
    def _plain(self, c: _Choice) -> bool:
        """Whether ``c``'s next token is simply the argmax of its (grammar-masked) logits."""
        p = c.gen.params
        return p.temperature == 0 and c.counts is None and not p.logit_bias and not self._holds_end(c)

    def _holds_end(self, c: _Choice) -> bool:
        """Whether ``min_tokens`` still keeps ``c`` from ending (under a grammar, the grammar says where it may)."""
        return c.tokens < c.gen.params.min_tokens and c.matcher is None

    def _choose(self, c: _Choice, logits: torch.Tensor) -> int:
        """``c``'s next token from its row of ``logits``, with the request's own parameters and RNG."""
        return choose_token(self._adjusted(c, logits), c.counts, c.gen.params, c.gen.generator, c.gen.prompt_ids)

    def _advance(self, c: _Choice, token: int, raw: torch.Tensor, row: int) -> int:
        """Take ``token`` as ``c``'s next and emit what it makes safe to show; row ``row`` of ``raw`` (the model's
        own logits) gives its logprobs. Returns the token."""
        p = c.gen.params
        if c.matcher is not None and not c.matcher.accept_token(token):  # cannot happen under the mask: never
            log.error("grammar refused token %d of a constrained sequence; ending it", token)  # emit it anyway
            self._finish(c, "stop")
            return token
        if c.counts is not None:
            c.counts[token] += 1
        c.tokens += 1
        c.pending += 1
        c.gen.completion_tokens += 1
        self.tokens_generated += 1
        if p.logprobs is not None:
            c.pending_lp.append(logprob_entry(raw[row], token, p.logprobs, self._token_text))
        finish: str | None
        if (token in self.loaded.eos_ids and not p.ignore_eos) or token in p.stop_token_ids \
                or (c.matcher is not None and c.matcher.is_terminated()):
            piece, finish = c.decoder.flush(), "stop"
        else:
            piece = c.decoder.push(token)
            finish = "length" if c.tokens >= max_tokens(p) else None
            piece += c.decoder.flush() if finish else ""
        text, stopped = c.stops.feed(piece)
        if stopped:
            finish = "stop"
        elif finish:
            text += c.stops.flush()
        if text or (finish and c.pending_lp):  # the last tokens' logprobs go out even without text
            c.gen.emit(Delta(c.index, text, c.pending, c.pending_lp if p.logprobs is not None else None))
            c.pending, c.pending_lp = 0, []
        if finish:
            self._finish(c, finish)
        return token

    def _adjusted(self, c: _Choice, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with the request's biases: ``logit_bias``, and no end before ``min_tokens``."""
        p = c.gen.params
        if p.logit_bias:
            logits = logits.clone()
            for token, bias in p.logit_bias.items():
                if token < logits.numel():
                    logits[token] += bias
        if self._holds_end(c):
            logits = logits.clone()
            logits[self._eos] = float("-inf")
            stops = [t for t in p.stop_token_ids if t < logits.numel()]
            if stops:
                logits[stops] = float("-inf")
        return logits

    def _finish(self, c: _Choice, reason: str) -> None:
        c.finished = True
        c.gen.emit(ChoiceEnd(c.index, reason))
        c.gen.running -= 1
        if c.gen.running == 0:
            c.gen.emit(Done(Usage(len(c.gen.prompt_ids), c.gen.completion_tokens)))

    def _token_text(self, token: int) -> str:
        return self.loaded.tokenizer.decode([token])

