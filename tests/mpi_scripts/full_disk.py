"""Launched by tests/test_mpi.py and tests/test_distributed.py: ``python full_disk.py MODULE ARGS...`` runs
``python -m MODULE ARGS...`` (``jaxdp.cli`` or a runtime's command line) in a process whose disk fills at a given
write, as a real one fills: ``FULL_DISK_AT=NAME:K`` makes the K-th write of a file named NAME (``checkpoint.npz``,
``metrics.jsonl``) fail with ENOSPC, and every later write of the multi-process runtimes' outputs (a full disk stays
full). Only rank 0 of an mpirun job fails (the only one that writes); a test of the distributed runtime sets the
variable on process 0 alone.
"""

import errno
import os
import runpy
import sys

from jaxdp import atomic
from jaxdp.runtime import _mpi_protocol as protocol


def fill_the_disk(name: str, at: int) -> None:
    writes, full = [0], [False]

    def written(path) -> None:
        if os.path.basename(os.fspath(path)) == name:
            writes[0] += 1
            full[0] = full[0] or writes[0] >= at
        if full[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))

    real_replace, real_append = atomic.replace_file, protocol.append_json_line

    def replace_file(path, write):
        written(path)
        return real_replace(path, write)

    def append_json_line(path, record):
        written(path)
        return real_append(path, record)

    atomic.replace_file, protocol.append_json_line = replace_file, append_json_line


if __name__ == "__main__":
    name, at = os.environ["FULL_DISK_AT"].split(":")
    if os.environ.get("OMPI_COMM_WORLD_RANK", "0") == "0":
        fill_the_disk(name, int(at))
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
