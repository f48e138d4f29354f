"""``redserve batch``: run a JSONL file of requests as a batch with a live progress line; status, cancel, results.

It talks to Redis directly, through the same ``BatchClient`` as the
gateway's Batch API, so a batch submitted here is also visible at
``GET /v1/batches`` and the other way round. Batch runners
(``redserve batch-runner``) do the work.

The input is OpenAI's batch format (``custom_id``, ``method``, ``url``,
``body`` per line) or plain request bodies, one per line, whose endpoint is
inferred (``messages``: chat, ``prompt``: completions, ``input``:
embeddings) and whose ``custom_id`` is ``line-<n>``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any, TextIO

from broker.batch import BatchClient
from broker.batch_store import ENDPOINTS, TERMINAL
from broker.errors import ServeError
from broker.settings import MissingRedisURL, Settings
from redserve.flags import add_settings_flags, settings_from

POLL = 0.25


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``batch`` subcommand and its own subcommands."""

    p = subparsers.add_parser("batch", parents=[common], help="Run a JSONL file of requests as a batch; follow, "
                                                             "cancel or collect batches.")
    sub = p.add_subparsers(dest="batch_command", required=True)
    submit = sub.add_parser("submit", parents=[common], help="Submit a JSONL file and watch it run.")
    submit.add_argument("file", help="OpenAI batch lines (custom_id, method, url, body) or plain request bodies.")
    submit.add_argument("--model", default=None, help="Model for every request that names none.")
    submit.add_argument("--endpoint", choices=ENDPOINTS, default=None,
                        help="Endpoint of plain request bodies [default: inferred from each body].")
    submit.add_argument("--out", default=None, help="Write the results here, in input order [default: stdout].")
    submit.add_argument("--no-wait", action="store_true", help="Print the batch id and return at once.")
    status = sub.add_parser("status", parents=[common], help="Show a batch's status and request counts.")
    status.add_argument("batch_id")
    status.add_argument("--json", action="store_true", help="Print the whole OpenAI batch object.")
    cancel = sub.add_parser("cancel", parents=[common], help="Cancel a batch: requests not started are skipped.")
    cancel.add_argument("batch_id")
    results = sub.add_parser("results", parents=[common], help="Write a finished batch's results (output and "
                                                               "errors, in input order).")
    results.add_argument("batch_id")
    results.add_argument("--out", default=None, help="File to write [default: stdout].")
    for leaf in (submit, status, cancel, results):
        add_settings_flags(leaf, "redis")
    return p


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        settings.resolved_redis_url()
        return asyncio.run(_COMMANDS[args.batch_command](args, settings))
    except MissingRedisURL as exc:
        print(f"redserve: {exc}", file=sys.stderr)
        return 2
    except ServeError as exc:  # an unknown batch, a batch that can no longer be cancelled, ...
        print(f"redserve: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _submit(args: argparse.Namespace, settings: Settings) -> int:
    with open(args.file, "rb") as f:
        content, endpoint = prepare(f.read(), args.model, args.endpoint)
    async with BatchClient(settings.required_batch_url(settings.resolved_redis_url()), settings) as client:
        uploaded = await client.create_file(content, filename=os.path.basename(args.file))
        batch = await client.create_batch(input_file_id=uploaded["id"], endpoint=endpoint)
        print(f"{batch['id']}: {endpoint}; Ctrl-C stops watching, the batch goes on "
              f"(`redserve batch status {batch['id']}`)", file=sys.stderr)
        if args.no_wait:
            print(batch["id"])
            return 0
        if not await client.runner_alive():
            print("warning: no batch runner has reported in lately; start one with `redserve batch-runner`",
                  file=sys.stderr)
        progress = Progress(sys.stderr)
        while batch["status"] not in TERMINAL:
            progress.show(batch)
            await asyncio.sleep(POLL)
            batch = await client.batch(batch["id"])
        progress.show(batch, final=True)
        if batch["status"] == "failed":
            for e in (batch["errors"] or {}).get("data", []):
                print(f"  {e['code']}: {e['message']}", file=sys.stderr)
            return 1
        await _write_results(client, batch, args.out)
    return 0 if batch["status"] == "completed" else 1


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    async with BatchClient(settings.required_batch_url(settings.resolved_redis_url()), settings) as client:
        batch = await client.batch(args.batch_id)
    print(json.dumps(batch, indent=2) if args.json else summary(batch))
    return 0


async def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    async with BatchClient(settings.required_batch_url(settings.resolved_redis_url()), settings) as client:
        print(summary(await client.cancel_batch(args.batch_id)))
    return 0


async def _results(args: argparse.Namespace, settings: Settings) -> int:
    async with BatchClient(settings.required_batch_url(settings.resolved_redis_url()), settings) as client:
        batch = await client.batch(args.batch_id)
        if batch["status"] not in TERMINAL:
            print(f"{summary(batch)}: not finished yet", file=sys.stderr)
            return 1
        await _write_results(client, batch, args.out)
    return 0


_COMMANDS = {"submit": _submit, "status": _status, "cancel": _cancel, "results": _results}


def prepare(content: bytes, model: str | None, endpoint: str | None) -> tuple[bytes, str]:
    """The file as OpenAI batch lines, and the batch's endpoint.

    Plain bodies become lines; ``model`` fills in bodies that name none. A
    line that is not JSON is passed on untouched, for the batch's validation
    to report with its line number.
    """
    lines: list[str] = []
    urls: list[str] = []
    for number, raw in enumerate(content.decode("utf-8", errors="replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            lines.append(raw)
            continue
        if isinstance(obj, dict) and "custom_id" not in obj and "body" not in obj:
            obj = {"custom_id": f"line-{number}", "method": "POST", "url": endpoint or infer_endpoint(obj),
                   "body": obj}
        if isinstance(obj, dict) and isinstance(obj.get("body"), dict):
            if model:
                obj["body"].setdefault("model", model)
            urls.append(str(obj.get("url")))
        lines.append(json.dumps(obj, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode(), endpoint or (urls[0] if urls else ENDPOINTS[0])


def infer_endpoint(body: dict[str, Any]) -> str:
    if "messages" in body:
        return "/v1/chat/completions"
    if "input" in body:
        return "/v1/embeddings"
    return "/v1/completions" if "prompt" in body else "/v1/chat/completions"


async def _write_results(client: BatchClient, batch: dict[str, Any], out: str | None) -> None:
    """Output and error lines merged back into input order (a line's id ends with its request index)."""
    lines: list[bytes] = []
    for file_id in (batch["output_file_id"], batch["error_file_id"]):
        if file_id:
            lines += (await client.file_content(file_id)).splitlines()
    lines.sort(key=lambda line: int(json.loads(line)["id"].rsplit("_", 1)[1]))
    data = b"".join(line + b"\n" for line in lines)
    if out:
        with open(out, "wb") as f:
            f.write(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def summary(batch: dict[str, Any]) -> str:
    c = batch["request_counts"]
    files = "".join(f"  {name} {batch[key]}" for name, key in (("output", "output_file_id"),
                                                              ("errors", "error_file_id")) if batch[key])
    return f"{batch['id']}  {batch['status']}  {c['completed'] + c['failed']}/{c['total']} done  " \
           f"{c['failed']} failed{files}"


class Progress:
    """One status line on stderr: rewritten in place on a terminal, printed once a second otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._origin: tuple[float, int] | None = None
        self._printed = 0.0

    def show(self, batch: dict[str, Any], *, final: bool = False) -> None:
        c = batch["request_counts"]
        done, total = c["completed"] + c["failed"], c["total"]
        now = time.monotonic()
        if self._origin is None and batch["status"] != "validating":
            self._origin = (now, done)
        rate = eta = None
        if self._origin and now > self._origin[0] + 0.2:
            rate = (done - self._origin[1]) / (now - self._origin[0])
            eta = (total - done) / rate if rate > 0 else None
        line = (f"{batch['id']}  {batch['status']:<11} {done}/{total} done  {c['failed']} failed  "
                f"{'-' if rate is None else f'{rate:.1f}'} req/s  ETA {_clock(eta)}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        elif final or now - self._printed >= 1.0:
            self.stream.write(line + "\n")
            self._printed = now
        self.stream.flush()


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
