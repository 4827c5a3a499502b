"""Typed configuration: dataclasses with defaults, help text and cross-field checks.

CLI flags are derived from the dataclasses (:func:`add_arguments` /
:func:`from_arguments`); environment variables are read here and only here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, help: str, flag: bool = True, **kw: Any) -> Any:
    """A dataclass field with CLI help text; ``flag=False`` keeps it off the CLI."""
    meta = {"help": help, "flag": flag}
    if "default_factory" in kw:
        return dataclasses.field(default_factory=kw.pop("default_factory"), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def env(name: str, default: str | None = None) -> str | None:
    """Reads one environment variable (the single place the process environment is read)."""
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def home_dir() -> Path:
    """Root of llmcluster's state: $LLMCLUSTER_HOME, else ~/.cache/llmcluster."""
    return Path(env("LLMCLUSTER_HOME") or Path.home() / ".cache" / "llmcluster")


def _base_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one ``--flag-name`` per field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("flag", True):
            continue
        tp = _base_type(hints[f.name])
        name = "--" + f.name.replace("_", "-")
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        if tp is bool:
            parser.add_argument(
                name,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif typing.get_origin(tp) in (list, tuple):
            item = typing.get_args(tp)[0] if typing.get_args(tp) else str

            def parse_list(text: str, item: Any = item) -> list[Any]:
                return [item(x) for x in text.split(",") if x]

            parser.add_argument(
                name,
                dest=f.name,
                default=None,
                type=parse_list,
                help=help_text + " comma-separated",
            )
        else:
            parser.add_argument(name, dest=f.name, type=tp, default=None, help=help_text)


def from_arguments(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """Builds ``cls`` from parsed flags; flags not given keep the dataclass default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        v = getattr(ns, f.name, None)
        if v is not None:
            values[f.name] = v
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)
