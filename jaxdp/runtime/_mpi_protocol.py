"""What the multi-process runtimes (:mod:`~jaxdp.runtime.mpi`, :mod:`~jaxdp.runtime.distributed`) share.

* The wire format of the parameter-server messages: one float32 buffer per message, a small header
  followed by the flat parameters (or Δ) of :func:`jax.flatten_util.ravel_pytree`. The header is
  :data:`HEADER_VALUES` float64 values stored in the first ``2 * HEADER_VALUES`` float32 slots (a
  bit-exact view, not a conversion), so versions and counts stay exact integers up to 2**53 and a
  message is a single contiguous buffer that mpi4py sends without pickling.
* The PRNG key schedule (:func:`worker_key`), so that a single-process reference can recompute
  exactly the batches every rank drew.
* The worker optimizers their command lines offer (:func:`inner_optimizer`).
* Small file helpers: JSON lines, ``.npz`` checkpoints replaced atomically (:mod:`jaxdp.atomic`: a crash never
  leaves a half-written checkpoint behind).

Nothing here imports mpi4py: importing it initialises MPI, which a ``jax.distributed`` process (or a
``--help``) must not do.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import optax

from jaxdp import atomic

# Message tags. Distinct tags keep parameter replies and Δ pushes from ever matching each other.
TAG_PARAMS = 11  # master -> worker: header [version, stop, rounds the worker pushed so far] + θ
TAG_DELTA = 12  # worker -> master: header [pulled_version, local_steps, mean_local_loss, episodes,
#                                            episode_return_sum, signal, epsilon, learning] + Δ

HEADER_VALUES = 8
HEADER_SLOTS = 2 * HEADER_VALUES  # float32 slots taken by the float64 header

# Field positions in the header.
VERSION = 0  # params: the master version of θ; delta: the version the worker's anchor was pulled at
STOP = 1  # params: 1.0 tells the worker to stop
LOCAL_STEPS = 1  # delta: number of local steps behind this Δ
LOCAL_LOSS = 2  # delta: mean workload loss over those local steps
EPISODES = 3  # delta: episodes the worker finished per local step (mean over the round; NaN without episodes)
EPISODE_RETURN_SUM = 4  # delta: summed return of those episodes per local step (mean over the round; NaN without)
SIGNAL = 5  # delta: the stop signal (jaxdp.stopping.STOP_SIGNALS) the worker got, 0 for none: the master stops
EPSILON = 6  # delta: DQN's exploration rate over the round (NaN for a workload without one)
LEARNING = 7  # delta: the share of the round's local steps whose gradient counted (DQN; NaN otherwise)
# The workload metrics a push carries beside the loss, by their name in the workload's metrics (absent: NaN, and
# the master logs nothing for them: a supervised workload's metrics have no episodes in them).
OPTIONAL_METRICS = {"episodes": EPISODES, "episode_return_sum": EPISODE_RETURN_SUM, "epsilon": EPSILON,
                    "learning": LEARNING}


def message_buffer(num_params: int) -> np.ndarray:
    """An empty float32 message buffer for ``num_params`` parameters plus the header."""
    return np.zeros(HEADER_SLOTS + num_params, np.float32)


def pack(buffer: np.ndarray, header: tuple[float, ...], payload: np.ndarray) -> np.ndarray:
    """Write ``header`` (at most :data:`HEADER_VALUES` numbers) and ``payload`` into ``buffer``; return it."""
    fields = header_of(buffer)
    fields[:] = 0.0
    fields[: len(header)] = header
    buffer[HEADER_SLOTS:] = payload
    return buffer


def header_of(buffer: np.ndarray) -> np.ndarray:
    """The float64 header of a message buffer (a view: writing to it writes the buffer)."""
    return buffer[:HEADER_SLOTS].view(np.float64)


def payload_of(buffer: np.ndarray) -> np.ndarray:
    """The float32 payload (θ or Δ) of a message buffer (a view)."""
    return buffer[HEADER_SLOTS:]


def worker_key(seed: int, worker: int, counter: int | jax.Array) -> jax.Array:
    """The PRNG key of worker ``worker``'s ``counter``-th round: ``fold_in(fold_in(PRNGKey(seed), worker), counter)``.

    The MPI runtime uses ``worker = rank`` and ``counter`` = the synchronous step (sync mode) or the
    worker's own round count (async modes); the jax.distributed runtime uses the global worker index
    and the step. Tests recompute a run's batches from it.
    """
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), worker), counter)


def to_builtin(value: Any) -> Any:
    """JSON-friendly copy of ``value``: arrays and NumPy/JAX scalars become Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_builtin(v) for v in value]
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        array = np.asarray(value)
        return array.item() if array.ndim == 0 else array.tolist()
    return value


INNER_OPTIMIZERS = ("sgd", "momentum", "adam")


def inner_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """The worker optimizer ``--inner NAME --lr LR`` of the runtimes' command lines (momentum: 0.9)."""
    return {
        "sgd": lambda: optax.sgd(learning_rate),
        "momentum": lambda: optax.sgd(learning_rate, momentum=0.9),
        "adam": lambda: optax.adam(learning_rate),
    }[name]()


def append_json_line(path: str, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path`` (flushed: a crash loses at most this line)."""
    with open(path, "a") as stream:
        stream.write(json.dumps(to_builtin(record)) + "\n")


def write_json(path: str, record: dict) -> None:
    """Write ``record`` as indented JSON, atomically."""
    atomic.write_json(path, to_builtin(record))


def truncate_json_lines(path: str, max_value: int, key: str = "step") -> int:
    """Drops the records of the JSON-lines file ``path`` whose ``key`` exceeds ``max_value`` (atomically);
    returns how many were dropped. A record without ``key`` falls back to its ``step``.

    A run killed after its last checkpoint has logged steps that the resumed run will log again; without this,
    metrics.jsonl would go back in time at the resume point. A torn last line (killed mid-write) is dropped too.
    """
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if record.get(key, record.get("step", 0)) <= max_value:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        atomic.write_lines(path, kept)
    return dropped


def save_checkpoint(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Save ``arrays`` to ``path`` (an ``.npz``) atomically (:func:`jaxdp.atomic.save_npz`)."""
    atomic.save_npz(path, arrays)


def load_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Read a checkpoint written by :func:`save_checkpoint` into a dict of arrays."""
    with np.load(path, allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}


def tree_to_arrays(prefix: str, tree: Any) -> dict[str, np.ndarray]:
    """The leaves of ``tree`` as host arrays named ``{prefix}{i}`` (for a checkpoint)."""
    return {f"{prefix}{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(tree))}


def arrays_to_tree(prefix: str, arrays: dict[str, np.ndarray], like: Any, who: str) -> Any:
    """Rebuild a pytree shaped like ``like`` from the ``{prefix}{i}`` arrays of a checkpoint.

    Raises ValueError (naming ``who``) when the checkpoint's leaves do not match ``like``'s structure,
    e.g. a checkpoint of another model or optimizer.
    """
    leaves, treedef = jax.tree.flatten(like)
    stored = [arrays.get(f"{prefix}{i}") for i in range(len(leaves))]
    if any(s is None for s in stored) or f"{prefix}{len(leaves)}" in arrays:
        raise ValueError(f"{who}: the checkpoint's {prefix!r} state does not match the optimizer (another config?)")
    for s, leaf in zip(stored, leaves):
        if np.shape(s) != np.shape(leaf):
            raise ValueError(
                f"{who}: checkpoint leaf of shape {np.shape(s)} where the model has {np.shape(leaf)} (another config?)"
            )
    restored = [jax.numpy.asarray(s, dtype=jax.numpy.asarray(leaf).dtype) for s, leaf in zip(stored, leaves)]
    return jax.tree.unflatten(treedef, restored)
