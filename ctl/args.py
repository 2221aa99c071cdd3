"""Argument types aivmmctl's verbs share: one way to read a count, one error wording."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def count(zero: str = "") -> Callable[[str], int]:
    """An argparse type for an integer >= 0; ``zero`` says what 0 means ("no limit")."""
    expected = f"an integer >= 0 ({zero})" if zero else "an integer >= 0"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse
