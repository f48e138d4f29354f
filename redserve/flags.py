"""Settings as command-line flags: each field of ``broker.settings.Settings`` that names a process in its
``roles`` becomes a flag of that process's subcommand, with its description, env var and default as help.

A new setting gets its flag and its environment variable from its own field, with no second list here.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from broker.settings import Role, Settings, fields_for


def add_settings_flags(parser: argparse.ArgumentParser, *roles: Role) -> None:
    """One flag per setting of ``roles``, in the order the settings are declared."""
    for name in fields_for(*roles):
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
