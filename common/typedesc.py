"""What a type hint expects, in words, for the one-line errors of config and records alike."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal


def describe(tp: Any, *, table: str = "table") -> str:
    """``"a list of strings"``, ``"one of 'a', 'b'"``, ``"an integer or a string"``...

    ``table`` names a nested mapping: "table" in TOML config, "object" in JSON records.
    """
    a_table = f"{'an' if table[0] in 'aeiou' else 'a'} {table}"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        (inner,) = args
        if dataclasses.is_dataclass(inner):
            return f"a list of {table}s"
        word = describe(inner, table=table).removeprefix("a ").removeprefix("an ")
        return f"a list of {word}s"
    if origin is dict:
        return f"{a_table} of strings"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a, table=table) for a in args if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return a_table
    return getattr(tp, "__name__", str(tp))
