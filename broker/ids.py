"""Request ids, and the response ids clients see (``chatcmpl-<rid>``, ``cmpl-<rid>``).

A response id embeds its request id, so whatever a client holds (a response
id) is what the cancel, resume and inspect paths take.
"""

from __future__ import annotations

import uuid

from broker.keys import TAG_LENGTH, model_tag
from broker.protocol import JobKind
from broker.tenants import well_formed

_PREFIXES = {JobKind.CHAT: "chatcmpl-", JobKind.COMPLETION: "cmpl-"}


def new_request_id(model: str) -> str:
    """A fresh request id for a job of ``model``: 32 hex digits that begin with the model's slot tag, so the
    request's keys share the slot of the model's dispatch (see ``broker.keys``)."""
    return model_tag(model) + uuid.uuid4().hex[TAG_LENGTH:]


def response_id(kind: JobKind, rid: str) -> str:
    return _PREFIXES[kind] + rid


def request_id(response_id: str) -> str | None:
    """The request id inside a response id (or a bare request id); None when it has not the shape of one."""
    rid = response_id
    for prefix in _PREFIXES.values():
        rid = rid.removeprefix(prefix)
    return rid if well_formed("request", rid) else None
