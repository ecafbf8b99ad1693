"""Config dataclasses as command-line flags: one mechanism for every config.

A config field says how it appears on the command line where it is defined, so a new setting is
one line and its flag, help text and default cannot drift from the field::

    @dataclass(frozen=True, kw_only=True)
    class ConvertConfig:
        shard_bytes: int = option(128 * MiB, "close a shard at this many bytes", parse=parse_size)

`add_options` adds one flag per field to an ``argparse`` parser (``--shard-bytes``), with the type
taken from the annotation: ``int``, ``float``, ``str``, ``X | None``, ``bool`` (``--x`` and
``--no-x``) and ``tuple[str, ...]`` (comma-separated). `config_from_args` builds the config back
from the parsed namespace. The help text lives in the field's metadata; config docstrings describe
the config as a whole and do not repeat it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = ["add_options", "config_from_args", "option", "parse_size"]

T = TypeVar("T")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``"64MB"``, ``"64MiB"``, ``"1.5G"`` or ``"1000"`` into bytes (K/M/G: powers of 2)."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64MB)")
    number, unit = float(m.group(1)), m.group(2).lower()
    return int(number * (1 << (10 * " kmgt".index(unit))) if unit else number)


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 - argparse's word
    *,
    parse: Callable[[str], Any] | None = None,
    choices: Iterable[Any] | None = None,
    flags: tuple[str, ...] = (),
    negative: str | None = None,
    positional: bool = False,
    metavar: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field that is also a command-line flag.

    Args:
        default: The field's default; fields without one become required flags.
        help: One line for ``--help``; the default is appended to it.
        parse: Turns the flag's text into the value (default: from the annotation).
        choices: The allowed values.
        flags: Option strings to use instead of ``--field-name`` (e.g. ``("-o", "--output")``).
        negative: For a ``bool``: an extra option string that sets it to ``False``
            (``"--no-eos"``), besides ``--no-<name>``.
        positional: A positional argument instead of a flag.
        metavar: Name of the value in ``--help``.
        cli: ``False`` keeps the field off the command line (set from Python only).

    Returns:
        A `dataclasses.field` carrying the flag's description in its metadata.
    """
    metadata = {
        "help": help,
        "parse": parse,
        "choices": tuple(choices) if choices is not None else None,
        "flags": flags,
        "negative": negative,
        "positional": positional,
        "metavar": metavar,
        "cli": cli,
    }
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """The non-None part of an annotation, and whether ``None`` is allowed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner = args[0] if len(args) == 1 else str
        return inner, True
    return annotation, False


def _split_commas(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parser_of(annotation: Any) -> Callable[[str], Any]:
    if annotation in (int, float, str):
        return annotation
    if typing.get_origin(annotation) is tuple:
        return _split_commas
    return str


def _cli_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [
        (f, hints[f.name])
        for f in dataclasses.fields(cls)
        if f.init and f.metadata.get("cli", True)
    ]


def _shown(value: Any, parse: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    if parse is parse_size and isinstance(value, int):
        for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
            if value >= 1 << shift and value % (1 << shift) == 0:
                return f"{value >> shift}{unit}"
    return str(value)


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: Iterable[str] = (),
) -> None:
    """Add one argument per field of the dataclass ``cls`` (see `option`).

    Args:
        parser: The parser (or argument group) to add to.
        cls: A dataclass whose fields are declared with `option` (plain fields work too).
        skip: Field names to leave off (the caller sets them).
    """
    skipped = set(skip)
    for f, annotation in _cli_fields(cls):
        if f.name in skipped:
            continue
        meta = f.metadata
        help_text = meta.get("help", "")
        has_default = f.default is not dataclasses.MISSING
        inner, _ = _base_type(annotation)
        if meta.get("positional"):
            optional: dict[str, Any] = {"nargs": "?", "default": f.default} if has_default else {}
            parser.add_argument(f.name, help=help_text, metavar=meta.get("metavar"), **optional)
            continue
        names = list(meta.get("flags") or ("--" + f.name.replace("_", "-"),))
        if inner is bool:
            parser.add_argument(
                *names,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=f.default if has_default else None,
                help=help_text,
            )
            if meta.get("negative"):
                parser.add_argument(
                    meta["negative"], dest=f.name, action="store_false", help=argparse.SUPPRESS
                )
            continue
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "type": meta.get("parse") or _parser_of(inner),
            "help": help_text,
        }
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if has_default:
            kwargs["default"] = f.default
            if f.default is not None:
                kwargs["help"] = f"{help_text} (default {_shown(f.default, meta.get('parse'))})"
        else:
            kwargs["required"] = True
        parser.add_argument(*names, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """Build ``cls`` from a namespace parsed with `add_options`.

    Args:
        cls: The config dataclass.
        args: Parsed arguments; attributes named like the fields are used.
        **values: Values for fields set by the caller (skipped flags), or overrides.

    Returns:
        The config; its ``__post_init__`` validates it.
    """
    given = vars(args)
    kwargs = {f.name: given[f.name] for f, _ in _cli_fields(cls) if f.name in given}
    kwargs.update(values)
    return cls(**kwargs)
