"""Batch state in Redis: OpenAI files and batches, each request's one result, and the JSONL formats.

Everything a batch is lives here, in Redis alone, so any gateway, batch
runner or CLI sees the same batch and a runner that dies loses nothing. Each
request's result is written with HSETNX (a batch line) or SET NX (a Python
API job): however often arq runs a job, exactly one result is stored, and
only the attempt that stored it counts it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from broker.connection import resolved
from broker.errors import ServeError
from broker.keys import Keys
from broker.protocol import as_str, pack, unpack
from broker.scripts import source
from broker.settings import Settings
from broker.tenants import ANONYMOUS, Tenant, well_formed

#: The endpoints a batch (or a Python API job) may target.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
COMPLETION_WINDOW = "24h"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: Errors listed when a file fails validation; the message says how many there were in all.
MAX_LISTED_ERRORS = 100

# How a stored result line is marked: first byte of the value in the results hash.
_OUTPUT, _ERROR, _EXPIRED, _SKIPPED = b"o", b"e", b"x", b""


class InvalidBatch(ServeError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class NotFound(ServeError):
    status, type, code = 404, "invalid_request_error", "not_found"


class QuotaExceeded(ServeError):
    """A tenant's stored files would pass its quota."""

    status, type, code = 400, "invalid_request_error", "quota_exceeded"


class Finished(ServeError):
    """The batch has ended (or is ending) and can no longer change."""

    status, type, code = 409, "invalid_request_error", "batch_finished"


@dataclass(frozen=True, slots=True)
class Request:
    """One request line of a batch input file."""

    index: int
    custom_id: str
    method: str
    url: str
    body: dict[str, Any]


@dataclass(slots=True)
class Parsed:
    requests: list[Request] = field(default_factory=list)
    #: OpenAI ``BatchError`` objects: a non-empty list fails the whole file.
    errors: list[dict[str, Any]] = field(default_factory=list)


def parse_requests(content: bytes, max_requests: int) -> Parsed:
    """Read an input file: one JSON object per line with ``custom_id``, ``method``, ``url`` and ``body``.

    A line that is not such an object, a repeated ``custom_id``, an empty file
    or too many requests make the file malformed (it fails validation, nothing
    runs). A well-formed line with a bad method, url or body still runs through
    ``line_problem`` and the endpoint, and fails alone into the error file.
    """
    out = Parsed()
    seen: set[str] = set()
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        out.errors.append(_file_error("invalid_encoding", f"The file is not UTF-8 text ({exc.reason}).", None))
        return out
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            out.errors.append(_file_error("invalid_json_line", f"Line {number} is not valid JSON: {exc.msg}.", number))
            continue
        if not isinstance(obj, dict):
            out.errors.append(_file_error("invalid_request", f"Line {number} must be a JSON object with custom_id, "
                                                             "method, url and body.", number))
            continue
        custom_id, body = obj.get("custom_id"), obj.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            out.errors.append(_file_error("missing_required_parameter",
                                          f"Line {number} has no custom_id (a non-empty string).", number, "custom_id"))
            continue
        if custom_id in seen:
            out.errors.append(_file_error("duplicate_custom_id",
                                          f"Line {number} repeats the custom_id {custom_id!r}.", number, "custom_id"))
            continue
        if not isinstance(body, dict):
            out.errors.append(_file_error("missing_required_parameter",
                                          f"Line {number} has no body (a JSON object).", number, "body"))
            continue
        seen.add(custom_id)
        out.requests.append(Request(len(out.requests), custom_id, str(obj.get("method", "")), str(obj.get("url", "")),
                                    body))
    if not out.requests and not out.errors:
        out.errors.append(_file_error("empty_file", "The file holds no request lines.", None))
    if len(out.requests) > max_requests:
        out.errors.append(_file_error(
            "too_many_requests", f"The file holds {len(out.requests)} requests; a batch takes at most {max_requests}.",
            None))
    if len(out.errors) > MAX_LISTED_ERRORS:
        more = len(out.errors) - MAX_LISTED_ERRORS
        out.errors = out.errors[:MAX_LISTED_ERRORS] + [_file_error("too_many_errors", f"...and {more} more.", None)]
    return out


def line_problem(method: str, url: str, body: dict[str, Any], endpoint: str | None) -> str | None:
    """Why one request cannot run as a batch request (None if it can); the endpoint judges its body."""
    if method.upper() != "POST":
        return f"method must be POST, not {method!r}."
    if url not in ENDPOINTS:
        return f"url must be one of {', '.join(ENDPOINTS)}, not {url!r}."
    if endpoint is not None and url != endpoint:
        return f"url {url!r} does not match the batch's endpoint {endpoint!r}."
    if body.get("stream"):
        return "stream is not supported in a batch: each result is stored whole."
    return None


def _file_error(code: str, message: str, line: int | None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


class BatchStore:
    """Files, batches and results over one raw (non-decoding) Redis client."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.ttl_ms = int(settings.batch_ttl * 1000)
        self._record = redis.register_script(source("batch_record"))
        self._transition = redis.register_script(source("batch_transition"))
        self._file_store = redis.register_script(source("file_store"))
        self._file_delete = redis.register_script(source("file_delete"))

    # --- files ---------------------------------------------------------------
    async def create_file(self, content: bytes, *, filename: str, purpose: str, owner: Tenant = ANONYMOUS,
                          quota: bool = True) -> dict[str, Any]:
        """Store a file for ``owner``, within its quota (``quota=False`` charges it regardless: batch output).

        A server without API keys has no tenants to hold apart: its files are counted, not refused.
        """
        if len(content) > self.settings.batch_max_file_bytes:
            raise InvalidBatch(f"The file is {len(content)} bytes; files are limited to "
                               f"{self.settings.batch_max_file_bytes} bytes (batch_max_file_bytes).", param="file")
        meta = {"id": f"file-{uuid.uuid4().hex[:24]}", "bytes": str(len(content)),
                "created_at": str(int(time.time())), "filename": filename, "purpose": purpose, "owner": owner.id}
        s = self.settings
        stored, used, files = await self._file_store(
            keys=[self.keys.file(meta["id"]), self.keys.tenant_files(owner.id)],
            args=[int(time.time() * 1000), self.ttl_ms, meta["id"], len(content), s.tenant_max_bytes,
                  s.tenant_max_files, int(quota and owner.limited), *[x for kv in meta.items() for x in kv],
                  "content", content])
        if not stored:
            raise QuotaExceeded(f"Storing {len(content)} more bytes would pass this key's quota: it keeps {files} "
                                f"files of {used} bytes, and may keep {s.tenant_max_files or 'any number of'} files "
                                f"of {s.tenant_max_bytes or 'any number of'} bytes (tenant_max_files, "
                                "tenant_max_bytes). Delete files or wait for them to expire.", param="file")
        return _file_object(meta)

    async def file(self, file_id: str, tenant: Tenant = ANONYMOUS) -> dict[str, Any]:
        names = ["id", "bytes", "created_at", "filename", "purpose", "owner"]
        values = await resolved(self.redis.hmget(self.keys.file(file_id), names)) \
            if well_formed("file", file_id) else [None]
        if values[0] is None or not tenant.owns(as_str(values[-1] or b"")):
            raise NotFound(f"No file found with id '{file_id}'.", param="file_id")
        return _file_object(dict(zip(names, map(as_str, values))))

    async def file_content(self, file_id: str, tenant: Tenant = ANONYMOUS) -> bytes:
        found = await resolved(self.redis.hmget(self.keys.file(file_id), ["content", "owner"])) \
            if well_formed("file", file_id) else [None, None]
        if found[0] is None or not tenant.owns(as_str(found[1] or b"")):
            raise NotFound(f"No file found with id '{file_id}'.", param="file_id")
        content: bytes = found[0]
        return content

    async def delete_file(self, file_id: str, tenant: Tenant = ANONYMOUS) -> dict[str, Any]:
        """Delete a file and give its bytes back to its owner's quota."""
        owner = await resolved(self.redis.hget(self.keys.file(file_id), "owner")) \
            if well_formed("file", file_id) else None
        if owner is None or not tenant.owns(as_str(owner)) or not await self._file_delete(
                keys=[self.keys.file(file_id), self.keys.tenant_files(as_str(owner))], args=[file_id, owner]):
            raise NotFound(f"No file found with id '{file_id}'.", param="file_id")
        return {"id": file_id, "object": "file", "deleted": True}

    # --- batches -------------------------------------------------------------
    async def create_batch(self, *, input_file_id: str, endpoint: str, completion_window: str = COMPLETION_WINDOW,
                           metadata: dict[str, str] | None = None, owner: Tenant = ANONYMOUS) -> dict[str, Any]:
        """Record a new batch of ``owner``'s as ``validating``; a runner validates its file and runs it."""
        if endpoint not in ENDPOINTS:
            raise InvalidBatch(f"endpoint must be one of {', '.join(ENDPOINTS)}.", param="endpoint")
        if completion_window != COMPLETION_WINDOW:
            raise InvalidBatch(f"completion_window must be {COMPLETION_WINDOW!r}.", param="completion_window")
        try:
            purpose = (await self.file(input_file_id, owner))["purpose"]
        except NotFound:
            raise NotFound(f"No file found with id '{input_file_id}'.", param="input_file_id") from None
        if purpose != "batch":
            raise InvalidBatch(f"File '{input_file_id}' was uploaded with purpose {purpose!r}, not 'batch'.",
                               param="input_file_id")
        now = time.time()
        batch_id = f"batch_{uuid.uuid4().hex}"
        fields = {"id": batch_id, "endpoint": endpoint, "input_file_id": input_file_id,
                  "completion_window": completion_window, "status": "validating", "created_at": str(int(now)),
                  "expires_at": str(int(now) + 24 * 3600), "metadata": json.dumps(metadata) if metadata else "",
                  "total": "0", "completed": "0", "failed": "0", "owner": owner.id}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.batch(batch_id), mapping=fields)
            pipe.pexpire(self.keys.batch(batch_id), self.ttl_ms)
            for index in (self.keys.batches(), self.keys.tenant_batches(owner.id)):
                pipe.zadd(index, {batch_id: int(now * 1000)})
                pipe.pexpire(index, self.ttl_ms)
            await pipe.execute()
        return _batch_object(fields)

    async def batch(self, batch_id: str, tenant: Tenant = ANONYMOUS) -> dict[str, Any]:
        return _batch_object(await self._fields(batch_id, tenant))

    async def owner(self, batch_id: str) -> Tenant:
        """The tenant a batch belongs to (its requests run as that tenant)."""
        owner: bytes | str | None = await resolved(self.redis.hget(self.keys.batch(batch_id), "owner"))
        return Tenant(as_str(owner or ANONYMOUS.id))

    async def batches(self, *, after: str | None = None, limit: int = 20,
                      tenant: Tenant = ANONYMOUS) -> tuple[list[dict[str, Any]], bool]:
        """Newest first, from just past ``after``; and whether more follow. A tenant lists its own, an admin all."""
        index = self.keys.batches() if tenant.admin else self.keys.tenant_batches(tenant.id)
        start = 0
        if after is not None:
            rank = await self.redis.zrevrank(index, after)
            if rank is None:
                raise NotFound(f"No batch found with id '{after}'.", param="after")
            start = rank + 1
        ids = [as_str(i) for i in await self.redis.zrevrange(index, start, start + limit)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in ids[:limit]:
                pipe.hgetall(self.keys.batch(batch_id))
            rows = await pipe.execute()
        gone = [i for i, row in zip(ids, rows) if not row]
        if gone:  # expired batches: forget them in the index too
            await self.redis.zrem(index, *gone)
        return [_batch_object(_decode(row)) for row in rows if row], len(ids) > limit

    async def transition(self, batch_id: str, allowed: Iterable[str], to: str, **fields: str) -> str:
        """Move the batch to ``to`` if its status is one of ``allowed``; returns the status it had."""
        extra = [x for kv in fields.items() for x in kv]
        before = await self._transition(keys=[self.keys.batch(batch_id)],
                                        args=[",".join(allowed), to, int(time.time()), *extra])
        if before is None:
            raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
        return as_str(before)

    async def cancel(self, batch_id: str, tenant: Tenant = ANONYMOUS) -> dict[str, Any]:
        """Ask a batch to stop: requests not yet started are skipped, the rest finish into its output."""
        await self._fields(batch_id, tenant)  # another tenant's batch reads as absent
        before = await self.transition(batch_id, ("validating", "in_progress"), "cancelling")
        if before in TERMINAL or before == "finalizing":
            raise Finished(f"Batch '{batch_id}' is {before} and can no longer be cancelled.", param="batch_id")
        return await self.batch(batch_id)

    async def state(self, batch_id: str) -> tuple[str, float]:
        """The batch's status and expiry (epoch s); ``("", 0)`` for a batch that is gone."""
        status, expires = await resolved(self.redis.hmget(self.keys.batch(batch_id), ["status", "expires_at"]))
        return (as_str(status), float(expires or 0)) if status is not None else ("", 0.0)

    # --- results -------------------------------------------------------------
    async def progress(self, batch_id: str) -> tuple[int, int]:
        """(requests settled, total requests)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hlen(self.keys.batch_results(batch_id))
            pipe.hget(self.keys.batch(batch_id), "total")
            settled, total = await pipe.execute()
        return int(settled), int(total or 0)

    async def recorded(self, batch_id: str, index: int) -> bool:
        return bool(await resolved(self.redis.hexists(self.keys.batch_results(batch_id), str(index))))

    async def record(self, batch_id: str, request: Request, status: int, body: dict[str, Any]) -> tuple[int, int]:
        """Store a response as the request's one output line; returns (settled, total)."""
        ok = 200 <= status < 300
        line = {"id": _line_id(batch_id, request.index), "custom_id": request.custom_id,
                "response": {"status_code": status, "request_id": str(body.get("id") or uuid.uuid4().hex),
                             "body": body}, "error": None}
        usage = (body.get("usage") or {}) if ok else {}
        return await self._store(batch_id, request.index, (_OUTPUT if ok else _ERROR) + _dumps(line),
                                 "completed" if ok else "failed", usage)

    async def record_error(self, batch_id: str, request: Request, code: str, message: str) -> tuple[int, int]:
        """Store a request that never ran (a bad line, or the batch expired) as an error line."""
        line = {"id": _line_id(batch_id, request.index), "custom_id": request.custom_id, "response": None,
                "error": {"code": code, "message": message}}
        mark = _EXPIRED if code == "batch_expired" else _ERROR
        return await self._store(batch_id, request.index, mark + _dumps(line), "failed", {})

    async def record_skipped(self, batch_id: str, request: Request) -> tuple[int, int]:
        """A request the batch's cancellation stopped before it ran: settled, in neither file."""
        return await self._store(batch_id, request.index, _SKIPPED, "", {})

    async def _store(self, batch_id: str, index: int, value: bytes, counter: str,
                     usage: dict[str, Any]) -> tuple[int, int]:
        settled, total = await self._record(
            keys=[self.keys.batch(batch_id), self.keys.batch_results(batch_id)],
            args=[index, value, counter, int(usage.get("prompt_tokens") or 0),
                  int(usage.get("completion_tokens") or 0), self.ttl_ms])
        return int(settled), int(total)

    async def finalize(self, batch_id: str) -> dict[str, Any]:
        """Write the output and error files from the settled results and end the batch (idempotent)."""
        fields = await self._fields(batch_id)
        status = fields["status"]
        if status in TERMINAL:
            return _batch_object(fields)
        if status == "in_progress":
            await self.transition(batch_id, ("in_progress",), "finalizing")
        rows = await resolved(self.redis.hgetall(self.keys.batch_results(batch_id)))
        output, errors, expired = [], [], False
        for _, value in sorted(rows.items(), key=lambda kv: int(kv[0])):
            mark, line = value[:1], value[1:]
            if mark == _OUTPUT:
                output.append(line)
            elif mark in (_ERROR, _EXPIRED):
                errors.append(line)
                expired = expired or mark == _EXPIRED
        owner = Tenant(fields.get("owner") or ANONYMOUS.id)
        files = {}
        for name, lines, suffix in (("output_file_id", output, "output"), ("error_file_id", errors, "errors")):
            if lines and not fields.get(name):  # a repeated finalize (its runner died) keeps the files it made
                meta = await self.create_file(b"\n".join(lines) + b"\n", filename=f"{batch_id}_{suffix}.jsonl",
                                              purpose="batch_output", owner=owner, quota=False)
                files[name] = meta["id"]
                await resolved(self.redis.hset(self.keys.batch(batch_id), name, meta["id"]))
        final = "cancelled" if status == "cancelling" else "expired" if expired else "completed"
        await self.transition(batch_id, ("finalizing", "cancelling"), final, **files)
        return await self.batch(batch_id)

    async def _fields(self, batch_id: str, tenant: Tenant = ANONYMOUS) -> dict[str, str]:
        fields = _decode(await resolved(self.redis.hgetall(self.keys.batch(batch_id)))) \
            if well_formed("batch", batch_id) else {}
        if not fields or not tenant.owns(fields.get("owner", ANONYMOUS.id)):
            raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
        return fields

    # --- Python API jobs -----------------------------------------------------
    async def store_job_result(self, job_id: str, status: int, body: dict[str, Any]) -> bool:
        """Store a Python API job's result unless one is there already; True if this one was stored."""
        return bool(await self.redis.set(self.keys.batch_job_result(job_id),
                                         pack({"status_code": status, "body": body}), nx=True, px=self.ttl_ms))

    async def job_result(self, job_id: str) -> dict[str, Any] | None:
        """``{"status_code", "body"}`` once the job has a result, else None."""
        value = await self.redis.get(self.keys.batch_job_result(job_id))
        return None if value is None else unpack(value)


def _line_id(batch_id: str, index: int) -> str:
    return f"batch_req_{batch_id.removeprefix('batch_')}_{index}"


def _file_object(meta: dict[str, str]) -> dict[str, Any]:
    return {"id": meta["id"], "object": "file", "bytes": int(meta["bytes"]), "created_at": int(meta["created_at"]),
            "filename": meta["filename"], "purpose": meta["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


def _batch_object(f: dict[str, str]) -> dict[str, Any]:
    """The stored fields as OpenAI's Batch object."""
    def at(name: str) -> int | None:
        return int(f[name]) if f.get(name) else None

    tokens_in, tokens_out = int(f.get("input_tokens") or 0), int(f.get("output_tokens") or 0)
    return {
        "id": f["id"], "object": "batch", "endpoint": f["endpoint"],
        "errors": {"object": "list", "data": json.loads(f["errors"])} if f.get("errors") else None,
        "input_file_id": f["input_file_id"], "completion_window": f["completion_window"], "status": f["status"],
        "output_file_id": f.get("output_file_id") or None, "error_file_id": f.get("error_file_id") or None,
        **{name: at(name) for name in ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
                                       "failed_at", "expired_at", "cancelling_at", "cancelled_at")},
        "request_counts": {"total": int(f.get("total") or 0), "completed": int(f.get("completed") or 0),
                           "failed": int(f.get("failed") or 0)},
        "metadata": json.loads(f["metadata"]) if f.get("metadata") else None,
        "usage": {"input_tokens": tokens_in, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": tokens_out, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": tokens_in + tokens_out},
    }


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _decode(row: dict[bytes, bytes]) -> dict[str, str]:
    return {as_str(k): as_str(v) for k, v in row.items()}
