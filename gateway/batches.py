"""The OpenAI Files and Batch APIs: upload a JSONL file of requests, run it as a batch, download the results.

Files and batches live in Redis (``broker.batch_store``), so any gateway
answers for any batch; batch runners (``redserve batch-runner``) do the work.
Only what batches need is here: files with ``purpose=batch`` in, generated
output and error files out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import Field
from starlette.datastructures import UploadFile
from starlette.responses import Response

from broker.batch import BatchClient
from broker.batch_store import COMPLETION_WINDOW
from broker.errors import ServeError
from gateway.errors import APIError
from gateway.schemas import RequestBody
from gateway.security import tenant_of


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.uploads = asyncio.Semaphore(app.state.settings.max_concurrent_uploads)
    url = app.state.settings.batch_url(app.state.redis_url)
    if url is None:  # redis_url is a cluster and no batch_redis_url was given: the batch API says so
        app.state.batches = None
        yield
        return
    async with BatchClient(url, app.state.settings) as client:
        app.state.batches = client
        yield


router = APIRouter(lifespan=_lifespan)


class CreateBatch(RequestBody):
    input_file_id: str = Field(min_length=1)
    endpoint: str
    completion_window: str = COMPLETION_WINDOW
    metadata: dict[str, str] | None = None


def _client(request: Request) -> BatchClient:
    client: BatchClient | None = request.app.state.batches
    if client is None:
        raise ServeError("The batch API needs a plain Redis beside the cluster: this gateway was started without "
                         "batch_redis_url.", status=503, code="batch_unavailable")
    return client


@router.post("/v1/files")
async def create_file(request: Request) -> dict[str, Any]:
    """multipart/form-data with ``file`` and ``purpose=batch``; kept in Redis within the tenant's quota.

    The body cap (``batch_max_file_bytes``) holds while the form is read; the
    form is spooled to disk, and only ``max_concurrent_uploads`` files per
    gateway are in memory at once, on their way to Redis (a slow upload holds
    no slot while it arrives).
    """
    client = _client(request)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise APIError(400, "Upload the file as multipart/form-data with the fields `file` and `purpose`.",
                       param="file", code="invalid_value")
    async with request.form(max_files=1, max_fields=4) as form:  # spooled to disk while it arrives
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch":
            raise APIError(400, f"purpose must be 'batch' (the only files this server keeps), not {purpose!r}.",
                           param="purpose", code="invalid_value")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "Missing the `file` field.", param="file", code="missing_required_parameter")
        async with request.app.state.uploads:  # in memory only from here, a few at a time
            return await client.create_file(await upload.read(), filename=upload.filename or "upload.jsonl",
                                            purpose=purpose, tenant=tenant_of(request))


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, request: Request) -> dict[str, Any]:
    return await _client(request).file(file_id, tenant=tenant_of(request))


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
    """Delete a file; its bytes go back to the tenant's quota."""
    return await _client(request).delete_file(file_id, tenant=tenant_of(request))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> Response:
    content = await _client(request).file_content(file_id, tenant=tenant_of(request))
    return Response(content, media_type="application/octet-stream")


@router.post("/v1/batches")
async def create_batch(body: CreateBatch, request: Request) -> dict[str, Any]:
    return await _client(request).create_batch(input_file_id=body.input_file_id, endpoint=body.endpoint,
                                                completion_window=body.completion_window, metadata=body.metadata,
                                                tenant=tenant_of(request))


@router.get("/v1/batches")
async def list_batches(request: Request, after: str | None = None,
                       limit: int = Query(default=20, ge=1, le=100)) -> dict[str, Any]:
    data, has_more = await _client(request).batches(after=after, limit=limit, tenant=tenant_of(request))
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, request: Request) -> dict[str, Any]:
    return await _client(request).batch(batch_id, tenant=tenant_of(request))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request) -> dict[str, Any]:
    return await _client(request).cancel_batch(batch_id, tenant=tenant_of(request))
