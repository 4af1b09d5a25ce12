"""Delay distributions: how late an asynchronous worker's gradient reaches the server.

A :class:`DelayDistribution` holds the probabilities of the delays ``{0, 1, ..., max_delay}``
as one array of shape ``(max_delay + 1,)``. The *shape* carries ``max_delay``, which is static
(it sizes ring buffers), while the *values* are an ordinary pytree leaf: a sweep over
distributions of the same ``max_delay`` is a ``jax.vmap``, e.g.
``jax.vmap(lambda p: delays.geometric(p, 8))(jnp.array([0.2, 0.5, 0.9]))``.

Constructors validate concrete arguments and name the offending one; traced arguments
(inside ``vmap``/``jit``) cannot be checked and are taken as given.

Example:
  >>> import jax
  >>> from jaxdp import delays
  >>> dist = delays.geometric(0.5, max_delay=4)
  >>> delays.max_delay(dist)
  4
  >>> int(delays.sample(dist, jax.random.PRNGKey(0))) in range(5)
  True
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp


class DelayDistribution(NamedTuple):
    """Probabilities of the delays ``0..max_delay``; ``probs.shape == (max_delay + 1,)``.

    ``probs`` need not be normalised (sampling treats it as relative weights) but must be
    non-negative with a positive sum.
    """

    probs: jax.Array


def _concrete(x: Any) -> Any | None:
    """The value of ``x`` if it is known at trace time, else None (a tracer cannot be checked)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return x


def _check_max_delay(max_delay: Any, caller: str) -> int:
    if isinstance(max_delay, bool) or not isinstance(max_delay, numbers.Integral):
        raise TypeError(f"{caller}: max_delay must be an int, got {max_delay!r}")
    if max_delay < 0:
        raise ValueError(f"{caller}: max_delay must be >= 0, got {max_delay}")
    return int(max_delay)


def _prng_key(seed: Any, caller: str) -> jax.Array:
    """A PRNG key from an int seed or a key (raw ``uint32[2]`` or typed); tracers allowed.

    Shared by the strategies that hold a key in their state.
    """
    if isinstance(seed, bool):
        raise TypeError(f"{caller}: seed must be an int or a jax PRNG key, got {seed!r}")
    if isinstance(seed, numbers.Integral):
        return jax.random.PRNGKey(int(seed))
    if hasattr(seed, "dtype") and hasattr(seed, "shape"):
        if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) and seed.shape == ():
            return seed
        if seed.shape == (2,) and seed.dtype == jnp.uint32:
            return seed
        if seed.shape == () and jnp.issubdtype(seed.dtype, jnp.integer):
            return jax.random.PRNGKey(seed)
    raise TypeError(
        f"{caller}: seed must be an int or a jax PRNG key, got {type(seed).__name__} "
        f"{getattr(seed, 'shape', '')}"
    )


def fixed(d: int) -> DelayDistribution:
    """Every gradient is exactly ``d`` steps late (a one-hot distribution).

    Args:
      d: the delay, an int >= 0.

    Returns:
      A DelayDistribution with ``max_delay == d``.
    """
    if isinstance(d, bool) or not isinstance(d, numbers.Integral):
        raise TypeError(f"delays.fixed: d must be an int, got {d!r}")
    if d < 0:
        raise ValueError(f"delays.fixed: d must be >= 0, got {d}")
    return DelayDistribution(jax.nn.one_hot(int(d), int(d) + 1, dtype=jnp.float32))


def uniform(max_delay: int) -> DelayDistribution:
    """Delays uniform on ``{0, ..., max_delay}`` (workers of equal speed, random order).

    Args:
      max_delay: the largest delay, an int >= 0.

    Returns:
      A DelayDistribution with ``probs == 1 / (max_delay + 1)`` everywhere.
    """
    max_delay = _check_max_delay(max_delay, "delays.uniform")
    return DelayDistribution(jnp.full((max_delay + 1,), 1.0 / (max_delay + 1), jnp.float32))


def geometric(p: float | jax.Array, max_delay: int) -> DelayDistribution:
    """Geometric delays ``P(k) ∝ p (1 - p)^k``, truncated at ``max_delay`` and renormalised.

    ``p`` is the chance that a gradient arrives at each step it is still in flight; small
    ``p`` means long delays. ``p`` may be traced (a sweep over ``p`` is a ``vmap``).

    Args:
      p: success probability in ``(0, 1]``.
      max_delay: the truncation point, an int >= 0.

    Returns:
      A normalised DelayDistribution of shape ``(max_delay + 1,)``.
    """
    max_delay = _check_max_delay(max_delay, "delays.geometric")
    p_value = _concrete(p)
    if p_value is not None:
        p_value = float(p_value)
        if not 0.0 < p_value <= 1.0:
            raise ValueError(f"delays.geometric: p must be in (0, 1], got {p_value}")
    k = jnp.arange(max_delay + 1, dtype=jnp.float32)
    p = jnp.asarray(p, jnp.float32)
    weights = p * jnp.power(1.0 - p, k)
    return DelayDistribution(weights / jnp.sum(weights))


def zipf(exponent: float | jax.Array, max_delay: int) -> DelayDistribution:
    """Heavy-tailed *straggler* delays ``P(k) ∝ (k + 1)^(-exponent)`` on ``{0..max_delay}``.

    Models stragglers: most gradients arrive almost on time, but a slow worker now and then
    delivers one very late, far more often than a geometric tail would allow. Smaller
    ``exponent`` means heavier stragglers (``exponent = 0`` is uniform).
    ``exponent`` may be traced.

    Args:
      exponent: the power-law exponent, a finite float >= 0.
      max_delay: the truncation point, an int >= 0.

    Returns:
      A normalised DelayDistribution of shape ``(max_delay + 1,)``.
    """
    max_delay = _check_max_delay(max_delay, "delays.zipf")
    exponent_value = _concrete(exponent)
    if exponent_value is not None:
        exponent_value = float(exponent_value)
        if not (0.0 <= exponent_value < float("inf")):
            raise ValueError(f"delays.zipf: exponent must be finite and >= 0, got {exponent_value}")
    k = jnp.arange(max_delay + 1, dtype=jnp.float32)
    weights = jnp.power(k + 1.0, -jnp.asarray(exponent, jnp.float32))
    return DelayDistribution(weights / jnp.sum(weights))


def max_delay(dist: DelayDistribution) -> int:
    """The largest delay ``dist`` can produce (static: read from the shape of ``probs``)."""
    return int(jnp.shape(dist.probs)[-1]) - 1


def sample(dist: DelayDistribution, key: jax.Array) -> jax.Array:
    """Draws one delay from ``dist``.

    Args:
      dist: the distribution; ``probs`` of rank 1.
      key: a PRNG key.

    Returns:
      An int32 scalar in ``{0..max_delay(dist)}``.
    """
    chex.assert_rank(dist.probs, 1)
    # log(0) = -inf: impossible delays are never drawn.
    logits = jnp.log(jnp.asarray(dist.probs, jnp.float32))
    return jax.random.categorical(key, logits).astype(jnp.int32)


def _validate(dist: Any, caller: str) -> DelayDistribution:
    """Checks that ``dist`` is a usable DelayDistribution (concrete values only); names ``caller``."""
    if not isinstance(dist, DelayDistribution):
        raise TypeError(f"{caller}: delay must be an int or a DelayDistribution, got {type(dist).__name__}")
    probs = dist.probs
    if jnp.ndim(probs) != 1 or jnp.shape(probs)[0] < 1:
        raise ValueError(f"{caller}: delay.probs must have shape (max_delay + 1,), got {jnp.shape(probs)}")
    if not jnp.issubdtype(jnp.result_type(probs), jnp.floating):
        raise TypeError(f"{caller}: delay.probs must be floating point, got {jnp.result_type(probs)}")
    probs_value = _concrete(probs)
    if probs_value is not None:
        probs_value = jnp.asarray(probs_value)
        if bool(jnp.any(probs_value < 0)) or not bool(jnp.sum(probs_value) > 0):
            raise ValueError(f"{caller}: delay.probs must be >= 0 with a positive sum, got {probs_value}")
    return dist
