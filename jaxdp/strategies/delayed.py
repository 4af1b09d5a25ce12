"""Asynchronous SGD with stale gradients: a parameter server that applies each gradient late.

Semantics (one ``update()`` call is one server step ``t``):

* the gradient ``g_t`` received at step ``t`` is applied at step ``t + d_t``, where ``d_t`` is a
  fixed int or drawn from a :class:`~jaxdp.delays.DelayDistribution` as
  ``delays.sample(dist, jax.random.fold_in(state.key, t))`` -- the key held in the state never
  changes, so the whole delay sequence is reproducible from the seed alone;
* every gradient is applied exactly once;
* gradients that arrive at the same step are *summed* and passed to ``inner`` once;
* a step at which nothing arrives emits zero updates and does not advance ``inner``'s state
  (``lax.cond``; under ``vmap`` both branches run and one is selected);
* with ``compensation=λ`` each gradient is corrected on arrival as in DC-ASGD,
  ``g + λ·g⊙g⊙(w_now − w_then)``.

Gradients still in flight when training stops are never applied; feed ``max_delay`` more
(zero) gradients to flush them.

The implementation is a ring buffer of ``max_delay + 1`` gradient-shaped slots and a count of
the gradients due at each: at step ``t``, ``g_t`` is put into slot ``(t + d_t) mod (max_delay +
1)`` (added if the slot's count is positive, else overwriting its stale contents), then slot
``t mod (max_delay + 1)`` is read and its count set to zero; the slot itself is not zeroed.
At any time the pending arrival steps lie in ``[t, t + max_delay]``, ``max_delay + 1``
consecutive integers, so no two pending steps share a slot. Cost per step: one slot written
in place (plus one slot read when the delay is random), and the arriving slot read by
``inner`` directly; a delay known at construction (an int, or ``delays.fixed(d)`` with
concrete probabilities) needs no sampling and never adds to a live slot.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxdp.strategies import delays as delays_lib


class DelayedState(NamedTuple):
    """State of :func:`delayed`.

    Attributes:
      step: int32 scalar, the number of ``update()`` calls so far (the server step ``t``).
      key: the PRNG key the delays are drawn from (constant; folded with ``step``).
      buffer: per slot, the sum of the gradients due at that slot; leaves of shape
        ``(max_delay + 1, *param.shape)``. A slot whose count is zero holds stale data (slots are
        not zeroed when read). None when ``max_delay == 0``.
      counts: int32 ``(max_delay + 1,)``, the number of gradients due at each slot (all zero,
        unused, when ``max_delay == 0``).
      inner_state: the state of ``inner``; advances only at steps where something arrives.
      sq_buffer: per slot ``Σ g⊙g`` (DC-ASGD only, else None; stale where the count is zero).
      sq_params_buffer: per slot ``Σ g⊙g⊙w_then`` (DC-ASGD only, else None).
    """

    step: jax.Array
    key: jax.Array
    buffer: optax.Updates | None
    counts: jax.Array
    inner_state: optax.OptState
    sq_buffer: optax.Updates | None = None
    sq_params_buffer: optax.Updates | None = None


def _check_delay(delay: Any) -> tuple[int, delays_lib.DelayDistribution | None]:
    """Returns ``(max_delay, distribution or None for a fixed int delay)``."""
    if isinstance(delay, bool):
        raise TypeError(f"delayed: delay must be an int or a DelayDistribution, got {delay!r}")
    if isinstance(delay, numbers.Integral):
        if delay < 0:
            raise ValueError(f"delayed: delay must be >= 0, got {delay}")
        return int(delay), None
    dist = delays_lib._validate(delay, "delayed")
    return delays_lib.max_delay(dist), dist


def _fixed_delay(max_delay: int, dist: delays_lib.DelayDistribution | None) -> int | None:
    """The delay every gradient gets, when it is known at construction (an int, or concrete
    probabilities with a single non-zero entry such as ``delays.fixed(d)``); else None."""
    if dist is None:
        return max_delay
    probs = delays_lib._concrete(dist.probs)
    if probs is None:
        return None
    nonzero = jnp.flatnonzero(jnp.asarray(probs))
    return int(nonzero[0]) if nonzero.shape[0] == 1 else None


def _check_compensation(compensation: Any) -> None:
    if compensation is None:
        return
    value = delays_lib._concrete(compensation)
    if value is not None:
        value = float(value)
        if not (0.0 <= value < float("inf")):
            raise ValueError(f"delayed: compensation must be finite and >= 0, got {value}")


def _push(slots: jax.Array, value: jax.Array, write: jax.Array, write_is_live: jax.Array | None) -> jax.Array:
    """Puts ``value`` into slot ``write``: added to it while it is live, else overwriting it.

    A slot is *live* while some gradient is due at it (its count is positive). A dead slot holds
    stale data from its last use and is never zeroed: zeroing the slot just read is a write after
    a read of the same buffer, which XLA:CPU orders by copying the whole ``(max_delay + 1) ×
    params`` buffer every step inside ``lax.scan`` (6-60x the inner step). Here the buffer is
    only written in place (``dynamic_update_slice``), and read afterwards, a plain data
    dependency. ``write_is_live=None`` says statically that the slot is dead (fixed delays).
    """
    value = value.astype(slots.dtype)
    if write_is_live is not None:
        old = lax.dynamic_index_in_dim(slots, write, axis=0, keepdims=False)
        value = jnp.where(write_is_live, old + value, value)
    return lax.dynamic_update_index_in_dim(slots, value, write, axis=0)


def _slot(slots: jax.Array, index: jax.Array) -> jax.Array:
    return lax.dynamic_index_in_dim(slots, index, axis=0, keepdims=False)


def _varying_axes(aval: Any) -> frozenset:
    """The manual mesh axes a value varies over inside ``shard_map`` (empty elsewhere)."""
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def _vary_like(x: jax.Array, target: Any) -> jax.Array:
    """``x`` marked varying over the axes ``target`` varies over.

    Under ``shard_map`` both ``lax.cond`` branches must have the same varying axes; inner's
    update varies with the per-worker gradient, the skip branch's zeros and old state may not.
    """
    missing = _varying_axes(target) - _varying_axes(jax.typeof(x))
    if not missing:
        return x
    return lax.pcast(x, tuple(missing), to="varying")


def delayed(
    inner: optax.GradientTransformation,
    delay: int | delays_lib.DelayDistribution,
    *,
    compensation: float | None = None,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    """Applies each gradient ``delay`` steps late, as an asynchronous parameter server does.

    The gradient received at step ``t`` is applied at step ``t + d_t``; gradients arriving
    together are summed before ``inner``; a step with no arrival emits zeros and leaves
    ``inner``'s state untouched. ``delay=0`` (or any distribution with ``max_delay == 0``) is
    ``inner`` exactly: the buffer and the ``lax.cond`` are skipped statically.

    With ``compensation=λ`` (DC-ASGD, Zheng et al. 2017) each gradient is corrected at
    application with the params it was computed at (``w_then``, the params passed to the
    ``update()`` that received it) and the params now (``w_now``)::

        g + λ · g ⊙ g ⊙ (w_now − w_then)

    Several gradients can arrive together, so each slot keeps ``Σg``, ``Σg⊙g`` and
    ``Σ g⊙g⊙w_then``; the corrected sum ``Σg + λ(Σg⊙g)⊙w_now − λΣ(g⊙g⊙w_then)`` is exact.

    Memory: ``(max_delay + 1) × params`` for the buffer (none when ``max_delay == 0``), or
    ``3 (max_delay + 1) × params`` with compensation, plus ``inner``'s state.

    Works under ``jit``, ``lax.scan``, ``vmap`` (with or without an axis name) and
    ``shard_map``. To give each vmapped worker its own delays, build the transform inside the
    vmapped function with a per-worker ``seed`` key (the seed may be traced).

    Args:
      inner: the optimizer the server runs on the (summed) arriving gradients.
      delay: an int ``d >= 0`` (every gradient ``d`` steps late) or a
        :class:`~jaxdp.delays.DelayDistribution` (``jaxdp.delays.uniform`` etc.).
      compensation: DC-ASGD's ``λ >= 0``, or None for no compensation. When set, ``params``
        must be passed to ``update()``.
      seed: an int or a jax PRNG key (raw or typed; may be traced) for the delays.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`DelayedState`.
      ``params`` and extra args are passed through to ``inner``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxdp import delayed
      >>> tx = delayed(optax.sgd(1.0), delay=2)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> for g in [1.0, 2.0, 3.0]:
      ...     updates, state = tx.update(jnp.full(2, g), state, params)
      >>> updates  # step 2 applies the gradient of step 0
      Array([-1., -1.], dtype=float32)

    References:
      Dean et al., 2012, "Large Scale Distributed Deep Networks" (Downpour SGD).
      Zheng et al., 2017, "Asynchronous Stochastic Gradient Descent with Delay Compensation".
    """
    max_delay, dist = _check_delay(delay)
    _check_compensation(compensation)
    delays_lib._prng_key(seed, "delayed")  # validate now; the key is made in init
    fixed_delay = _fixed_delay(max_delay, dist)
    inner = optax.with_extra_args_support(inner)
    num_slots = max_delay + 1
    compensated = compensation is not None

    def init_fn(params: optax.Params) -> DelayedState:
        def slots():
            if max_delay == 0:
                return None
            return jax.tree.map(lambda p: jnp.zeros((num_slots,) + jnp.shape(p), jnp.result_type(p)), params)

        return DelayedState(
            step=jnp.zeros([], jnp.int32),
            key=delays_lib._prng_key(seed, "delayed"),
            buffer=slots(),
            counts=jnp.zeros([num_slots], jnp.int32),
            inner_state=inner.init(params),
            sq_buffer=slots() if compensated else None,
            sq_params_buffer=slots() if compensated else None,
        )

    def update_fn(
        updates: optax.Updates,
        state: DelayedState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, DelayedState]:
        if compensated and params is None:
            raise ValueError("delayed: compensation requires params in update(), got params=None")
        if max_delay == 0:
            # Nothing can be late: be inner, bit for bit.
            new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
            return new_updates, state._replace(step=state.step + 1, inner_state=inner_state)

        chex.assert_trees_all_equal_structs(updates, state.buffer)
        step = state.step
        if fixed_delay is not None:
            delay_now = jnp.asarray(fixed_delay, jnp.int32)
        else:
            delay_now = delays_lib.sample(dist, jax.random.fold_in(state.key, step))
        write = (step + delay_now) % num_slots
        read = step % num_slots
        # With a fixed delay every slot is read (and so dead) before it is written again.
        write_is_live = None if fixed_delay is not None else state.counts[write] > 0
        counts = state.counts.at[write].add(1)
        num_arrived = counts[read]
        counts = counts.at[read].set(0)

        def push(buffer, values):
            return jax.tree.map(lambda b, v: _push(b, v, write, write_is_live), buffer, values)

        buffer = push(state.buffer, updates)
        sq_buffer = sq_params_buffer = None
        if compensated:
            squares = jax.tree.map(lambda g: g * g, updates)
            sq_buffer = push(state.sq_buffer, squares)
            sq_params_buffer = push(state.sq_params_buffer, jax.tree.map(lambda s, w: s * w, squares, params))

        # The buffers go into the cond whole and the arriving slot is sliced inside the branch, so
        # the slice fuses into inner's first reads instead of being copied out every step.
        def apply_inner(inner_state, buffer, sq_buffer, sq_params_buffer):
            arrived_sum = jax.tree.map(lambda b: _slot(b, read), buffer)
            if compensated:
                # Σ (g + λ g⊙g⊙(w_now − w_then)) over the gradients arriving now.
                arrived_sum = jax.tree.map(
                    lambda g, sq, sqw, w: g + compensation * (_slot(sq, read) * w - _slot(sqw, read)),
                    arrived_sum,
                    sq_buffer,
                    sq_params_buffer,
                    params,
                )
            return inner.update(arrived_sum, inner_state, params, **extra_args)

        operands = (state.inner_state, buffer, sq_buffer, sq_params_buffer)
        out_types = jax.eval_shape(apply_inner, *operands)

        def skip_inner(inner_state, *_):
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_types[0])
            return jax.tree.map(_vary_like, (zeros, inner_state), out_types)

        # A dead slot read here holds stale data; inner never sees it: the skip branch runs (under
        # vmap both run and the apply branch's result is discarded by the select).
        new_updates, inner_state = lax.cond(num_arrived > 0, apply_inner, skip_inner, *operands)
        new_state = DelayedState(
            step=step + 1,
            key=state.key,
            buffer=buffer,
            counts=counts,
            inner_state=inner_state,
            sq_buffer=sq_buffer,
            sq_params_buffer=sq_params_buffer,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
