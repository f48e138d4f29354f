"""``redserve``: the command line. Every flag maps onto one field of ``broker.Settings``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import typing
from typing import Any, Sequence

from pydantic import ValidationError

from broker.settings import Settings
from redserve import batch_cli, chat, loop

REDIS_FLAGS = ["redis_url", "key_prefix", "event_loop"]
WORKER_FLAGS = ["host", "metrics_port", "model_path", "vllm_engine_args", "api_config", "worker_ttl", "heartbeat_interval", "max_concurrency", "max_queue", "speed", "drain_timeout",
                "orphan_grace", "resend_window", "outbox_max_bytes",
                "echo_tokens", "echo_delay"]
#: Engines that load a model directory from this machine.
LOCAL_ENGINES = ("hf", "vllm")
GATEWAY_FLAGS = ["host", "port", "gateway_processes", "dispatch_method", "reply_timeout", "max_attempts", "replay_window",
                 "redis_wait", "replica_acks", "replica_ack_timeout",
                 "stream_buffer", "send_timeout", "api_keys", "api_keys_file", "admin_api_keys", "open_paths",
                 "api_docs", "rpm_limit", "tpm_limit", "tpm_default_max_tokens", "max_in_flight_per_key",
                 "max_body_bytes", "max_prompt_chars", "max_tokens_cap", "max_messages", "max_n",
                 "batch_max_file_bytes", "batch_max_requests", "batch_ttl", "tenant_max_bytes", "tenant_max_files",
                 "max_concurrent_uploads", "votes_max_entries"]
#: A runner runs each batch line as its batch's owner, under the owner's limits (no key needed in process).
BATCH_RUNNER_FLAGS = ["reply_timeout", "max_attempts", "batch_concurrency", "batch_share", "batch_lease",
                      "batch_max_requests", "batch_ttl", "rpm_limit", "tpm_limit", "tpm_default_max_tokens",
                      "tenant_max_bytes"]


def _add_settings_flags(parser: argparse.ArgumentParser, names: list[str]) -> None:
    """One flag per settings field, with the field's description, env name and default as help."""
    for name in dict.fromkeys(names):  # in order, each once (up takes gateway and worker flags)
        field = Settings.model_fields[name]
        ann = field.annotation
        kwargs: dict[str, Any] = {}
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if typing.get_origin(ann) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(ann))
        elif typing.get_origin(ann) is list:
            kwargs["nargs"] = "*"
        elif ann in (int, float):
            kwargs["type"] = ann
        elif args and all(isinstance(a, str) for a in args):
            kwargs["choices"] = args
        env = "REDIS_URL or REDSERVE_REDIS_URL" if name == "redis_url" else f"REDSERVE_{name.upper()}"
        if typing.get_origin(ann) is list:
            env += " as a JSON list"
        desc = (field.description or name.replace("_", " ")).rstrip(".")
        default = field.get_default(call_default_factory=True)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                            help=f"{desc} [env {env}; default {default!r}]", **kwargs)


def settings_from(args: argparse.Namespace) -> Settings:
    """Environment and defaults, overridden by the flags that were given."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="redserve", description="LLM serving where gateways and workers meet in Redis (OpenAI-compatible).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="Logging threshold [default info].")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="Run the whole stack here: private Redis (unless REDIS_URL), gateway and workers.")
    up.add_argument("--workers", type=int, default=1, help="Worker processes to start [default 1].")
    up.add_argument("--engine", default="echo", help="Engine of those workers [default echo].")
    up.add_argument("--no-batch-runner", action="store_true", help="Start no batch runner (no /v1/batches).")
    up.add_argument("--model", default=None,
                    help="Model they serve [default: the engine's name]; for hf and vllm a model directory, "
                         "served under its folder name.")
    _add_settings_flags(up, REDIS_FLAGS + GATEWAY_FLAGS + WORKER_FLAGS)

    gw = sub.add_parser("gateway", parents=[common],
                        help="Run an OpenAI-compatible gateway (one process, or --gateway-processes on one port).")
    gw.add_argument("--listen-fd", type=int, default=None,
                    help="Accept on this inherited listening socket instead of binding host:port "
                         "(how --gateway-processes shares one port).")
    _add_settings_flags(gw, REDIS_FLAGS + GATEWAY_FLAGS)

    wk = sub.add_parser("worker", parents=[common], help="Run one model worker process.")
    wk.add_argument("--engine", required=True, help="echo, hf, vllm or openai (see README).")
    wk.add_argument("--model", action="append", required=True, dest="models",
                    help="Model name to serve; repeat to serve several under one worker.")
    wk.add_argument("--worker-id", default=None, help="Stable id instead of a random one.")
    _add_settings_flags(wk, REDIS_FLAGS + WORKER_FLAGS)

    tm = sub.add_parser("tiny-model", parents=[common],
                        help="Build a tiny random-weight Llama with a trained tokenizer and chat template, offline.")
    tm.add_argument("directory", help="Where to save it (save_pretrained layout).")
    tm.add_argument("--no-chat-template", action="store_true", help="Leave the chat template out.")
    tm.add_argument("--context-length", type=int, default=256, help="max_position_embeddings [default 256].")

    st = sub.add_parser("status", parents=[common], help="Print the live workers, like `docker ps`.")
    _add_settings_flags(st, REDIS_FLAGS)

    ins = sub.add_parser("inspect", parents=[common], help="Say where a request is: queued, running on which "
                                                           "worker, or finished.")
    ins.add_argument("request_id", help="The id of its response (chatcmpl-..., cmpl-...) or the bare request id.")
    _add_settings_flags(ins, REDIS_FLAGS)

    br = sub.add_parser("batch-runner", parents=[common],
                        help="Run one batch runner: works batch jobs through the same workers, interactive first.")
    _add_settings_flags(br, REDIS_FLAGS + BATCH_RUNNER_FLAGS)

    chat.add_parser(sub, common)
    batch_cli.add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from(args)
    except ValidationError as exc:  # a bad flag or REDSERVE_* variable: say which, no traceback
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            print(f"redserve: --{name.replace('_', '-')} (env REDSERVE_{name.upper()}): {err['msg']}, "
                  f"got {err.get('input')!r}", file=sys.stderr)
        return 2
    if args.command == "up":
        from redserve.stack import run_stack

        model = args.model or args.engine
        if args.engine in LOCAL_ENGINES and not settings.model_path and os.path.isdir(model):
            settings = settings.model_copy(update={"model_path": model})
            model = os.path.basename(os.path.normpath(model))
        return run_stack(settings, workers=args.workers, engine=args.engine, model=model, log_level=args.log_level,
                         batch_runner=not args.no_batch_runner)
    if args.command == "gateway":
        _need_redis(settings)
        if settings.gateway_processes > 1 and args.listen_fd is None:
            from redserve.gateways import GatewayGroup

            return GatewayGroup(settings, args.log_level).run()
        from redserve.serve import run_gateway

        return loop.run(run_gateway(settings, log_level=args.log_level, listen_fd=args.listen_fd),
                        settings.event_loop)
    if args.command == "worker":
        _need_redis(settings)
        return loop.run(run_worker(settings, args.engine, args.models, args.worker_id), settings.event_loop)
    if args.command == "tiny-model":
        from workers.tiny_model import build_tiny_model

        path = build_tiny_model(args.directory, chat_template=not args.no_chat_template,
                                context_length=args.context_length)
        print(f"tiny model saved in {path}; serve it with: redserve up --engine hf --model {path}")
        return 0
    if args.command == "status":
        _need_redis(settings)
        from redserve.status import print_status

        return asyncio.run(print_status(settings))
    if args.command == "inspect":
        _need_redis(settings)
        from redserve.status import print_location

        return asyncio.run(print_location(settings, args.request_id))
    if args.command == "chat":
        return chat.run(args)
    if args.command == "batch-runner":
        _need_redis(settings)
        from gateway.batch_runner import serve

        loop.run(serve(settings), settings.event_loop)
        return 0
    if args.command == "batch":
        return batch_cli.run(args)
    return 2


def _need_redis(settings: Settings) -> None:
    if not settings.redis_url:
        sys.exit("redserve: set --redis-url or REDIS_URL (only `redserve up` starts a private Redis)")


async def run_worker(settings: Settings, engine: str, models: list[str], worker_id: str | None) -> int:
    from workers import engine_class

    worker = engine_class(engine)(settings, models, worker_id=worker_id)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.drain)
    await worker.serve()
    return 0
