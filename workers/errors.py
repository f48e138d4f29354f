"""The error an engine raises for a request it will not run: ``broker.errors.ServeError``, a 400 by default."""

from __future__ import annotations

from broker.errors import ServeError


class JobError(ServeError):
    """A failure the user caused or should hear about: a 400 unless said otherwise (``ServeError``'s kwargs)."""

    status = 400
