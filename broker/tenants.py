"""Who owns what: a tenant is an API key's stable id, recorded on everything it creates.

Files, batches, requests and replay logs each carry their owner's id in
Redis. A tenant sees only what it owns, and what it does not own reads as
absent (404, never 403, so existence is not confirmed). Operators hold
admin keys and see everything. Without API keys there is one tenant,
``ANONYMOUS``, which owns everything and sees everything, as before keys.

The id is derived from the key (a hash prefix), never the key itself, so
Redis and the logs never hold a secret.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

#: What an id created by redserve looks like (random hex after a prefix); anything else is never looked up.
_ID_SHAPES = {
    # (and, until they expire, the batch output files of earlier versions: file-<batch hex>-output/-errors)
    "file": re.compile(r"file-[0-9a-f]{24}|file-[0-9a-f]{32}-(?:output|errors)"),
    "batch": re.compile(r"batch_[0-9a-f]{32}"),
    "request": re.compile(r"[0-9a-f]{32}"),
    "battle": re.compile(r"[0-9a-f]{32}"),
}


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    #: Sees and may act on everything (operators).
    admin: bool = False

    def owns(self, owner: str | None) -> bool:
        """Whether this tenant may see a thing recorded with ``owner`` (None: the thing does not exist)."""
        return owner is not None and (self.admin or owner == self.id)

    @property
    def limited(self) -> bool:
        """Rate limits and in-flight caps apply to every key (admin keys too), not to a server without keys."""
        return self.id != ANONYMOUS.id


#: The only tenant of a server without API keys.
ANONYMOUS = Tenant("anonymous", admin=True)
#: Who calls an open path (``open_paths``) of a server with API keys: owns nothing, sees nothing.
PUBLIC = Tenant("public")


def tenant_id(key: bytes) -> str:
    """A key's tenant id: 16 hex digits of its SHA-256 (stable, and says nothing of the key)."""
    return hashlib.sha256(key).hexdigest()[:16]


def well_formed(kind: str, value: str) -> bool:
    """Whether ``value`` has the shape of a ``kind`` id redserve hands out (file, batch, request, battle)."""
    return bool(_ID_SHAPES[kind].fullmatch(value))
