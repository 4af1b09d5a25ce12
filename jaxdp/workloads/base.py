"""The one interface every runtime drives: what a single worker does between two talks with the master.

A runtime (vmap, devices, async_sim, mpi, distributed) owns the layout of the workers and the communication;
a workload owns the data (a dataset, or environments and a replay buffer) and the loss. They meet here:

* ``init(key) -> (params, worker_state)`` -- the initial global parameters and one worker's private state
  (its data stream, env state, replay buffer...). Runtimes stack ``worker_state`` along a leading worker axis.
* ``local_step(worker_state, params, key) -> (worker_state, grads, metrics)`` -- one stochastic gradient at
  ``params`` from the worker's own data; ``metrics`` is a flat dict of scalars.
* ``evaluate(params) -> metrics`` -- a dict of scalars for logging (test accuracy, greedy return...). Runtimes call
  it on the host between steps and never trace it, so it may keep host-side state (an RL workload carries its
  evaluation env pool from one call to the next); a pure ``evaluate`` jits itself.
* ``restart(worker_state, params, local_steps_done) -> worker_state`` (optional) -- a fresh worker's state made to
  continue a resumed run whose workers had each taken ``local_steps_done`` local steps, at the restored ``params``.
  The multi-process runtimes checkpoint θ and the optimizers, not the workers' private state (an env pool cannot be
  saved, and a replay buffer per process is too big to gather); this hook moves on what a schedule reads (DQN's ε,
  its learning gate and target network), so that a resumed worker does not start its schedule again.
* ``unroll_local_steps`` -- True when ``local_step``'s gradient must not run inside an XLA loop (a CNN on XLA:CPU,
  where convolution gradients run 10-60x slower inside one: jax-ml/jax#12868). Runtimes that take several local
  steps in one program then unroll them (:func:`jaxdp.runtime.async_sim.worker_round`).

Keeping the gradient computation separate from the optimizer lets every strategy (allreduce, delayed, local_steps,
hogwild) wrap the same workload, and keeps ``strategies/`` free of any knowledge of data or RL.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

PyTree = Any
Metrics = dict[str, jax.Array]


class Workload(NamedTuple):
    """A worker's side of training: see the module docstring for the contract of each function."""

    init: Callable[[jax.Array], tuple[PyTree, PyTree]]
    local_step: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree, Metrics]]
    evaluate: Callable[[PyTree], Metrics]
    name: str = "workload"
    unroll_local_steps: bool = False
    restart: Callable[[PyTree, PyTree, int], PyTree] | None = None


def restarted(workload: Workload, worker_state: PyTree, params: PyTree, local_steps_done: int) -> PyTree:
    """``workload.restart(...)`` where the workload has one, else ``worker_state`` unchanged (see the module
    docstring); what the runtimes call on a resume."""
    if workload.restart is None or local_steps_done == 0:
        return worker_state
    return workload.restart(worker_state, params, int(local_steps_done))
