"""A stand-in for vLLM's AsyncLLM; vLLM needs a GPU (a CUDA build), which CI lacks.

It implements exactly the surface ``workers.vllm.VLLMEngine`` uses (listed in
that module's docstring), under vLLM's names and with vLLM's shapes and rules
(``vllm/v1/engine/async_llm.py``, ``vllm/outputs.py``, ``vllm/sampling_params.py``,
``vllm/pooling_params.py``): DELTA ``RequestOutput``s, one per child of an ``n > 1``
request that moved (as ``ParentRequest.get_outputs`` streams them),
``finish_reason`` ``"stop"``/``"length"``/``"abort"``, the EOS token counted
in ``token_ids`` but not shown in ``text``, stop strings cut before they
show, per-token ``{token_id: Logprob}`` maps, ``VLLMValidationError`` (in
0.33 not a ``ValueError``) for what vLLM refuses (``n > 1`` with greedy decoding, generation on a pooling
model). Anything else the worker might call is missing, so it fails loudly.

The "model" is a deterministic toy: a choice reads ``REPLY`` token by token,
greedy choices from its start, sampled choice ``i`` from ``seed + i`` tokens in
(vLLM seeds choice ``i`` with ``seed + i``), and ends with EOS after
``reply_tokens`` tokens. One step, every ``step_delay`` seconds, gives every
live choice one token. Unlike vLLM it does not abort a request by itself when
its consumer is cancelled, so a test sees the worker's own ``abort``.
"""

from __future__ import annotations

import asyncio
import random
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from http import HTTPStatus
from typing import Any

from workers.stops import StopMatcher

#: What every choice reads, cycled: plain ASCII words, so token texts join into the text.
REPLY = " the quick brown fox jumps over the lazy dog. Hello there! How are you today? I am fine, thank you."


class VLLMError(Exception):
    """``vllm.exceptions.VLLMError`` (0.33): the base of vLLM's own errors, not a ``ValueError``."""


class VLLMClientError(VLLMError):
    """``vllm.exceptions.VLLMClientError``: the request's fault (a 4xx)."""


class VLLMValidationError(VLLMClientError):
    """``vllm.exceptions.VLLMValidationError``: a refused parameter, named when vLLM knows it."""

    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.value = value


class GracefulHTTPError(VLLMError):
    """``vllm.exceptions.GracefulHTTPError``: an expected refusal that carries its HTTP status."""

    def __init__(self, message: str, http_status: HTTPStatus) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status


class QueueOverflowError(GracefulHTTPError):
    """``vllm.exceptions.QueueOverflowError``: ``max_num_queued_reqs`` would be exceeded (503)."""

    def __init__(self) -> None:
        super().__init__("The engine is currently busy and cannot accept new requests. Please try again later or "
                         "on a different instance.", HTTPStatus.SERVICE_UNAVAILABLE)


@dataclass
class StructuredOutputsParams:
    """``vllm.sampling_params.StructuredOutputsParams``: exactly one constraint, else VLLMValidationError."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        count = sum(x is not None for x in (self.json, self.regex, self.choice, self.grammar, self.json_object,
                                            self.structural_tag))
        if count > 1:
            raise VLLMValidationError("You can only use one kind of structured outputs constraint "
                                      f"but multiple are specified: {self.__dict__}")
        if count < 1:
            raise VLLMValidationError("You must use one kind of structured outputs constraint "
                                      f"but none are specified: {self.__dict__}")


class RequestOutputKind(Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """The fields of ``vllm.SamplingParams`` the worker sets (with vLLM's defaults), and vLLM's rules on them."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self.stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop
        self.stop_token_ids = self.stop_token_ids or []
        if self.top_k < -1:
            raise VLLMValidationError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise VLLMValidationError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.repetition_penalty <= 0.0:
            raise VLLMValidationError(f"repetition_penalty must be greater than zero, got "
                                      f"{self.repetition_penalty}.", parameter="repetition_penalty")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise VLLMValidationError(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                                      f"got {self.min_tokens}.")
        if self.temperature < 1e-5:
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            if self.n > 1:
                raise VLLMValidationError(f"n must be 1 when using greedy sampling, got {self.n}.")


@dataclass
class PoolingParams:
    task: str | None = None


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: None
    outputs: list[CompletionOutput]
    finished: bool


@dataclass
class PoolingOutput:
    data: Any  # a torch.Tensor in vLLM; here an array, which has the one method used: tolist()


@dataclass
class PoolingRequestOutput:
    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    num_cached_tokens: int
    finished: bool


@dataclass
class ModelConfig:
    max_model_len: int
    runner_type: str = "generate"


def standin_classes() -> dict[str, Any]:
    """The stand-in twin of ``workers.vllm.vllm_classes()``."""
    return {"sampling_params": SamplingParams, "pooling_params": PoolingParams, "delta": RequestOutputKind.DELTA,
            "structured_outputs": StructuredOutputsParams, "client_error": VLLMClientError, "vllm_error": VLLMError,
            "lora_request": LoRARequest}


@dataclass
class Received:
    """One request as the stand-in got it."""

    prompt: dict[str, Any]
    params: Any
    lora_request: Any = None


@dataclass
class LoRARequest:
    """``vllm.lora.request.LoRARequest`` (0.33): the fields the worker sets."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""


@dataclass(eq=False)
class _Choice:
    index: int
    start: int
    stops: StopMatcher
    tokens: int = 0
    finished: bool = False


@dataclass(eq=False)
class StandInAsyncLLM:
    """``vllm.v1.engine.async_llm.AsyncLLM`` as far as ``workers.vllm.VLLMEngine`` uses it."""

    tokenizer: Any
    max_model_len: int = 4096
    runner_type: str = "generate"
    reply_tokens: int = 12
    step_delay: float = 0.0
    #: vLLM before 0.11 made get_tokenizer a coroutine; later a plain method.
    tokenizer_is_coroutine: bool = False
    #: vLLM's ``max_num_queued_reqs``: a request past it raises QueueOverflowError (0 = no limit).
    max_num_queued_reqs: int = 0
    live: int = 0

    #: What the worker did: requests by id, aborted ids, tokens made, whether it was shut down.
    requests: dict[str, Received] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    tokens_generated: int = 0
    shut_down: bool = False

    def __post_init__(self) -> None:
        self.model_config = ModelConfig(self.max_model_len, self.runner_type)
        self.reply_ids: list[int] = list(self.tokenizer(REPLY, add_special_tokens=False)["input_ids"])

    def get_tokenizer(self) -> Any:
        if self.tokenizer_is_coroutine:
            return asyncio.sleep(0, self.tokenizer)
        return self.tokenizer

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.shut_down = True

    async def generate(self, prompt: dict[str, Any], sampling_params: SamplingParams, request_id: str, *,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        if self.runner_type == "pooling":
            raise VLLMValidationError("This model does not support generation")
        if sampling_params.output_kind is not RequestOutputKind.DELTA:
            raise NotImplementedError("the stand-in streams DELTA outputs only")
        ids = list(prompt["prompt_token_ids"])
        if self.max_num_queued_reqs and self.live >= self.max_num_queued_reqs:
            raise QueueOverflowError()
        self.live += 1
        try:
            async for out in self._generate(ids, prompt, sampling_params, request_id, lora_request):
                yield out
        finally:
            self.live -= 1

    async def _generate(self, ids: list[int], prompt: dict[str, Any], sampling_params: SamplingParams,
                        request_id: str, lora_request: LoRARequest | None) -> AsyncIterator[RequestOutput]:
        self.requests[request_id] = Received(prompt, sampling_params, lora_request)
        p = sampling_params
        seed = p.seed if p.seed is not None else random.randrange(len(self.reply_ids))
        choices = [_Choice(i, 0 if p.temperature == 0 else seed + i, StopMatcher(p.stop)) for i in range(p.n)]
        while True:
            await asyncio.sleep(self.step_delay)
            if request_id in self.aborted:
                outs = [CompletionOutput(c.index, "", [], None, None, "abort") for c in choices if not c.finished]
                yield RequestOutput(request_id, None, ids, None, outs, finished=True)
                return
            # As vLLM's parallel sampling streams n > 1 (ParentRequest.get_outputs, DELTA): one RequestOutput per
            # child that moved, holding that child's output only; finished once every child is.
            for c in [c for c in choices if not c.finished]:
                out = self._step(c, p)
                yield RequestOutput(request_id, None, ids, None, [out], finished=all(x.finished for x in choices))
            if all(c.finished for c in choices):
                return

    def _step(self, c: _Choice, p: SamplingParams) -> CompletionOutput:
        """One token of choice ``c``."""
        c.tokens += 1
        self.tokens_generated += 1
        if c.tokens > self.reply_tokens:  # EOS: a token, never text
            token, piece, finish = self.tokenizer.eos_token_id, "", "stop"
        else:
            token = self.reply_ids[(c.start + c.tokens - 1) % len(self.reply_ids)]
            piece = self.tokenizer.decode([token])
            finish = "length" if p.max_tokens is not None and c.tokens >= p.max_tokens else None
        text, stopped = c.stops.feed(piece)
        if stopped:
            finish = "stop"
        elif finish:
            text += c.stops.flush()
        c.finished = finish is not None
        logprobs = None if p.logprobs is None else [self._logprobs(token, p)]
        return CompletionOutput(c.index, text, [token], None, logprobs, finish)

    def _logprobs(self, token: int, p: SamplingParams) -> dict[int, Logprob]:
        """The ``p.logprobs`` most likely tokens plus the chosen one: greedy picks rank 1; sampling picks
        one just outside the top ones (so the map holds ``p.logprobs + 1`` entries, as vLLM's may)."""
        k = p.logprobs or 0
        vocab = len(self.tokenizer)
        ranked = [t % vocab for t in range(token + 1, token + 1 + k)]
        ranked = [token, *ranked[:max(k - 1, 0)]] if p.temperature == 0 else [*ranked, token]
        return {t: Logprob(-0.5 * (rank + 1), rank + 1, self.tokenizer.decode([t])) for rank, t in enumerate(ranked)}

    async def encode(self, prompt: dict[str, Any], pooling_params: PoolingParams, request_id: str
                     ) -> AsyncIterator[PoolingRequestOutput]:
        if self.runner_type != "pooling":
            raise VLLMValidationError("This model does not support pooling")
        if pooling_params.task != "embed":
            raise ValueError(f"Unsupported task: {pooling_params.task!r}")
        ids = list(prompt["prompt_token_ids"])
        self.requests[request_id] = Received(prompt, pooling_params)
        await asyncio.sleep(self.step_delay)
        yield PoolingRequestOutput(request_id, PoolingOutput(array("d", toy_embedding(ids))), ids, 0, finished=True)


def toy_embedding(prompt_ids: list[int]) -> list[float]:
    """The stand-in's fixed, unnormalised vector for a prompt."""
    return [float(len(prompt_ids)), 2.0, 0.0, 1.0]
