"""Command-line pieces shared by every jaxdp entry point (``jaxdp``, ``python -m jaxdp.runtime.mpi``, ...).

A usage error is one line (``prog: error: ...``) and exit status 2, before any work starts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Collection, Sequence


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: ...``) and exit status 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message}\n")


# Not a string, which argparse would convert with the option's type; compared by identity.
_NOT_GIVEN = object()


def given_options(parser: argparse.ArgumentParser, dests: Collection[str], argv: Sequence[str] | None, *,
                  holder: argparse.ArgumentParser | None = None) -> frozenset[str]:
    """Which of ``dests`` the command line ``argv`` gives, whatever their values: an option given at its default
    value counts, which a comparison with the default cannot tell. ``holder`` is the (sub)parser that declares the
    options, ``parser`` itself by default. Used on a fresh parser: it loses the options' defaults."""
    (holder or parser).set_defaults(**dict.fromkeys(dests, _NOT_GIVEN))
    parsed = vars(parser.parse_args(argv))
    return frozenset(dest for dest in dests if dest in parsed and parsed[dest] is not _NOT_GIVEN)


def folder_problem(path: str, flag: str) -> str | None:
    """Why ``path`` cannot be a folder this process writes in, or None: it is one, or it can be made (its nearest
    existing ancestor is a writable folder). Checked before any work, so a run does not fail at its first write."""
    import os

    full = os.path.abspath(path)
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        if existing == full:
            return f"{flag} {path!r} is a file, not a folder"
        return f"{flag} {path!r} cannot be created: {existing!r} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag} {path!r}: {existing!r} is not writable"
    return None


def file_problem(path: str, flag: str, what: str = "file") -> str | None:
    """Why ``path`` cannot be a file this process writes, or None: it is not a folder, and its folder is one this
    process writes in or can make (``folder_problem``). ``what`` names the file in the message ("the PNG")."""
    import os

    if os.path.isdir(path):
        return f"{flag} {path!r} is a folder: give {what}'s path"
    return folder_problem(os.path.dirname(path) or ".", f"{flag} {path!r}:")


def integer(text: str) -> int:
    """An integer, also one written as a float that is whole (``1e6``, ``2.5e5``), as run lengths and buffer sizes
    are written in papers and scripts; ``1.5`` is refused."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if not math.isfinite(value) or value != math.floor(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value
