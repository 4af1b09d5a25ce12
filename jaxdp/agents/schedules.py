"""Hyperparameter schedules: ``schedule(step) -> value``, pure and jittable.

A schedule's parameters may be jnp arrays (even traced ones), so that a sweep over, e.g., the final
exploration rate is a ``jax.vmap`` over them instead of a loop of runs.

Example:
    >>> epsilon = linear(start=1.0, end=0.05, duration=10_000)
    >>> [round(float(epsilon(step)), 3) for step in (0, 5_000, 20_000)]
    [1.0, 0.525, 0.05]
"""

from collections.abc import Callable
from numbers import Real

import jax
import jax.numpy as jnp

Schedule = Callable[[jax.Array | int], jax.Array]


def linear(start: float | jax.Array, end: float | jax.Array, duration: int | jax.Array) -> Schedule:
    """Linear interpolation from ``start`` (step 0) to ``end`` (step ``duration``), then constant.

    ``value(step) = start + (end − start) · clip(step / duration, 0, 1)``: the ε-greedy decay of DQN
    (Mnih et al. 2015: 1.0 → 0.1 over the first million frames).

    Args:
        start: value at step 0.
        end: value from step ``duration`` on.
        duration: steps of the ramp, ``> 0`` (checked when it is a Python number).

    Returns:
        ``schedule(step) -> float32 array`` (the broadcast shape of the arguments).
    """
    if isinstance(duration, Real) and not duration > 0:
        raise ValueError(f"linear: duration must be > 0, got {duration!r}")

    def schedule(step):
        fraction = jnp.clip(jnp.asarray(step, jnp.float32) / jnp.asarray(duration, jnp.float32), 0.0, 1.0)
        # Written as a weighted sum so that the ends are exactly `start` and `end`.
        return jnp.asarray(start, jnp.float32) * (1.0 - fraction) + jnp.asarray(end, jnp.float32) * fraction

    return schedule


def constant(value: float | jax.Array) -> Schedule:
    """The schedule that is ``value`` at every step (for ablations that switch a decay off)."""

    def schedule(step):
        return jnp.broadcast_to(jnp.asarray(value, jnp.float32), jnp.shape(value))

    return schedule
