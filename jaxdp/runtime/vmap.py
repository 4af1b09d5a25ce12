"""N simulated workers on one device: a leading worker axis and ``jax.vmap`` with an axis name.

Every input and output of the mapped step carries a leading axis of size ``num_workers``: worker
``n`` owns slice ``n`` of the parameters, the optimizer state, its batch and its PRNG key.
Collectives inside the step (``jaxdp.allreduce``, ``jaxdp.local_steps(..., axis_name=...)``) run
over ``axis_name``. The parameters are laid out per worker even when the workers are meant to agree
(synchronous training): a strategy that keeps them in agreement does so by construction, and the
same layout runs unchanged under :mod:`jaxdp.runtime.devices`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

AXIS_NAME = "workers"


def _check_num_workers(num_workers: object, who: str) -> int:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int):
        raise TypeError(f"{who}: num_workers must be an int, got {type(num_workers).__name__} {num_workers!r}")
    if num_workers < 1:
        raise ValueError(f"{who}: num_workers must be >= 1, got {num_workers}")
    return num_workers


def check_worker_axis(tree: Any, num_workers: int, who: str) -> None:
    """Raise ValueError unless every leaf of ``tree`` has a leading axis of size ``num_workers``."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = jnp.shape(leaf)
        if not shape or shape[0] != num_workers:
            raise ValueError(
                f"{who}: every input leaf needs a leading worker axis of size num_workers={num_workers}; "
                f"leaf {jax.tree_util.keystr(path) or '<root>'} has shape {shape} "
                f"(lay inputs out with jaxdp.runtime.vmap.replicate or split keys per worker)"
            )


def replicate(tree: Any, num_workers: int) -> Any:
    """Give every leaf a leading worker axis: ``num_workers`` identical copies.

    Args:
      tree: a pytree of arrays (parameters, optimizer state, ...).
      num_workers: N >= 1.

    Returns:
      The same pytree with each leaf of shape ``[N, *leaf.shape]``.

    Example:
      >>> import jax.numpy as jnp
      >>> replicate({"w": jnp.ones(3)}, 2)["w"].shape
      (2, 3)
    """
    num_workers = _check_num_workers(num_workers, "replicate")
    return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (num_workers, *jnp.shape(leaf))), tree)


def map_workers(
    step_fn: Callable[..., Any], num_workers: int, axis_name: str = AXIS_NAME
) -> Callable[..., Any]:
    """Run ``step_fn`` once per worker, vectorised, with collectives over ``axis_name``.

    Args:
      step_fn: one worker's step, written for unbatched inputs; it may call collectives
        (``lax.pmean``, ``jaxdp.allreduce``) over ``axis_name``.
      num_workers: N >= 1, the size of the leading worker axis of every input and output.
      axis_name: the name the collectives use.

    Returns:
      A function with ``step_fn``'s signature whose every input leaf and output leaf carries a
      leading worker axis of size N. It raises ValueError when an input's leading axis is not N.
      Not jitted: wrap it in ``jax.jit`` (or call it inside a jitted loop).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> mean = map_workers(lambda x: jax.lax.pmean(x, "workers"), 4)
      >>> mean(jnp.arange(4.0))
      Array([1.5, 1.5, 1.5, 1.5], dtype=float32)
    """
    num_workers = _check_num_workers(num_workers, "map_workers")
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"map_workers: axis_name must be a non-empty str, got {axis_name!r}")
    vectorised = jax.vmap(step_fn, axis_name=axis_name, axis_size=num_workers)

    def mapped(*args: Any) -> Any:
        check_worker_axis(args, num_workers, "map_workers")
        return vectorised(*args)

    return mapped
