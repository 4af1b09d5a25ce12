"""Supervised learning as a :class:`~jaxdp.workloads.base.Workload`: the digits MLP for every runtime.

The runtimes (vmap, devices, async_sim, mpi, distributed) drive a ``Workload``; this module adapts
:mod:`jaxdp.workloads.digits` to that interface:

* ``init(key) -> (params, worker_state)``: the MLP's parameters from ``key`` and a fresh
  :class:`SupervisedWorkerState` (the number of examples this worker has drawn so far).
* ``local_step(worker_state, params, key) -> (worker_state, grads, metrics)``: one mini-batch of
  ``batch_size`` training examples drawn i.i.d. (with replacement) with
  ``fold_in(key, worker_id)``, the gradient of the mean cross-entropy at ``params``, and
  ``{"loss": ...}`` (the mini-batch loss before the step).
* ``evaluate(params) -> {"loss", "accuracy"}``: on the held-out test split.
* ``restart(worker_state, params, n)``: a resumed worker's count, ``n · batch_size``.

Why ``worker_id`` is folded into the key: the runtimes already hand each worker its own key, but a
runtime that does not (or a user who shares one key among processes) still gets decorrelated data
streams, one per worker id. The sampling depends only on ``(key, worker_id)``, never on the
worker state, so a resumed run draws exactly the batches an uninterrupted one would.

Building the workload does no JAX work (the data are loaded on first use), so it can be built before
``jax.distributed.initialize``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxdp.workloads import digits
from jaxdp.workloads.base import Workload


class SupervisedWorkerState(NamedTuple):
    """One worker's private state: how many training examples it has drawn (int32 scalar)."""

    examples_seen: jax.Array


def digits_workload(
    batch_size: int = 32, hidden: Sequence[int] = (64,), seed: int = 0, worker_id: int = 0
) -> Workload:
    """The digits MLP classifier as a :class:`Workload`.

    Args:
      batch_size: examples per local step (per worker), >= 1.
      hidden: widths of the tanh hidden layers (may be empty: softmax regression).
      seed: seeds the train/test split (``digits.load(seed)``); the parameters come from the key
        given to ``init``.
      worker_id: >= 0, folded into every sampling key so that workers sharing a key still draw
        different batches (the MPI runtime passes the rank).

    Returns:
      A ``Workload`` named ``"digits"``. ``local_step``'s metrics: ``{"loss"}`` (mini-batch loss);
      ``evaluate``'s: ``{"loss", "accuracy"}`` on the test split. All three are jittable.

    Example:
      >>> import jax
      >>> workload = digits_workload(batch_size=8, hidden=(16,))
      >>> params, state = workload.init(jax.random.PRNGKey(0))
      >>> state, grads, metrics = workload.local_step(state, params, jax.random.PRNGKey(1))
      >>> int(state.examples_seen), sorted(workload.evaluate(params))
      (8, ['accuracy', 'loss'])
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"digits_workload: batch_size must be an int, got {type(batch_size).__name__} {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"digits_workload: batch_size must be >= 1, got {batch_size}")
    hidden = tuple(hidden)
    if any(isinstance(width, bool) or not isinstance(width, int) or width < 1 for width in hidden):
        raise ValueError(f"digits_workload: hidden must be a sequence of ints >= 1, got {hidden!r}")
    if isinstance(worker_id, bool) or not isinstance(worker_id, int) or worker_id < 0:
        raise ValueError(f"digits_workload: worker_id must be an int >= 0, got {worker_id!r}")
    loaded: list[digits.Dataset] = []

    def dataset() -> digits.Dataset:
        # Loaded on first use, not here: building a workload must not touch JAX devices, because a
        # multi-process job (jax.distributed) has to initialise before any device is used.
        # ensure_compile_time_eval: the first use may come while a jitted function is being traced,
        # and the data must be concrete arrays, not that trace's tracers.
        if not loaded:
            with jax.ensure_compile_time_eval():
                loaded.append(digits.load(seed=seed))
        return loaded[0]

    def init(key: jax.Array) -> tuple[digits.Params, SupervisedWorkerState]:
        params = digits.init_mlp(key, hidden=hidden)
        return params, SupervisedWorkerState(examples_seen=jnp.zeros([], jnp.int32))

    def local_step(
        worker_state: SupervisedWorkerState, params: digits.Params, key: jax.Array
    ) -> tuple[SupervisedWorkerState, digits.Params, dict[str, jax.Array]]:
        data = dataset()
        x, y = digits.sample_batch(jax.random.fold_in(key, worker_id), data.x_train, data.y_train, batch_size)
        loss, grads = jax.value_and_grad(digits.loss)(params, x, y)
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
        worker_state = SupervisedWorkerState(examples_seen=worker_state.examples_seen + batch_size)
        return worker_state, grads, {"loss": loss}

    @jax.jit  # runtimes call evaluate un-jitted (workloads/base.py): a pure one compiles itself
    def evaluate(params: digits.Params) -> dict[str, jax.Array]:
        data = dataset()
        return {
            "loss": digits.loss(params, data.x_test, data.y_test),
            "accuracy": digits.accuracy(params, data.x_test, data.y_test),
        }

    def restart(worker_state: SupervisedWorkerState, params: digits.Params, local_steps_done: int):
        del worker_state, params  # the batches depend on the key alone: only the count moves on
        return SupervisedWorkerState(examples_seen=jnp.asarray(local_steps_done * batch_size, jnp.int32))

    return Workload(init=init, local_step=local_step, evaluate=evaluate, name="digits", restart=restart)
