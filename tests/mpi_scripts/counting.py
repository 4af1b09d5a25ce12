"""``--count-steps`` for the launched scripts: a workload whose every executed ``local_step`` appends one line per
worker to a file, through an ``io_callback`` -- an effect outside the workload's state, like an RL worker's env
pool -- and whose every ``evaluate`` call appends one line to another. A runtime that ran a step or an evaluation
and discarded its result (a warm-up run) would show up as extra lines.
"""

from __future__ import annotations

import numpy as np
from jax.experimental import io_callback

from jaxdp.workloads.base import Workload


def counting_local_steps(workload: Workload, path: str, evaluations_path: str) -> Workload:
    """``workload`` whose ``local_step`` appends ``np.size(examples_seen)`` lines to ``path`` each time it runs, and
    whose ``evaluate`` (host-side, as runtimes call it) appends one line to ``evaluations_path``."""

    def record(examples_seen: np.ndarray) -> None:
        with open(path, "a") as file:
            file.write("step\n" * int(np.size(examples_seen)))

    def local_step(worker_state, params, key):
        # The argument depends on the worker's state, so under a runtime's vmap it is batched and each call
        # writes one line per worker; unordered because ordered effects cannot be vmapped.
        io_callback(record, None, worker_state.examples_seen, ordered=False)
        return workload.local_step(worker_state, params, key)

    def evaluate(params):
        with open(evaluations_path, "a") as file:
            file.write("evaluate\n")
        return workload.evaluate(params)

    return workload._replace(local_step=local_step, evaluate=evaluate)

