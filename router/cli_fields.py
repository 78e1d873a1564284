"""Generate argparse flags from a frozen config dataclass, and build the config back.

Each field becomes ``--field-name``; its type comes from the default value, its help and
choices from ``field(metadata={"help": ..., "choices": ...})``. Tuple fields take one or
more values (``nargs="*"``). This keeps the dataclass the single source of truth for both
the CLI and programmatic construction.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of the dataclass ``cls`` to ``parser``."""
    for f in dataclasses.fields(cls):
        default = _default_of(f)
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata.get("help", "")}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kwargs["nargs"] = "*"
        elif default is None:
            kwargs["type"] = str
        else:
            kwargs["type"] = type(default)
        if kwargs["help"] and not isinstance(default, bool):
            kwargs["help"] += f" (default: {default!r})"
        parser.add_argument(flag, **kwargs)


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    """Build ``cls`` from the parsed flags; list values become tuples."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(ns, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"config field {f.name!r} needs a default to become a CLI flag")
