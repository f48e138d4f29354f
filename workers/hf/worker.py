"""HFWorker: ties loaded models and their one compute thread to the broker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.protocol import FEATURES, Done, Embed, Embeddings, Event, Generate, Job, TokenLogprob, Usage
from broker.settings import Settings
from workers.base import BaseModelWorker, lora_adapters
from workers.errors import JobError
from workers.hf.embeddings import mean_pooled
from workers.hf.engine import BatchEngine, ComputeThread, Relay
from workers.hf.grammar import Grammars
from workers.hf.loading import LoadedModel, LoadOptions, load_model, with_adapters
from workers.hf.sampling import prompt_logprobs
from workers.params import fitted
from workers.prompts import prompt_ids

log = logging.getLogger(__name__)


@dataclass
class Held:
    """One model directory this worker holds: the weights, its batch (causal LMs) and its grammar compiler."""

    loaded: LoadedModel
    batcher: BatchEngine | None = None
    grammars: Grammars | None = None


class HFWorker(BaseModelWorker):
    """Serves one or more model directories (``--model NAME=PATH``, repeatable) and LoRA adapters of one.

    Every model has its own batch; one compute thread runs them all, a step of
    each busy model in turn, and each model keeps its own queue count in its
    sorted set.
    """

    engine = "hf"
    features = FEATURES

    def __init__(self, redis_url: str, settings: Settings, models: list[str], *, worker_id: str | None = None,
                 model_path: str | None = None) -> None:
        #: Served name -> model directory.
        self.sources = model_sources(models, model_path or getattr(settings, "model_path", None))
        #: ``--lora NAME=PATH``: each adapter is served as a model of its own, beside its base.
        self.adapters = lora_adapters(settings.lora)
        if self.adapters and len(self.sources) > 1:
            raise ValueError("--lora adapters need a worker of one base model (this one has "
                             f"{len(self.sources)}: {', '.join(self.sources)})")
        super().__init__(redis_url, settings, [*self.sources, *self.adapters], worker_id=worker_id)
        self.held: dict[str, Held] = {}
        self._compute: ComputeThread | None = None
        self._relay: Relay | None = None

    async def setup(self) -> None:
        options = LoadOptions(self.settings.device, self.settings.dtype, self.settings.max_model_len,
                              self.settings.load_in)
        self._compute = ComputeThread(f"hf-engine-{self.id}", self.settings.torch_threads)
        self._relay = self._compute.relay(asyncio.get_running_loop())
        for name, path in self.sources.items():
            loaded = await asyncio.to_thread(load_model, path, options)
            loaded = await asyncio.to_thread(with_adapters, loaded, self.adapters)
            held = self.held[name] = Held(loaded)
            if loaded.causal:
                held.batcher = BatchEngine(loaded, self._compute)
                held.grammars = await asyncio.to_thread(Grammars, loaded.tokenizer, loaded.vocab_size)
            log.info("hf worker loaded %s as %s (%s, context %d, %s)", path, name,
                     "causal LM" if loaded.causal else "embeddings only", loaded.context_length, loaded.device)
        first = next(iter(self.held.values())).loaded
        self.tokenizer = first.tokenizer  # the base's documented attribute: the first model's
        self.record.context_length, self.record.root = first.context_length, str(first.path)
        if len(self.held) > 1:
            self.record.contexts = {n: h.loaded.context_length for n, h in self.held.items()}
            self.record.roots = {n: str(h.loaded.path) for n, h in self.held.items()}
        self._compute.start()

    async def teardown(self) -> None:
        if self._compute is not None:
            await asyncio.to_thread(self._compute.close)

    def holding(self, model: str) -> Held:
        """What serves ``model``: its own directory, or the base an adapter rides on."""
        return self.held[model] if model in self.held else next(iter(self.held.values()))

    def tokenizer_of(self, model: str) -> Any:
        return self.holding(model).loaded.tokenizer if self.held else None

    async def generate(self, job: Job) -> AsyncIterator[Event]:
        held = self.holding(job.model)
        loaded, batcher = held.loaded, held.batcher
        if batcher is None:
            raise JobError(f"The model `{job.model}` serves embeddings only.", param="model", code="unsupported")
        ids = await asyncio.to_thread(prompt_ids, loaded.tokenizer, job)
        assert isinstance(job.params, Generate)
        params = fitted(job.params, job.kind, len(ids), loaded.context_length)
        grammar = None
        if params.structured is not None:  # compiled before the job joins the batch: a bad one costs nothing
            assert held.grammars is not None
            forced = params.tools and params.tool_choice in ("required", "function")
            grammar = await asyncio.to_thread(held.grammars.compile, params.structured,
                                              "tools" if forced else "response_format")
        events: asyncio.Queue[Any] = asyncio.Queue()
        assert self._relay is not None  # set up with the compute thread
        gen = batcher.submit(ids, params, self._relay.outlet(events), grammar,
                             job.model if job.model in self.adapters else None)
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if isinstance(ev, Done):
                    return
        finally:  # cancelled, closed early or done: the compute thread drops it within a step
            gen.cancel()

    async def prompt_logprobs(self, job: Job, top: int) -> list[TokenLogprob]:
        loaded = self.holding(job.model).loaded
        if loaded.adapters:
            raise JobError("Prompt logprobs (echo with logprobs) are not available on a worker serving LoRA "
                           "adapters.", param="echo", code="unsupported_parameter")
        if not loaded.causal:
            raise JobError(f"The model `{job.model}` serves embeddings only.", param="model", code="unsupported")
        ids = await asyncio.to_thread(prompt_ids, loaded.tokenizer, job)
        return await asyncio.to_thread(prompt_logprobs, loaded.model, ids, top, _token_text(loaded.tokenizer))

    async def embed(self, job: Job) -> Embeddings:
        assert isinstance(job.params, Embed)
        vectors, tokens = await asyncio.to_thread(mean_pooled, self.holding(job.model).loaded, job.params.input)
        return Embeddings(vectors, Usage(tokens))

    def matryoshka(self, model: str) -> bool:
        config = self.holding(model).loaded.model.config if self.held else None
        return bool(getattr(config, "is_matryoshka", False) or getattr(config, "matryoshka_dimensions", None))


def model_sources(models: list[str], model_path: str | None) -> dict[str, Path]:
    """``--model NAME=PATH`` (repeatable) as {name: directory}. A bare NAME is read from ``--model-path`` when
    it is the only model, else as a path itself."""
    sources: dict[str, Path] = {}
    for spec in models:
        name, sep, path = spec.partition("=")
        if sep and not (name and path):
            raise ValueError(f"--model wants NAME or NAME=PATH, got {spec!r}")
        if not sep:
            path = model_path if model_path and len(models) == 1 else name
        if name in sources:
            raise ValueError(f"--model {name} is given twice")
        sources[name] = Path(path).expanduser()
    return sources


def _token_text(tokenizer: Any) -> Callable[[int], str]:
    return lambda token: tokenizer.decode([token])

