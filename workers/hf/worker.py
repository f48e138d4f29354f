"""HFWorker: ties a loaded model and its compute thread to the broker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from broker.protocol import FEATURES, Done, Embed, Embeddings, Event, Generate, Job, TokenLogprob, Usage
from broker.settings import Settings
from workers.base import BaseModelWorker, lora_adapters
from workers.errors import JobError
from workers.hf.embeddings import mean_pooled
from workers.hf.engine import BatchEngine, Emit
from workers.hf.grammar import Grammars
from workers.hf.loading import LoadedModel, LoadOptions, load_model, with_adapters
from workers.hf.sampling import prompt_logprobs
from workers.params import fitted
from workers.prompts import prompt_ids

log = logging.getLogger(__name__)


class HFWorker(BaseModelWorker):
    engine = "hf"
    features = FEATURES

    def __init__(self, redis_url: str, settings: Settings, models: list[str], *, worker_id: str | None = None,
                 model_path: str | None = None) -> None:
        #: ``--lora NAME=PATH``: each adapter is served as a model of its own, beside the base.
        self.adapters = lora_adapters(settings.lora)
        super().__init__(redis_url, settings, [*models, *self.adapters], worker_id=worker_id)
        # The directory: the argument, else the settings field, else the served name read as a path.
        self.model_path = Path(model_path or getattr(settings, "model_path", None) or models[0]).expanduser()
        self.loaded: LoadedModel | None = None
        self.batcher: BatchEngine | None = None
        self.grammars: Grammars | None = None

    async def setup(self) -> None:
        options = LoadOptions(self.settings.device, self.settings.dtype, self.settings.max_model_len,
                              self.settings.load_in)
        self.loaded = await asyncio.to_thread(load_model, self.model_path, options)
        self.loaded = await asyncio.to_thread(with_adapters, self.loaded, self.adapters)
        self.tokenizer = self.loaded.tokenizer
        self.record.context_length = self.loaded.context_length
        self.record.root = str(self.model_path)
        if self.loaded.causal:
            self.batcher = BatchEngine(self.loaded)
            self.batcher.start()
            self.grammars = await asyncio.to_thread(Grammars, self.loaded.tokenizer, self.loaded.vocab_size)
        log.info("hf worker loaded %s (%s, context %d, %s)", self.model_path,
                 "causal LM" if self.loaded.causal else "embeddings only", self.loaded.context_length,
                 self.loaded.device)

    async def teardown(self) -> None:
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.close)

    async def generate(self, job: Job) -> AsyncIterator[Event]:
        loaded, batcher = self.loaded, self.batcher
        assert loaded is not None
        if batcher is None:
            raise JobError(f"The model `{job.model}` serves embeddings only.", param="model", code="unsupported")
        ids = await asyncio.to_thread(prompt_ids, loaded.tokenizer, job)
        assert isinstance(job.params, Generate)
        params = fitted(job.params, job.kind, len(ids), loaded.context_length)
        grammar = None
        if params.structured is not None:  # compiled before the job joins the batch: a bad one costs nothing
            assert self.grammars is not None
            forced = params.tools and params.tool_choice in ("required", "function")
            grammar = await asyncio.to_thread(self.grammars.compile, params.structured,
                                              "tools" if forced else "response_format")
        events: asyncio.Queue[Any] = asyncio.Queue()
        gen = batcher.submit(ids, params, _threadsafe_put(asyncio.get_running_loop(), events), grammar,
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
        loaded = self.loaded
        assert loaded is not None
        if loaded.adapters:
            raise JobError("Prompt logprobs (echo with logprobs) are not available on a worker serving LoRA "
                           "adapters.", param="echo", code="unsupported_parameter")
        if not loaded.causal:
            raise JobError(f"The model `{job.model}` serves embeddings only.", param="model", code="unsupported")
        ids = await asyncio.to_thread(prompt_ids, loaded.tokenizer, job)
        return await asyncio.to_thread(prompt_logprobs, loaded.model, ids, top, _token_text(loaded.tokenizer))

    async def embed(self, job: Job) -> Embeddings:
        assert self.loaded is not None and isinstance(job.params, Embed)
        vectors, tokens = await asyncio.to_thread(mean_pooled, self.loaded, job.params.input)
        return Embeddings(vectors, Usage(tokens))

    def matryoshka(self) -> bool:
        config = self.loaded.model.config if self.loaded is not None else None
        return bool(getattr(config, "is_matryoshka", False) or getattr(config, "matryoshka_dimensions", None))


def _token_text(tokenizer: Any) -> Callable[[int], str]:
    return lambda token: tokenizer.decode([token])


def _threadsafe_put(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Any]) -> Emit:
    """What the compute thread calls to hand an event to a task on ``loop``."""

    def put(ev: Any) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, ev)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    return put
