"""VLLMWorker: serves a model through vLLM's V1 engine (``AsyncLLM``), like FastChat's VLLMWorker.

Why vLLM behind redserve: vLLM brings paged attention, continuous batching
and CUDA kernels; redserve brings dispatch, liveness and the OpenAI API. This
module only translates between the two: a job becomes a token-id prompt plus
``vllm.SamplingParams``, and vLLM's streamed ``RequestOutput`` deltas become
protocol events. vLLM does the sampling, stop strings (never leaked: its
detokenizer holds back a possible stop's prefix) and batching itself.

Everything that touches vLLM sits in ``VLLMEngine``, so the contract is one
short list (``tests/test_vllm_contract.py`` holds a stand-in to exactly it,
because vLLM needs a GPU that CI lacks):

- ``AsyncEngineArgs(model=..., **extra)`` and ``AsyncLLM.from_engine_args(args)``;
- ``llm.model_config.max_model_len`` and ``llm.model_config.runner_type``
  (``"pooling"`` for an embedding model);
- ``llm.get_tokenizer()`` (a coroutine before vLLM 0.11, a plain call since);
- ``llm.generate(prompt, sampling_params, request_id)``: an async generator of
  ``RequestOutput`` with ``.prompt_token_ids`` and ``.outputs[i]`` holding
  ``.index``, ``.text``, ``.token_ids``, ``.finish_reason`` and ``.logprobs``
  (a list, per token, of ``{token_id: Logprob(logprob, rank, decoded_token)}``);
- ``SamplingParams(n, temperature, top_p, top_k, seed, presence_penalty,
  frequency_penalty, max_tokens, stop, logprobs, output_kind)`` with
  ``output_kind=RequestOutputKind.DELTA`` (each output carries only new text);
- ``llm.abort(request_id)``, ``llm.shutdown()``;
- ``llm.encode(prompt, PoolingParams(task="embed"), request_id)``: an async
  generator of ``PoolingRequestOutput`` with ``.outputs.data`` (a tensor) and
  ``.prompt_token_ids``.

Prompts are always ``{"prompt_token_ids": [...]}`` (``vllm.inputs.TokensPrompt``):
redserve tokenises (chat template included) so it can check the context length
and count prompt tokens itself, exactly as the transformers engine does.

Which runner vLLM uses is vLLM's call (``runner="auto"``): a model whose
architecture does not generate (a BERT sentence encoder, say) is started as a
pooling model and serves embeddings only; chat and completions then answer
400. Extra engine arguments (``gpu_memory_utilization``, ``tensor_parallel_size``,
``runner``, ...) come from the ``vllm_engine_args`` setting, a JSON object.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.errors import ServeError
from broker.protocol import (
    FEATURES,
    ChoiceEnd,
    Delta,
    Done,
    Embed,
    Embeddings,
    Event,
    Generate,
    Job,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from broker.settings import Settings
from workers.base import BaseModelWorker, lora_adapters
from workers.errors import JobError
from workers.params import fitted, inputs_fit, l2_normalised
from workers.prompts import prompt_ids

log = logging.getLogger(__name__)

#: vLLM's finish reasons that end a choice normally; anything else ("abort", "error") fails the request.
FINISH_REASONS = frozenset({"stop", "length"})


def vllm_classes() -> dict[str, Any]:
    """vLLM's request classes, imported only here, so this module imports without vLLM.

    ``client_error`` is what vLLM (0.33) raises for a request it refuses, ``VLLMClientError``
    (``VLLMValidationError`` is one), no longer a ``ValueError``; ``vllm_error`` is the base of its own
    errors, some of which carry their HTTP status (``QueueOverflowError``: 503).
    """
    from vllm import PoolingParams
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.exceptions import VLLMClientError, VLLMError
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    return {"sampling_params": VLLMSamplingParams, "pooling_params": PoolingParams, "delta": RequestOutputKind.DELTA,
            "structured_outputs": StructuredOutputsParams, "client_error": VLLMClientError, "vllm_error": VLLMError,
            "lora_request": LoRARequest}


# --- the adapter: every vLLM name this worker uses ---------------------------------------
@dataclass(eq=False)
class _Pending:
    """A choice's tokens (and their logprobs) produced since its last delta: vLLM may hold text back."""

    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


class VLLMEngine:
    """A running ``AsyncLLM`` and the vLLM classes requests to it are built from.

    ``start`` builds the real one; the contract test builds one around a
    stand-in ``llm`` and stand-in classes, which is why they are arguments.
    """

    def __init__(self, llm: Any, *, sampling_params: Any, pooling_params: Any, delta: Any, structured_outputs: Any,
                 client_error: type[Exception], vllm_error: type[Exception], lora_request: Any) -> None:
        self.llm = llm
        self._sampling_params = sampling_params
        self._pooling_params = pooling_params
        self._delta = delta
        self._structured_outputs = structured_outputs
        self._lora_request = lora_request
        #: What vLLM raises when it refuses a request: a 400, never a 500.
        self.refusals: tuple[type[Exception], ...] = (ValueError, client_error)
        #: Every error of vLLM's own, and what older vLLM raised for a refusal.
        self.errors: tuple[type[Exception], ...] = (ValueError, vllm_error)

    @classmethod
    def start(cls, engine_args: Mapping[str, Any]) -> VLLMEngine:
        """Start vLLM (blocking: loads the model and spawns the engine-core process; call it in a thread).

        Building ``AsyncLLM`` outside the event loop is fine: it starts its
        output handler lazily, on the first request.
        """
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return cls(AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args)), **vllm_classes())

    # --- what the engine is -------------------------------------------------------
    @property
    def context_length(self) -> int:
        return int(self.llm.model_config.max_model_len)

    @property
    def pooling(self) -> bool:
        """True when vLLM runs the model for embeddings (it then cannot generate)."""
        return self.llm.model_config.runner_type == "pooling"

    async def tokenizer(self) -> Any:
        tokenizer = self.llm.get_tokenizer()
        return await tokenizer if inspect.isawaitable(tokenizer) else tokenizer

    def shutdown(self) -> None:
        """Stop the engine-core process (blocking)."""
        self.llm.shutdown()

    # --- requests -----------------------------------------------------------------
    def sampling_params(self, p: Generate) -> Any:
        """redserve's validated, fitted parameters as ``vllm.SamplingParams``, streaming deltas.

        vLLM has rules of its own (``n > 1`` needs sampling, not greedy
        decoding): what it refuses is a 400 with vLLM's reason.
        """
        try:
            return self._sampling_params(
                n=p.n,
                temperature=p.temperature,
                top_p=p.top_p,
                top_k=p.top_k or -1,  # redserve: 0 = no cut; older vLLM takes only -1 for that, newer either
                # vLLM seeds a torch.Generator (int64), and choice i of a request with seed + i.
                seed=None if p.seed is None else p.seed % 2**62,
                presence_penalty=p.presence_penalty,
                frequency_penalty=p.frequency_penalty,
                max_tokens=p.max_tokens,
                stop=list(p.stop),
                logprobs=p.logprobs,
                output_kind=self._delta,
                min_p=p.min_p,
                repetition_penalty=p.repetition_penalty,
                min_tokens=p.min_tokens,
                ignore_eos=p.ignore_eos,
                stop_token_ids=list(p.stop_token_ids) or None,
                skip_special_tokens=p.skip_special_tokens,
                include_stop_str_in_output=p.include_stop_str_in_output,
                logit_bias=dict(p.logit_bias) or None,
                structured_outputs=None if p.structured is None else self._structured_outputs(
                    json=p.structured.json, regex=p.structured.regex, choice=p.structured.choice,
                    grammar=p.structured.grammar, json_object=p.structured.json_object or None),
            )
        except self.refusals as exc:
            raise refused(exc) from exc

    def pooling_params(self) -> Any:
        return self._pooling_params(task="embed")

    def lora(self, name: str, number: int, path: str) -> Any:
        """vLLM's ``LoRARequest`` for adapter ``name`` (``number``: vLLM's id for it, from 1)."""
        return self._lora_request(lora_name=name, lora_int_id=number, lora_path=path)

    async def generate(self, prompt_ids: list[int], params: Generate, request_id: str, lora: Any = None
                       ) -> AsyncIterator[Event]:
        """The events of one request: deltas, a ``ChoiceEnd`` per choice, then ``Done``."""
        request = self.sampling_params(params)
        pending: dict[int, _Pending] = {}
        prompt_tokens, completion_tokens = len(prompt_ids), 0
        stream = self.llm.generate({"prompt_token_ids": prompt_ids}, request, request_id,
                                   **({"lora_request": lora} if lora is not None else {}))
        async with self._running(request_id, stream):
            async for out in stream:
                prompt_tokens = len(out.prompt_token_ids or prompt_ids)
                for o in out.outputs:
                    p = pending.setdefault(o.index, _Pending())
                    p.tokens += len(o.token_ids)
                    completion_tokens += len(o.token_ids)
                    if params.logprobs is not None:
                        p.logprobs += logprob_entries(o.token_ids, o.logprobs or [], params.logprobs)
                    # As the transformers engine does: text as it comes; logprobs of held-back tokens at the end.
                    if o.text or (o.finish_reason and p.logprobs):
                        yield Delta(o.index, o.text, p.tokens, p.logprobs if params.logprobs is not None else None)
                        pending[o.index] = _Pending()
                    if o.finish_reason:
                        if o.finish_reason not in FINISH_REASONS:
                            raise JobError(f"vLLM ended choice {o.index}: {o.finish_reason}.", status=500,
                                           type="server_error")
                        yield ChoiceEnd(o.index, o.finish_reason)
        yield Done(Usage(prompt_tokens, completion_tokens))

    async def embed(self, prompt_ids: list[int], request_id: str) -> tuple[list[float], int]:
        """One input's pooled vector, as vLLM returns it, and its token count."""
        final = None
        stream = self.llm.encode({"prompt_token_ids": prompt_ids}, self.pooling_params(), request_id)
        async with self._running(request_id, stream):
            async for out in stream:
                final = out
        vector = [] if final is None else [float(x) for x in final.outputs.data.tolist()]
        if final is None or not vector:  # an aborted pooling request ends with an empty tensor: no empty vectors
            raise ServeError(f"vLLM returned no embedding for request {request_id}.", status=503,
                             code="embedding_failed")
        return vector, len(final.prompt_token_ids or prompt_ids)

    @contextlib.asynccontextmanager
    async def _running(self, request_id: str, stream: AsyncIterator[Any]) -> AsyncIterator[None]:
        """Scope of one vLLM request: its stream is closed at the end, whatever happens.

        A job cancelled (its client went away) or a stream closed early
        aborts the request in vLLM. vLLM's own generators abort then too;
        saying it here keeps the guarantee in our contract rather than in
        vLLM's internals (aborting a finished or unknown request is a no-op).
        A ``VLLMClientError`` (or, from older vLLM, a ``ValueError``) is vLLM
        refusing the request (it validates on submission, raising from the
        stream's first step): a 400.
        """
        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]  # an AsyncIterator that has aclose()
                yield
        except (asyncio.CancelledError, GeneratorExit):
            await self.llm.abort(request_id)
            raise
        except self.errors as exc:
            raise self.mapped(exc) from exc

    def mapped(self, exc: Exception) -> ServeError:
        """A vLLM error as what the client hears: a refusal is a 400 with vLLM's reason; an error that carries its
        HTTP status (``GracefulHTTPError``: a full queue is a 503) keeps it; anything else is a 500."""
        if isinstance(exc, self.refusals):
            return refused(exc)
        status = getattr(exc, "http_status", None) or getattr(exc, "status_code", None) or 500
        return ServeError(f"vLLM: {getattr(exc, 'message', None) or exc}", status=int(status),
                          code="engine_busy" if int(status) == 503 else "engine_error")


def refused(exc: Exception) -> JobError:
    """vLLM's refusal of a request (``VLLMValidationError`` names the parameter where it knows it) as a 400."""
    return JobError(f"vLLM refused the request: {exc}", param=getattr(exc, "parameter", None))


def logprob_entries(token_ids: Any, logprobs: list[Mapping[int, Any]], top: int) -> list[TokenLogprob]:
    """vLLM's per-token ``{token_id: Logprob}`` maps in the protocol's shape (as ``workers.hf`` emits it).

    vLLM returns the ``top`` most likely tokens plus the sampled one when it is
    not among them; the sampled token's entry is the chosen one.
    """
    entries = []
    for token, candidates in zip(token_ids, logprobs):
        chosen = candidates[token]
        best = sorted(candidates.items(), key=lambda kv: kv[1].logprob, reverse=True)[:top]
        entries.append(TokenLogprob(chosen.decoded_token or "", float(chosen.logprob),
                                    [TopLogprob(lp.decoded_token or "", float(lp.logprob)) for _, lp in best]))
    return entries


# --- prompts -----------------------------------------------------------------------------

def embedding_inputs(tokenizer: Any, params: Embed, context_length: int) -> list[list[int]]:
    """Token ids of each embedding input (blocking); an overlong one is a 400 naming ``input``."""
    ids = [t if isinstance(t, list) else list(tokenizer(t)["input_ids"]) for t in params.input]
    inputs_fit(max(map(len, ids), default=0), context_length)
    return ids


def extra_engine_args(value: str | None) -> dict[str, Any]:
    """The ``vllm_engine_args`` setting: a JSON object of further ``AsyncEngineArgs`` fields."""
    if not value:
        return {}
    args = json.loads(value)
    if not isinstance(args, dict):
        raise ValueError(f"vllm_engine_args must be a JSON object, got {value!r}")
    return args


# --- the worker ----------------------------------------------------------------------------
class VLLMWorker(BaseModelWorker):
    engine = "vllm"
    #: Everything maps onto ``SamplingParams`` (constraints onto ``StructuredOutputsParams``); tools and template
    #: options go through the shared chat template path.
    features = FEATURES

    def __init__(self, redis_url: str, settings: Settings, models: list[str], *, worker_id: str | None = None,
                 engine_args: Mapping[str, Any] | None = None) -> None:
        #: ``--lora NAME=PATH``: each adapter a model of its own; vLLM batches adapters together (``LoRARequest``).
        self.adapters = lora_adapters(settings.lora)
        super().__init__(redis_url, settings, [*models, *self.adapters], worker_id=worker_id)
        # A local directory or a Hugging Face repo id: the settings field, else the served name.
        self.model_path = os.path.expanduser(getattr(settings, "model_path", None) or models[0])
        #: What ``AsyncEngineArgs`` gets: the model, the ``vllm_engine_args`` setting, then ``engine_args``.
        self.engine_args: dict[str, Any] = {
            "model": self.model_path,
            **({"dtype": settings.dtype} if settings.dtype != "auto" else {}),
            **({"max_model_len": settings.max_model_len} if settings.max_model_len else {}),
            **({"enable_lora": True, "max_loras": len(self.adapters)} if self.adapters else {}),
            **extra_engine_args(getattr(settings, "vllm_engine_args", None)),
            **(engine_args or {}),
        }
        self.vllm: VLLMEngine | None = None

    def start_engine(self, engine_args: Mapping[str, Any]) -> VLLMEngine:
        """The engine factory (blocking); the contract test overrides it to hand in a stand-in."""
        return VLLMEngine.start(engine_args)

    async def setup(self) -> None:
        self.vllm = await asyncio.to_thread(self.start_engine, self.engine_args)
        self.tokenizer = await self.vllm.tokenizer()
        self.record.root = self.model_path
        self.record.context_length = self.vllm.context_length
        log.info("vllm worker started %s (%s, context %d)", self.model_path,
                 "embeddings only" if self.vllm.pooling else "generation", self.vllm.context_length)

    async def teardown(self) -> None:
        if self.vllm is not None:
            await asyncio.to_thread(self.vllm.shutdown)

    async def generate(self, job: Job) -> AsyncIterator[Event]:
        vllm = self.vllm
        assert vllm is not None
        if vllm.pooling:
            raise JobError(f"The model `{job.model}` serves embeddings only.", param="model", code="unsupported")
        ids = await asyncio.to_thread(prompt_ids, self.tokenizer, job)
        assert isinstance(job.params, Generate)
        params = fitted(job.params, job.kind, len(ids), vllm.context_length)
        lora = None
        if job.model in self.adapters:
            lora = vllm.lora(job.model, list(self.adapters).index(job.model) + 1, self.adapters[job.model])
        async for ev in vllm.generate(ids, params, job.request_id, lora):
            yield ev

    def matryoshka(self, model: str) -> bool:
        config = getattr(getattr(self.vllm, "llm", None), "model_config", None)
        hf = getattr(config, "hf_config", None)
        return bool(getattr(hf, "is_matryoshka", False) or getattr(hf, "matryoshka_dimensions", None))

    async def embed(self, job: Job) -> Embeddings:
        vllm = self.vllm
        assert vllm is not None and isinstance(job.params, Embed)
        if not vllm.pooling:
            return await super().embed(job)  # refuses: a generating vLLM engine cannot pool
        inputs = await asyncio.to_thread(embedding_inputs, self.tokenizer, job.params, vllm.context_length)
        results = await asyncio.gather(*(vllm.embed(ids, f"{job.request_id}-{i}") for i, ids in enumerate(inputs)))
        return Embeddings([l2_normalised(v) for v, _ in results], Usage(sum(n for _, n in results)))
