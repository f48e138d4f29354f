"""The broker: Redis key schema, worker registry, dispatcher and reply routing.

Everything here is a library: gateways, batch runners and workers import it,
and no process owns the state. The state lives in Redis.
"""

from broker.settings import Settings

__all__ = ["Settings"]
__version__ = "0.1.0"
