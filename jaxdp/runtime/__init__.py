"""How N workers are laid out and talk. One step function, several layouts.

* :mod:`jaxdp.runtime.vmap` -- N simulated workers on one device (``jax.vmap`` with an axis name).
* :mod:`jaxdp.runtime.devices` -- one worker per device (``jax.shard_map`` over a 1-D mesh).

Both expose ``map_workers(step_fn, num_workers, axis_name="workers", ...)`` with the same contract:
inputs and outputs carry a leading worker axis. The other runtimes (``async_sim``, ``mpi``,
``distributed``) are separate modules, imported explicitly (``from jaxdp.runtime import mpi``) so
that importing this package never pulls in MPI or starts a distributed client.
"""

from jaxdp.runtime import devices, vmap
from jaxdp.runtime.vmap import AXIS_NAME, replicate

__all__ = ["AXIS_NAME", "devices", "replicate", "vmap"]
