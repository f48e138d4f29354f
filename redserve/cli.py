"""``redserve``: the command line. Every flag maps onto one field of ``broker.Settings``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from broker.settings import MissingRedisURL, Settings
from redserve import arena_cli, batch_cli, chat, loop
from redserve.flags import add_settings_flags, settings_from

#: Engines that load a model directory from this machine.
LOCAL_ENGINES = ("hf", "vllm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="redserve", description="LLM serving where gateways and workers meet in Redis (OpenAI-compatible).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="Logging threshold [default info].")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common],
                        help="Run the whole stack here: private Redis (unless REDIS_URL), gateway and workers.")
    up.add_argument("--workers", type=int, default=1, help="Worker processes to start [default 1].")
    up.add_argument("--engine", default="echo", help="Engine of those workers [default echo].")
    up.add_argument("--no-batch-runner", action="store_true", help="Start no batch runner (no /v1/batches).")
    up.add_argument("--model", action="append", default=None, dest="models",
                    help="Model they serve [default: the engine's name]; for hf and vllm a model directory, "
                         "served under its folder name. Repeat it for several models (the arena needs two), "
                         "each with --workers workers of its own.")
    add_settings_flags(up, "redis", "gateway", "worker")
    up.set_defaults(run=_up)

    gw = sub.add_parser("gateway", parents=[common],
                        help="Run an OpenAI-compatible gateway (one process, or --gateway-processes on one port).")
    gw.add_argument("--listen-fd", type=int, default=None,
                    help="Accept on this inherited listening socket instead of binding host:port "
                         "(how --gateway-processes shares one port).")
    add_settings_flags(gw, "redis", "gateway")
    gw.set_defaults(run=_gateway)

    wk = sub.add_parser("worker", parents=[common], help="Run one model worker process.")
    wk.add_argument("--engine", required=True, help="echo, hf, vllm or openai (see README).")
    wk.add_argument("--model", action="append", required=True, dest="models",
                    help="Model to serve: NAME, or NAME=PATH (hf: a model directory); repeat to serve several in "
                         "one worker.")
    wk.add_argument("--worker-id", default=None, help="Stable id instead of a random one.")
    add_settings_flags(wk, "redis", "worker")
    wk.set_defaults(run=_worker)

    tm = sub.add_parser("tiny-model", parents=[common],
                        help="Build a tiny random-weight Llama with a trained tokenizer and chat template, offline.")
    tm.add_argument("directory", help="Where to save it (save_pretrained layout).")
    tm.add_argument("--no-chat-template", action="store_true", help="Leave the chat template out.")
    tm.add_argument("--context-length", type=int, default=256, help="max_position_embeddings [default 256].")
    tm.add_argument("--lora", dest="lora_dir", default=None, metavar="DIR",
                    help="Also build a random LoRA adapter for it in DIR.")
    tm.set_defaults(run=_tiny_model)

    st = sub.add_parser("status", parents=[common], help="Print the live workers, like `docker ps`.")
    add_settings_flags(st, "redis")
    st.set_defaults(run=_status)

    ins = sub.add_parser("inspect", parents=[common], help="Say where a request is: queued, running on which "
                                                           "worker, or finished.")
    ins.add_argument("request_id", help="The id of its response (chatcmpl-..., cmpl-...) or the bare request id.")
    add_settings_flags(ins, "redis")
    ins.set_defaults(run=_inspect)

    br = sub.add_parser("batch-runner", parents=[common],
                        help="Run one batch runner: works batch jobs through the same workers, interactive first.")
    add_settings_flags(br, "redis", "batch-runner")
    br.set_defaults(run=_batch_runner)

    arena_cli.add_parsers(sub, common)
    chat.add_parser(sub, common).set_defaults(run=lambda args, _settings: chat.run(args))
    batch_cli.add_parser(sub, common).set_defaults(run=lambda args, _settings: batch_cli.run(args))
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
    command: Callable[[argparse.Namespace, Settings], int] = args.run
    try:
        return command(args, settings)
    except MissingRedisURL as exc:
        print(f"redserve: {exc}", file=sys.stderr)
        return 2


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from redserve.stack import run_stack

    served: list[tuple[str, str | None]] = []
    if settings.model_path and len(args.models or ()) > 1:
        print("redserve up: --model-path names one model's directory; with several models give each --model "
              "as a directory instead", file=sys.stderr)
        return 2
    for model in args.models or [args.engine]:
        if args.engine in LOCAL_ENGINES and not settings.model_path and os.path.isdir(model):
            served.append((os.path.basename(os.path.normpath(model)), model))
        else:
            served.append((model, None))
    return run_stack(settings, workers=args.workers, engine=args.engine, models=served, log_level=args.log_level,
                     batch_runner=not args.no_batch_runner)


def _gateway(args: argparse.Namespace, settings: Settings) -> int:
    url = settings.resolved_redis_url()
    if settings.gateway_processes > 1 and args.listen_fd is None:
        from redserve.gateways import GatewayGroup

        return GatewayGroup(settings, args.log_level).run()
    from redserve.serve import run_gateway

    return loop.run(run_gateway(url, settings, log_level=args.log_level, listen_fd=args.listen_fd),
                    settings.event_loop)


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    url = settings.resolved_redis_url()
    return loop.run(run_worker(url, settings, args.engine, args.models, args.worker_id), settings.event_loop)


def _tiny_model(args: argparse.Namespace, _settings: Settings) -> int:
    from workers.tiny_model import build_tiny_model

    path = build_tiny_model(args.directory, chat_template=not args.no_chat_template, context_length=args.context_length)
    print(f"tiny model saved in {path}; serve it with: redserve up --engine hf --model {path}")
    if args.lora_dir:
        from workers.tiny_model import build_tiny_lora

        adapter = build_tiny_lora(path, args.lora_dir)
        print(f"a LoRA adapter for it in {adapter}; serve both with: redserve worker --engine hf --model tiny "
              f"--model-path {path} --lora tiny-lora={adapter}")
    return 0


def _status(_args: argparse.Namespace, settings: Settings) -> int:
    from redserve.status import print_status

    return asyncio.run(print_status(settings.resolved_redis_url(), settings))


def _inspect(args: argparse.Namespace, settings: Settings) -> int:
    from redserve.status import print_location

    return asyncio.run(print_location(settings.resolved_redis_url(), settings, args.request_id))


def _batch_runner(_args: argparse.Namespace, settings: Settings) -> int:
    from gateway.batch_runner import serve

    loop.run(serve(settings.resolved_redis_url(), settings), settings.event_loop)
    return 0


async def run_worker(redis_url: str, settings: Settings, engine: str, models: list[str], worker_id: str | None) -> int:
    from workers import engine_class

    worker = engine_class(engine)(redis_url, settings, models, worker_id=worker_id)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.drain)
    await worker.serve()
    return 0
