"""How one worker turns gradients into updates: pure optax transforms. Knows nothing of RL."""

from jaxdp.strategies import delays
from jaxdp.strategies.allreduce import AllReduceState, allreduce
from jaxdp.strategies.delayed import DelayedState, delayed
from jaxdp.strategies.hogwild import HogwildState, hogwild
from jaxdp.strategies.learning_rate import dpsgd_learning_rate
from jaxdp.strategies.local_steps import LocalStepsState, local_steps

__all__ = [
    "AllReduceState",
    "DelayedState",
    "HogwildState",
    "LocalStepsState",
    "allreduce",
    "delayed",
    "delays",
    "dpsgd_learning_rate",
    "hogwild",
    "local_steps",
]
