"""Stopping a run on a signal, between two steps, with a checkpoint: SIGINT (Ctrl-C), SIGTERM (the notice a
scheduler sends before it kills a job, e.g. SLURM's ``--signal`` or a preemption) and SIGUSR1 (the signal Open MPI's
``mpirun`` passes on to every rank, where it ends the job at once on SIGINT and SIGTERM; also SLURM's usual choice for
"checkpoint now", as in PyTorch Lightning).

:func:`stop_requests` turns the first such signal into a request that a training loop reads where its state is whole
(between two chunks, or two synchronous steps), so that it can log and save a checkpoint there, then raise
:class:`RunStopped`. ``--resume`` continues from that checkpoint. Every training loop of jaxdp uses it: the
single-process loop (:mod:`jaxdp.loop`) and the multi-process runtimes (:mod:`jaxdp.runtime.mpi`,
:mod:`jaxdp.runtime.distributed`), where the processes first agree to stop at the same step.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

#: The signals a run turns into a stop request.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class RunStopped(KeyboardInterrupt):
    """A run stopped early on one of :data:`STOP_SIGNALS`, after logging and saving a checkpoint at ``step`` (when
    it has a ``logdir``): ``--resume`` continues from there. A KeyboardInterrupt, so a notebook cell or a script stops
    as Ctrl-C always stops it.

    ``step`` and ``total_steps`` count what the loop counts (env steps in ``jaxdp train``, updates in the runtimes).
    In a multi-process job every process that stops raises it; ``report`` is True on the one that speaks for the
    job (process 0), so that a command line prints one line, not one per process.
    """

    def __init__(self, signum: int, step: int, total_steps: int, logdir: str | None, report: bool = True,
                 evaluating: bool = False, starting: bool = False):
        where = ("during the final evaluation" if evaluating else "before training began" if starting
                 else f"at step {step} of {total_steps}")
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum, self.step, self.total_steps, self.logdir, self.report = signum, step, total_steps, logdir, report
        self.evaluating = evaluating  # training had ended and was saved: a resume only evaluates
        # While the run was being built (JAX loading, environments, compilation, a checkpoint's restore): nothing was
        # trained or written, and a resumed run's checkpoint is as it was. ``logdir`` is that run's, else None.
        self.starting = starting


def exit_status(stop: RunStopped, prog: str) -> int:
    """How a command line ends a stopped run: one line on stderr (from the process that reports for the job) and
    the exit status 128 + the signal's number, the shell's convention for a process that a signal ended."""
    if stop.report:
        if stop.starting:
            where = ("nothing was written: run the command again" if not stop.logdir else
                     f"the run is as its last checkpoint left it: continue with the same command and --resume "
                     f"(--logdir {stop.logdir})")
        elif not stop.logdir:
            where = "nothing saved (no --logdir)"
        elif stop.evaluating:
            where = (f"the trained parameters are saved: the same command with --resume evaluates them and writes the "
                     f"summary (--logdir {stop.logdir})")
        else:
            where = f"checkpoint saved: continue with the same command and --resume (--logdir {stop.logdir})"
        print(f"{prog}: {stop}; {where}", file=sys.stderr, flush=True)
    return 128 + stop.signum


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Turns the first of :data:`STOP_SIGNALS` into a request (the list gets the signal number) that a training loop
    honours where its state is whole and can be saved. A second signal acts at once, as usual. A signal the process
    ignores stays ignored (``nohup``, a background job), and outside the main thread (where Python cannot handle
    signals) nothing changes. The previous handlers come back on exit."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        requested.append(signum)
        signal.signal(signum, previous[signum])  # the next one stops at once

    # The actions to restore, known before any handler is installed (a signal may come at once). None: an action
    # set outside Python, which could not be restored; such a signal is left alone, as an ignored one is.
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    previous = {signum: action for signum, action in previous.items() if action not in (None, signal.SIG_IGN)}
    for signum in previous:
        signal.signal(signum, handler)
    try:
        yield requested
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


__all__ = ["STOP_SIGNALS", "RunStopped", "exit_status", "stop_requests"]
