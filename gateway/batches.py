"""The OpenAI Files and Batch APIs: upload a JSONL file of requests, run it as a batch, download the results.

Files and batches live in Redis (``broker.batch_store``), so any gateway
answers for any batch; batch runners (``redserve batch-runner``) do the work.
Only what batches need is here: files with ``purpose=batch`` in, generated
output and error files out.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, AsyncIterator

from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import Field
from starlette.responses import Response

from broker.batch import BatchClient
from broker.batch_store import COMPLETION_WINDOW
from gateway.errors import APIError
from gateway.schemas import StrictModel

#: Room for the multipart envelope (boundaries, part headers) around a file of the largest size.
_ENVELOPE = 64 * 1024


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with BatchClient(settings=app.state.settings) as client:
        app.state.batches = client
        yield


router = APIRouter(lifespan=_lifespan)


class CreateBatch(StrictModel):
    input_file_id: str = Field(min_length=1)
    endpoint: str
    completion_window: str = COMPLETION_WINDOW
    metadata: dict[str, str] | None = None


def _client(request: Request) -> BatchClient:
    return request.app.state.batches


@router.post("/v1/files")
async def create_file(request: Request) -> dict[str, Any]:
    """multipart/form-data with ``file`` and ``purpose=batch``; the file is kept in Redis (``batch_max_file_bytes``)."""
    client = _client(request)
    form = await _multipart(request, client.settings.batch_max_file_bytes)
    purpose = form.get("purpose", (None, b""))[1].decode(errors="replace")
    if purpose != "batch":
        raise APIError(400, f"purpose must be 'batch' (the only files this server keeps), not {purpose!r}.",
                       param="purpose", code="invalid_value")
    if "file" not in form:
        raise APIError(400, "Missing the `file` field.", param="file", code="missing_required_parameter")
    filename, content = form["file"]
    return await client.create_file(content, filename=filename or "upload.jsonl", purpose=purpose)


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, request: Request) -> dict[str, Any]:
    return await _client(request).file(file_id)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> Response:
    return Response(await _client(request).file_content(file_id), media_type="application/octet-stream")


@router.post("/v1/batches")
async def create_batch(body: CreateBatch, request: Request) -> dict[str, Any]:
    return await _client(request).create_batch(input_file_id=body.input_file_id, endpoint=body.endpoint,
                                                completion_window=body.completion_window, metadata=body.metadata)


@router.get("/v1/batches")
async def list_batches(request: Request, after: str | None = None,
                       limit: int = Query(default=20, ge=1, le=100)) -> dict[str, Any]:
    data, has_more = await _client(request).batches(after=after, limit=limit)
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, request: Request) -> dict[str, Any]:
    return await _client(request).batch(batch_id)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request) -> dict[str, Any]:
    return await _client(request).cancel_batch(batch_id)


async def _multipart(request: Request, limit: int) -> dict[str, tuple[str | None, bytes]]:
    """The parts of a multipart/form-data body by field name: (filename, bytes), read up to ``limit``."""
    mime, _, params = request.headers.get("content-type", "").partition(";")
    found = re.search(r'boundary="?([^";]+)"?', params)
    if mime.strip().lower() != "multipart/form-data" or not found:
        raise APIError(400, "Upload the file as multipart/form-data with the fields `file` and `purpose`.",
                       param="file", code="invalid_value")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit + _ENVELOPE:
            raise APIError(400, f"The file exceeds the limit of {limit} bytes (batch_max_file_bytes).",
                           param="file", code="file_too_large")
    parts: dict[str, tuple[str | None, bytes]] = {}
    for part in bytes(body).split(b"--" + found.group(1).encode())[1:]:
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, sep, content = part.partition(b"\r\n\r\n")
        headers = head.decode("utf-8", errors="replace")
        name = re.search(r'\bname="([^"]*)"', headers)
        if sep and name:
            filename = re.search(r'\bfilename="([^"]*)"', headers)
            parts[name.group(1)] = (filename.group(1) if filename else None, content.removesuffix(b"\r\n"))
    return parts
