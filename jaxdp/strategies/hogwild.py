"""Lock-free shared-memory parallelism (Hogwild!) as the DPSGD paper's synthetic process.

Several threads update one shared parameter vector without locks. Following the synthetic
write sequence of Zhao & Li (2016), used in Sec. 3.2 of the DPSGD paper (Mohamad et al.),
the disordered lock-free writes are replaced by an ordered sequence: each ``update()`` call
is one thread's write in a round-robin of ``num_threads`` threads, and two things can go
wrong with it, per coordinate ``i``:

* **stale reads.** The write to coordinate ``i`` lands ``τ_i ~ Uniform{0..max_staleness}``
  steps late. A coordinate whose write has not landed is exactly a coordinate that the next
  threads read stale: since this transform receives gradients already computed from the
  parameters it emitted, delaying the landing of each coordinate is how stale reads enter.
  The default ``max_staleness = num_threads − 1`` says that a thread's read can miss the
  writes of the other threads still in flight, but never its own previous write.
* **lost writes.** Each coordinate of a write is lost with probability ``overwrite_prob``
  (another thread overwrote it before it was committed): the paper's diagonal 0/1 matrix.

All randomness comes from the key held in the state: the draws of step ``t`` use
``jax.random.fold_in(state.key, t)``, so a run is reproducible from its seed.
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


class HogwildState(NamedTuple):
    """State of :func:`hogwild`.

    Attributes:
      step: int32 scalar, the number of writes so far.
      key: the PRNG key (constant; folded with ``step``).
      buffer: the parts of past writes not landed yet, by landing slot; leaves of shape
        ``(max_staleness + 1, *param.shape)``. None when ``max_staleness == 0``.
      inner_state: the state of ``inner`` (advances at every write).
    """

    step: jax.Array
    key: jax.Array
    buffer: optax.Updates | None
    inner_state: optax.OptState


def _land(
    slots: jax.Array, write: jax.Array, landing_delay: jax.Array, step: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Adds each coordinate of ``write`` to its landing slot, then takes out slot ``step``.

    One elementwise pass makes the new buffer: it spreads the write and zeroes the landed slot in
    the same select, instead of a masked add followed by a separate ``.at[read].set(0)`` pass.
    The landed slot is the old slot plus the coordinates landing at once. (XLA:CPU still copies
    the buffer once per step so that the old slot stays readable next to the in-place rewrite.)
    """
    num_slots = slots.shape[0]
    write = write.astype(slots.dtype)
    read = step % num_slots
    target = (step + landing_delay) % num_slots
    landed = lax.dynamic_index_in_dim(slots, read, axis=0, keepdims=False) + jnp.where(
        landing_delay == 0, write, jnp.zeros_like(write)
    )
    slot_ids = lax.broadcasted_iota(jnp.int32, slots.shape, 0)
    spread = slots + jnp.where(slot_ids == target[None], write[None], jnp.zeros_like(write)[None])
    return jnp.where(slot_ids == read, jnp.zeros_like(slots), spread), landed


def hogwild(
    inner: optax.GradientTransformation,
    num_threads: int,
    max_staleness: int | None = None,
    overwrite_prob: float | jax.Array = 0.0,
    *,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    """Lock-free threads writing to shared memory: stale, partially lost writes of ``inner``.

    Each ``update()`` is one thread's write: ``inner``'s update vector, each coordinate of which
    is lost with probability ``overwrite_prob`` and otherwise lands ``τ_i ~
    Uniform{0..max_staleness}`` steps later (the emitted update of a step is everything that
    lands then). With ``overwrite_prob = 0`` every write lands exactly once, so after
    ``max_staleness`` more zero writes the sum of the emitted updates equals the sum of
    ``inner``'s. ``overwrite_prob = 0, max_staleness = 0`` is ``inner`` exactly (skipped
    statically).

    Memory: a per-coordinate ring buffer of ``(max_staleness + 1) × params`` (none when
    ``max_staleness == 0``), plus ``inner``'s state. Compute: each write is spread over the
    slots and the landed slot zeroed in one select pass over the buffer, ``(max_staleness + 1) ×
    params`` per step (plus, on XLA:CPU, a copy of the buffer), and one 32-bit random draw per
    coordinate for the landing delays (two with ``overwrite_prob > 0``).

    Args:
      inner: the per-thread optimizer (e.g. ``optax.sgd(η_l)``); advances at every write.
      num_threads: the number of threads ``P >= 1`` in the round-robin.
      max_staleness: the largest landing delay ``>= 0``; default ``num_threads − 1``.
      overwrite_prob: probability in ``[0, 1]`` that a coordinate of a write is lost. May be
        traced (a sweep is a ``vmap``); then the lossless case is not skipped statically.
      seed: an int or a jax PRNG key (raw or typed; may be traced).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`HogwildState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxdp import hogwild
      >>> tx = hogwild(optax.sgd(0.1), num_threads=4, overwrite_prob=0.1, seed=0)
      >>> params = jnp.ones(1000)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.ones(1000), state, params)
      >>> bool(jnp.all((updates == 0) | jnp.isclose(updates, -0.1)))
      True

    References:
      Recht et al., 2011, "Hogwild!: A lock-free approach to parallelizing SGD".
      Zhao & Li, 2016, "Fast asynchronous parallel SGD: a lock-free approach with convergence
      guarantee" (the synthetic write sequence).
      Mohamad et al., "DPSGD", Sec. 3.2.
    """
    if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral):
        raise TypeError(f"hogwild: num_threads must be an int, got {num_threads!r}")
    if num_threads < 1:
        raise ValueError(f"hogwild: num_threads must be >= 1, got {num_threads}")
    if max_staleness is None:
        max_staleness = int(num_threads) - 1
    if isinstance(max_staleness, bool) or not isinstance(max_staleness, numbers.Integral):
        raise TypeError(f"hogwild: max_staleness must be an int, got {max_staleness!r}")
    if max_staleness < 0:
        raise ValueError(f"hogwild: max_staleness must be >= 0, got {max_staleness}")
    max_staleness = int(max_staleness)
    overwrite_value = delays_lib._concrete(overwrite_prob)
    if overwrite_value is not None:
        overwrite_value = float(overwrite_value)
        if not 0.0 <= overwrite_value <= 1.0:
            raise ValueError(f"hogwild: overwrite_prob must be in [0, 1], got {overwrite_value}")
    delays_lib._prng_key(seed, "hogwild")  # validate now; the key is made in init
    lossless = overwrite_value == 0.0
    inner = optax.with_extra_args_support(inner)
    num_slots = max_staleness + 1

    def init_fn(params: optax.Params) -> HogwildState:
        buffer = None
        if max_staleness > 0:
            buffer = jax.tree.map(lambda p: jnp.zeros((num_slots,) + jnp.shape(p), jnp.result_type(p)), params)
        return HogwildState(
            step=jnp.zeros([], jnp.int32),
            key=delays_lib._prng_key(seed, "hogwild"),
            buffer=buffer,
            inner_state=inner.init(params),
        )

    def update_fn(
        updates: optax.Updates,
        state: HogwildState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, HogwildState]:
        writes, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        step = state.step
        if lossless and max_staleness == 0:
            # No contention: be inner, bit for bit.
            return writes, HogwildState(step + 1, state.key, None, inner_state)

        if state.buffer is not None:
            chex.assert_trees_all_equal_structs(writes, state.buffer)
        step_key = jax.random.fold_in(state.key, step)
        write_leaves, treedef = jax.tree.flatten(writes)
        buffer_leaves = [None] * len(write_leaves) if state.buffer is None else treedef.flatten_up_to(state.buffer)
        landed_leaves, new_buffer_leaves = [], []
        for index, (write, slots) in enumerate(zip(write_leaves, buffer_leaves)):
            delay_key, keep_key = jax.random.split(jax.random.fold_in(step_key, index))
            if not lossless:
                keep = jax.random.bernoulli(keep_key, 1.0 - jnp.asarray(overwrite_prob), jnp.shape(write))
                write = jnp.where(keep, write, jnp.zeros_like(write))
            if max_staleness == 0:
                landed_leaves.append(write)
                continue
            # One 32-bit draw per coordinate (randint draws two): exactly uniform when
            # num_slots is a power of two, else biased by less than num_slots / 2**32.
            landing_bits = jax.random.bits(delay_key, jnp.shape(write), jnp.uint32)
            landing_delay = (landing_bits % jnp.uint32(num_slots)).astype(jnp.int32)
            slots, landed = _land(slots, write, landing_delay, step)
            landed_leaves.append(landed.astype(write.dtype))
            new_buffer_leaves.append(slots)
        buffer = None if max_staleness == 0 else treedef.unflatten(new_buffer_leaves)
        new_state = HogwildState(step + 1, state.key, buffer, inner_state)
        return treedef.unflatten(landed_leaves), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
