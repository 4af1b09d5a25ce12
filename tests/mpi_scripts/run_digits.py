"""Launched by tests/test_mpi.py under mpirun: ``python -m jaxdp.runtime.mpi``'s command line, plus
``--dump-params``, which makes every rank that holds the final parameters save them (flattened) to
``LOGDIR/params_rank{r}.npy`` so the test can compare ranks with each other and with a reference, and
``--count-steps``, which makes every rank count the local steps it executes in ``LOGDIR/local_steps_rank{r}.txt``
and its evaluations in ``LOGDIR/evaluations_rank{r}.txt``.
"""

import os
import sys

import numpy as np
from jax.flatten_util import ravel_pytree

from counting import counting_local_steps
from jaxdp.runtime import mpi
from jaxdp.stopping import RunStopped, exit_status


def main() -> int:
    status = train()
    mpi.finalize(status)
    return status


def train() -> int:
    parser = mpi.build_parser()
    parser.add_argument("--dump-params", action="store_true")
    parser.add_argument("--count-steps", action="store_true")
    args = parser.parse_args()
    from mpi4py import MPI

    from jaxdp.workloads.supervised import digits_workload

    rank = MPI.COMM_WORLD.Get_rank()
    inner, outer = mpi.make_optimizers(args)
    workload = digits_workload(batch_size=args.batch_size, hidden=tuple(args.hidden), seed=args.seed, worker_id=rank)
    if args.count_steps:
        workload = counting_local_steps(workload, os.path.join(args.logdir, f"local_steps_rank{rank}.txt"),
                                        os.path.join(args.logdir, f"evaluations_rank{rank}.txt"))
    try:
        result = mpi.run_mpi(workload, inner=inner, outer=outer, **mpi.run_options(args))
    except RunStopped as stop:
        return exit_status(stop, "run_digits.py")
    except mpi.WorkersLost as error:  # as python -m jaxdp.runtime.mpi reports it
        print(f"run_digits.py: {error}", file=sys.stderr, flush=True)
        return 1
    if args.dump_params and "params" in result:
        np.save(os.path.join(args.logdir, f"params_rank{rank}.npy"), np.asarray(ravel_pytree(result["params"])[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
