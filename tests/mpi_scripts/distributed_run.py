"""Launched by tests/test_distributed.py, once per process: ``python -m jaxdp.runtime.distributed``'s
command line plus ``--dump-params``, which saves this process's final parameters (flattened) to
``LOGDIR/params_process{i}.npy``, and ``--count-steps``, which counts the local steps this process executes in
``LOGDIR/local_steps_process{i}.txt`` (and its evaluations in ``evaluations_process{i}.txt``). The workload is
built by a function, after jax.distributed starts.
"""

import os
import sys

import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from counting import counting_local_steps
from jaxdp.runtime import distributed
from jaxdp.stopping import RunStopped, exit_status


def main() -> int:
    parser = distributed.build_parser()
    parser.add_argument("--dump-params", action="store_true")
    parser.add_argument("--count-steps", action="store_true")
    args = parser.parse_args()
    from jaxdp.workloads.supervised import digits_workload

    def workload():
        built = digits_workload(batch_size=args.batch_size, hidden=tuple(args.hidden), seed=args.seed)
        if not args.count_steps:
            return built
        os.makedirs(args.logdir, exist_ok=True)
        return counting_local_steps(built, os.path.join(args.logdir, f"local_steps_process{args.process_id}.txt"),
                                    os.path.join(args.logdir, f"evaluations_process{args.process_id}.txt"))

    try:
        result = distributed.run_distributed(workload, inner=optax.sgd(args.lr), **distributed.run_options(args))
    except RunStopped as stop:
        return exit_status(stop, "distributed_run.py")
    if args.dump_params:
        os.makedirs(args.logdir, exist_ok=True)
        flat = np.asarray(ravel_pytree(result["params"])[0])
        np.save(os.path.join(args.logdir, f"params_process{args.process_id}.npy"), flat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
