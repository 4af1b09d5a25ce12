"""Synchronous data parallelism: average the updates of all workers over a named axis.

Every worker computes a gradient on its own mini-batch; ``allreduce`` replaces it by the mean over
the workers (``lax.pmean``), so that all workers then take the same step from the same parameters
(lecture: g̃ = (1/N) Σ_n g_n; θ ← θ − α g̃). Put it *first* in a chain, so that the optimizer after
it sees the averaged gradient and its state stays identical on every worker::

    optax.chain(jaxdp.allreduce("workers"), optax.adam(3e-4))

With the mean loss, N workers with per-worker batch b then produce the same parameters as one
worker with batch N·b (to float tolerance).

The axis must be bound by the caller: run the update under ``jax.vmap(..., axis_name=...)``,
``jax.shard_map`` over a mesh with that axis, or ``jax.pmap`` — see :mod:`jaxdp.runtime`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

AxisName = str | tuple[str, ...]


class AllReduceState(NamedTuple):
    """``allreduce`` keeps no state: averaging is stateless."""


def validate_axis_name(axis_name: object, who: str) -> AxisName:
    """Return ``axis_name`` if it is a non-empty str or a non-empty tuple of them; else raise naming it."""
    if isinstance(axis_name, str):
        if not axis_name:
            raise ValueError(f"{who}: axis_name must be a non-empty string, got ''")
        return axis_name
    if isinstance(axis_name, tuple):
        if not axis_name or not all(isinstance(name, str) and name for name in axis_name):
            raise ValueError(
                f"{who}: axis_name must be a str or a non-empty tuple of non-empty str, got {axis_name!r}"
            )
        return axis_name
    raise TypeError(
        f"{who}: axis_name must be a str or a tuple of str, got {type(axis_name).__name__} {axis_name!r}"
    )


def mean_over_axis(tree: optax.Updates, axis_name: AxisName, who: str) -> optax.Updates:
    """``lax.pmean`` of every leaf over ``axis_name``, with a clear error when the axis is unbound.

    JAX reports an unbound axis as a bare ``NameError`` at trace time; we re-raise it as a
    ``ValueError`` that says which axis and how to bind it. ``who`` names the calling transform.
    """
    try:
        return jax.lax.pmean(tree, axis_name)
    except NameError as error:
        raise ValueError(
            f"{who}: axis_name {axis_name!r} is not bound; run the update under "
            f"vmap/shard_map/pmap with axis_name={axis_name!r} ({error})"
        ) from error


def allreduce(axis_name: AxisName) -> optax.GradientTransformation:
    """Average the updates over the workers of a named axis (synchronous data parallelism).

    Semantics: ``update(g, state) = (pmean(g, axis_name), state)``. Every worker then holds the same
    averaged update; any optimizer chained after it sees that average, so its state (momentum,
    Adam moments) stays identical across workers and the workers stay in lock-step.

    Memory: none beyond the inputs (the state is empty). Communication: one all-reduce of a
    params-sized tree per step.

    Args:
      axis_name: the name of the worker axis (a ``str``), or a tuple of names to average over
        several mesh axes at once. Must be bound when ``update`` is traced.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`AllReduceState`. ``update`` raises
      ``ValueError`` naming ``axis_name`` when the axis is not bound.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxdp
      >>> opt = optax.chain(jaxdp.allreduce("workers"), optax.sgd(0.1))
      >>> params = jnp.zeros((4, 2))  # 4 workers, each with its own copy
      >>> grads = jnp.arange(8.0).reshape(4, 2)
      >>> def step(p, g):
      ...     updates, _ = opt.update(g, opt.init(p), p)
      ...     return optax.apply_updates(p, updates)
      >>> jax.vmap(step, axis_name="workers")(params, grads)[0]
      Array([-0.3, -0.4], dtype=float32)
    """
    axis_name = validate_axis_name(axis_name, "allreduce")

    def init_fn(params: optax.Params) -> AllReduceState:
        del params
        return AllReduceState()

    def update_fn(
        updates: optax.Updates, state: AllReduceState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, AllReduceState]:
        del params
        return mean_over_axis(updates, axis_name, "allreduce"), state

    return optax.GradientTransformation(init_fn, update_fn)
