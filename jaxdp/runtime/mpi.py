"""Real processes under ``mpirun``: synchronous all-reduce, or a parameter server with asynchronous workers.

Three modes, one entry point (:func:`run_mpi`) and a command line (``python -m jaxdp.runtime.mpi``).

``mode="sync"`` -- every rank is a worker; there is no server. Each step every rank computes a gradient
on its own mini-batch (key :func:`~jaxdp.runtime._mpi_protocol.worker_key` ``(seed, rank, step)``),
the gradients are averaged with one ``mpi4jax.allreduce`` (SUM, then ÷ K) inside the jitted step, and
every rank applies ``inner`` to the mean: g̃ = (1/K) Σ_k g_k; θ ← θ + inner(g̃). All ranks therefore hold
identical parameters, and K ranks with batch b compute what one process computes with the K batches.
With ``outer`` given, a sync step is instead a round of ``local_steps`` (B) inner steps from the
shared anchor, an all-reduce (mean) of Δ = anchor − local, and ``outer`` applied to the anchor with
mean Δ as the gradient (synchronous local SGD; :func:`jaxdp.local_steps` with an axis, on processes):
one all-reduce every B gradient steps.

``mode="async"`` (Downpour SGD) and ``mode="dpsgd"`` (paper Alg. 1 and 2) -- rank 0 is the parameter
server, ranks 1..K−1 are workers. A worker pulls θ (the anchor), runs B inner steps from it (B = 1 in
async mode) and pushes Δ = θ_pulled − u, then waits for fresh parameters. The master receives from
*whichever* worker is ready (``MPI.ANY_SOURCE``), and after every M (``master_batch``) arrivals
applies ``θ ← θ + outer.update(aggregate(Δ_1..Δ_M), outer_state, θ)`` where ``aggregate`` is the
**mean** of the M Δ's by default, or their **sum** (``aggregate="sum"``: with ``outer = sgd(η_g)``,
paper Alg. 1's θ ← θ − η_g Σ_m Δ_m) -- the same convention as :mod:`jaxdp.runtime.async_sim`. It then
replies with the new θ to exactly the workers whose Δ it just applied: M = 1 is Downpour (in async mode
Δ is one inner update, so with ``inner = sgd(α)`` and the default ``outer = sgd(1)`` the master applies
θ ← θ − α g_k on arrival). Staleness of an arrival = master version at the apply − the version the
worker pulled; per-worker arrival counts, the staleness histogram, bytes and rounds are recorded. A
worker's ``inner`` state persists across its rounds (as in :func:`jaxdp.local_steps` and DiLoCo).

Transfers: a pytree is flattened into one float32 vector (``jax.flatten_util.ravel_pytree``); a
message is that vector behind a small header (see :mod:`~jaxdp.runtime._mpi_protocol`), sent with
mpi4py's buffer interface (``Isend`` / ``Irecv``, no pickling). Parameters must be float32.

Faults.

* async / dpsgd: a dead worker does not stop the master. Launch with ``mpirun --with-ft ulfm`` (Open
  MPI 5's User-Level Failure Mitigation; without it Open MPI tears the whole job down when any process
  dies): the master's wildcard receive then reports the failure (``MPI_ERR_PROC_FAILED_PENDING``), the
  master acknowledges it (``Comm.Ack_failed``), names the dead ranks (``Comm.Get_failed``), logs them and
  goes on with the others, shrinking M to the number of live workers when needed (a Δ that arrived
  before its sender died is still applied). Because Open MPI can keep failing a wildcard receive that
  saw a failure, the master then cancels it and posts a fresh one. A worker that sends nothing for
  ``worker_timeout`` seconds is declared lost too, so the master never waits forever on a hung
  worker. ``summary.json`` lists ``lost_workers``. When all updates are done, the master answers every
  live worker's next push with "stop" (so no push is left unreceived), and the job exits 0. A worker
  that loses the master, or waits ``2 × worker_timeout`` for its answer (a master alive but hung; 120 s more
  before the first reply), exits 1 with one line.
* sync: collectives cannot finish without every rank, so a lost peer ends the job, with one clear
  line and a non-zero exit status, never a hang: under ULFM an error handler on the communicator
  catches the failed all-reduce; otherwise Open MPI kills the job itself; and a watchdog thread exits
  the rank if no step completes for ``step_timeout`` seconds. The runtime never calls ``MPI_Abort``
  after a failure (under ULFM, Open MPI 5's launcher can hang in "Abort is in progress"); it
  ``os._exit``s instead.
* the end: under ULFM, Open MPI 5's ``MPI_Finalize`` can hang for ever after a process failure. :func:`finalize`
  bounds it (``FINALIZE_TIMEOUT_SECONDS``): past the bound a rank says so in one line and exits with its status.
  The command lines call it; ``run_mpi`` sets it to run at exit for scripts that do not.

Stopping: the first SIGINT, SIGTERM or SIGUSR1 a rank gets (a scheduler's notice; ``srun`` signals every rank)
stops the whole job where its state is whole, with a log point and ``checkpoint.npz`` there (given a ``logdir``); no
``summary.json`` is written and ``resume=True`` continues. In sync mode the request rides with each step (an
all-reduce MAX of one integer), so all ranks stop after the same step and raise
:class:`jaxdp.stopping.RunStopped`. In the async modes a worker passes its signal on in its next push; the master
(signalled itself or told so) stops at θ as it stands, answers every worker "stop" and raises ``RunStopped``; the
workers return normally. Open MPI 5's ``mpirun`` kills its ranks at once on SIGINT and SIGTERM, but passes SIGUSR1
on to every rank: stop an ``mpirun`` job with ``kill -USR1 <mpirun's pid>``, or signal the ranks themselves (their
pids are in ``logdir/rank{r}.pid``). A second signal acts at once.

A full disk: where rank 0 cannot write its log or checkpoint (a full disk or quota, a read-only filesystem), the
job stops as on a signal, without writing more: in sync mode every rank stops after the next step (the request
:data:`jaxdp.stopping.WRITE_FAILED` rides with it), in the async modes the master answers every worker "stop". Rank 0
then raises :class:`jaxdp.stopping.WriteFailed` (a one-line report naming the last whole checkpoint, which
``resume=True`` continues from: checkpoints are replaced atomically); the other ranks of a sync job raise it too,
with nothing to report, and the async workers return normally.

Start-up: every rank compiles and runs its step once (result discarded) before the clock starts, and
in the async modes all ranks then meet at a barrier, so that neither ``wall_seconds`` nor the
staleness statistics include compilation (``startup_seconds`` is reported apart).

Files (rank 0, when ``logdir`` is given): ``metrics.jsonl`` (one JSON object per log point: ``step``,
``sps`` (updates per second), ``workload.evaluate``'s metrics, ``train_*`` local metrics, and in the
async modes staleness statistics), ``summary.json`` (see :func:`run_mpi`), ``checkpoint.npz`` every
``checkpoint_every`` updates and at the end (written atomically: a temp file, then ``os.replace``) and, while its
part of the job runs, each rank's ``rank{r}.pid``. ``resume=True`` restarts from ``checkpoint.npz``; the step
count continues. In the async modes the checkpoint holds the master's θ, outer state, version and statistics; the
workers' inner optimizer states restart fresh. The workload's ``worker_state`` is not checkpointed: on a resume
each rank's fresh one goes through ``Workload.restart`` with the local steps that rank had taken (sync: the step
count, times B in rounds; async: its arrivals at the master, times B), so that its schedules (DQN's ε) continue.

Reproducibility: sync runs are deterministic (same seed and K → same parameters, resumed or not).
Async runs are not bitwise reproducible: the order in which pushes arrive depends on timing, so the
staleness histogram and arrival counts are recorded instead. For reproducible asynchronous
experiments use :mod:`jaxdp.runtime.async_sim`.

Launch (see docs/multiprocess.md)::

    mpirun -n 4 --with-ft ulfm python -m jaxdp.runtime.mpi --mode async --workload digits --total-updates 500

"DPSGD" is Distributed-Parallel SGD (Mohamad et al.), not differentially-private SGD.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxdp.runtime import _checks
from jaxdp.runtime import _mpi_protocol as protocol
from jaxdp.runtime.async_sim import worker_round
from jaxdp.stopping import (WRITE_FAILED, DiskProblem, RunStopped, WriteFailed, disk_problems_noted, exit_status,
                             stop_requests)
from jaxdp.workloads.base import Workload, restarted
from jaxdp.cli_args import OneLineParser as _OneLineParser
from jaxdp.cli_args import given_options
from jaxdp.cli_args import non_negative_int as _non_negative_int
from jaxdp.cli_args import positive_float as _positive_float
from jaxdp.cli_args import positive_int as _positive_int

MODES = ("sync", "async", "dpsgd")
AGGREGATES = ("mean", "sum")
STARTUP_GRACE_SECONDS = 120.0  # extra time before a rank's first step / push: JIT compilation
SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_NAME = "checkpoint.npz"


class WorkersLost(RuntimeError):
    """The parameter server lost every worker before its last update (async / dpsgd, rank 0). It has saved
    ``checkpoint.npz`` at that update (given a ``logdir``) and written ``summary.json`` with ``completed: false``;
    ``--resume`` with new workers continues from there. The command lines print it as one line and exit 1."""


def _import_mpi():
    # Imported lazily: ``from mpi4py import MPI`` initialises MPI, which --help and bad arguments must not do.
    from mpi4py import MPI

    return MPI


def fault_tolerance_enabled() -> bool:
    """Whether this process was launched with Open MPI's ULFM on (``mpirun --with-ft ulfm``)."""
    return os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() in ("1", "true", "yes", "enabled")


# Under ULFM, Open MPI 5's MPI_Finalize first agrees with the surviving ranks on who has failed
# (ompi_comm_shrink_internal, then the coll/ftagree ERA agreement), and after a process failure that agreement can
# spin for ever. Measured with the pinned Open MPI 5.0.11: when one of 3 ranks exits with a non-zero status without
# finalizing, the other two never return from MPI_Finalize, every time; and after a SIGKILLed worker, now and then
# (the killed-worker test hung in about 1 full test run in 15-20, after its summary.json was written). mpi4py calls
# MPI_Finalize holding the GIL, so no Python thread can step in there; called through ctypes, which lets go of the
# GIL, a watchdog thread can. A normal MPI_Finalize takes ~0.1 s here.
FINALIZE_TIMEOUT_SECONDS = 30.0


def finalize(status: int = 0, timeout: float = FINALIZE_TIMEOUT_SECONDS, arm: Callable | None = None) -> bool:
    """End MPI on this rank, bounded: call ``MPI_Finalize``; if it has not returned within ``timeout`` seconds (the
    ULFM hang after a process failure, above), print one line and end the process at once with ``status``.

    Call it last, with the status the rank is about to exit with: under ULFM, ``mpirun`` counts a rank that ends
    without finalizing as a failed process and still exits with the ranks' statuses. Returns True when MPI is
    finalized (or was never started), False if MPI_Finalize reported an error. ``python -m jaxdp.runtime.mpi`` and
    ``jaxdp train --runtime mpi`` call it; :func:`run_mpi` also sets it to run at exit with status 1 (the status a
    script meant to exit with is unknown there), which a script's own ``finalize(status)`` makes a no-op. ``arm``
    is a watchdog from :func:`_finalize_watchdog`; by default one is started here.
    """
    if "mpi4py.MPI" not in sys.modules:
        return True  # MPI was never started in this process
    from mpi4py import MPI

    if not MPI.Is_initialized() or MPI.Is_finalized():
        return True
    if "mpi4jax" in sys.modules:
        jax.effects_barrier()  # what mpi4jax's own exit hook does: no MPI call may still be queued in XLA
    done = (arm or _finalize_watchdog())(status, timeout, MPI.COMM_WORLD.Get_rank())
    try:
        import ctypes

        # MPI_Finalize resolved through mpi4py's extension module (dlsym searches the libraries it links).
        error = ctypes.CDLL(MPI.__file__).MPI_Finalize()
    finally:
        done.set()
    return error == 0


def _finalize_watchdog() -> Callable[[int, float, int], threading.Event]:
    """Start a daemon thread now and return ``arm(status, timeout, rank)``: once armed, the thread ends the process
    with ``status`` unless the event ``arm`` returned is set within ``timeout`` seconds. Started ahead of time
    because Python >= 3.12 refuses to start a thread while the interpreter exits, where the exit hook runs."""
    orders: queue.SimpleQueue = queue.SimpleQueue()

    def watch() -> None:
        status, timeout, rank, done = orders.get()
        if not done.wait(timeout):
            _say(f"rank {rank}: MPI_Finalize did not return within {timeout:g} s (Open MPI's fault-tolerant "
                 f"finalize can hang after a process failure); exiting with status {status} without it")
            sys.stdout.flush()
            os._exit(status)

    threading.Thread(target=watch, name="jaxdp-mpi-finalize-watchdog", daemon=True).start()

    def arm(status: int, timeout: float, rank: int) -> threading.Event:
        done = threading.Event()
        orders.put((status, timeout, rank, done))
        return done

    return arm


@functools.cache
def _finalize_at_exit() -> None:
    """Once per process: have :func:`finalize` (status 1) run at exit, before mpi4py's unbounded MPI_Finalize."""
    atexit.register(finalize, 1, FINALIZE_TIMEOUT_SECONDS, _finalize_watchdog())


def run_mpi(
    workload: Workload,
    *,
    mode: str,
    inner: optax.GradientTransformation,
    outer: optax.GradientTransformation | None = None,
    local_steps: int = 1,
    master_batch: int = 1,
    aggregate: str = "mean",
    total_updates: int,
    seed: int = 0,
    logdir: str | None = None,
    log_every: int = 100,
    log_seconds: float | None = None,
    print_points: bool = True,
    checkpoint_every: int = 0,
    checkpoint_seconds: float | None = None,
    resume: bool = False,
    comm: Any = None,
    worker_timeout: float = 60.0,
    step_timeout: float = 60.0,
    config: dict | None = None,
    record_hook: Callable[[dict, int], dict] | None = None,
) -> dict:
    """Train ``workload`` on the processes of ``comm`` (default ``MPI.COMM_WORLD``); call it on every rank.

    See the module docstring for the semantics of each mode, the message protocol and fault handling.

    Args:
      workload: what a worker computes (:class:`~jaxdp.workloads.base.Workload`); float32 parameters.
        Every rank builds its own (e.g. ``digits_workload(worker_id=rank)``); ``init`` must give the
        same parameters on every rank for the same key (rank 0's are broadcast anyway).
      mode: ``"sync"`` (all-reduce), ``"async"`` (Downpour: parameter server, B = 1) or ``"dpsgd"``
        (parameter server, B = ``local_steps``).
      inner: the workers' optimizer (sync: applied to the mean gradient; async/dpsgd: the local steps).
      outer: the master's optimizer, applied with the aggregated Δ as the gradient; default
        ``optax.sgd(1.0)`` in async/dpsgd. In sync mode, ``None`` means gradient all-reduce and a
        given ``outer`` means rounds of B local steps with an all-reduce of Δ.
      local_steps: B >= 1, inner steps per push (async: must be 1; sync without ``outer``: must be 1).
      master_batch: M >= 1, arrivals per master update (async/dpsgd; at most the number of workers).
      aggregate: ``"mean"`` or ``"sum"`` of the M Δ's of one master update.
      total_updates: the run ends after this many updates (sync steps / rounds, or master updates).
      seed: seeds the initial parameters and every rank's batches.
      logdir: where rank 0 writes metrics.jsonl, summary.json and checkpoint.npz; None writes nothing
        but the returned summary.
      log_every: updates between two log points (each evaluates the workload on rank 0).
      log_seconds: also a log point after any update that ends this many seconds after the last point; rank 0 (the
        master) decides alone. None: update counts only.
      print_points: rank 0 prints one line per log point (``jaxdp train --no-progress`` turns it off).
      checkpoint_every: updates between checkpoints; 0 disables them.
      checkpoint_seconds: also a checkpoint after any update that ends this many seconds after the last one (or
        the start), so that a crash loses at most that much work however long an update takes; rank 0 (the master)
        decides alone. None: update counts only. Not in sync rounds (``outer`` given with ``mode="sync"``), whose
        checkpoint gathers every rank's inner state and so must fall on a step all ranks know.
      resume: continue from ``logdir/checkpoint.npz`` (the step count continues); needs ``logdir``.
      comm: an mpi4py intracommunicator; it is duplicated, never modified.
      worker_timeout: seconds without a push after which the master declares a computing worker lost. A worker
        gives up on a master that leaves it without an answer for twice that (plus ``STARTUP_GRACE_SECONDS``
        until its first reply): it says so and exits 1.
      step_timeout: sync mode: seconds without a completed step after which a rank gives up (exit 1).
      config: extra entries recorded under ``summary["config"]`` (e.g. the command line).
      record_hook: ``record_hook(record, steps)`` maps each log record (``step`` = updates, ``sps`` = updates/s,
        ``train_*`` = metrics averaged over the ``steps`` sync steps, or pushes to the server, since the last
        point) to the record written and printed (RL: env steps). With a hook, a resume keeps the records up to
        the checkpoint by their ``updates`` (which the hook must keep), else by their ``step``.

    Returns:
      On rank 0 the summary (also written to ``logdir/summary.json``): ``runtime``, ``mode``,
      ``total_updates``, ``start_step``, ``wall_seconds``, ``final`` (``workload.evaluate`` at the end),
      ``num_processes``, ``lost_workers``, ``bytes_sent`` (payload bytes handed to MPI by all ranks),
      ``bytes_per_update``, ``bytes_per_gradient_step``, ``communication_rounds``, ``config``, and in
      the async modes ``arrivals_per_worker``, ``staleness_histogram``, ``staleness_mean``,
      ``staleness_max``, ``discarded_arrivals``, ``fault_tolerance``. On the other ranks a small dict
      (``rank``, ``role``). On every rank that holds the final parameters (all ranks in sync mode,
      rank 0 otherwise) the dict also carries ``params`` (not written to JSON).

    Raises:
      jaxdp.stopping.RunStopped: on SIGINT, SIGTERM or SIGUSR1 (see "Stopping" in the module docstring), after the
        checkpoint: on every rank in sync mode, on rank 0 in the async modes.
      WorkersLost: on rank 0 in the async modes, when every worker is lost before the last update.

    Example (run under ``mpirun -n 3``)::

        from jaxdp.runtime.mpi import run_mpi
        from jaxdp.workloads.supervised import digits_workload
        from mpi4py import MPI
        summary = run_mpi(digits_workload(worker_id=MPI.COMM_WORLD.rank), mode="async",
                          inner=optax.sgd(0.1), total_updates=300, logdir="runs/async")
    """
    if not isinstance(workload, Workload):
        raise TypeError(f"run_mpi: workload must be a jaxdp Workload, got {type(workload).__name__}")
    if mode not in MODES:
        raise ValueError(f"run_mpi: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"run_mpi: inner must be an optax.GradientTransformation, got {type(inner).__name__}")
    if outer is not None and not isinstance(outer, optax.GradientTransformation):
        raise TypeError(f"run_mpi: outer must be an optax.GradientTransformation or None, got {type(outer).__name__}")
    local_steps = _checks.check_int("run_mpi", "local_steps", local_steps, 1)
    master_batch = _checks.check_int("run_mpi", "master_batch", master_batch, 1)
    if aggregate not in AGGREGATES:
        raise ValueError(f"run_mpi: aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    total_updates, seed, log_every, checkpoint_every, log_seconds, checkpoint_seconds = _checks.check_schedule(
        "run_mpi", total_updates, seed, log_every, checkpoint_every, log_seconds, checkpoint_seconds)
    if checkpoint_seconds is not None:
        if logdir is None:
            raise ValueError("run_mpi: checkpoint_seconds needs a logdir to write checkpoints to")
        if mode == "sync" and outer is not None:
            raise ValueError("run_mpi: checkpoint_seconds cannot time the checkpoints of sync rounds (outer given): "
                             "each gathers every rank's inner state, at a step all ranks know; use checkpoint_every")
    worker_timeout = _checks.check_positive_float("run_mpi", "worker_timeout", worker_timeout)
    step_timeout = _checks.check_positive_float("run_mpi", "step_timeout", step_timeout)
    if mode == "async" and local_steps != 1:
        raise ValueError(
            f"run_mpi: local_steps must be 1 in mode='async' (Downpour), got {local_steps}; use mode='dpsgd'"
        )
    if mode == "sync" and (master_batch != 1 or aggregate != "mean"):
        # Every rank all-reduces in sync mode: there is no master to batch arrivals or choose how to add them.
        raise ValueError(
            f"run_mpi: mode='sync' has no master: master_batch={master_batch} and aggregate={aggregate!r} are read "
            "by mode='async' and 'dpsgd' only (sync averages over every rank)"
        )
    if mode == "sync" and outer is None and local_steps != 1:
        raise ValueError(
            f"run_mpi: local_steps={local_steps} in mode='sync' needs an outer optimizer (outer=optax.sgd(1.0) "
            "averages the models)"
        )
    if resume and logdir is None:
        raise ValueError("run_mpi: resume=True needs a logdir to find the checkpoint in")
    if checkpoint_every and logdir is None:
        raise ValueError("run_mpi: checkpoint_every > 0 needs a logdir to write checkpoints to")

    launched = time.perf_counter()
    MPI = _import_mpi()
    _finalize_at_exit()
    base = MPI.COMM_WORLD if comm is None else comm
    size = base.Get_size()
    if mode != "sync":
        if size < 2:
            raise ValueError(
                f"run_mpi: mode={mode!r} needs a master and at least one worker (>= 2 processes), got {size}"
            )
        if master_batch > size - 1:
            raise ValueError(f"run_mpi: master_batch must be <= the number of workers ({size - 1}), got {master_batch}")
        if outer is None:
            outer = optax.sgd(1.0)
    comm = base.Dup()  # our own communicator: our error handler and messages never touch the caller's
    rank = comm.Get_rank()

    params, worker_state = workload.init(jax.random.PRNGKey(seed))
    flat, unravel = ravel_pytree(params)
    if flat.dtype != jnp.float32:
        raise TypeError(f"run_mpi: the workload's parameters must all be float32, got {flat.dtype}")
    host_flat = np.array(flat, np.float32)
    comm.Bcast(host_flat, root=0)  # every rank starts from rank 0's θ_0, whatever its init did
    params = unravel(jnp.asarray(host_flat))

    pid_file = None
    if logdir is not None:
        os.makedirs(logdir, exist_ok=True)
        pid_file = os.path.join(logdir, f"rank{rank}.pid")
        with open(pid_file, "w") as stream:
            stream.write(f"{os.getpid()}\n")

    run_config = {
        "runtime": "mpi",
        "mode": mode,
        "workload": workload.name,
        "num_processes": size,
        "local_steps": local_steps,
        "master_batch": master_batch,
        "aggregate": aggregate,
        "total_updates": total_updates,
        "seed": seed,
        "log_every": log_every,
        "log_seconds": log_seconds,
        "checkpoint_every": checkpoint_every,
        "checkpoint_seconds": checkpoint_seconds,
        "outer": None if outer is None else "given",
        "worker_timeout": worker_timeout,
        "step_timeout": step_timeout,
        **(config or {}),
    }
    common = dict(
        workload=workload,
        inner=inner,
        outer=outer,
        local_steps=local_steps,
        total_updates=total_updates,
        seed=seed,
        logdir=logdir,
        log_every=log_every,
        log_seconds=log_seconds,
        print_points=bool(print_points),
        checkpoint_every=checkpoint_every,
        checkpoint_seconds=checkpoint_seconds,
        resume=resume,
        comm=comm,
        MPI=MPI,
        params=params,
        worker_state=worker_state,
        unravel=unravel,
        run_config=run_config,
        launched=launched,
        record_hook=record_hook,
    )
    # A first SIGINT / SIGTERM / SIGUSR1 becomes a request that the loops read between steps (see "Stopping").
    with stop_requests() as requested, _removed_when_done(pid_file):
        if mode == "sync":
            return _run_sync(requested=requested, step_timeout=step_timeout, **common)
        if rank == 0:
            return _run_master(requested=requested, master_batch=master_batch, aggregate=aggregate,
                               worker_timeout=worker_timeout, **common)
        return _run_worker(requested=requested, worker_timeout=worker_timeout, **common)


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _removed_when_done(pid_file: str | None) -> Iterator[None]:
    """Removes this rank's ``rank{r}.pid`` when its part of the job ends, however it ends short of being killed: a
    stale file would name a process id the system may give to another program (``kill $(cat LOGDIR/rank*.pid)``)."""
    try:
        yield
    finally:
        if pid_file is not None:
            with contextlib.suppress(OSError, ValueError):
                with open(pid_file) as stream:
                    ours = int(stream.read()) == os.getpid()  # a resumed job's rank may have written it since
                if ours:
                    os.remove(pid_file)


def _write_summary(logdir: str, summary: dict, saved_step: int | None) -> None:
    """Rank 0 writes ``summary.json`` once the others are done: a full disk is a :class:`WriteFailed` at once."""
    disk: list[DiskProblem] = []
    with disk_problems_noted(disk, "writing the summary"):
        protocol.write_json(os.path.join(logdir, SUMMARY_NAME), summary)
    if disk:
        raise disk[0].failed(logdir, saved_step) from disk[0].error


def _say(message: str) -> None:
    print(f"jaxdp.mpi: {message}", file=sys.stderr, flush=True)


def _mean_metrics(history: list[dict]) -> dict:
    if not history:
        return {}
    out = {f"train_{k}": float(np.mean([float(h[k]) for h in history])) for k in history[0]}
    if "episodes" in history[0]:  # RL workloads: the mean return of the episodes finished since the last point
        episodes = sum(float(h["episodes"]) for h in history)
        returns = sum(float(h["episode_return_sum"]) for h in history)
        out["episodic_return"] = returns / episodes if episodes > 0 else None
    return out


def _start_metrics(path: str, resume: bool, start_step: int, record_hook) -> None:
    """A fresh metrics.jsonl, or on a resume the records up to the checkpoint: a run killed after its last
    checkpoint logged updates that the resumed run logs again, and the curve must not go back in time."""
    if not resume:
        open(path, "w").close()
    else:
        protocol.truncate_json_lines(path, start_step, key="updates" if record_hook else "step")


def _checkpoint_path(logdir: str) -> str:
    return os.path.join(logdir, CHECKPOINT_NAME)


def _read_checkpoint(logdir: str, mode: str) -> dict[str, np.ndarray]:
    path = _checkpoint_path(logdir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"run_mpi: resume=True but there is no checkpoint at {path}")
    arrays = protocol.load_checkpoint(path)
    if str(arrays["mode"]) != mode:
        raise ValueError(f"run_mpi: the checkpoint at {path} is from mode={str(arrays['mode'])!r}, not {mode!r}")
    return arrays


class _Watchdog:
    """Exits the process (status 1, one clear line) when no step completes for ``timeout`` seconds.

    A synchronous collective with a dead or stuck peer blocks inside XLA forever; this thread is what
    turns that into an error. ``beat()`` after every completed step; the first step gets
    ``STARTUP_GRACE_SECONDS`` more (compilation).
    """

    def __init__(self, timeout: float, rank: int):
        self.timeout = timeout
        self.rank = rank
        self.step = 0
        self.last = time.monotonic() + STARTUP_GRACE_SECONDS
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="jaxdp-mpi-watchdog", daemon=True)
        self.thread.start()

    def beat(self, step: int) -> None:
        self.step = step
        self.last = time.monotonic()

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        while not self.stopped.wait(0.5):
            waited = time.monotonic() - self.last
            if waited > self.timeout:
                _say(
                    f"rank {self.rank}: no synchronous step completed for {waited:.0f} s after step {self.step} "
                    "(a peer died or hangs); giving up"
                )
                os._exit(1)


# ----------------------------------------------------------------------------------------------------------
# mode="sync": all-reduce, no server
# ----------------------------------------------------------------------------------------------------------


def _run_sync(
    *, workload, inner, outer, local_steps, total_updates, seed, logdir, log_every, log_seconds,
    print_points, checkpoint_every, checkpoint_seconds, resume, comm, MPI, params, worker_state, unravel, run_config,
    launched, record_hook, requested, step_timeout,
) -> dict:
    import mpi4jax  # noqa: PLC0415 (imports mpi4py: only once MPI is wanted)

    rank, size = comm.Get_rank(), comm.Get_size()
    num_params = ravel_pytree(params)[0].size

    def on_mpi_error(failed_comm, error_code):
        # Runs inside the failing MPI call (also inside mpi4jax's XLA kernel), before mpi4jax could call
        # MPI_Abort -- which under ULFM can leave the launcher hanging. Exit this rank instead.
        _say(
            f"rank {rank}: lost a peer during a synchronous collective ({MPI.Get_error_string(error_code)}); "
            "a synchronous job cannot continue without every rank: exiting"
        )
        os._exit(1)

    comm.Set_errhandler(MPI.Comm.Create_errhandler(on_mpi_error))

    def mean_over_ranks(tree):
        flat_tree, unravel_tree = ravel_pytree(tree)
        return unravel_tree(mpi4jax.allreduce(flat_tree, op=MPI.SUM, comm=comm) / size)

    def agree(stop):
        # A stop request (a signal's number, 0 for none) travels with every step: all ranks learn the largest one
        # in the same step, so they all stop after it, whichever of them got the signal.
        return mpi4jax.allreduce(stop, op=MPI.MAX, comm=comm)

    gradient_mode = outer is None

    if gradient_mode:
        state = (params, inner.init(params), worker_state)

        def step(state, counter, stop):
            params, inner_state, worker_state = state
            key = protocol.worker_key(seed, rank, counter)
            worker_state, grads, metrics = workload.local_step(worker_state, params, key)
            updates, inner_state = inner.update(mean_over_ranks(grads), inner_state, params)
            return (optax.apply_updates(params, updates), inner_state, worker_state), metrics, agree(stop)

    else:
        state = (params, inner.init(params), outer.init(params), worker_state)

        def step(state, counter, stop):
            anchor, inner_state, outer_state, worker_state = state
            key = protocol.worker_key(seed, rank, counter)
            delta, inner_state, worker_state, metrics = worker_round(
                workload.local_step, inner, local_steps, anchor, inner_state, worker_state, key,
                unroll=workload.unroll_local_steps,
            )
            updates, outer_state = outer.update(mean_over_ranks(delta), outer_state, anchor)
            new_state = (optax.apply_updates(anchor, updates), inner_state, outer_state, worker_state)
            return new_state, metrics, agree(stop)

    step = jax.jit(step)
    evaluate = workload.evaluate  # host-side by contract (workloads/base.py): never traced here

    start_step = 0
    if resume:
        arrays = _read_checkpoint(logdir, "sync") if rank == 0 else None
        arrays = comm.bcast(arrays, root=0)
        start_step = int(arrays["step"])
        restored = unravel(jnp.asarray(arrays["params"]))
        # Every rank took one local step per sync step (B per round): the worker's schedules continue from there.
        worker_state = restarted(workload, state[-1], restored, start_step * (1 if gradient_mode else local_steps))
        if gradient_mode:
            inner_state = protocol.arrays_to_tree("inner_", arrays, state[1], "run_mpi")
            state = (restored, inner_state, worker_state)
        else:
            inner_state = protocol.arrays_to_tree(f"inner{rank}_", arrays, state[1], "run_mpi")
            outer_state = protocol.arrays_to_tree("outer_", arrays, state[2], "run_mpi")
            state = (restored, inner_state, outer_state, worker_state)

    metrics_path = None if logdir is None else os.path.join(logdir, METRICS_NAME)
    disk: list[DiskProblem] = []  # rank 0: a write that met a full disk, which stops the job at its next step
    saved_step = start_step if resume else None  # the step of the last whole checkpoint
    if rank == 0 and metrics_path is not None:
        with disk_problems_noted(disk, "starting metrics.jsonl"):
            _start_metrics(metrics_path, resume, start_step, record_hook)

    def log_point(step_count, sps, history):
        record = {"step": step_count, "sps": sps, **_mean_metrics(history)}
        record.update({k: float(v) for k, v in evaluate(state[0]).items()})
        if record_hook is not None:
            record = record_hook(record, len(history))
        if metrics_path is not None:
            protocol.append_json_line(metrics_path, record)
        shown = " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step" and v is not None)
        if print_points:
            print(f"[jaxdp.mpi sync] step {step_count}/{total_updates} {shown}", flush=True)

    def checkpoint(step_count):
        nonlocal saved_step
        # In round mode each rank's inner state differs: gather them (a collective; all ranks are here).
        inner_states = comm.gather(jax.tree.map(np.asarray, state[1]), root=0) if not gradient_mode else None
        if rank != 0 or disk:
            return
        arrays = {
            "mode": np.array("sync"),
            "step": np.array(step_count),
            "params": np.asarray(ravel_pytree(state[0])[0]),
        }
        if gradient_mode:
            arrays.update(protocol.tree_to_arrays("inner_", state[1]))
        else:
            for r, tree in enumerate(inner_states):
                arrays.update(protocol.tree_to_arrays(f"inner{r}_", tree))
            arrays.update(protocol.tree_to_arrays("outer_", state[2]))
        with disk_problems_noted(disk, "saving the checkpoint"):
            protocol.save_checkpoint(_checkpoint_path(logdir), arrays)
            saved_step = step_count

    watchdog = _Watchdog(step_timeout, rank)
    # Warm-up: compile the step ahead of time (it lands in jit's cache), then meet, so that wall_seconds
    # and sps measure training, not compilation. Compile only, never run: a workload's step may have
    # effects outside its state (an RL worker's env pool advances), and a discarded run would leave the
    # first real step acting on stale observations.
    no_stop = jnp.zeros((), jnp.int32)
    step.lower(state, jnp.asarray(start_step, jnp.int32), no_stop).compile()
    comm.Barrier()
    watchdog.beat(start_step)
    if rank == 0 and start_step == 0 and not disk:
        with disk_problems_noted(disk, "logging"):
            log_point(0, None, [])
    startup_seconds = time.perf_counter() - launched
    history: list[dict] = []
    started = time.perf_counter()
    last_checkpoint = time.monotonic()
    interval_start, interval_step = started, start_step
    step_count = start_step
    stopped_by = 0  # the signal every rank agreed to stop on
    while step_count < total_updates and not stopped_by:
        stop = jnp.asarray(WRITE_FAILED if disk else requested[0] if requested else 0, jnp.int32)
        state, metrics, agreed = step(state, jnp.asarray(step_count, jnp.int32), stop)
        jax.block_until_ready(state)
        step_count += 1
        stopped_by = int(agreed)
        watchdog.beat(step_count)
        if rank == 0 and not disk:
            history.append(jax.device_get(metrics))
            timed = log_seconds and time.perf_counter() - interval_start >= log_seconds
            if step_count % log_every == 0 or step_count == total_updates or stopped_by or timed:
                now = time.perf_counter()
                with disk_problems_noted(disk, "logging"):
                    log_point(step_count, (step_count - interval_step) / max(now - interval_start, 1e-9), history)
                history, interval_start, interval_step = [], time.perf_counter(), step_count
        due = checkpoint_every and (step_count % checkpoint_every == 0 or step_count == total_updates)
        # Rank 0 alone writes a gradient-mode checkpoint (no collective), so its own clock may decide.
        timed = rank == 0 and checkpoint_seconds and time.monotonic() - last_checkpoint >= checkpoint_seconds
        # Not where rank 0 could not write: a full disk stays full, and every rank knows it here.
        if logdir is not None and (due or timed or stopped_by) and stopped_by != WRITE_FAILED:
            checkpoint(step_count)  # also at the end and at a stop: --resume continues exactly from here
            last_checkpoint = time.monotonic()
        watchdog.beat(step_count)
    wall_seconds = time.perf_counter() - started
    watchdog.stop()
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    if stopped_by:
        comm.Barrier()  # every rank stays until rank 0 has written the checkpoint
        if disk:  # rank 0 (a failure at the last step needs no agreement: the others are done)
            raise disk[0].failed(logdir, saved_step) from disk[0].error
        if stopped_by == WRITE_FAILED:
            raise WriteFailed(logdir, "rank 0 could not write", "training", saved_step, removed=False, report=False)
        raise RunStopped(stopped_by, step_count, total_updates, logdir, report=rank == 0)
    if disk:
        raise disk[0].failed(logdir, saved_step) from disk[0].error

    if rank != 0:
        return {"rank": rank, "role": "worker", "params": state[0]}
    rounds = total_updates - start_step
    gradient_steps = rounds * local_steps * size
    bytes_sent = rounds * size * num_params * 4  # every rank hands its float32 vector to the all-reduce
    summary = {
        "runtime": "mpi",
        "mode": "sync",
        "total_updates": total_updates,
        "start_step": start_step,
        "wall_seconds": wall_seconds,
        "startup_seconds": startup_seconds,
        "updates_per_second": rounds / max(wall_seconds, 1e-9),
        "final": {k: float(v) for k, v in evaluate(state[0]).items()},
        "num_processes": size,
        "num_params": int(num_params),
        "lost_workers": [],
        "bytes_sent": bytes_sent,
        "bytes_per_update": bytes_sent / max(rounds, 1),
        "bytes_per_gradient_step": bytes_sent / max(gradient_steps, 1),
        "communication_rounds": rounds,
        "gradient_steps": gradient_steps,
        "config": run_config,
    }
    if logdir is not None:
        _write_summary(logdir, summary, saved_step)
    return {**summary, "params": state[0]}


# ----------------------------------------------------------------------------------------------------------
# mode="async" / "dpsgd": the parameter server (rank 0)
# ----------------------------------------------------------------------------------------------------------


def _run_master(
    *, workload, inner, outer, local_steps, total_updates, seed, logdir, log_every, log_seconds,
    print_points, checkpoint_every, checkpoint_seconds, resume, comm, MPI, params, worker_state, unravel, run_config,
    launched, record_hook, requested, master_batch, aggregate, worker_timeout,
) -> dict:
    del inner, worker_state, seed
    size = comm.Get_size()
    workers = list(range(1, size))
    num_params = ravel_pytree(params)[0].size
    outer_state = outer.init(params)
    evaluate = workload.evaluate  # host-side by contract (workloads/base.py): never traced here

    @jax.jit
    def apply_outer(params, outer_state, aggregated_flat):
        updates, outer_state = outer.update(unravel(aggregated_flat), outer_state, params)
        params = optax.apply_updates(params, updates)
        return params, outer_state, ravel_pytree(params)[0]

    # Statistics (restored on resume so that the totals cover the whole run).
    version = 0
    stats = {
        "arrivals": {w: 0 for w in workers},
        "staleness_counts": [],  # histogram: index = staleness
        "staleness_sum": {w: 0 for w in workers},
        "bytes_sent_master": 0,
        "bytes_received_master": 0,
        "discarded_arrivals": 0,
        "gradient_steps": 0,
    }
    if resume:
        arrays = _read_checkpoint(logdir, run_config["mode"])
        version = int(arrays["step"])
        params = unravel(jnp.asarray(arrays["params"]))
        outer_state = protocol.arrays_to_tree("outer_", arrays, outer_state, "run_mpi")
        saved = json.loads(str(arrays["stats"]))
        stats.update({k: v for k, v in saved.items() if k not in ("arrivals", "staleness_sum")})
        for name in ("arrivals", "staleness_sum"):
            for w, count in saved[name].items():
                if int(w) in stats[name]:
                    stats[name][int(w)] = count
    start_version = version
    theta_host = np.array(ravel_pytree(params)[0], np.float32)

    metrics_path = None if logdir is None else os.path.join(logdir, METRICS_NAME)
    disk: list[DiskProblem] = []  # a write that met a full disk: the job stops as on a signal, writing nothing more
    saved_step = start_version if resume else None  # the version of the last whole checkpoint
    if metrics_path is not None:
        with disk_problems_noted(disk, "starting metrics.jsonl"):
            _start_metrics(metrics_path, resume, start_version, record_hook)
    if not fault_tolerance_enabled():
        _say(
            "fault tolerance is off: if a worker dies, Open MPI ends the whole job; launch with "
            "`mpirun --with-ft ulfm` to let the master continue without it"
        )

    # Worker bookkeeping: "computing" (has θ, owes us a Δ), "waiting" (its Δ is pending), "lost", "stopped".
    status = {w: "computing" for w in workers}
    last_heard: dict[int, float] = {}
    lost_workers: list[dict] = []
    outbox: list[tuple[Any, np.ndarray, int]] = []  # (request, buffer kept alive, destination)

    def live() -> list[int]:
        return [w for w in workers if status[w] in ("computing", "waiting")]

    def declare_lost(w: int, reason: str) -> None:
        if status[w] in ("lost", "stopped"):
            return
        status[w] = "lost"
        lost_workers.append({"rank": w, "reason": reason, "at_update": version})
        _say(f"master: worker rank {w} lost ({reason}) at update {version}; continuing with {len(live())} worker(s)")

    def check_failures() -> None:
        # ULFM: acknowledge the failures so that wildcard receives work again, then name the dead ranks.
        comm.Ack_failed()
        failed = comm.Get_failed()
        ranks = MPI.Group.Translate_ranks(failed, list(range(failed.Get_size())), comm.Get_group())
        for w in ranks:
            if w in status:
                declare_lost(w, "process failed")

    def send(w: int, header: tuple, payload: np.ndarray | None) -> None:
        buffer = protocol.message_buffer(0 if payload is None else payload.size)
        protocol.pack(buffer, header, np.zeros(0, np.float32) if payload is None else payload)
        try:
            outbox.append((comm.Isend(buffer, dest=w, tag=protocol.TAG_PARAMS), buffer, w))
        except MPI.Exception as error:
            declare_lost(w, f"send failed: {error}")
            return
        stats["bytes_sent_master"] += buffer.nbytes

    def flush_outbox() -> None:
        still = []
        for request, buffer, w in outbox:
            try:
                if not request.Test():
                    still.append((request, buffer, w))
            except MPI.Exception as error:
                declare_lost(w, f"send failed: {error.Get_error_string()}")
        outbox[:] = still

    def write_log(step_count, sps, interval):
        if disk:
            return
        with disk_problems_noted(disk, "logging"):
            log_record(step_count, sps, interval)

    def log_record(step_count, sps, interval):
        record = {"step": step_count, "sps": sps, **_mean_metrics(interval["metrics"])}
        if interval["staleness"]:
            record["staleness_mean"] = float(np.mean(interval["staleness"]))
            record["staleness_max"] = int(np.max(interval["staleness"]))
        record["live_workers"] = sum(status[w] != "lost" for w in workers)
        record.update({k: float(v) for k, v in evaluate(params).items()})
        if record_hook is not None:
            record = record_hook(record, len(interval["metrics"]))
        if metrics_path is not None:
            protocol.append_json_line(metrics_path, record)
        shown = " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step" and v is not None)
        if print_points:
            print(f"[jaxdp.mpi {run_config['mode']}] update {step_count}/{total_updates} {shown}", flush=True)

    def checkpoint():
        nonlocal saved_step
        if disk:
            return
        arrays = {
            "mode": np.array(run_config["mode"]),
            "step": np.array(version),
            "params": theta_host,
            "stats": np.array(json.dumps(protocol.to_builtin(stats))),
        }
        arrays.update(protocol.tree_to_arrays("outer_", outer_state))
        with disk_problems_noted(disk, "saving the checkpoint"):
            protocol.save_checkpoint(_checkpoint_path(logdir), arrays)
            saved_step = version

    def on_push(w: int) -> None:
        stats["bytes_received_master"] += mpi_status.Get_count(MPI.FLOAT) * 4
        header = protocol.header_of(receive_buffer)
        if header[protocol.SIGNAL]:
            heard.append(int(header[protocol.SIGNAL]))  # a worker's stop request
        if status.get(w) == "computing" and not finished:
            delta_sum[:] += protocol.payload_of(receive_buffer)
            pending.append((w, int(header[protocol.VERSION])))
            status[w] = "waiting"
            last_heard[w] = time.monotonic()
            stats["arrivals"][w] += 1
            stats["gradient_steps"] += int(header[protocol.LOCAL_STEPS])
            interval["metrics"].append({"loss": float(header[protocol.LOCAL_LOSS]),
                                        **{name: float(header[slot]) for name, slot in
                                           protocol.OPTIONAL_METRICS.items() if np.isfinite(header[slot])}})
        else:  # after the last update, or from a worker given up on: answer "stop"
            stats["discarded_arrivals"] += 1
            if status.get(w) in ("computing", "waiting", "lost"):
                status[w] = "stopped"
                send(w, (version, 1.0), None)

    def cancel_receive(request: Any) -> bool:
        """Cancel the wildcard receive; True if it had caught a push before the cancel took effect."""
        try:
            request.Cancel()
        except MPI.Exception:
            pass
        # Complete the cancelled request: an active request left behind can hang MPI_Finalize.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                if request.Test(mpi_status):
                    return not mpi_status.Is_cancelled()
            except MPI.Exception:
                comm.Ack_failed()  # a failure reported on it: acknowledge and complete the cancel
            time.sleep(0.001)
        return False

    # Warm-up: compile the master's functions, then wait until every worker has compiled its round
    # too, so that compilation shows up neither as staleness nor in wall_seconds. apply_outer is pure,
    # so a discarded run of it only compiles it. evaluate may keep host state (workloads/base.py) and
    # is never run for nothing: a fresh run logs θ_0 here, before any worker starts (which compiles it);
    # a resumed run compiles it at its first log point.
    jax.block_until_ready(apply_outer(params, outer_state, jnp.zeros(num_params, jnp.float32)))
    interval = {"metrics": [], "staleness": []}
    if start_version == 0:
        write_log(0, None, interval)
    comm.Barrier()
    startup_seconds = time.perf_counter() - launched
    last_heard.update({w: time.monotonic() for w in workers})
    # Start: every worker gets θ; the header's third field is where its round counter starts, so a
    # resumed worker does not redraw the batches of its first life.
    for w in workers:
        send(w, (version, 0.0, stats["arrivals"][w]), theta_host)
    receive_buffer = protocol.message_buffer(num_params)
    mpi_status = MPI.Status()
    request = comm.Irecv(receive_buffer, source=MPI.ANY_SOURCE, tag=protocol.TAG_DELTA)
    delta_sum = np.zeros(num_params, np.float32)
    pending: list[tuple[int, int]] = []  # (worker, pulled version) of the Δ's in delta_sum
    started = time.perf_counter()
    last_checkpoint = time.monotonic()
    interval_start, interval_version = started, version
    idle_sleep = 0.0
    finished = version >= total_updates
    heard: list[int] = []  # stop signals the workers got
    stopped_by = 0

    while True:
        progressed = False
        # 1. A push from whichever worker is ready.
        try:
            arrived = request.Test(mpi_status)
        except MPI.Exception as error:
            if error.Get_error_class() not in (MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING):
                raise
            check_failures()
            # Open MPI can keep failing a wildcard receive that saw a failure, even after the failure is
            # acknowledged: cancel it and post a fresh one (keeping a push it may have caught meanwhile).
            arrived = cancel_receive(request)
            if not arrived:
                request = comm.Irecv(receive_buffer, source=MPI.ANY_SOURCE, tag=protocol.TAG_DELTA)
            progressed = True
        if arrived:
            progressed = True
            on_push(mpi_status.Get_source())
            request = comm.Irecv(receive_buffer, source=MPI.ANY_SOURCE, tag=protocol.TAG_DELTA)

        # 2. Deadlines: a computing worker that stays silent too long is lost.
        now = time.monotonic()
        for w in workers:
            if status[w] == "computing" and now - last_heard[w] > worker_timeout:
                declare_lost(w, f"no push for {worker_timeout:.0f} s")

        # 3. A stop request, this rank's signal or a worker's, or a disk this rank could not write: end as after the
        # last update, at θ as it stands. The Δ's not applied yet are dropped, as if they had never arrived (the
        # checkpoint holds θ_version, and a resumed worker redraws their batches); their workers, and every other one
        # at its next push, are answered "stop".
        if not finished and (requested or heard or disk):
            stopped_by, finished = (requested or heard or [WRITE_FAILED])[0], True
            for w, _ in pending:
                stats["arrivals"][w] -= 1
                stats["gradient_steps"] -= local_steps
                stats["discarded_arrivals"] += 1
            pending.clear()
            delta_sum[:] = 0.0
            for w in workers:
                if status[w] == "waiting":
                    status[w] = "stopped"
                    send(w, (version, 1.0), None)
            if version > interval_version:
                now_perf = time.perf_counter()
                write_log(version, (version - interval_version) / max(now_perf - interval_start, 1e-9), interval)
            if logdir is not None:
                checkpoint()
            progressed = True

        # 4. Apply the outer step to every M arrivals (fewer when fewer workers are left).
        if pending and not finished and len(pending) >= min(master_batch, len(live())):
            count = len(pending)
            aggregated = delta_sum / count if aggregate == "mean" else delta_sum
            params, outer_state, new_flat = apply_outer(params, outer_state, jnp.asarray(aggregated))
            theta_host = np.array(new_flat, np.float32)
            for w, pulled in pending:
                staleness = version - pulled
                stats["staleness_sum"][w] += staleness
                counts = stats["staleness_counts"]
                counts.extend([0] * (staleness + 1 - len(counts)))
                counts[staleness] += 1
                interval["staleness"].append(staleness)
            version += 1
            finished = version >= total_updates
            for w, _ in pending:
                if status[w] != "waiting":
                    continue  # lost since its push: its Δ still counted, nobody to answer
                if finished:
                    status[w] = "stopped"
                    send(w, (version, 1.0), None)
                else:
                    status[w] = "computing"
                    last_heard[w] = time.monotonic()
                    send(w, (version, 0.0, stats["arrivals"][w]), theta_host)
            pending.clear()
            delta_sum[:] = 0.0
            progressed = True
            busy_since = time.monotonic()
            timed = log_seconds and time.perf_counter() - interval_start >= log_seconds
            if version % log_every == 0 or finished or timed:
                now_perf = time.perf_counter()
                write_log(version, (version - interval_version) / max(now_perf - interval_start, 1e-9), interval)
                interval = {"metrics": [], "staleness": []}
                interval_start, interval_version = time.perf_counter(), version
            timed = checkpoint_seconds and time.monotonic() - last_checkpoint >= checkpoint_seconds
            if (checkpoint_every and (version % checkpoint_every == 0 or finished)) or timed:
                checkpoint()  # also at the end: a longer --resume continues exactly from here
                last_checkpoint = time.monotonic()
            # Time the master spent evaluating or checkpointing is not the workers' silence.
            busy = time.monotonic() - busy_since
            for w in workers:
                if status[w] == "computing":
                    last_heard[w] += busy

        flush_outbox()
        if finished and not any(status[w] == "computing" for w in workers):
            break
        if not live():
            if finished:
                break
            _say(f"master: every worker is lost at update {version}/{total_updates}; stopping")
            if logdir is not None:
                checkpoint()  # θ_version is whole: a --resume with new workers loses nothing
            break
        # Back off while nothing happens, so that the master leaves the cores to the workers.
        idle_sleep = 0.0 if progressed else min(0.002, idle_sleep + 0.0001)
        if idle_sleep:
            time.sleep(idle_sleep)

    wall_seconds = time.perf_counter() - started
    deadline = time.monotonic() + 10.0
    while outbox and time.monotonic() < deadline:  # let the last "stop" messages go out
        flush_outbox()
        time.sleep(0.001)
    cancel_receive(request)  # the wildcard receive posted for a push that will never come
    if disk:  # the workers were answered "stop", as on a signal
        raise disk[0].failed(logdir, saved_step) from disk[0].error
    if stopped_by:  # the run has not ended: no summary
        raise RunStopped(stopped_by, version, total_updates, logdir)

    completed = version >= total_updates
    counts = np.asarray(stats["staleness_counts"] or [0], np.int64)
    arrivals_total = int(sum(stats["arrivals"].values()))
    bytes_sent = stats["bytes_sent_master"] + stats["bytes_received_master"]
    updates_done = version - start_version
    summary = {
        "runtime": "mpi",
        "mode": run_config["mode"],
        "completed": completed,
        "total_updates": version,
        "start_step": start_version,
        "wall_seconds": wall_seconds,
        "startup_seconds": startup_seconds,
        "updates_per_second": updates_done / max(wall_seconds, 1e-9),
        "final": {k: float(v) for k, v in evaluate(params).items()},
        "num_processes": size,
        "num_workers": len(workers),
        "num_params": int(num_params),
        "lost_workers": lost_workers,
        "arrivals_per_worker": {str(w): n for w, n in stats["arrivals"].items()},
        "staleness_histogram": counts.tolist(),
        "staleness_mean": float((counts * np.arange(len(counts))).sum() / max(counts.sum(), 1)),
        "staleness_max": int(np.nonzero(counts)[0].max()) if counts.sum() else 0,
        "staleness_mean_per_worker": {
            str(w): stats["staleness_sum"][w] / max(stats["arrivals"][w], 1) for w in workers
        },
        "discarded_arrivals": stats["discarded_arrivals"],
        "bytes_sent": bytes_sent,
        "bytes_sent_master": stats["bytes_sent_master"],
        "bytes_sent_workers": stats["bytes_received_master"],
        "bytes_per_update": bytes_sent / max(version, 1),
        "bytes_per_gradient_step": bytes_sent / max(stats["gradient_steps"], 1),
        "communication_rounds": arrivals_total,
        "gradient_steps": stats["gradient_steps"],
        "fault_tolerance": fault_tolerance_enabled(),
        "config": run_config,
    }
    if logdir is not None:
        _write_summary(logdir, summary, saved_step)
    if not completed:
        raise WorkersLost(f"every worker was lost; stopped at update {version}/{total_updates}")
    return {**summary, "params": params}


# ----------------------------------------------------------------------------------------------------------
# mode="async" / "dpsgd": a worker (ranks 1..K-1)
# ----------------------------------------------------------------------------------------------------------


def _wait(request: Any, deadline: float, what: str, MPI) -> Any:
    """Poll ``request`` until done; TimeoutError after ``deadline`` (time.monotonic). Returns the status."""
    mpi_status = MPI.Status()
    sleep = 0.0
    while not request.Test(mpi_status):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} from the master in time")
        sleep = min(0.002, sleep + 0.0001)
        time.sleep(sleep)
    return mpi_status


def _run_worker(
    *, workload, inner, outer, local_steps, total_updates, seed, logdir, log_every, log_seconds,
    print_points, checkpoint_every, checkpoint_seconds, resume, comm, MPI, params, worker_state, unravel, run_config,
    launched, record_hook, requested, worker_timeout,
) -> dict:
    del outer, total_updates, logdir, log_every, log_seconds, print_points, checkpoint_every, checkpoint_seconds
    del run_config, launched, record_hook
    rank = comm.Get_rank()
    num_params = ravel_pytree(params)[0].size
    inner_state = inner.init(params)

    @jax.jit
    def local_round(anchor_flat, inner_state, worker_state, counter):
        anchor = unravel(anchor_flat)
        key = protocol.worker_key(seed, rank, counter)
        delta, inner_state, worker_state, metrics = worker_round(
            workload.local_step, inner, local_steps, anchor, inner_state, worker_state, key,
            unroll=workload.unroll_local_steps,
        )
        return ravel_pytree(delta)[0], inner_state, worker_state, metrics

    # The master may wait for M pushes, each up to worker_timeout, before it answers: be patient. Until this worker's
    # first reply, also through the start-up (compilation); past it, a master silent for longer is hung (stopped,
    # deadlocked, stuck in I/O) though alive, so MPI reports nothing: give up on it rather than wait for ever.
    reply_timeout = 2 * worker_timeout
    rounds = 0  # replies received

    def deadline() -> float:
        return time.monotonic() + reply_timeout + (STARTUP_GRACE_SECONDS if rounds == 0 else 0.0)

    params_buffer = protocol.message_buffer(num_params)
    push_buffer = protocol.message_buffer(num_params)
    try:
        # Warm-up (see the master): compile the round ahead of time, then meet. Compile only: running it
        # would advance an RL worker's env pool behind its state's back (see _run_sync).
        anchor = ravel_pytree(params)[0]
        local_round.lower(anchor, inner_state, worker_state, jnp.asarray(0, jnp.int32)).compile()
        comm.Barrier()
        request = comm.Irecv(params_buffer, source=0, tag=protocol.TAG_PARAMS)
        _wait(request, deadline(), "parameters", MPI)
        header = protocol.header_of(params_buffer)
        counter = int(header[2])  # the rounds this worker pushed before (the master's statistics, on a resume)
        if resume and header[protocol.STOP] == 0.0:
            worker_state = restarted(workload, worker_state, unravel(jnp.asarray(protocol.payload_of(params_buffer))),
                                     counter * local_steps)
        while header[protocol.STOP] == 0.0:
            pulled_version = float(header[protocol.VERSION])
            anchor = jnp.array(protocol.payload_of(params_buffer), copy=True)
            delta, inner_state, worker_state, metrics = local_round(
                anchor, inner_state, worker_state, jnp.asarray(counter, jnp.int32)
            )
            loss = float(metrics["loss"]) if "loss" in metrics else float("nan")
            header = [float("nan")] * protocol.HEADER_VALUES
            header[protocol.VERSION] = pulled_version
            header[protocol.LOCAL_STEPS] = local_steps
            header[protocol.LOCAL_LOSS] = loss
            # A signal this worker got goes to the master, which stops the whole job (see "Stopping").
            header[protocol.SIGNAL] = requested[0] if requested else 0
            # RL workloads report finished episodes, which the master turns into the episodic return.
            for name, slot in protocol.OPTIONAL_METRICS.items():
                if name in metrics:
                    header[slot] = float(metrics[name])
            protocol.pack(push_buffer, tuple(header), np.asarray(delta))
            # Post the receive for the reply before pushing, so the master's answer always has a home.
            request = comm.Irecv(params_buffer, source=0, tag=protocol.TAG_PARAMS)
            push = comm.Isend(push_buffer, dest=0, tag=protocol.TAG_DELTA)
            _wait(push, deadline(), "acceptance of a push", MPI)
            _wait(request, deadline(), "reply", MPI)
            header = protocol.header_of(params_buffer)
            counter += 1
            rounds += 1
    except (MPI.Exception, TimeoutError) as error:
        message = error.Get_error_string() if isinstance(error, MPI.Exception) else str(error)
        _say(f"worker rank {rank}: lost contact with the master (rank 0): {message}; exiting")
        os._exit(1)
    return {"rank": rank, "role": "worker", "rounds": rounds}


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


# The one-line parser and value checks live in jaxdp.cli_args (shared with the jaxdp command).


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m jaxdp.runtime.mpi`` (validated before MPI starts)."""
    parser = _OneLineParser(
        prog="python -m jaxdp.runtime.mpi",
        description="Train a workload on MPI processes: sync all-reduce, or a parameter server (rank 0) with "
        "async (Downpour) or dpsgd (B local steps) workers. Launch under mpirun; see docs/multiprocess.md.",
    )
    parser.add_argument("--mode", choices=MODES, default="sync", help="how the ranks cooperate (default: sync)")
    parser.add_argument("--workload", choices=("digits",), default="digits", help="what to train (default: digits)")
    parser.add_argument("--total-updates", type=_positive_int, default=300, help="sync steps or master updates")
    parser.add_argument("--inner", choices=protocol.INNER_OPTIMIZERS, default="sgd", help="worker optimizer")
    parser.add_argument("--lr", type=_positive_float, default=0.1, help="inner learning rate (default: 0.1)")
    parser.add_argument(
        "--outer-lr", type=_positive_float, default=None,
        help="master learning rate η_g of outer = sgd(η_g); async/dpsgd default 1.0; in sync mode it switches "
        "to rounds of --local-steps with an all-reduce of Δ",
    )
    parser.add_argument("--outer-momentum", type=float, default=0.0, help="momentum of the outer sgd (default: 0)")
    parser.add_argument("--local-steps", type=_positive_int, default=1, help="B: inner steps per push (dpsgd)")
    parser.add_argument("--master-batch", type=_positive_int, default=1, help="M: arrivals per master update")
    parser.add_argument("--aggregate", choices=AGGREGATES, default="mean", help="mean or sum of the M Δ's")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="examples per local step")
    parser.add_argument("--hidden", type=_positive_int, nargs="*", default=[64], help="MLP hidden widths")
    parser.add_argument("--seed", type=_non_negative_int, default=0)
    parser.add_argument("--logdir", default=None, help="where rank 0 writes metrics.jsonl, summary.json, checkpoints")
    parser.add_argument("--log-every", type=_positive_int, default=50)
    parser.add_argument("--log-seconds", type=_positive_float, default=None,
                        help="also a log point once this many seconds have passed since the last (rank 0's clock)")
    parser.add_argument("--checkpoint-every", type=_non_negative_int, default=0, help="0: no checkpoints")
    parser.add_argument("--checkpoint-seconds", type=_positive_float, default=None,
                        help="also a checkpoint once this many seconds have passed since the last (rank 0's clock; "
                             "not in sync rounds, --outer-lr with --mode sync)")
    parser.add_argument("--resume", action="store_true", help="continue from LOGDIR/checkpoint.npz")
    parser.add_argument("--worker-timeout", type=_positive_float, default=60.0, help="seconds; see run_mpi")
    parser.add_argument("--step-timeout", type=_positive_float, default=60.0, help="seconds; see run_mpi")
    return parser


# The options that one mode or another does not read: refused when given there, even at their default value,
# as `jaxdp train` refuses an option its run does not read (a comparison with the default cannot tell).
_MODE_OPTIONS = ("master_batch", "aggregate", "outer_momentum")


def _given_mode_options(argv: Sequence[str] | None) -> frozenset[str]:
    """Which of :data:`_MODE_OPTIONS` ``argv`` gives, whatever their values."""
    return given_options(build_parser(), _MODE_OPTIONS, argv)


def _check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser,
                     given: frozenset[str] = frozenset()) -> None:
    if args.mode == "sync":  # every rank all-reduces: no master batches arrivals or adds them
        for name in sorted(given & {"master_batch", "aggregate"}):
            parser.error(f"argument --{name.replace('_', '-')}: --mode sync has no master (every rank all-reduces); "
                         "it is read by --mode async and dpsgd")
        if "outer_momentum" in given and args.outer_lr is None:
            parser.error("argument --outer-momentum: --mode sync has no outer optimizer without --outer-lr (rounds "
                         "of --local-steps with an all-reduce of Δ)")
    if args.mode == "async" and args.local_steps != 1:
        parser.error(f"argument --local-steps: must be 1 with --mode async (Downpour), got {args.local_steps}")
    if args.mode == "sync" and args.outer_lr is None and args.local_steps != 1:
        parser.error("argument --local-steps: > 1 in --mode sync needs --outer-lr (1.0 averages the models)")
    if args.resume and args.logdir is None:
        parser.error("argument --resume: needs --logdir")
    if args.checkpoint_every and args.logdir is None:
        parser.error("argument --checkpoint-every: needs --logdir")
    if args.checkpoint_seconds is not None and args.logdir is None:
        parser.error("argument --checkpoint-seconds: needs --logdir")
    if args.checkpoint_seconds is not None and args.mode == "sync" and args.outer_lr is not None:
        parser.error("argument --checkpoint-seconds: sync rounds (--outer-lr) checkpoint at counted steps only, as "
                     "each checkpoint gathers every rank's state; use --checkpoint-every")
    if not 0.0 <= args.outer_momentum < 1.0:
        parser.error(f"argument --outer-momentum: must be in [0, 1), got {args.outer_momentum}")
    world = os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE")
    if world is not None and args.mode != "sync":
        if int(world) < 2:
            parser.error(f"argument --mode: {args.mode} needs >= 2 processes (mpirun -n K, K >= 2), got {world}")
        if args.master_batch > int(world) - 1:
            parser.error(
                f"argument --master-batch: must be <= the number of workers ({int(world) - 1}), got {args.master_batch}"
            )


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run_mpi`'s keyword arguments that the command line (:func:`build_parser`) gives, all but the
    workload, the optimizers (:func:`make_optimizers`) and ``config``."""
    names = ("mode", "local_steps", "master_batch", "aggregate", "total_updates", "seed", "logdir", "log_every",
             "log_seconds", "checkpoint_every", "checkpoint_seconds", "resume", "worker_timeout", "step_timeout")
    return {name: getattr(args, name) for name in names}


def make_optimizers(
    args: argparse.Namespace,
) -> tuple[optax.GradientTransformation, optax.GradientTransformation | None]:
    """``(inner, outer)`` from parsed command-line arguments (``outer`` None in plain sync mode)."""
    inner = protocol.inner_optimizer(args.inner, args.lr)
    outer_lr = args.outer_lr
    if outer_lr is None and (args.mode != "sync"):
        outer_lr = 1.0
    outer = None if outer_lr is None else optax.sgd(outer_lr, momentum=args.outer_momentum or None)
    return inner, outer


def main(argv: Sequence[str] | None = None) -> int:
    """``mpirun -n K python -m jaxdp.runtime.mpi ...``: parse, check, then train (see :func:`build_parser`); end MPI
    within a bounded time (:func:`finalize`) with the exit status."""
    status = _train_from_command_line(argv)
    finalize(status)
    return status


def _train_from_command_line(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_arguments(args, parser, _given_mode_options(argv))  # everything that can be checked before MPI starts

    MPI = _import_mpi()
    rank = MPI.COMM_WORLD.Get_rank()
    from jaxdp.workloads.supervised import digits_workload  # noqa: PLC0415

    workload = digits_workload(batch_size=args.batch_size, hidden=tuple(args.hidden), seed=args.seed, worker_id=rank)
    inner, outer = make_optimizers(args)
    try:
        summary = run_mpi(
            workload, inner=inner, outer=outer, **run_options(args),
            config={"argv": list(sys.argv[1:] if argv is None else argv), "inner": args.inner, "lr": args.lr,
                    "outer_lr": args.outer_lr, "batch_size": args.batch_size, "hidden": list(args.hidden)},
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        if rank == 0:
            print(f"{parser.prog}: error: {error}", file=sys.stderr, flush=True)
        return 2
    except RunStopped as stop:
        return exit_status(stop, parser.prog)
    except WriteFailed as failed:  # a full disk: rank 0 reports, and every rank that knew ends with status 1
        if failed.report:
            print(f"{parser.prog}: {failed}", file=sys.stderr, flush=True)
        return 1
    except WorkersLost as error:  # rank 0; the workers are gone
        print(f"{parser.prog}: {error}", file=sys.stderr, flush=True)
        return 1
    if rank == 0:
        final = " ".join(f"{k} {v:.4g}" for k, v in summary["final"].items())
        lost = f", lost workers {[w['rank'] for w in summary['lost_workers']]}" if summary["lost_workers"] else ""
        print(f"[jaxdp.mpi {args.mode}] done: {summary['total_updates']} updates in {summary['wall_seconds']:.1f} s, "
              f"{final}{lost}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
