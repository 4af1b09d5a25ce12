"""jaxdp: distributed and parallel SGD as optax transforms, and the deep RL trained with it.

The strategies are pure ``optax.GradientTransformation``s:

* :func:`allreduce` -- synchronous data parallelism (average over a named axis),
* :func:`delayed` -- asynchronous SGD with stale gradients (parameter server, Downpour),
* :func:`local_steps` -- DPSGD / local SGD: B local steps, then an outer step on the update vector,
* :func:`hogwild` -- the lock-free shared-memory model (stale reads, lost writes).

"DPSGD" here is Distributed-Parallel SGD (Mohamad et al.), not differentially-private SGD
(that one is ``optax.contrib.dpsgd``).
"""

from jaxdp.strategies import (
    allreduce,
    delayed,
    delays,
    dpsgd_learning_rate,
    hogwild,
    local_steps,
)

__version__ = "0.1.0"

__all__ = [
    "allreduce",
    "delayed",
    "delays",
    "dpsgd_learning_rate",
    "hogwild",
    "local_steps",
]
