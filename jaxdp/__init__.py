"""jaxdp: distributed and parallel SGD as optax transforms, and the deep RL trained with it.

The strategies are pure ``optax.GradientTransformation``s:

* :func:`allreduce` -- synchronous data parallelism (average over a named axis),
* :func:`delayed` -- asynchronous SGD with stale gradients (parameter server, Downpour),
* :func:`local_steps` -- DPSGD / local SGD: B local steps, then an outer step on the update vector,
* :func:`hogwild` -- the lock-free shared-memory model (stale reads, lost writes).

"DPSGD" here is Distributed-Parallel SGD (Mohamad et al.), not differentially-private SGD
(that one is ``optax.contrib.dpsgd``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = [
    "allreduce",
    "delayed",
    "delays",
    "dpsgd_learning_rate",
    "hogwild",
    "local_steps",
]

if TYPE_CHECKING:
    from jaxdp.strategies import allreduce, delayed, delays, dpsgd_learning_rate, hogwild, local_steps


def __getattr__(name: str):
    """The strategies, imported on first use (PEP 562): ``import jaxdp.cli`` must not load JAX, so that ``jaxdp
    --help`` answers at once and a Ctrl-C while JAX loads reaches the command line's own handler (the
    interpreter's KeyboardInterrupt, raised inside JAX's import, could be swallowed by a garbage-collection hook)."""
    if name in __all__:
        value = getattr(importlib.import_module("jaxdp.strategies"), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'jaxdp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
