"""The broker as one object: what a gateway or batch runner holds to submit jobs.

It owns the Redis clients, the registry, the dispatcher and this process's
reply router; ``submit`` ties them together in the order that matters:
open the reply stream first, then dispatch.
"""

from __future__ import annotations

import time
from typing import Any

from broker.connection import connect
from broker.dispatch import Dispatcher
from broker.keys import Keys
from broker.protocol import Job, JobKind, pack
from broker.registry import Registry
from broker.replies import ReplyRouter, ReplyStream
from broker.scripts import Scripts
from broker.settings import DispatchMethod, Settings


class BrokerClient:
    def __init__(self, settings: Settings, *, gateway_id: str | None = None) -> None:
        if not settings.redis_url:
            raise ValueError("BrokerClient needs settings.redis_url")
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.text = connect(settings.redis_url, decode=True)
        self.raw = connect(settings.redis_url, decode=False)
        scripts = Scripts.register(self.raw)
        self.registry = Registry(self.text, self.keys, Scripts.register(self.text))
        self.dispatcher = Dispatcher(self.raw, self.keys, settings.dispatch_method, scripts)
        self.router = ReplyRouter(self.raw, self.keys, gateway_id)

    async def start(self) -> "BrokerClient":
        await self.router.start()
        return self

    async def close(self) -> None:
        await self.router.stop()
        await self.text.aclose()
        await self.raw.aclose()

    async def __aenter__(self) -> "BrokerClient":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(
        self,
        model: str,
        kind: JobKind,
        params: dict[str, Any],
        *,
        timeout: float | None = None,
        method: DispatchMethod | None = None,
    ) -> ReplyStream:
        """Dispatch one job; the returned stream yields its reply events.

        Raises UnknownModel, NoWorker or Busy (and closes the stream) when
        the job could not be placed.
        """
        timeout = timeout or self.settings.reply_timeout
        stream = self.router.open(timeout)
        job = Job(
            request_id=stream.rid,
            model=model,
            kind=kind,
            reply_to=self.router.channel,
            params=params,
            deadline=time.time() + timeout,
        )
        try:
            placed = await self.dispatcher.dispatch(job, method)
        except BaseException:
            stream.close()
            raise
        stream.worker_id = placed.worker_id
        return stream

    async def release(self, stream: ReplyStream) -> None:
        """Done with a stream: forget it, and cancel the job if it has not finished."""
        stream.close()
        if not stream.finished and stream.worker_id:
            await self.raw.publish(self.keys.worker_control(stream.worker_id), pack({"cancel": stream.rid}))
