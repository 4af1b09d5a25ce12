"""Launched by tests/test_mpi.py under ``mpirun --with-ft ulfm -n 3``: every rank meets at a barrier, then rank
``--exiting-rank`` ends at once with status ``--exit-status`` without finalizing MPI (a rank that dies), and the
others end MPI through :func:`jaxdp.runtime.mpi.finalize` with ``--timeout`` and status 0, printing whether
MPI_Finalize returned; or, with ``--at-exit``, return 0 and leave it to the exit hook that ``run_mpi`` sets
(``finalize`` with status 1), its timeout set to ``--timeout``."""

import argparse
import os
import sys

from mpi4py import MPI

from jaxdp.runtime import mpi


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exiting-rank", type=int, required=True)
    parser.add_argument("--exit-status", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--at-exit", action="store_true")
    args = parser.parse_args()
    rank = MPI.COMM_WORLD.Get_rank()
    if args.at_exit:
        mpi.FINALIZE_TIMEOUT_SECONDS = args.timeout
        mpi._finalize_at_exit()  # what run_mpi does first
    MPI.COMM_WORLD.Barrier()
    if rank == args.exiting_rank:
        os._exit(args.exit_status)
    if args.at_exit:
        return 0
    finalized = mpi.finalize(0, timeout=args.timeout)
    print(f"rank {rank}: MPI_Finalize returned {finalized}, MPI.Is_finalized() {MPI.Is_finalized()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
