"""Stopping a run on a signal, between two steps, with a checkpoint: SIGINT (Ctrl-C), SIGTERM (the notice a
scheduler sends before it kills a job, e.g. SLURM's ``--signal`` or a preemption) and SIGUSR1 (the signal Open MPI's
``mpirun`` passes on to every rank, where it ends the job at once on SIGINT and SIGTERM; also SLURM's usual choice for
"checkpoint now", as in PyTorch Lightning).

:func:`stop_requests` turns the first such signal into a request that a training loop reads where its state is whole
(between two chunks, or two synchronous steps), so that it can log and save a checkpoint there, then raise
:class:`RunStopped`. ``--resume`` continues from that checkpoint. Every training loop of jaxdp uses it: the
single-process loop (:mod:`jaxdp.loop`) and the multi-process runtimes (:mod:`jaxdp.runtime.mpi`,
:mod:`jaxdp.runtime.distributed`), where the processes first agree to stop at the same step.

A run also stops where it cannot write in its ``logdir`` (a full disk or quota, a read-only filesystem): it raises
:class:`WriteFailed`, which a command line reports in one line, and ``--resume`` continues from the last whole
checkpoint once there is room. In a multi-process job only process 0 writes, while the others wait for it in a
collective: :func:`disk_problems_noted` keeps such a failure for the job to stop on together, at its next step
(:data:`WRITE_FAILED`, a stop request that no signal makes), rather than leaving the others to find a peer gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import NamedTuple

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


# The errors of a full or read-only disk: a run cannot go on, and its last checkpoint is what it has. orbax's
# tensorstore reports them as a ValueError whose message carries the system's text, so the texts are matched too.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

#: The stop request that process 0 of a multi-process job makes when it cannot write: larger than any signal's number,
#: so that the job's agreement (a maximum over the processes) stops on it whatever else was requested.
WRITE_FAILED = 1 << 16


class WriteFailed(Exception):
    """A run could not write in its ``logdir`` (the disk or the quota is full, or the filesystem is read-only): it
    stopped there. ``checkpoint_step`` is the step of its last whole checkpoint (None if it saved none), which
    ``--resume`` continues from once there is room; the checkpoint being written was removed (or, written under a
    temporary name, never replaced the last one). ``removed``: a run that saved no checkpoint removed what it had
    written, so that the same command can run again. In a multi-process job every process raises it; ``report`` is
    True on the one that speaks for the job (process 0), as with :class:`RunStopped`."""

    def __init__(self, logdir: str, reason: str, doing: str, checkpoint_step: int | None, removed: bool = True,
                 report: bool = True):
        if checkpoint_step is not None:
            last = f"the last checkpoint, at step {checkpoint_step}, is whole: make room and continue with --resume"
        else:
            last = (f"it had saved no checkpoint{', and what it wrote was removed' if removed else ''}: make room and "
                    f"run the command again")
        super().__init__(f"cannot write in --logdir {logdir} ({reason}) while {doing}; {last}")
        self.logdir, self.reason, self.doing, self.checkpoint_step = logdir, reason, doing, checkpoint_step
        self.removed, self.report = removed, report

    def counted(self, per_step: int, removed: bool | None = None) -> WriteFailed:
        """The same failure with its checkpoint's step counted ``per_step`` times finer (a runtime's updates as env
        steps), and ``removed`` when given."""
        step = None if self.checkpoint_step is None else self.checkpoint_step * per_step
        return WriteFailed(self.logdir, self.reason, self.doing, step, self.removed if removed is None else removed,
                           self.report)


def disk_problem(error: BaseException) -> str | None:
    """The system's text when ``error`` (or an error it was raised from) is a full or read-only disk, else None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
            return os.strerror(error.errno)
        found = disk_problem_in(str(error))
        if found:
            return found
        error = error.__cause__ or error.__context__
    return None


def disk_problem_in(text: str) -> str | None:
    """The system's text of a full or read-only disk when ``text`` (a message) carries it, else None."""
    return next((os.strerror(code) for code in _DISK_ERRNOS if os.strerror(code) in text), None)


class DiskProblem(NamedTuple):
    """A write that met a full or read-only disk: the system's text, what was being written, the error."""

    reason: str
    doing: str
    error: BaseException

    def failed(self, logdir: str, checkpoint_step: int | None) -> WriteFailed:
        """The :class:`WriteFailed` that process 0 raises (``from self.error``) once the job has stopped."""
        return WriteFailed(logdir, self.reason, self.doing, checkpoint_step, removed=False)


@contextlib.contextmanager
def disk_problems_noted(noted: list[DiskProblem], doing: str) -> Iterator[None]:
    """Process 0's writes in a multi-process job: a full or read-only disk met in the block is appended to ``noted``
    (with ``doing``, e.g. "saving the checkpoint") instead of raised, so that the job can stop together at its next
    step; other errors pass. The callers write nothing more once something is noted: a full disk stays full."""
    try:
        yield
    except Exception as error:
        reason = disk_problem(error)
        if reason is None:
            raise
        noted.append(DiskProblem(reason, doing, error))


__all__ = ["STOP_SIGNALS", "WRITE_FAILED", "DiskProblem", "RunStopped", "WriteFailed", "disk_problem",
           "disk_problem_in", "disk_problems_noted", "exit_status", "stop_requests"]
