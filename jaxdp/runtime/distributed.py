"""Multi-controller JAX: synchronous data parallelism across processes and hosts with ``jax.distributed``.

Every process runs this same program (SPMD, "multi-controller"): it calls
``jax.distributed.initialize(coordinator_address, num_processes, process_id)``, after which
``jax.devices()`` lists the devices of *all* processes. The runtime lays one worker on each global
device (a 1-D :class:`~jax.sharding.Mesh` with axis ``"workers"``) and runs the step of
:func:`make_sync_step` under ``jax.shard_map`` (:func:`jaxdp.runtime.devices.map_workers`): each
worker computes a gradient on its own mini-batch, ``jaxdp.allreduce("workers")`` averages the
gradients across all devices of all processes (one cross-process all-reduce per step), and ``inner``
is applied to the mean -- g̃ = (1/N) Σ_n g_n; θ ← θ + inner(g̃). The parameters are laid out per
worker (a leading worker axis, as in the vmap and devices runtimes) and stay identical on every
worker by construction; the step is the same function the vmap runtime runs, so a 2-process job
computes what ``jaxdp.runtime.vmap.map_workers(step, 2)`` computes in one process.

Worker ``n``'s key at step ``t`` is :func:`~jaxdp.runtime._mpi_protocol.worker_key` ``(seed, n, t)``
(see :func:`worker_keys`). Runs are deterministic for a given seed and worker count.

Collectives: on GPUs and TPUs XLA uses the platform's (NCCL, ICI); on CPU this module selects gloo
(``jax_cpu_collectives_implementation="gloo"``, TCP between processes; also JAX 0.10's default)
before initialising. On a single host, start the processes with ``coordinator_address=127.0.0.1:PORT``.

Stopping: SIGINT, SIGTERM or SIGUSR1 sent to any process (``srun`` and schedulers signal every one) stops the whole
job after the same step on every process, with a log point and a checkpoint there, and raises
:class:`jaxdp.stopping.RunStopped` in every process; ``resume=True`` continues. The request rides with the step's
own collective (a ``pmax`` of one integer per worker), so no process needs to hear of the signal but through it.
Where process 0 cannot write its log or checkpoint (a full disk or quota, a read-only filesystem), the job stops the
same way after the next step (the request :data:`jaxdp.stopping.WRITE_FAILED`), writing nothing more, and every
process raises :class:`jaxdp.stopping.WriteFailed` (process 0's reports the last whole checkpoint, which ``resume=True``
continues from); a failure at the last step ends process 0 alone that way, the others being done.

Faults: ``jax.distributed`` health-checks the processes; when one dies the coordination service
stops the others (after ``heartbeat_timeout_seconds``), so a synchronous job ends instead of
hanging. There is no asynchronous mode here: use :mod:`jaxdp.runtime.mpi` for a parameter server.

Files (process 0, when ``logdir`` is given): ``metrics.jsonl``, ``summary.json``, ``checkpoint.npz``
(atomic), as in :mod:`jaxdp.runtime.mpi` (``wall_seconds`` excludes compilation: the step runs once
before the clock starts); ``resume=True`` continues from the checkpoint, which
process 0 reads and broadcasts to the others (no shared filesystem needed). Each process's fresh worker state
goes through ``Workload.restart`` with the restored step count, as in :mod:`jaxdp.runtime.mpi`.

Launch (see docs/multiprocess.md)::

    python -m jaxdp.runtime.distributed --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 0 &
    python -m jaxdp.runtime.distributed --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec

from jaxdp.runtime import _checks
from jaxdp.runtime import _mpi_protocol as protocol
from jaxdp.runtime import devices as devices_runtime
from jaxdp.runtime.vmap import AXIS_NAME
from jaxdp.stopping import (WRITE_FAILED, DiskProblem, RunStopped, WriteFailed, disk_problems_noted, exit_status,
                             stop_requests)
from jaxdp.strategies import allreduce
from jaxdp.workloads.base import Workload, restarted
from jaxdp.cli_args import OneLineParser as _OneLineParser
from jaxdp.cli_args import non_negative_int as _non_negative_int
from jaxdp.cli_args import positive_float as _positive_float
from jaxdp.cli_args import positive_int as _positive_int

SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_NAME = "checkpoint.npz"


def make_sync_step(
    workload: Workload, inner: optax.GradientTransformation, axis_name: str = AXIS_NAME
) -> tuple[Callable[..., Any], optax.GradientTransformation]:
    """One worker's synchronous step, for any runtime that binds ``axis_name`` (vmap, devices, distributed).

    Args:
      workload: supplies ``local_step`` (the gradient on the worker's own batch).
      inner: the optimizer applied to the all-reduced (mean) gradient.
      axis_name: the worker axis the gradients are averaged over.

    Returns:
      ``(sync_step, optimizer)``: ``optimizer = optax.chain(jaxdp.allreduce(axis_name), inner)`` (use its
      ``init`` for the state) and ``sync_step(params, opt_state, worker_state, key) -> (params, opt_state,
      worker_state, metrics)`` for one worker; ``metrics`` are the mean over the workers.

    Example:
      >>> import jax, optax
      >>> from jaxdp.runtime import vmap
      >>> from jaxdp.workloads.supervised import digits_workload
      >>> workload = digits_workload(batch_size=8, hidden=(8,))
      >>> step, optimizer = make_sync_step(workload, optax.sgd(0.1))
      >>> params, worker_state = workload.init(jax.random.PRNGKey(0))
      >>> stacked = vmap.replicate((params, optimizer.init(params), worker_state), 2)
      >>> params2, *_ = vmap.map_workers(step, 2)(*stacked, worker_keys(0, 2, 0))
      >>> bool(jax.numpy.all(params2["layers"][0]["w"][0] == params2["layers"][0]["w"][1]))
      True
    """
    if not isinstance(workload, Workload):
        raise TypeError(f"make_sync_step: workload must be a jaxdp Workload, got {type(workload).__name__}")
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"make_sync_step: inner must be an optax.GradientTransformation, got {type(inner).__name__}")
    optimizer = optax.chain(allreduce(axis_name), inner)

    def sync_step(params, opt_state, worker_state, key):
        worker_state, grads, metrics = workload.local_step(worker_state, params, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        # Metrics of all workers (scalars: one small all-reduce): any worker can then log the whole job's.
        metrics = jax.lax.pmean(metrics, axis_name)
        return optax.apply_updates(params, updates), opt_state, worker_state, metrics

    return sync_step, optimizer


def worker_keys(seed: int, num_workers: int, step: int | jax.Array) -> jax.Array:
    """The keys of all ``num_workers`` workers at ``step``: row n is ``worker_key(seed, n, step)``."""
    return jax.vmap(lambda worker: protocol.worker_key(seed, worker, step))(jnp.arange(num_workers))


def initialize(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int = 300,
    heartbeat_timeout_seconds: int = 100,
) -> None:
    """Select gloo for CPU collectives and call ``jax.distributed.initialize`` (once; before any JAX work).

    All three of ``coordinator_address``, ``num_processes`` and ``process_id`` given, or all three None:
    then JAX detects them from the cluster environment (SLURM's ``srun``, TPU pods, Open MPI 4's
    ``mpirun`` -- not Open MPI 5's, which no longer sets ``OMPI_MCA_orte_hnp_uri``; see
    ``jax.distributed.initialize``). Raises ValueError (naming the argument) for bad values.
    """
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            "run_distributed: give all of coordinator_address, num_processes and process_id, or none of them "
            "(auto-detection from SLURM / Open MPI / TPU environments)"
        )
    if not any(given):
        if not jax.distributed.is_initialized():
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(
                local_device_ids=None if local_device_ids is None else list(local_device_ids),
                initialization_timeout=initialization_timeout,
                heartbeat_timeout_seconds=heartbeat_timeout_seconds,
            )
        return
    if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
        raise ValueError(f"run_distributed: coordinator_address must be 'host:port', got {coordinator_address!r}")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"run_distributed: num_processes must be an int >= 1, got {num_processes!r}")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"run_distributed: process_id must be an int in [0, {num_processes}), got {process_id!r}")
    if jax.distributed.is_initialized():
        if (jax.process_count(), jax.process_index()) != (num_processes, process_id):
            raise ValueError(
                f"run_distributed: jax.distributed is already initialised as process {jax.process_index()} of "
                f"{jax.process_count()}, not {process_id} of {num_processes}"
            )
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=None if local_device_ids is None else list(local_device_ids),
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )


_PLACE_BYTES = 160


def memories() -> list[tuple[str, int, bool]]:
    """``(the memory this process allocates from, bytes available there, True)`` of every process of the job, in
    process order; a collective: every process calls it, and all get the same list. On CPU the memory is the host's,
    ``"host NAME"``, which the processes of one host share; on accelerators it is the process's one device, ``"the
    KIND of process I (host NAME)"``. Each process is one worker, so each holds a worker's replay (see
    ``jaxdp.train.check_shared_replay_memory``)."""
    import socket

    from jaxdp import memory

    device = jax.local_devices()[0]
    free, _ = memory.available_bytes(device)
    host = socket.gethostname()
    place = (f"host {host}" if device.platform == "cpu" else
             f"the {device.device_kind} of process {jax.process_index()} (host {host})")
    encoded = place.encode()[:_PLACE_BYTES].ljust(_PLACE_BYTES, b"\0")
    mine = np.concatenate([np.frombuffer(encoded, np.uint8).astype(np.int32),
                           [min(free >> 20, np.iinfo(np.int32).max)]])  # MiB, to fit an int32
    every = np.asarray(multihost_utils.process_allgather(mine.astype(np.int32)))
    return [(bytes(row[:-1].astype(np.uint8)).rstrip(b"\0").decode(errors="replace"), int(row[-1]) << 20, True)
            for row in every.reshape(jax.process_count(), -1)]


def _local(tree: Any) -> Any:
    """This process's copy of a worker-stacked global pytree: the first addressable worker's slice."""
    return jax.tree.map(lambda leaf: np.asarray(leaf.addressable_shards[0].data)[0], tree)


def run_distributed(
    workload: Workload | Callable[[], Workload],
    *,
    inner: optax.GradientTransformation,
    total_updates: int,
    seed: int = 0,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    logdir: str | None = None,
    log_every: int = 100,
    log_seconds: float | None = None,
    print_points: bool = True,
    checkpoint_every: int = 0,
    checkpoint_seconds: float | None = None,
    resume: bool = False,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int = 300,
    config: dict | None = None,
    check_vma: bool = True,
    record_hook: Callable[[dict, int], dict] | None = None,
) -> dict:
    """Synchronous SGD over every device of ``num_processes`` JAX processes; call it in every process.

    See the module docstring for the semantics. The distributed system is initialised here (unless it
    already is) and shut down at the end.

    Args:
      workload: a :class:`~jaxdp.workloads.base.Workload`, or a zero-argument function that builds one
        (use a function when building it touches JAX devices: that must wait for the initialisation).
      inner: the optimizer applied to the mean gradient (after ``jaxdp.allreduce("workers")``).
      total_updates: synchronous steps; the run ends at this step count.
      seed: seeds the initial parameters and every worker's batches.
      coordinator_address: ``host:port`` of process 0's coordination service (``127.0.0.1:PORT`` locally).
      num_processes: number of processes in the job.
      process_id: this process's index in ``[0, num_processes)``. Give all three, or none of them to let
        JAX detect them (under SLURM ``srun``, on TPU pods; see :func:`initialize`).
      logdir: where process 0 writes metrics.jsonl, summary.json and checkpoint.npz.
      log_every: steps between two log points (each evaluates the workload in process 0).
      log_seconds: also a log point after any step that ends this many seconds after the last point; process 0
        decides alone. None: step counts only.
      print_points: process 0 prints one line per log point (``jaxdp train --no-progress`` turns it off).
      checkpoint_every: steps between checkpoints; 0 disables them.
      checkpoint_seconds: also a checkpoint after any step that ends this many seconds after the last one (or the
        start); process 0 writes it alone and decides alone. None: step counts only.
      resume: continue from ``logdir/checkpoint.npz`` on process 0; the step count continues.
      local_device_ids: the local devices this process uses (default: all of them).
      initialization_timeout: seconds to wait for all processes to join.
      config: extra entries recorded under ``summary["config"]``.
      check_vma: shard_map's type checking of varying axes; False for workloads whose step calls a custom call
        without a varying-axes rule (envpool: the RL workload). Parameters are laid out per worker either way.
      record_hook: ``record_hook(record, steps)`` maps each log record (``step`` = updates, ``sps`` = updates/s,
        ``train_*`` = metrics averaged over workers and the ``steps`` steps since the last point) to the record
        written and printed (RL: env steps, episodes, return).

    Returns:
      On every process: ``params`` (the final parameters, this process's copy, NumPy), ``num_workers``,
      ``process_id``; on process 0 also the summary written to ``summary.json`` (``total_updates``,
      ``start_step``, ``wall_seconds``, ``updates_per_second``, ``final`` evaluation metrics,
      ``bytes_per_update`` (float32 gradient payload of all workers), ``config``).

    Raises:
      jaxdp.stopping.RunStopped: in every process, when a process got a stop signal; the job stopped after
        the same step everywhere and process 0 saved a checkpoint there (with a ``logdir``).

    Example (in each of two processes, i = 0 and 1)::

        summary = run_distributed(lambda: digits_workload(), inner=optax.sgd(0.1), total_updates=200,
                                  coordinator_address="127.0.0.1:12355", num_processes=2, process_id=i)
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"run_distributed: inner must be an optax.GradientTransformation, got {type(inner).__name__}")
    total_updates, seed, log_every, checkpoint_every, log_seconds, checkpoint_seconds = _checks.check_schedule(
        "run_distributed", total_updates, seed, log_every, checkpoint_every, log_seconds, checkpoint_seconds)
    if (resume or checkpoint_every or checkpoint_seconds) and logdir is None:
        raise ValueError("run_distributed: resume, checkpoint_every and checkpoint_seconds need a logdir")
    if not isinstance(workload, Workload) and not callable(workload):
        raise TypeError(f"run_distributed: workload must be a Workload or a function returning one, got {workload!r}")
    launched = time.perf_counter()
    initialize(
        coordinator_address, num_processes, process_id,
        local_device_ids=local_device_ids, initialization_timeout=initialization_timeout,
    )  # fmt: skip
    process_id, num_processes = jax.process_index(), jax.process_count()
    if not isinstance(workload, Workload):
        workload = workload()
        if not isinstance(workload, Workload):
            raise TypeError(
                f"run_distributed: the workload function returned {type(workload).__name__}, not a Workload"
            )

    devices = jax.devices()
    num_workers = len(devices)
    mesh = devices_runtime.make_mesh(num_workers, AXIS_NAME, devices)
    worker_sharding = NamedSharding(mesh, PartitionSpec(AXIS_NAME))
    sync_step, optimizer = make_sync_step(workload, inner, AXIS_NAME)

    def step_and_agree(params, opt_state, worker_state, key, stop):
        # A stop request (a signal's number, 0 for none) rides with each step: every worker learns the largest
        # one in the same step, so all processes stop after the same step, whichever of them got the signal.
        return (*sync_step(params, opt_state, worker_state, key), jax.lax.pmax(stop, AXIS_NAME))

    step_fn = jax.jit(devices_runtime.map_workers(step_and_agree, num_workers, AXIS_NAME, devices,
                                                  check_vma=check_vma))
    keys_fn = jax.jit(lambda step: worker_keys(seed, num_workers, step))
    evaluate = workload.evaluate  # host-side by contract (workloads/base.py): never traced here

    def to_global(tree: Any, stacked: bool = False) -> Any:
        # Every process holds the host values of all workers (a broadcast view for replicated state);
        # make_array_from_callback copies just this process's rows to its devices.
        def leaf_to_global(leaf):
            host = np.asarray(leaf)
            if not stacked:
                host = np.broadcast_to(host, (num_workers, *host.shape))
            return jax.make_array_from_callback(host.shape, worker_sharding, lambda index: host[index])

        return jax.tree.map(leaf_to_global, tree)

    params, worker_state = workload.init(jax.random.PRNGKey(seed))
    opt_state = optimizer.init(params)
    start_step = 0
    if resume:
        flat, unravel = ravel_pytree(params)
        if process_id == 0:
            arrays = protocol.load_checkpoint(os.path.join(logdir, CHECKPOINT_NAME))
            restored = (arrays["params"], protocol.arrays_to_tree("opt_", arrays, opt_state, "run_distributed"),
                        np.asarray(arrays["step"], np.int32))  # fmt: skip
        else:
            restored = (np.zeros_like(flat), opt_state, np.zeros((), np.int32))
        flat_restored, opt_state, step_restored = multihost_utils.broadcast_one_to_all(
            jax.tree.map(np.asarray, restored), is_source=process_id == 0
        )
        params = unravel(jnp.asarray(flat_restored))
        opt_state = jax.tree.map(jnp.asarray, opt_state)
        start_step = int(step_restored)
        worker_state = restarted(workload, worker_state, params, start_step)  # one local step per sync step

    global_params = to_global(params)
    global_opt_state = to_global(opt_state)
    global_worker_state = to_global(worker_state)

    metrics_path = None if logdir is None else os.path.join(logdir, METRICS_NAME)
    disk: list[DiskProblem] = []  # process 0: a write that met a full disk, which stops the job at its next step
    saved_step = start_step if resume else None  # the step of the last whole checkpoint
    if process_id == 0 and logdir is not None:
        with disk_problems_noted(disk, "starting metrics.jsonl"):
            os.makedirs(logdir, exist_ok=True)
            if not resume:
                open(metrics_path, "w").close()
            else:  # records logged after the checkpoint (a killed run) are logged again from it: keep one curve
                protocol.truncate_json_lines(metrics_path, start_step, key="updates" if record_hook else "step")

    def log_point(step_count, sps, history):
        local_params = _local(global_params)
        record = {"step": step_count, "sps": sps}
        if history:
            record.update({f"train_{k}": float(np.mean([h[k] for h in history])) for k in history[0]})
        record.update({k: float(v) for k, v in evaluate(local_params).items()})
        if record_hook is not None:
            record = record_hook(record, len(history))
        if metrics_path is not None:
            protocol.append_json_line(metrics_path, record)
        shown = " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step" and v is not None)
        if print_points:
            print(f"[jaxdp.distributed] step {step_count}/{total_updates} {shown}", flush=True)

    def stop_flags(requested: list[int]) -> jax.Array:
        # Every worker of this process carries this process's request (a signal's number, WRITE_FAILED, 0 for none).
        stop = WRITE_FAILED if disk else requested[0] if requested else 0
        return to_global(np.full(num_workers, stop, np.int32), stacked=True)

    # Warm-up: compile the step ahead of time (it lands in jit's cache), then meet, so that wall_seconds
    # and sps measure training, not compilation. Compile only, never run: a workload's step may have
    # effects outside its state (an RL worker's env pool advances), and a discarded run would leave the
    # first real step acting on stale observations.
    step_fn.lower(global_params, global_opt_state, global_worker_state,
                  to_global(np.asarray(keys_fn(start_step)), stacked=True), stop_flags([])).compile()  # fmt: skip
    if num_processes > 1:
        multihost_utils.sync_global_devices("jaxdp.distributed warm-up")
    if process_id == 0 and start_step == 0 and not disk:
        with disk_problems_noted(disk, "logging"):
            log_point(0, None, [])
    startup_seconds = time.perf_counter() - launched  # joining the cluster, restoring and compiling
    history: list[dict] = []
    started = time.perf_counter()
    last_checkpoint = time.monotonic()
    interval_start, interval_step = started, start_step
    step_count = start_step
    stopped_by = 0  # the signal every process agreed to stop on
    with stop_requests() as requested:
        while step_count < total_updates and not stopped_by:
            keys = to_global(np.asarray(keys_fn(step_count)), stacked=True)
            global_params, global_opt_state, global_worker_state, metrics, agreed = step_fn(
                global_params, global_opt_state, global_worker_state, keys, stop_flags(requested)
            )
            jax.block_until_ready(global_params)  # one step at a time: a deep queue of collectives can time out
            step_count += 1
            stopped_by = int(np.asarray(agreed.addressable_shards[0].data).reshape(-1)[0])
            if process_id == 0 and not disk:
                history.append({k: float(np.mean(np.asarray(v.addressable_shards[0].data)))
                                for k, v in metrics.items()})
                timed = log_seconds and time.perf_counter() - interval_start >= log_seconds
                if step_count % log_every == 0 or step_count == total_updates or stopped_by or timed:
                    now = time.perf_counter()
                    with disk_problems_noted(disk, "logging"):
                        log_point(step_count, (step_count - interval_step) / max(now - interval_start, 1e-9),
                                  history)
                    history, interval_start, interval_step = [], time.perf_counter(), step_count
            # Also at the end (a longer --resume continues exactly from here) and where the job stops.
            due = checkpoint_every and (step_count % checkpoint_every == 0 or step_count == total_updates)
            due = due or (checkpoint_seconds and time.monotonic() - last_checkpoint >= checkpoint_seconds)
            if process_id == 0 and logdir is not None and (due or stopped_by) and not disk:
                arrays = {"step": np.array(step_count), "params": np.asarray(ravel_pytree(_local(global_params))[0])}
                arrays.update(protocol.tree_to_arrays("opt_", _local(global_opt_state)))
                with disk_problems_noted(disk, "saving the checkpoint"):
                    protocol.save_checkpoint(os.path.join(logdir, CHECKPOINT_NAME), arrays)
                    saved_step = step_count
                last_checkpoint = time.monotonic()
    wall_seconds = time.perf_counter() - started
    if stopped_by:
        # The run has not ended: no summary. The barrier keeps every process alive until the checkpoint is written.
        if num_processes > 1:
            multihost_utils.sync_global_devices("jaxdp.distributed stop")
        jax.distributed.shutdown()
        if disk:
            raise disk[0].failed(logdir, saved_step) from disk[0].error
        if stopped_by == WRITE_FAILED:
            raise WriteFailed(logdir, "process 0 could not write", "training", saved_step, removed=False, report=False)
        raise RunStopped(stopped_by, step_count, total_updates, logdir, report=process_id == 0)
    if disk:  # at the last step: the others are done
        jax.distributed.shutdown()
        raise disk[0].failed(logdir, saved_step) from disk[0].error

    final_params = _local(global_params)
    result = {"params": final_params, "num_workers": num_workers, "process_id": process_id}
    if process_id == 0:
        num_params = int(ravel_pytree(final_params)[0].size)
        steps_done = total_updates - start_step
        result.update(
            {
                "runtime": "distributed",
                "mode": "sync",
                "total_updates": total_updates,
                "start_step": start_step,
                "wall_seconds": wall_seconds,
                "startup_seconds": startup_seconds,
                "updates_per_second": steps_done / max(wall_seconds, 1e-9),
                "final": {k: float(v) for k, v in evaluate(final_params).items()},
                "num_processes": num_processes,
                "num_workers": num_workers,
                "num_params": num_params,
                "bytes_per_update": num_workers * num_params * 4,
                "config": {
                    "runtime": "distributed",
                    "workload": workload.name,
                    "total_updates": total_updates,
                    "seed": seed,
                    "log_every": log_every,
                    "log_seconds": log_seconds,
                    "checkpoint_every": checkpoint_every,
                    "checkpoint_seconds": checkpoint_seconds,
                    "num_processes": num_processes,
                    **(config or {}),
                },
            }
        )
        if logdir is not None:
            with disk_problems_noted(disk, "writing the summary"):
                protocol.write_json(os.path.join(logdir, SUMMARY_NAME),
                                    {k: v for k, v in result.items() if k != "params"})
    jax.distributed.shutdown()
    if disk:
        raise disk[0].failed(logdir, saved_step) from disk[0].error
    return result


# The one-line parser and value checks live in jaxdp.cli_args (shared with the jaxdp command).


def _address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m jaxdp.runtime.distributed`` (validated before JAX starts)."""
    parser = _OneLineParser(
        prog="python -m jaxdp.runtime.distributed",
        description="Synchronous data-parallel training over jax.distributed processes (one per host or device "
        "group); start one per process with the same --coordinator. See docs/multiprocess.md.",
    )
    parser.add_argument("--coordinator", type=_address, default=None,
                        help="HOST:PORT of process 0 (omit all three to auto-detect under srun / mpirun)")
    parser.add_argument("--num-processes", type=_positive_int, default=None)
    parser.add_argument("--process-id", type=_non_negative_int, default=None)
    parser.add_argument("--workload", choices=("digits",), default="digits")
    parser.add_argument("--total-updates", type=_positive_int, default=300)
    parser.add_argument("--inner", choices=protocol.INNER_OPTIMIZERS, default="sgd")
    parser.add_argument("--lr", type=_positive_float, default=0.1)
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="examples per worker per step")
    parser.add_argument("--hidden", type=_positive_int, nargs="*", default=[64])
    parser.add_argument("--seed", type=_non_negative_int, default=0)
    parser.add_argument("--logdir", default=None)
    parser.add_argument("--log-every", type=_positive_int, default=50)
    parser.add_argument("--log-seconds", type=_positive_float, default=None,
                        help="also a log point once this many seconds have passed since the last (process 0's clock)")
    parser.add_argument("--checkpoint-every", type=_non_negative_int, default=0)
    parser.add_argument("--checkpoint-seconds", type=_positive_float, default=None,
                        help="also a checkpoint once this many seconds have passed since the last (process 0's clock)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--initialization-timeout", type=_positive_int, default=300, help="seconds")
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the command line; a bad value exits 2 with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if any(given) and not all(given):
        parser.error("arguments --coordinator, --num-processes, --process-id: give all three or none (auto-detect)")
    if all(given) and args.process_id >= args.num_processes:
        parser.error(f"argument --process-id: must be < --num-processes ({args.num_processes}), got {args.process_id}")
    if (args.resume or args.checkpoint_every or args.checkpoint_seconds) and args.logdir is None:
        parser.error("argument --resume/--checkpoint-every/--checkpoint-seconds: needs --logdir")
    return args


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run_distributed`'s keyword arguments that the command line (:func:`build_parser`) gives, all but the
    workload, the optimizer and ``config``."""
    return dict(total_updates=args.total_updates, seed=args.seed, coordinator_address=args.coordinator,
                num_processes=args.num_processes, process_id=args.process_id, logdir=args.logdir,
                log_every=args.log_every, log_seconds=args.log_seconds, checkpoint_every=args.checkpoint_every,
                checkpoint_seconds=args.checkpoint_seconds, resume=args.resume,
                initialization_timeout=args.initialization_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxdp.runtime.distributed --coordinator H:P --num-processes N --process-id I ...``."""
    args = parse_arguments(argv)
    from jaxdp.workloads.supervised import digits_workload  # noqa: PLC0415

    try:
        result = run_distributed(
            lambda: digits_workload(batch_size=args.batch_size, hidden=tuple(args.hidden), seed=args.seed,
                                    worker_id=0),  # fmt: skip
            inner=protocol.inner_optimizer(args.inner, args.lr), **run_options(args),
            config={"argv": list(sys.argv[1:] if argv is None else argv), "inner": args.inner, "lr": args.lr,
                    "batch_size": args.batch_size, "hidden": list(args.hidden)},  # fmt: skip
        )
    except RunStopped as stop:
        return exit_status(stop, "python -m jaxdp.runtime.distributed")
    except WriteFailed as failed:  # a full disk: process 0 reports, and every process that knew ends with status 1
        if failed.report:
            print(f"python -m jaxdp.runtime.distributed: {failed}", file=sys.stderr, flush=True)
        return 1
    if result["process_id"] == 0:
        final = " ".join(f"{k} {v:.4g}" for k, v in result["final"].items())
        print(f"[jaxdp.distributed] done: {result['total_updates']} steps in {result['wall_seconds']:.1f} s, {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
