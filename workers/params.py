"""What a generation job may ask of the model that serves it: the one check that depends on the model.

Every value arrives validated: the gateway checked shapes and caps once, at
the edge, the job's ``Generate`` is typed, and the worker base refuses
what its engine does not declare in ``features``. What only the engine can
judge is left: whether prompt plus completion fit its model's context.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import msgspec

from broker.protocol import Generate, JobKind
from workers.errors import JobError


def fitted(params: Generate, kind: JobKind, prompt_tokens: int, context: int) -> Generate:
    """``params`` with ``max_tokens`` set: by default the room the context leaves; asking for more is a 400."""
    room = context - prompt_tokens
    wanted_tokens = params.max_tokens
    if room < 1 or (wanted_tokens is not None and wanted_tokens > room):
        asked = prompt_tokens + (wanted_tokens or 1)
        what = "messages" if kind is JobKind.CHAT else "prompt"
        raise JobError(
            f"This model's maximum context length is {context} tokens. However, you requested {asked} tokens "
            f"({prompt_tokens} in the {what}, {wanted_tokens or 1} for the completion). "
            f"Please reduce the length of the {what} or the completion.",
            param=what, code="context_length_exceeded",
        )
    return params if wanted_tokens is not None else msgspec.structs.replace(params, max_tokens=room)


def max_tokens(params: Generate) -> int:
    """The completion limit of a ``fitted`` job."""
    assert params.max_tokens is not None, "fitted() sets max_tokens"
    return params.max_tokens


def in_vocabulary(ids: Iterable[int], vocab: int, param: str) -> None:
    """A token id the model does not have is a 400 naming ``param``."""
    if bad := [t for t in ids if not 0 <= t < vocab]:
        raise JobError(f"Token id {bad[0]} is not in the model's vocabulary (0..{vocab - 1}).", param=param)


def inputs_fit(longest: int, context: int) -> None:
    """An embedding input longer than the model's context is a 400 naming ``input``."""
    if longest > context:
        raise JobError(f"An input is longer than this model's maximum of {context} tokens.",
                       param="input", code="context_length_exceeded")


def l2_normalised(vector: list[float]) -> list[float]:
    """``vector`` scaled to length 1 (a zero vector stays as it is)."""
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector
