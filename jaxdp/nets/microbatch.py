"""Apply a network to a large batch as several smaller ones, with the same parameters and outputs.

Why: on XLA:CPU a convolution's cost per frame grows with the batch once its im2col buffers leave the cache.
Measured on a 2-core EPYC (jax 0.10): the A2C update of 128 Pong frames (Nature CNN, forward and backward) takes
112 ms as one batch and 50 ms as four batches of 32. On accelerators one large batch is the fast layout, so
callers use this only on the CPU backend (see ``jaxdp.train.network_apply``).

The split is static (shapes are known at trace time) and differentiable: the parameter gradient is the sum of the
microbatches' gradients, which equals the gradient of the whole batch up to float rounding.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def microbatched(apply_fn: Callable[..., Any], size: int) -> Callable[..., Any]:
    """``apply_fn(params, x)`` computed on slices of at most ``size`` rows of ``x`` and concatenated.

    Args:
      apply_fn: ``(params, x[B, ...]) -> pytree of arrays [B, ...]`` (e.g. a Flax ``module.apply``).
      size: the largest batch one call sees (>= 1).

    Returns:
      A function with ``apply_fn``'s signature and results.

    Example:
      >>> import jax.numpy as jnp
      >>> f = microbatched(lambda p, x: x * p, 2)
      >>> f(3.0, jnp.arange(5.0))
      Array([ 0.,  3.,  6.,  9., 12.], dtype=float32)
    """
    if size < 1:
        raise ValueError(f"microbatched: size must be >= 1, got {size}")

    def apply(params: Any, x: jax.Array) -> Any:
        batch = x.shape[0]
        if batch <= size:
            return apply_fn(params, x)
        # Near-equal slices (e.g. 128 rows at size 48: 43 + 43 + 42), so no call runs a tiny remainder.
        pieces = -(-batch // size)
        bounds = np.linspace(0, batch, pieces + 1).round().astype(int)
        outs = [apply_fn(params, x[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
        return jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=0), *outs)

    return apply
