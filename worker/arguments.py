"""What both command lines (fleetd's and fleetctl's) share: their parser, and number types
whose error names the word given and what it should have been."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

EXIT_USAGE = 2  # a usage error's exit status, in both commands


def terminal_columns() -> int:
    """The terminal's width as shutil.get_terminal_size() finds it: $COLUMNS, else standard
    output's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(1).columns
        except (OSError, ValueError):
            columns = 0
    return columns or 80


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, sized to the terminal without shutil, which argparse's own imports for
    every argument a parser is given: shutil brings the compressors (zlib, bz2, lzma) with
    it: ~2 ms on the arbiter's way to its first spawn, ~0.25 MiB of its memory for good."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        if width is None:
            width = terminal_columns() - 2  # argparse's own margin
        super().__init__(prog, indent_increment, max_help_position, width)


class Parser(argparse.ArgumentParser):
    """A command line's parser: a usage error is one line and exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse repeats what it was given whole, "unrecognized arguments" unescaped: a
        # 5,000-character word was a line that long, and one holding a newline two lines.
        # Words are cut to 80 characters, the line to 290 (fleetctl's list of commands fits).
        from .logs import one_line, shortened  # here: only an error needs them

        words = (shortened(word, 83) for word in one_line(message).split(" "))
        self.exit(EXIT_USAGE, shortened(f"{self.prog}: error: {' '.join(words)}", 290) + "\n")


def finite(text: str) -> float:
    try:
        if not text.isascii():  # float() reads the digits of every script ("١")
            raise ValueError(text)
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text:.80}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text:.80}")
    return value


def positive(text: str) -> float:
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text:.80}")
    return value


def non_negative(text: str) -> float:
    value = finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text:.80}")
    return value
