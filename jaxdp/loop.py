"""The host side of a run: progress bar, metrics files, TensorBoard, checkpoints, evaluation, seed aggregates.

The device side (everything jitted) is :mod:`jaxdp.train`. Outputs in ``--logdir``:

* ``metrics.jsonl`` -- one JSON object per log point: ``step`` (env steps per seed), ``episodic_return`` (mean real-game
  return of the episodes finished since the last point, or null), ``episodes``, ``sps`` (env steps per second since
  the last point, all seeds and workers: the first point's interval holds the compilation, which ``summary.json``
  reports apart), learner metrics. With several seeds: ``seed_<s>/metrics.jsonl`` for each seed, and the
  top-level file holds the mean over seeds.
* ``summary.json`` -- ``total_steps``, ``wall_seconds`` (training, compilation included), ``compile_seconds`` (the
  first chunk's wall time, its compilation with it; the first learning chunk's added after DQN's random play), ``sps``,
  ``eval_seconds`` (the greedy evaluation's, apart), ``final_return`` (mean return of the episodes that ended in
  the last 10% of the run's steps, :func:`final_return`), ``eval_return`` (the mean over the evaluation games that
  ended, ``eval_episodes_ended`` of the ``--eval-episodes`` each run played: a stalled greedy policy may end none),
  ``config``, ``provenance`` (library versions and machine, :mod:`jaxdp.provenance`); with several seeds also
  per-seed values and the mean, std and a 95% confidence interval over seeds (Student t), and
  ``learning_curves.png`` (each seed, their mean and its 95% bootstrap band, :func:`bootstrap_band`).
* A hyperparameter sweep (``--lr 1e-3 3e-3``, see ``TrainConfig.sweep``) adds a level: each grid point writes
  to ``<point>/`` (``lr_0.001``; its seeds in ``<point>/seed_<s>/``, and the mean over them in
  ``<point>/metrics.jsonl`` and ``<point>/summary.json``); the top-level metrics are the mean over every run;
  ``summary.json`` lists every point in ``grid`` (mean, std, CI over seeds), every run in ``runs``, and the best
  point (by mean final return, among the points none of whose runs diverged) in ``best``, ``final_return`` and
  ``eval_return``; the PNG has each point's mean and range over seeds.
* Divergence, in ``summary.json``: ``diverged_runs`` counts the runs whose loss became NaN or infinite or whose final
  parameters are not finite; each run has ``diverged_at_step`` (the first such log point, or null) and
  ``params_finite`` (:func:`divergence_fields`). Such a run trains on to its end; the closing lines name it.
* ``tb/`` -- TensorBoard events; ``checkpoints/`` -- orbax checkpoints that ``--resume`` continues from;
  ``config.json`` -- the run's config, which a ``--resume`` must match but for its length and reporting
  (:data:`jaxdp.config.RESUMABLE_CHANGES`).

A crash loses at most the work since the last checkpoint (``--checkpoint-interval`` seconds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdp import atomic, provenance
from jaxdp.cli_args import folder_problem
from jaxdp.config import (ConfigError, TrainConfig, check_resumable, evaluation_shown, make_logdir, point_shown,
                          save_run_config, validate)
from jaxdp.runtime._mpi_protocol import truncate_json_lines
from jaxdp.stopping import DiskProblem, RunStopped, WriteFailed, disk_problem_in, disk_problems_noted, stop_requests


# ---------------------------------------------------------------------------------------------------------------
# Episode bookkeeping (host).
# ---------------------------------------------------------------------------------------------------------------
def episodes_by_seed(info, num_seeds: int) -> list[list[tuple[int, float, int]]]:
    """Flattens a chunk's StepInfo into per-seed lists of (order, return, length) in the order they finished.

    info arrays have shape [iterations, S, N, (k,) E] (scan axes first, then lanes, then per-iteration steps).
    """
    finished = np.asarray(info.finished)
    returns = np.asarray(info.returns)
    lengths = np.asarray(info.lengths)
    # Move the seed axis first, keep time order within the rest.
    finished = np.moveaxis(finished, 1, 0).reshape(num_seeds, finished.shape[0], -1)
    returns = np.moveaxis(returns, 1, 0).reshape(num_seeds, returns.shape[0], -1)
    lengths = np.moveaxis(lengths, 1, 0).reshape(num_seeds, lengths.shape[0], -1)
    out = []
    for s in range(num_seeds):
        idx = np.nonzero(finished[s])
        out.append([(int(i), float(returns[s][i, j]), int(lengths[s][i, j])) for i, j in zip(*idx)])
    return out


#: The end of a run that its final return averages over: the last 10% of its env steps.
FINAL_FRACTION = 0.1


def final_return(steps: Sequence[int], returns: Sequence[float], total_steps: int) -> float | None:
    """The mean return of the episodes that ended in the last ``FINAL_FRACTION`` of the run's env steps (after step
    0.9 × ``total_steps``), or the return of the last one when none ended there; None without any.

    Counted in steps, not in episodes: an agent's episodes lengthen as it learns, and the last 10% of its episodes
    reached back into its early play (a 50k-step DQN CartPole run: returns 104–211 over the last 10% of episodes,
    348–462 over the last 10% of steps, where its curve ends). Every runtime reports this window.

    Args:
      steps: the env step at which each episode ended (per seed), in order.
      returns: their returns.
      total_steps: the run's length in the same steps.
    """
    if len(steps) != len(returns):
        raise ValueError(f"final_return: {len(steps)} steps for {len(returns)} returns")
    if not returns:
        return None
    late = [r for st, r in zip(steps, returns) if st > (1.0 - FINAL_FRACTION) * total_steps]
    return float(np.mean(late)) if late else float(returns[-1])


def evaluation_fields(returns: list[float]) -> dict:
    """A run's evaluation in its summary: ``eval_return``, the mean return of the evaluation games that ended within
    their time limit (None if none did), and ``eval_episodes_ended``, how many did."""
    return {"eval_return": float(np.mean(returns)) if returns else None, "eval_episodes_ended": len(returns)}


def divergence_fields(params: Any, metrics: str | Iterable[dict]) -> dict:
    """Whether a run diverged, for its summary: ``diverged_at_step``, the step of the first log point of ``metrics``
    (the path of a ``metrics.jsonl``, or its records already read) whose learner loss is NaN or infinite (None if none
    is), and ``params_finite``, whether every entry of the final parameters is finite. A diverged run trains on to
    its end without a word otherwise, and its NaN policy still plays (argmax of NaN is action 0): its returns look
    like a bad agent's, not a broken one's."""
    if isinstance(metrics, str):
        path, metrics = metrics, []
        if os.path.exists(path):
            with open(path) as f:
                metrics = [json.loads(line) for line in f]
    first = None
    for record in metrics:
        loss = record.get("loss", record.get("train_loss"))  # the MPI runtime logs the workers' train_loss
        if isinstance(loss, (int, float)) and not math.isfinite(loss):
            first = record["step"]
            break
    finite = all(bool(np.isfinite(np.asarray(leaf)).all()) for leaf in jax.tree.leaves(params))
    return {"diverged_at_step": first, "params_finite": finite}


def diverged(fields: dict) -> bool:
    """A run's :func:`divergence_fields` say it diverged."""
    return fields.get("diverged_at_step") is not None or fields.get("params_finite") is False


def confidence_interval(values: list[float]) -> dict[str, float] | None:
    vals = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(vals) == 0:
        return None
    mean = float(vals.mean())
    if len(vals) == 1:
        return {"mean": mean, "std": 0.0, "ci95_low": mean, "ci95_high": mean, "n": 1}
    from scipy import stats

    std = float(vals.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(vals) - 1) * std / math.sqrt(len(vals)))
    return {"mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half, "n": int(len(vals))}


# ---------------------------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------------------------
def add_scalars(tb, record: dict) -> None:
    """A log record's finite numbers as TensorBoard scalars at its ``step``."""
    for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
            tb.add_scalar(k, v, record["step"])


class MetricsWriter:
    """Appends JSON lines (flushed per line, so a crash keeps what was logged) and mirrors to TensorBoard."""

    def __init__(self, path: str, tb_dir: str | None):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._f = open(path, "a")
        self._tb = None
        if tb_dir is not None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(tb_dir)

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, default=atomic.json_value) + "\n")
        self._f.flush()
        if self._tb is not None:
            add_scalars(self._tb, record)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def discard_unfinished_checkpoints(logdir: str, settle: float = 0.5, patience: float = 10.0) -> None:
    """Removes what a failed save left in ``logdir``'s checkpoints: orbax writes a checkpoint under a temporary name
    and renames it once whole, so a failed one is a folder with ``.orbax-checkpoint-tmp`` in its name. orbax's
    threads may still write in it after the save has raised (measured: they made its folders again), so it is removed
    until none has come back for ``settle`` seconds, for ``patience`` seconds at most."""
    import shutil

    folder = os.path.join(logdir, "checkpoints")

    def unfinished() -> list[str]:
        names = os.listdir(folder) if os.path.isdir(folder) else []
        return [os.path.join(folder, name) for name in names if ".orbax-checkpoint-tmp" in name]

    deadline, quiet_since = time.monotonic() + patience, time.monotonic()
    while time.monotonic() < deadline:
        found = unfinished()
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
        now = time.monotonic()
        if found:
            quiet_since = now
        elif now - quiet_since >= settle:
            return
        time.sleep(0.05)


def remover_of_new_files(logdir: str) -> Callable[[], None]:
    """A function that removes what appears in ``logdir`` from now on, and ``logdir`` itself if it does not exist
    yet: what a run wrote, and only that, when it must leave nothing behind (see :func:`writes_in`)."""
    import shutil

    there_before = set(os.listdir(logdir)) if os.path.isdir(logdir) else None

    def remove() -> None:
        if not os.path.isdir(logdir):
            return
        made = [logdir] if there_before is None else [
            os.path.join(logdir, name) for name in os.listdir(logdir) if name not in there_before]
        for path in made:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:  # another process of the job may remove its own file (a rank's pid file) meanwhile
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)

    return remove


@contextlib.contextmanager
def writes_in(logdir: str, doing: str, checkpoint_step: Callable[[], int | None], manager=None,
              nothing_saved: Callable[[], None] | None = None):
    """Turns a full or read-only disk met inside the block into :class:`WriteFailed` (one line on the command line,
    not a library's traceback), after removing the unfinished checkpoint: once ``manager``'s (orbax's) own threads,
    which go on writing it after the save has failed, are done. When no checkpoint was saved, ``nothing_saved``
    removes what the run had written, which could not be resumed and would keep its ``--logdir`` from another try.
    Other errors pass as they are.

    orbax's threads log the failure too, each with its traceback (three of them, 140 lines for one save), and
    tensorstore's callbacks, still running once orbax has closed its event loop, report "Event loop is closed" as
    unraisable errors (up to 21 six-line tracebacks measured): both are held while the block runs, and dropped when
    the failure is reported as :class:`WriteFailed`, which says the same in one line; otherwise they are reported as
    they came. Every other unraisable error is reported at once."""
    noted: list[DiskProblem] = []
    held = _HeldDiskErrors()
    orbax_log = logging.getLogger("absl")  # orbax logs through absl's logger
    orbax_log.addFilter(held)
    report_unraisable, closed_loop = sys.unraisablehook, []

    def hold_closed_loop(unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            closed_loop.append(unraisable)
        else:
            report_unraisable(unraisable)

    sys.unraisablehook = hold_closed_loop
    try:
        with disk_problems_noted(noted, doing):
            yield
        if noted:
            if manager is not None:
                with contextlib.suppress(Exception):  # the same failure, from the threads that met it
                    manager.wait_until_finished()
            discard_unfinished_checkpoints(logdir)
            step = checkpoint_step()
            if step is None and nothing_saved is not None:
                nothing_saved()
            raise WriteFailed(logdir, noted[0].reason, doing, step) from noted[0].error
    finally:
        orbax_log.removeFilter(held)
        sys.unraisablehook = report_unraisable
        if not noted:
            for record in held.records:
                orbax_log.handle(record)
            for unraisable in closed_loop:
                report_unraisable(unraisable)


class _HeldDiskErrors(logging.Filter):
    """Holds the warnings and errors that report a full or read-only disk (see :func:`writes_in`)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and disk_problem_in(record.getMessage()):
            self.records.append(record)
            return False
        return True


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints (orbax). The env handle is not saved: envpool's state lives outside JAX. On resume the pool is
# recreated and reset; learner, optimizer, replay and keys continue.
# ---------------------------------------------------------------------------------------------------------------
def _checkpoint_manager(logdir: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(logdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
    )


# Saving a checkpoint pauses training (the next chunk reuses the state's buffers), and a DQN replay takes seconds:
# orbax writes every byte of Atari's 7 GB replay, 2.9-3.2 s a save on a 2-core EPYC in CHECKPOINT_CHUNK_BYTES chunks
# (4-8 s in orbax's own, 7.5 s inside a Pong run), and a sweep's replays take as many times that. After a save of d
# seconds the next one therefore waits at least d / CHECKPOINT_SHARE seconds, whatever --checkpoint-interval asks.
CHECKPOINT_SHARE = 0.05


def checkpoint_due(since_last: float, last_save_seconds: float, interval: float) -> bool:
    """Whether a checkpoint is due ``since_last`` seconds after the previous one ended, which took
    ``last_save_seconds`` to save: ``interval`` (``--checkpoint-interval``) has passed, and so has
    ``last_save_seconds / CHECKPOINT_SHARE``, so that saving takes at most about 5% of a run's time."""
    return since_last >= max(interval, last_save_seconds / CHECKPOINT_SHARE)


# Bytes of one stored chunk. orbax's own choice cut a 7 GB replay into four 1.76 GB chunks, and compressing them
# held 3.4 GB more than the run for the length of a save (peak 10.7 GB); 64 MB chunks hold 0.13 GB more, and saved
# it in 2.9-3.2 s instead of 4.3-7.2 s (2-core EPYC).
CHECKPOINT_CHUNK_BYTES = 64 << 20
# Leaves this large (DQN replays) are restored in place, chunk by chunk, into one buffer (see restore_checkpoint).
RESTORE_IN_PLACE_BYTES = 256 << 20


def save_checkpoint(manager, iteration: int, lanes, host_state: dict) -> None:
    import orbax.checkpoint as ocp

    chunked = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHECKPOINT_CHUNK_BYTES), lanes)
    # PyTreeSave, as restore_checkpoint restores with PyTreeRestore (a manager keeps one handler per item). It
    # writes what StandardSave wrote, and reads checkpoints saved by it.
    manager.save(iteration, args=ocp.args.Composite(
        lanes=ocp.args.PyTreeSave(lanes, save_args=chunked), host=ocp.args.JsonSave(host_state)))
    manager.wait_until_finished()


def restore_checkpoint(manager, lanes_template, *, in_place_bytes: int | None = None):
    """``(lanes, host state)`` of the latest checkpoint, or None when there is none.

    ``lanes_template`` gives the tree, shapes and dtypes (arrays or ``jax.ShapeDtypeStruct``; arrays are not
    reused: drop a template's large arrays before calling, or they are held twice). orbax restores an array through a
    host copy of the whole of it: restoring a 7 GB replay peaked at 14 GB, and a resumed single-seed Atari DQN, which
    held its fresh replay too, at 16 GB. Leaves of at least ``in_place_bytes`` are read instead in slices of about
    ``CHECKPOINT_CHUNK_BYTES`` straight from the checkpoint's tensorstore, each written into one buffer by a donated
    update: the leaf's size plus one slice. ``in_place_bytes`` defaults to ``RESTORE_IN_PLACE_BYTES``.
    """
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    abstract = _abstract(lanes_template)
    in_place_bytes = RESTORE_IN_PLACE_BYTES if in_place_bytes is None else in_place_bytes
    large = jax.tree.map(lambda leaf: leaf.ndim > 0 and not jnp.issubdtype(leaf.dtype, jax.dtypes.extended)  # keys
                         and leaf.size * np.dtype(leaf.dtype).itemsize >= in_place_bytes, abstract)
    # PyTreeRestore skips the PLACEHOLDER leaves (StandardRestore refuses them).
    item = jax.tree.map(lambda a, big: ocp.PLACEHOLDER if big else a, abstract, large)
    restore_args = jax.tree.map(lambda a, big: ocp.PLACEHOLDER if big else ocp.ArrayRestoreArgs(
        sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), abstract, large)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            lanes=ocp.args.PyTreeRestore(item=item, restore_args=restore_args), host=ocp.args.JsonRestore()))
    except ValueError as error:
        if "tree structures do not match" not in str(error):
            raise
        # Another state tree than this run builds: from Python, most often another optimizer chain (inner=...), which
        # config.json cannot record. orbax's message names the subtree that differs ("opt_state: ...").
        where = " ".join(line.strip() for line in str(error).splitlines()[1:4])
        raise ConfigError(f"--resume: the checkpoint in {manager.directory} holds another state than this run builds "
                          f"({where}): resume with the optimizer chain (inner=...) the run was started with") from None
    directory = os.path.join(str(manager.directory), str(step), "lanes")
    names = ocp.tree.get_param_names(abstract, include_empty_nodes=False)  # the paths orbax stored them under
    lanes = jax.tree.map(lambda leaf, a, big, name: _read_in_place(directory, name, a) if big else leaf,
                         restored["lanes"], abstract, large, names, is_leaf=lambda x: x is ocp.PLACEHOLDER)
    return lanes, restored["host"]


def _abstract(tree):
    """``tree``'s arrays as ``jax.ShapeDtypeStruct`` with their shardings, holding no memory. A leaf without a
    sharding (jax.eval_shape's) means this process's first device, as orbax's StandardRestore took it to mean."""
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)
                                                       or one_device), tree)


def _read_in_place(directory: str, name: str, abstract: jax.ShapeDtypeStruct) -> jax.Array:
    """The array ``name`` of an orbax checkpoint ``directory``, read in slices along its longest axis into one
    buffer (each slice's update donates the buffer, so XLA writes it in place)."""
    import tensorstore as ts

    kvstore = {"driver": "ocdbt", "base": f"file://{directory}/", "path": name}
    try:  # orbax 0.12 writes zarr (v2) arrays; later versions may write zarr3
        store = ts.open({"driver": "zarr", "kvstore": kvstore}, open=True, read=True).result()
    except ValueError:
        store = ts.open({"driver": "zarr3", "kvstore": kvstore}, open=True, read=True).result()
    if tuple(store.shape) != tuple(abstract.shape):
        raise ValueError(f"checkpoint: {name} has shape {tuple(store.shape)}, this run's has {abstract.shape}")
    axis = int(np.argmax(abstract.shape))
    row_bytes = max(1, abstract.size // abstract.shape[axis] * np.dtype(abstract.dtype).itemsize)
    # Whole stored chunks at a time: a slice of a chunk decompresses all of it (jaxdp's earlier checkpoints stored a
    # 7 GB replay in four chunks).
    stored = store.chunk_layout.read_chunk.shape
    rows = max(1, CHECKPOINT_CHUNK_BYTES // row_bytes, stored[axis] if stored is not None else 1)
    buffer = jnp.zeros(abstract.shape, abstract.dtype, device=abstract.sharding)
    length = abstract.shape[axis]
    for start in range(0, length, rows):
        index = tuple(slice(start, min(start + rows, length)) if i == axis else slice(None)
                      for i in range(len(abstract.shape)))
        part = store[index].read().result().astype(abstract.dtype, copy=False)
        buffer = _write_slice(buffer, part, start, axis)
    return buffer


@functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
def _write_slice(buffer: jax.Array, part: jax.Array, start: jax.Array, axis: int) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(buffer, part, start, axis)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: greedy episodes of the real game (no episodic life), host API.
# ---------------------------------------------------------------------------------------------------------------
# Steps a batch of greedy games may take in a game without a time limit (CliffWalking-v0): Atari's 108k frames.
EVAL_STEPS_WITHOUT_TIME_LIMIT = 27_000
# Greedy games played at once, one per env; more episodes are played in further batches.
EVAL_ENVS = 32


def evaluate(cfg: TrainConfig, network, params, episodes: int, seed: int, bar=None,
             stop: Sequence[int] = ()) -> list[float]:
    """The returns of ``episodes`` greedy games of the real game (no episodic life), fewer if some do not end;
    ε-greedy ones with ``cfg.eval_epsilon`` > 0 (the random actions drawn from a generator seeded by ``seed``).

    Each env plays one game, the first it finishes, and up to ``EVAL_ENVS`` play at once: counting whichever
    games end first, as a pool that replays its finished envs would, favours short games. A batch of games gets
    the game's time limit, or ``EVAL_STEPS_WITHOUT_TIME_LIMIT`` steps in a game without one, so a greedy policy
    that never ends a game (Breakout without FIRE after a lost life, CliffWalking into a wall) cannot hang the run;
    such a game reports no return. ``bar``: an optional tqdm-like bar, told each step and each finished game.
    ``stop``: a list that turns non-empty when the games must end (:func:`jaxdp.stopping.stop_requests`); they end
    at the next step, and the returns of the games finished by then are returned.
    """
    from jaxdp import envs as envs_lib

    if episodes <= 0:
        return []
    @jax.jit
    def greedy(params, obs):  # one program per step: the network and the argmax
        y = network.apply(params, obs)
        return jnp.argmax(y if cfg.is_dqn else y[0], axis=-1).astype(jnp.int32)

    out: list[float] = []
    for first in range(0, episodes, EVAL_ENVS):
        n = min(EVAL_ENVS, episodes - first)
        # The first batch keeps the seeds of earlier versions (10,000 + seed); later ones must not repeat its envs.
        env = envs_lib.make_host(cfg.env, n, seed=10_000 + seed + 1_000_003 * (first // EVAL_ENVS),
                                 episodic_life=False)
        obs = env.reset()
        explore = np.random.default_rng([seed, first])  # the same games on every call
        running = np.zeros(n)
        returns = np.full(n, np.nan)  # the first game of each env
        max_steps = (env.spec.max_episode_steps or EVAL_STEPS_WITHOUT_TIME_LIMIT) + 10
        for _ in range(max_steps):
            if stop:
                break
            actions = np.asarray(greedy(params, obs))
            if cfg.eval_epsilon > 0:
                random = explore.integers(0, env.spec.num_actions, n, dtype=np.int32)
                actions = np.where(explore.random(n) < cfg.eval_epsilon, random, actions)
            st = env.step(actions)
            running += np.asarray(st.reward) * ~np.asarray(st.first)
            ended = np.asarray(st.game_over) & np.isnan(returns)
            returns[ended] = running[ended]
            obs = st.obs
            if bar is not None:
                bar.update(1)
                if ended.any():
                    bar.set_postfix(games=f"{len(out) + int((~np.isnan(returns)).sum())}/{episodes}")
            if not np.isnan(returns).any():
                break
        env.close()
        out.extend(float(r) for r in returns if not np.isnan(r))
        if stop:
            break
    return out


# ---------------------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------------------
def communication_rounds(cfg: TrainConfig, updates: int) -> int:
    """Communication rounds in the first ``updates`` gradient updates of one worker, for the vmap runtime's strategies.

    single: none; sync / async (stale-gradient server) / hogwild across workers: every update is one round;
    dpsgd: one round at the end of every B local steps, so whole rounds only (77 updates of B = 3 hold 25 rounds,
    and the last two steps are still local). A round moves each worker's update vector up and the result down.
    """
    if cfg.workers == 1 and cfg.strategy in ("single", "hogwild"):
        return 0
    if cfg.strategy == "dpsgd":
        return updates // cfg.local_steps
    return updates if cfg.workers > 1 or cfg.strategy == "async" else 0


def _lane_params(lanes, seed_index: int):
    return jax.tree.map(lambda x: x[seed_index, 0], lanes.params)


def _progress(cfg: TrainConfig, total: int | None, desc: str | None = None):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", unit_scale=True, dynamic_ncols=True, desc=desc or f"{cfg.algo} {cfg.env}")


def evaluate_runs(cfg: TrainConfig, network, params_of_runs: list, seeds: list[int],
                  stop: list[int] | None = None) -> tuple[list[list[float]], float]:
    """:func:`evaluate` of each run's parameters, with a progress bar when ``cfg.progress``; also the seconds taken,
    which the summary keeps apart from training (a stuck greedy Atari policy can play 27,000 steps a batch).

    The evaluation follows a training whose end is saved: SIGINT, SIGTERM or SIGUSR1 ends it at the next step with
    :class:`RunStopped` (``evaluating=True``), one line instead of a traceback, and ``--resume`` evaluates again.
    ``stop``: the training's own stop requests (:func:`~jaxdp.stopping.stop_requests`), still recorded, handed over
    so that no signal falls between the two; without it the evaluation records its own."""
    if cfg.eval_episodes <= 0:
        return [[] for _ in params_of_runs], 0.0
    start = time.time()
    returns: list[list[float]] = []
    with contextlib.ExitStack() as own:
        requested = stop if stop is not None else own.enter_context(stop_requests())
        for params, seed in zip(params_of_runs, seeds):
            desc = f"{evaluation_shown(cfg)} {cfg.env}" + (f" seed {seed}" if len(seeds) > 1 else "")
            bar = _progress(cfg, None, desc)
            try:
                returns.append(evaluate(cfg, network, params, cfg.eval_episodes, seed, bar, stop=requested))
            finally:
                if bar is not None:
                    bar.close()
            if requested:
                raise RunStopped(requested[0], cfg.total_steps, cfg.total_steps, cfg.logdir, evaluating=True)
    return returns, time.time() - start


def bootstrap_band(ys: np.ndarray, confidence: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A percentile-bootstrap confidence band for the mean over runs of curves ``ys`` (runs × points), as rliable
    draws its intervals: the runs are resampled with replacement, the same resamples at every point, and the band is
    the (1 ± confidence)/2 quantiles of the resampled means. Unlike a Student-t interval it stays within the runs'
    range: over two seeds it is their min and max, where t (12.7 for one degree of freedom) put CartPole returns
    below -200. Deterministic (``seed``); a point where a run has no value (NaN) has no band."""
    chex.assert_rank(ys, 2)
    ys = np.asarray(ys, np.float64)
    n, points = ys.shape
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    low, high = np.full(points, np.nan), np.full(points, np.nan)
    quantiles = [(1 - confidence) / 2, (1 + confidence) / 2]
    for start in range(0, points, 1024):  # bounded memory: resamples × n × 1024 values at a time
        chunk = ys[:, start:start + 1024]
        means = chunk[picks].mean(axis=1)  # (resamples, chunk)
        low[start:start + 1024], high[start:start + 1024] = np.quantile(means, quantiles, axis=0)
    return low, high


def plot_learning_curves(path: str, groups: dict[str, list[list[tuple[int, float]]]], title: str) -> None:
    """Learning curves as a PNG: for each group (a sweep's grid point; one group for a seed sweep), the mean over
    its runs. A single group also draws each run and a 95% bootstrap confidence band of the mean
    (:func:`bootstrap_band`); several groups draw each one's range over its runs (min to max)."""
    # A Figure of its own, not pyplot: no backend to select, nothing global touched (a notebook that trains keeps
    # its inline backend), nothing to close.
    from matplotlib.figure import Figure

    grid = sorted({s for curves in groups.values() for c in curves for s, _ in c})
    if not grid:
        return
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, curves in groups.items():
        ys = []
        for c in curves:
            xs = np.array([s for s, _ in c], dtype=float)
            vs = np.array([v for _, v in c], dtype=float)
            ys.append(np.interp(grid, xs, vs) if len(xs) else np.full(len(grid), np.nan))
        ys = np.array(ys)
        mean = np.nanmean(ys, axis=0)
        if len(groups) == 1:
            for y in ys:
                ax.plot(grid, y, lw=0.6, alpha=0.4)
        line, = ax.plot(grid, mean, lw=2, label=f"{label + ': ' if label else ''}mean of {len(curves)} seeds")
        if len(curves) > 1 and len(groups) == 1:
            low, high = bootstrap_band(ys)
            ax.fill_between(grid, low, high, alpha=0.25, label="95% bootstrap CI of the mean")
        elif len(curves) > 1:
            # Several points side by side: each point's range over its seeds, which one band per point keeps
            # readable; summary.json holds the intervals.
            ax.fill_between(grid, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), alpha=0.2, color=line.get_color())
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episodic return")
    ax.set_title(title)
    ax.legend(fontsize="small", title=None if len(groups) == 1 else "band: min to max over seeds",
              title_fontsize="small")
    fig.tight_layout()
    atomic.replace_file(path, lambda temporary: fig.savefig(temporary, dpi=120, format="png"))


def point_label(point: dict[str, float]) -> str:
    """A grid point as a folder name: ``lr_0.001``, ``eps_end_0.01-eps_fraction_0.3``."""
    return "-".join(f"{name}_{value:g}" for name, value in point.items())


def run_dirs(cfg: TrainConfig) -> list[str]:
    """Where each run (``cfg.runs``) writes: ``--logdir`` for one run; ``seed_<s>/`` for the seeds of a seed sweep;
    ``<point>/`` (:func:`point_label`) for the points of a hyperparameter sweep, ``<point>/seed_<s>/`` with several
    seeds."""
    out = []
    for point, seed in cfg.runs:
        d = cfg.logdir
        if cfg.sweep:
            d = os.path.join(d, point_label(cfg.grid[point]))
        if len(cfg.seeds) > 1:
            d = os.path.join(d, f"seed_{seed}")
        out.append(d)
    return out


def mean_groups(cfg: TrainConfig) -> list[tuple[str, list[int]]]:
    """``(folder, runs)`` whose metrics.jsonl is the mean over those runs: ``--logdir`` over all runs (when there
    are several), and each point's folder over its seeds (a sweep with several seeds)."""
    S = len(cfg.runs)
    groups = [(cfg.logdir, list(range(S)))] if S > 1 else []
    if cfg.sweep and len(cfg.seeds) > 1:
        for point, values in enumerate(cfg.grid):
            groups.append((os.path.join(cfg.logdir, point_label(values)),
                           [r for r, (p, _) in enumerate(cfg.runs) if p == point]))
    return groups


def run(cfg: TrainConfig, *, inner: optax.GradientTransformation | None = None) -> dict:
    """Trains ``cfg`` with logging and checkpoints; returns the summary dict (also written to summary.json).

    ``inner``: the learner's own optax chain (see :func:`jaxdp.train.make_train`). It is not saved with the run:
    a ``--resume`` must pass the same one again.

    SIGINT (Ctrl-C), SIGTERM or SIGUSR1 stops the run after the current chunk: it logs, saves a checkpoint and raises
    :class:`RunStopped`; ``--resume`` continues it. A second signal stops it at once.

    ``cfg`` is validated first (:func:`jaxdp.config.validate`), as the command line does: a script's bad value
    raises ``ConfigError`` before anything is written (``total_steps=-5`` trained 10k steps of DQN warm-up).
    """
    cfg = validate(cfg)
    with contextlib.ExitStack() as signals:
        return _run(cfg, signals, inner)


def _run(cfg: TrainConfig, signals: contextlib.ExitStack, inner: optax.GradientTransformation | None) -> dict:
    from jaxdp import train as train_lib

    t_start = time.time()
    S = len(cfg.runs)  # lanes: grid points x seeds
    # From the start: a signal while the run is built (envpool, the network, a checkpoint's restore: seconds) is
    # honoured when the build ends, in one line. Python's own Ctrl-C could land in a callback that swallows it (JAX's
    # garbage-collection hook), and the run then trained to its end.
    requested = signals.enter_context(stop_requests())
    check_resumable(cfg, cfg.logdir)  # a resume of another run is refused before any work (a script may skip the CLI)
    problem = folder_problem(cfg.logdir, "--logdir")  # checked now, created once the run is built
    if problem:
        raise ConfigError(problem)
    trainer = train_lib.make_train(cfg, inner=inner)
    keys = train_lib.seed_keys(cfg)
    handle = trainer.initial_handle()
    lanes = trainer.init(keys)
    total_steps = trainer.total_iterations * trainer.env_steps_per_iteration
    if requested and not cfg.resume:  # nothing written yet
        raise RunStopped(requested[0], 0, total_steps, None, starting=True)

    forget_run = remover_of_new_files(cfg.logdir)  # a full disk before the first checkpoint (see writes_in)
    make_logdir(cfg.logdir)
    manager = _checkpoint_manager(cfg.logdir)

    def last_checkpoint() -> int | None:  # the env step of the last whole checkpoint, for WriteFailed
        saved = manager.latest_step()
        return None if saved is None else saved * trainer.env_steps_per_iteration

    writing = functools.partial(writes_in, cfg.logdir, checkpoint_step=last_checkpoint, manager=manager,
                                nothing_saved=None if cfg.resume else forget_run)

    iteration = 0  # loop iterations done (warmup included)
    episodes: list[list[tuple[int, float, int]]] = [[] for _ in range(S)]  # (step, return, length)
    if cfg.resume:
        # The env pool is new: keep its fresh observations and episode accumulators, restore the rest. The fresh
        # state is dropped before the restore, so that a DQN replay is not held twice.
        fresh_env = dict(obs=lanes.obs, first=lanes.first, stats=lanes.stats)
        template = _abstract(lanes)
        del lanes
        restored = restore_checkpoint(manager, template)
        if restored is None:
            raise SystemExit(f"jaxdp train: error: --resume: no checkpoint in {cfg.logdir}/checkpoints")
        saved, host = restored
        lanes = saved._replace(**fresh_env)
        iteration = int(host["iteration"])
        episodes = [[tuple(e) for e in per_seed] for per_seed in host["episodes"]]
        if requested:  # nothing written yet: the checkpoint is as it was
            raise RunStopped(requested[0], iteration * trainer.env_steps_per_iteration, total_steps, cfg.logdir,
                             starting=True)
    # What a --resume must match, written once the run is built and its checkpoint restored: a resume that fails
    # before (another optimizer chain, memory) leaves the run's config.json as it was.
    with writing("writing its config.json"):
        save_run_config(cfg, cfg.logdir)
    start_iteration = iteration  # a resumed run's rates count the steps this process trains, in its wall time

    per_run_dirs = run_dirs(cfg)
    groups = mean_groups(cfg)
    with writing("opening its logs"):
        if cfg.resume:  # continue the curves from the checkpoint: steps logged after it will be logged again
            for d in dict.fromkeys([cfg.logdir, *per_run_dirs, *(d for d, _ in groups)]):
                truncate_json_lines(os.path.join(d, "metrics.jsonl"), iteration * trainer.env_steps_per_iteration)
        writers = [MetricsWriter(os.path.join(d, "metrics.jsonl"), os.path.join(d, "tb") if cfg.tensorboard else None)
                   for d in per_run_dirs]
        mean_writers = [(MetricsWriter(os.path.join(d, "metrics.jsonl"), None), members) for d, members in groups]
    steps_per_iter = trainer.env_steps_per_iteration
    total_iters = trainer.total_iterations
    bar = _progress(cfg, total_iters * steps_per_iter)
    if bar is not None:
        bar.update(iteration * steps_per_iter)

    # The paper's accounting (Fig. 5): data points per second are `sps`; updates, rounds and bytes below.
    param_bytes = sum(int(np.prod(x.shape[2:])) * x.dtype.itemsize for x in jax.tree.leaves(lanes.params))
    bytes_per_round = 2 * param_bytes * cfg.workers  # each worker sends its vector up and gets the result back
    last_log_t = time.time()
    last_log_iter = iteration
    last_ckpt_t = time.time()
    last_ckpt_seconds = 0.0  # how long the last save took (see checkpoint_due)
    pending: list[list[float]] = [[] for _ in range(S)]
    pending_metrics: list[dict] = []
    compile_seconds = None

    def record_episodes(info, first_iteration: int, iters_per_row: int = 1):
        for s, eps in enumerate(episodes_by_seed(info, S)):
            for i, r, ln in eps:
                step = (first_iteration + (i + 1) * iters_per_row) * steps_per_iter
                episodes[s].append((step, r, ln))
                pending[s].append(r)

    def log_point(force: bool = False):
        nonlocal last_log_t, last_log_iter
        if iteration == last_log_iter:  # nothing new since the last point (e.g. the final forced one)
            return
        now = time.time()
        # A point every --log-interval seconds, and at least every 2% of the run (for learning curves).
        progressed = (iteration - last_log_iter) >= max(1, total_iters // 50)
        if not force and now - last_log_t < cfg.log_interval and not progressed:
            return
        sps = (iteration - last_log_iter) * steps_per_iter * S / max(now - last_log_t, 1e-9)
        # Learner metrics: mean over the chunks since the last point, per seed (workers averaged).
        means = {k: np.mean([m[k] for m in pending_metrics], axis=0) for k in (pending_metrics[0] if
                                                                              pending_metrics else {})}
        learn_iters = max(0, iteration - trainer.warmup_iterations)
        rounds = communication_rounds(cfg, learn_iters)
        accounting = {"updates": learn_iters, "updates_per_second": (iteration - last_log_iter) * S /
                      max(now - last_log_t, 1e-9) if iteration > trainer.warmup_iterations else 0.0,
                      "comm_rounds": rounds, "bytes_sent": rounds * bytes_per_round}
        recs = [{"step": iteration * steps_per_iter, **accounting,
                 "episodic_return": float(np.mean(pending[s])) if pending[s] else None,
                 "episodes": len(pending[s]), "sps": sps,
                 **{k: float(v[s]) for k, v in means.items()}} for s in range(S)]
        with writing(f"logging step {iteration * steps_per_iter}"):
            for writer, rec in zip(writers, recs):
                writer.write(rec)
            for mean_writer, members in mean_writers:
                rets = [recs[r]["episodic_return"] for r in members if recs[r]["episodic_return"] is not None]
                mean_writer.write({"step": iteration * steps_per_iter,
                                   "episodic_return": float(np.mean(rets)) if rets else None,
                                   "episodes": sum(recs[r]["episodes"] for r in members), "sps": sps})
        if bar is not None:
            recent = [r for s in range(S) for _, r, _ in episodes[s][-20:]]
            bar.set_postfix({"sps": f"{sps:,.0f}", "return": f"{np.mean(recent):.1f}" if recent else "-"})
        for p in pending:
            p.clear()
        pending_metrics.clear()
        last_log_t, last_log_iter = now, iteration

    def maybe_checkpoint(force: bool = False):
        nonlocal last_ckpt_t, last_ckpt_seconds
        if force or checkpoint_due(time.time() - last_ckpt_t, last_ckpt_seconds, cfg.checkpoint_interval):
            started = time.time()
            with writing(f"saving the checkpoint at step {iteration * steps_per_iter}"):
                save_checkpoint(manager, iteration, lanes, {"iteration": iteration, "episodes": episodes})
            last_ckpt_t = time.time()
            last_ckpt_seconds = last_ckpt_t - started

    # Warmup (DQN random play before learning starts).
    if trainer.warmup is not None and iteration < trainer.warmup_iterations:
        n = trainer.warmup_iterations - iteration
        t0 = time.time()
        handle, lanes, info = trainer.warmup(handle, lanes, n)
        jax.block_until_ready(lanes.params)
        compile_seconds = time.time() - t0
        record_episodes(info, iteration)
        iteration += n
        if bar is not None:
            bar.update(n * steps_per_iter)
        log_point(force=True)

    while iteration < total_iters and not requested:
        t0 = time.time()
        # Whole chunks, then a shorter last one (one more compile) so that the run takes exactly --total-steps.
        chunk_iters = min(trainer.chunk_iterations, total_iters - iteration)
        handle, lanes, (info, metrics) = trainer.chunk(handle, lanes, jnp.int32(iteration), chunk_iters)
        metrics = jax.device_get(metrics)
        if compile_seconds is None or iteration == trainer.warmup_iterations:
            compile_seconds = (compile_seconds or 0.0) + (time.time() - t0)
        record_episodes(info, iteration)
        iteration += chunk_iters
        # metrics arrays are [iterations, S, N]: keep one value per seed.
        pending_metrics.append({k: np.asarray(v).reshape(v.shape[0], S, -1).mean(axis=(0, 2))
                                for k, v in metrics.items()})
        if bar is not None:
            bar.update(chunk_iters * steps_per_iter)
        log_point()
        maybe_checkpoint()
    log_point(force=True)
    maybe_checkpoint(force=True)
    if bar is not None:
        bar.close()
    with writing("closing the logs"):
        for w in writers + [mean_writer for mean_writer, _ in mean_writers]:  # the curves are whole: nothing follows
            w.close()
    if requested:
        raise RunStopped(requested[0], iteration * steps_per_iter, total_iters * steps_per_iter, cfg.logdir)

    wall = time.time() - t_start  # training (compilation included); the evaluation is timed apart
    # Greedy evaluation of each run's (worker 0) parameters on the real game. It takes over the training's stop
    # requests: a signal from here on ends the evaluation, whose parameters the last checkpoint holds.
    params_of_runs = [_lane_params(lanes, r) for r in range(len(cfg.runs))]
    eval_returns, eval_seconds = evaluate_runs(cfg, trainer.network, params_of_runs, [s for _, s in cfg.runs],
                                               stop=requested)
    signals.close()  # what follows writes the summary: a signal acts at once again
    per_run = []
    for r, (point, seed) in enumerate(cfg.runs):
        ended_at, rets = [st for st, _, _ in episodes[r]], [ret for _, ret, _ in episodes[r]]
        per_run.append({
            "seed": seed,
            **({"hyperparams": cfg.grid[point]} if cfg.sweep else {}),
            "episodes": len(rets),
            "final_return": final_return(ended_at, rets, iteration * steps_per_iter),
            **evaluation_fields(eval_returns[r]),
            **divergence_fields(params_of_runs[r], os.path.join(per_run_dirs[r], "metrics.jsonl")),
        })
    per_point = _sweep_points(cfg, per_run) if cfg.sweep else []
    # The best point by mean final return, among the points none of whose runs diverged while any such point exists:
    # a diverged run's return is a broken policy's, which on some games beats a poor one's.
    stable = [q for q in per_point if not q["diverged_runs"]] or per_point
    best = max(stable, key=lambda q: -math.inf if q["final_return"] is None else q["final_return"], default=None)
    trained_here = (iteration - start_iteration) * steps_per_iter * S  # env steps, all runs
    rounds = communication_rounds(cfg, max(0, iteration - trainer.warmup_iterations))
    summary = {
        "total_steps": iteration * steps_per_iter,
        "start_step": start_iteration * steps_per_iter,
        "wall_seconds": wall,
        "compile_seconds": compile_seconds,
        "eval_seconds": eval_seconds,
        # The games eval_return averages, over all runs: a game that did not end within its time limit has no return.
        "eval_episodes_ended": sum(p["eval_episodes_ended"] for p in per_run),
        # How many runs diverged (a NaN or infinite loss, or final parameters that are not finite); each run's
        # fields are under "seeds" / "runs", or here for a single run.
        "diverged_runs": sum(diverged(p) for p in per_run),
        **({k: per_run[0][k] for k in ("diverged_at_step", "params_finite")} if S == 1 else {}),
        "sps": trained_here / wall,
        # A sweep reports its best point (by the mean final return over seeds) here, and every point in "grid".
        "final_return": best["final_return"] if best else per_run[0]["final_return"] if S == 1 else
        (confidence_interval([p["final_return"] for p in per_run]) or {}).get("mean"),
        "eval_return": best["eval_return"] if best else per_run[0]["eval_return"] if S == 1 else
        (confidence_interval([p["eval_return"] for p in per_run]) or {}).get("mean"),
        "config": dataclasses.asdict(cfg),
        "provenance": provenance.describe(),  # the library versions and machine behind these numbers
        "updates": max(0, iteration - trainer.warmup_iterations),
        "data_points_per_second": trained_here / wall,
        "param_bytes": param_bytes,
        "comm_rounds": rounds,
        "bytes_sent": rounds * bytes_per_round,
    }
    if cfg.strategy == "async" and "max_delay" not in dict(cfg.sweep):
        # Staleness of the stale-gradient server: the delay distribution the gradients were drawn from (a swept
        # delay: each point's, in "grid").
        summary["staleness_distribution"] = staleness_distribution(cfg)
    with writing("writing the summary"):
        if cfg.sweep:
            summary["best"] = best["hyperparams"]
            summary["grid"] = per_point
            summary["runs"] = per_run
            if len(cfg.seeds) > 1:
                for q in per_point:
                    atomic.write_json(os.path.join(cfg.logdir, point_label(q["hyperparams"]), "summary.json"),
                                      {**q, "config": summary["config"]})
        elif S > 1:
            summary["seeds"] = per_run
            summary["final_return_over_seeds"] = confidence_interval([p["final_return"] for p in per_run])
            summary["eval_return_over_seeds"] = confidence_interval([p["eval_return"] for p in per_run])
        if S > 1:
            for r, d in enumerate(per_run_dirs):
                atomic.write_json(os.path.join(d, "summary.json"), {**per_run[r], "config": summary["config"]})
            by_point: dict[str, list] = {}
            for r, (point, _) in enumerate(cfg.runs):
                # Labelled as the closing lines name the points: by their options.
                by_point.setdefault(point_shown(cfg.grid[point]), []).append(_curve(episodes[r]))
            plot_learning_curves(os.path.join(cfg.logdir, "learning_curves.png"), by_point, f"{cfg.algo} on {cfg.env}")
        atomic.write_json(os.path.join(cfg.logdir, "summary.json"), summary)
    return summary


def staleness_distribution(cfg: TrainConfig) -> list[float]:
    """The probabilities of delays ``0..max_delay`` that ``--strategy async`` draws its gradients' delays from."""
    from jaxdp import train as train_lib

    dist = train_lib.delay_distribution(cfg)
    probs = np.asarray(dist.probs) if hasattr(dist, "probs") else np.eye(cfg.max_delay + 1)[cfg.max_delay]
    return probs.tolist()


def _sweep_points(cfg: TrainConfig, per_run: list[dict]) -> list[dict]:
    """Each grid point of a sweep: its values, and its runs' final and greedy-evaluation returns over seeds (mean,
    std, 95% CI; the mean is also ``final_return`` / ``eval_return``)."""
    out = []
    for point, values in enumerate(cfg.grid):
        members = [p for p, (q, _) in zip(per_run, cfg.runs) if q == point]
        finals = confidence_interval([p["final_return"] for p in members])
        evals = confidence_interval([p["eval_return"] for p in members])
        out.append({"hyperparams": values, "seeds": [p["seed"] for p in members],
                    "final_return": None if finals is None else finals["mean"],
                    "eval_return": None if evals is None else evals["mean"],
                    "final_return_over_seeds": finals, "eval_return_over_seeds": evals,
                    "diverged_runs": sum(diverged(p) for p in members),
                    **({"staleness_distribution": staleness_distribution(cfg.point_config(point))}
                       if cfg.strategy == "async" else {})})
    return out


def _curve(eps: list[tuple[int, float, int]], window: int = 20) -> list[tuple[int, float]]:
    """Running mean of the last `window` episode returns against env steps."""
    out = []
    rets: list[float] = []
    for step, r, _ in eps:
        rets.append(r)
        out.append((step, float(np.mean(rets[-window:]))))
    return out
