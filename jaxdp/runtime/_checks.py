"""Argument checks shared by the runtimes: a bad value is one clear error naming the function and the argument.

Each runtime checks its arguments before it starts work (before MPI or jax.distributed is touched), so a typo
fails at once, on every rank, with the same message.
"""

from __future__ import annotations

import math

import numpy as np


def check_int(caller: str, name: str, value: object, low: int) -> int:
    """``value`` as a Python int, if it is an integer (not a bool) and ``>= low``; else TypeError / ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{caller}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{caller}: {name} must be >= {low}, got {value}")
    return int(value)


def check_positive_float(caller: str, name: str, value: object) -> float:
    """``value`` as a float, if it is a finite number > 0 (not a bool); else ValueError."""
    number = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if not number or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{caller}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_schedule(caller: str, total_updates: object, seed: object, log_every: object, checkpoint_every: object,
                   log_seconds: object, checkpoint_seconds: object) -> tuple[int, int, int, int, float | None,
                                                                          float | None]:
    """A multi-process run's length and seed and when it logs and checkpoints, checked and as Python numbers, in
    that order: ``total_updates`` and ``log_every`` >= 1, ``seed`` and ``checkpoint_every`` >= 0, and the intervals
    in seconds None or finite and > 0."""
    return (check_int(caller, "total_updates", total_updates, 1), check_int(caller, "seed", seed, 0),
            check_int(caller, "log_every", log_every, 1), check_int(caller, "checkpoint_every", checkpoint_every, 0),
            None if log_seconds is None else check_positive_float(caller, "log_seconds", log_seconds),
            None if checkpoint_seconds is None else check_positive_float(caller, "checkpoint_seconds",
                                                                         checkpoint_seconds))
