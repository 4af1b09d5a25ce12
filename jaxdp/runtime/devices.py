"""N workers on N devices: the vmap runtime's step under ``jax.shard_map`` over a 1-D mesh.

Same contract as :func:`jaxdp.runtime.vmap.map_workers`: every input and output leaf carries a
leading worker axis of size ``num_workers``, sharded one worker per device over the mesh axis
``axis_name``; inside, each device sees its block of size 1, squeezed away, and runs ``step_fn``
with collectives over ``axis_name``.

Why the parameters carry the worker axis (each device holds its own, *varying* copy) instead of
being passed replicated (``P()``): under ``shard_map`` with ``check_vma=True`` the gradient of a
replicated (device-invariant) input with respect to a device-varying loss is *summed* over the
devices (the transpose of the implicit broadcast is a psum). A following ``allreduce`` would then
average an already summed gradient: N times too large. Laying the parameters out per worker, as
the vmap runtime does, keeps every worker's gradient its own, so both runtimes compute the same.

On CPU, fake devices come from ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set before
JAX is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxdp.runtime.vmap import AXIS_NAME, _check_num_workers, check_worker_axis, replicate

__all__ = ["AXIS_NAME", "make_mesh", "map_workers", "replicate", "shard_map_unchecked"]


def make_mesh(num_workers: int, axis_name: str = AXIS_NAME, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh of ``num_workers`` devices with axis ``axis_name``.

    Args:
      num_workers: N >= 1, one worker per device.
      axis_name: the mesh axis name.
      devices: the devices to use (exactly N of them); default the first N of ``jax.devices()``.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(N,)``.
    """
    num_workers = _check_num_workers(num_workers, "map_workers")
    if devices is None:
        available = jax.devices()
        if len(available) < num_workers:
            raise ValueError(
                f"map_workers: num_workers={num_workers} needs one device per worker but only "
                f"{len(available)} {available[0].platform} device(s) exist; on CPU get fake devices with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={num_workers} (set before importing jax), "
                f"or use jaxdp.runtime.vmap"
            )
        devices = available[:num_workers]
    else:
        devices = list(devices)
        if len(devices) != num_workers:
            raise ValueError(
                f"map_workers: num_workers={num_workers} must equal the number of devices given, got "
                f"{len(devices)}; on CPU get fake devices with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={num_workers}"
            )
    return Mesh(np.asarray(devices), (axis_name,))


def map_workers(
    step_fn: Callable[..., Any],
    num_workers: int,
    axis_name: str = AXIS_NAME,
    devices: Sequence[jax.Device] | None = None,
    *,
    check_vma: bool = True,
) -> Callable[..., Any]:
    """Run ``step_fn`` once per worker, one worker per device, with collectives over ``axis_name``.

    Args:
      step_fn: one worker's step, written for unbatched inputs (the same function the vmap runtime
        takes); it may call collectives over ``axis_name``.
      num_workers: N >= 1; must equal the number of devices used.
      axis_name: the mesh axis name the collectives use.
      devices: exactly N devices; default the first N of ``jax.devices()`` (ValueError if fewer).
      check_vma: shard_map's varying-axes type checking; turn it off for steps that call custom calls without a
        varying-axes rule (envpool's XLA step; see :func:`shard_map_unchecked`).

    Returns:
      A function with ``step_fn``'s (positional) signature whose every input and output leaf
      carries a leading worker axis of size N, sharded over the devices. ValueError when an input's
      leading axis is not N. Wrap it in ``jax.jit`` for speed.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> mean = map_workers(lambda x: jax.lax.pmean(x, "workers"), 1)
      >>> mean(jnp.array([3.0]))
      Array([3.], dtype=float32)
    """
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"map_workers: axis_name must be a non-empty str, got {axis_name!r}")
    mesh = make_mesh(num_workers, axis_name, devices)
    worker_axis = PartitionSpec(axis_name)

    def per_device(*blocks: Any) -> Any:
        # Each device holds a block of size 1 of the worker axis: drop it, run the worker, restore it.
        outputs = step_fn(*jax.tree.map(lambda block: block[0], blocks))
        return jax.tree.map(lambda leaf: leaf[None], outputs)

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=worker_axis, out_specs=worker_axis, check_vma=check_vma)

    def mapped(*args: Any) -> Any:
        check_worker_axis(args, num_workers, "map_workers")
        return sharded(*args)

    return mapped


def shard_map_unchecked(fn: Callable[..., Any], mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable[..., Any]:
    """``jax.shard_map`` with ``check_vma=False``, for per-device programs that call foreign custom calls.

    envpool's XLA step (an FFI custom call) has no varying-manual-axes rule, so under ``check_vma=True`` its
    outputs are typed device-invariant and clash with the varying values around them (in ``lax.cond``/``scan``
    carries). Unchecked mode trusts the specs: callers must lay out per worker what differs per worker (the RL
    trainer puts every lane leaf on the worker axis, as :func:`map_workers` does for parameters), and an
    output given as ``P()`` must be equal on every device (it is read from one).
    """
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
