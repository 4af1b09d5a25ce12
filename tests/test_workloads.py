"""Workload contracts the runtimes rely on (workloads/base.py), for the RL workload on a real envpool pool."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxdp.config import TrainConfig
from jaxdp.workloads.rl import rl_workload


@pytest.fixture(scope="module")
def cartpole():
    workload = rl_workload(TrainConfig(algo="a2c", env="CartPole-v1", num_envs=2), eval_steps=3, eval_envs=2)
    params, _ = workload.init(jax.random.PRNGKey(0))
    return workload, params


def test_rl_evaluate_carries_its_pool_between_calls(cartpole):
    """Three greedy steps per call, yet every finished CartPole game is reported with its whole length.

    A CartPole game lasts at least 8 steps whatever the policy, so a return above 3 can only come from
    episode statistics carried over from earlier calls (a traced evaluate restarted them every call).
    """
    workload, params = cartpole
    returns = [float(workload.evaluate(params)["eval_return"]) for _ in range(60)]
    finished = [r for r in returns if not np.isnan(r)]
    assert finished, "no game ended in 180 greedy steps"
    assert min(finished) >= 8, finished


def test_rl_evaluate_refuses_to_be_traced(cartpole):
    workload, params = cartpole
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(workload.evaluate)(params)


def test_rl_workload_unrolls_local_steps_for_a_cnn_on_cpu():
    """The runtimes unroll a round's local steps where the workload asks (async_sim.worker_round): a Nature-CNN
    gradient inside an XLA:CPU loop is 10-60x slower (jax-ml/jax#12868), an MLP's is not."""
    pong = rl_workload(TrainConfig(algo="a2c", env="Pong-v5", num_envs=2), eval_steps=0)
    cartpole = rl_workload(TrainConfig(algo="dqn", env="CartPole-v1", num_envs=2), eval_steps=0)
    assert pong.unroll_local_steps is (jax.default_backend() == "cpu")
    assert cartpole.unroll_local_steps is False
