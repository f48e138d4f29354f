"""Model workers. Each engine subclasses ``workers.base.BaseModelWorker`` and implements only generation."""

from __future__ import annotations

import importlib

from workers.base import BaseModelWorker

#: engine name -> "module:Class", imported only when asked for (engines pull heavy deps).
ENGINES: dict[str, str] = {
    "echo": "workers.echo:EchoWorker",
    "hf": "workers.hf:HFWorker",
    "openai": "workers.openai_api:ExternalAPIWorker",
    "vllm": "workers.vllm:VLLMWorker",
}


def engine_class(name: str) -> type[BaseModelWorker]:
    try:
        module, _, cls = ENGINES[name].partition(":")
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(sorted(ENGINES))}") from None
    return getattr(importlib.import_module(module), cls)
