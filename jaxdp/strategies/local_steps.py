"""Local steps with an outer step on the update vector: the worker side of DPSGD, local SGD, DiLoCo.

"DPSGD" here is Distributed-Parallel SGD (Mohamad et al., "Scaling up Stochastic Gradient Descent
for Non-convex Optimisation", seeds/002, Alg. 2), not differentially-private SGD
(``optax.contrib.dpsgd``).

A worker keeps an *anchor*: the global parameters it last pulled. For ``sync_every`` (B) steps it
moves its local parameters with ``inner``. At the B-th step it forms the update vector

    Δ = anchor − local        (global minus local: it points uphill, like a gradient)

averages Δ over ``axis_name`` when one is given (synchronous all-reduce of the update vectors, the
M = N master batch of the paper taken in lock-step), treats Δ as the gradient of ``outer`` at the
anchor, and moves the anchor:

    new_anchor = anchor + outer.update(Δ, outer_state, anchor)

The emitted update at that step is ``new_anchor − params``: applying it puts the worker's
parameters onto the new anchor, from which the next round starts. At the other steps the emitted
update is just ``inner``'s. Special cases:

* B = 1 and ``outer = optax.sgd(1.0)``: synchronous SGD with ``inner`` (mean of the inner updates).
* ``outer = optax.sgd(1.0)``: model averaging (local SGD) — the new anchor is the mean of the
  workers' local parameters.
* ``outer = optax.sgd(η_g)``: the paper's global learning rate, anchor − η_g · mean Δ.
* ``outer = optax.sgd(η_g, momentum=0.9, nesterov=True)`` and ``inner = adamw``: DiLoCo.

The asynchronous master of the paper (Alg. 1, M arrivals from stale workers) is the
``async_sim`` / ``mpi`` runtimes' business; this transform is what one worker does.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from jaxdp.strategies.allreduce import AxisName, mean_over_axis, validate_axis_name


class LocalStepsState(NamedTuple):
    """State of :func:`local_steps`.

    Attributes:
      count: local steps taken since the last synchronisation, in ``[0, sync_every)`` (int32).
      anchor: the global parameters the current round started from (1 × params).
      inner_state: state of the local optimizer; kept across rounds, as in DiLoCo.
      outer_state: state of the outer (global) optimizer.
    """

    count: chex.Array
    anchor: optax.Params
    inner_state: optax.OptState
    outer_state: optax.OptState


def local_steps(
    inner: optax.GradientTransformation,
    outer: optax.GradientTransformation,
    sync_every: int,
    axis_name: AxisName | None = None,
) -> optax.GradientTransformation:
    """B local steps with ``inner``, then an outer step with ``outer`` on the update vector Δ.

    DPSGD here is Distributed-Parallel SGD (Mohamad et al.), not differentially-private SGD
    (optax.contrib.dpsgd).

    Each call to ``update(grads, state, params)``:

    1. ``inner_updates = inner.update(grads, inner_state, params)``; ``local = params + inner_updates``;
       ``count += 1``.
    2. If ``count == sync_every`` (a ``lax.cond``, so the synchronisation, including the collective,
       runs only every B steps when the predicate is not batched): ``Δ = anchor − local``, averaged
       over ``axis_name`` if given; ``outer_updates = outer.update(Δ, outer_state, anchor)``;
       ``new_anchor = anchor + outer_updates``; emit ``new_anchor − params``; ``count = 0``.
    3. Otherwise emit ``inner_updates``.

    ``inner``'s state is *not* reset at a synchronisation (as in DiLoCo): moments carry over from
    one round to the next. Under ``jax.vmap`` the per-worker ``count`` is batched, so ``lax.cond``
    becomes a select and both branches run every step (same result, more work); under
    ``shard_map`` or a single worker it is a real branch.

    Memory: the anchor (1 × params) + ``inner``'s state + ``outer``'s state (e.g. 3 × params for
    ``inner = adam`` and ``outer = sgd``). Communication: one all-reduce of Δ every B steps.

    Args:
      inner: the local optimizer (the worker's lock-free threads in the paper; e.g. ``optax.sgd(η_l)``).
      outer: the optimizer applied to the anchor with Δ as the gradient (``optax.sgd(η_g)`` in the
        paper; ``optax.sgd(1.0)`` averages models).
      sync_every: B >= 1, the number of local steps per round.
      axis_name: the worker axis to average Δ over (bound by vmap/shard_map/pmap), or None for a
        single worker (or when the runtime aggregates Δ itself).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`LocalStepsState`. ``update`` requires
      ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, jaxdp
      >>> opt = jaxdp.local_steps(optax.sgd(0.1), optax.sgd(1.0), sync_every=2)
      >>> params = jnp.array([1.0])
      >>> state = opt.init(params)
      >>> for _ in range(2):
      ...     updates, state = opt.update(params, state, params)  # gradient of params**2 / 2
      ...     params = optax.apply_updates(params, updates)
      >>> params, state.count
      (Array([0.81], dtype=float32), Array(0, dtype=int32))
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"local_steps: inner must be an optax.GradientTransformation, got {type(inner).__name__}")
    if not isinstance(outer, optax.GradientTransformation):
        raise TypeError(f"local_steps: outer must be an optax.GradientTransformation, got {type(outer).__name__}")
    if isinstance(sync_every, bool) or not isinstance(sync_every, int):
        raise TypeError(f"local_steps: sync_every must be an int, got {type(sync_every).__name__} {sync_every!r}")
    if sync_every < 1:
        raise ValueError(f"local_steps: sync_every must be >= 1, got {sync_every}")
    if axis_name is not None:
        axis_name = validate_axis_name(axis_name, "local_steps")

    def init_fn(params: optax.Params) -> LocalStepsState:
        return LocalStepsState(
            count=jnp.zeros([], jnp.int32),
            # A real copy: the anchor must not alias params that a caller may donate.
            anchor=jax.tree.map(jnp.array, params),
            inner_state=inner.init(params),
            outer_state=outer.init(params),
        )

    def update_fn(
        grads: optax.Updates, state: LocalStepsState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, LocalStepsState]:
        if params is None:
            raise ValueError(
                "local_steps: update needs params (the local parameters), got params=None; "
                "call opt.update(grads, state, params)"
            )
        inner_updates, inner_state = inner.update(grads, state.inner_state, params)
        count = state.count + 1
        is_sync = count >= sync_every

        # Only what the synchronisation reads goes into the cond, and ``local`` is formed inside
        # it: the other B − 1 steps pass ``inner_updates``, the anchor and the outer state
        # through untouched (XLA aliases them, no copy), so they cost about what ``inner`` does.
        def synchronise(inner_updates, anchor, outer_state):
            local = optax.apply_updates(params, inner_updates)
            delta = jax.tree.map(lambda a, l: (a - l).astype(a.dtype), anchor, local)
            if axis_name is not None:
                delta = mean_over_axis(delta, axis_name, "local_steps")
            outer_updates, outer_state = outer.update(delta, outer_state, anchor)
            new_anchor = optax.apply_updates(anchor, outer_updates)
            # the same dtypes as inner's updates, so that both branches of the cond agree
            to_anchor = jax.tree.map(lambda n, p, u: (n - p).astype(u.dtype), new_anchor, params, inner_updates)
            return to_anchor, new_anchor, outer_state

        def keep_going(inner_updates, anchor, outer_state):
            return inner_updates, anchor, outer_state

        updates, anchor, outer_state = jax.lax.cond(
            is_sync, synchronise, keep_going, inner_updates, state.anchor, state.outer_state
        )
        new_state = LocalStepsState(
            count=jnp.where(is_sync, jnp.zeros_like(count), count),
            anchor=anchor,
            inner_state=inner_state,
            outer_state=outer_state,
        )
        return updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)
