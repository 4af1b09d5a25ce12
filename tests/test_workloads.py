"""Workload contracts the runtimes rely on (workloads/base.py), for the RL workload on a real envpool pool, and the
restart of a resumed run's workers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp.config import TrainConfig, validate
from jaxdp.workloads.base import restarted
from jaxdp.workloads.rl import rl_workload
from jaxdp.workloads.supervised import digits_workload


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


def _grads_nonzero(grads) -> bool:
    return any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


def test_dqn_worker_restarted_mid_run_keeps_its_schedule_and_refills_its_replay_first():
    """What the multi-process runtimes cannot checkpoint (env pools, replays) starts afresh on a resume;
    ``restart`` puts the fresh worker where the run was: its ε, its target network at the restored θ, and learning
    only once its own replay holds its share of --learning-starts. In a fresh run the gate is --learning-starts
    alone, step for step."""
    cfg = validate(TrainConfig(algo="dqn", env="CartPole-v1", strategy="sync", workers=2, num_envs=4,
                               learning_starts=400, total_steps=20_000))
    workload = rl_workload(cfg, 0, eval_steps=0)
    step = jax.jit(workload.local_step)
    per_step = cfg.env_steps_per_update * 4 * 2  # env steps of all workers per local step

    def epsilon(env_steps: int) -> float:
        frac = min(env_steps / (cfg.eps_fraction * cfg.total_steps), 1.0)
        return cfg.eps_start + frac * (cfg.eps_end - cfg.eps_start)

    params, state = workload.init(jax.random.PRNGKey(0))
    for t in range(40):
        state, grads, metrics = step(state, params, jax.random.PRNGKey(t))
        assert _grads_nonzero(grads) == (t * per_step >= cfg.learning_starts), t
        assert float(metrics["epsilon"]) == pytest.approx(epsilon(t * per_step), abs=1e-6)

    _, fresh = workload.init(jax.random.PRNGKey(1))
    done = 500
    state = workload.restart(fresh, params, done)
    assert int(state[1].updates) == done
    assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(state[1].target_params), jax.tree.leaves(params)))
    refill = cfg.learning_starts // 2 // (cfg.env_steps_per_update * 4)  # local steps to this worker's share
    for t in range(refill + 3):
        state, grads, metrics = step(state, params, jax.random.PRNGKey(100 + t))
        assert float(metrics["epsilon"]) == pytest.approx(epsilon((done + t) * per_step), abs=1e-6)
        assert _grads_nonzero(grads) == (t >= refill), t


def test_restart_moves_the_counters_of_a2c_and_digits_workers():
    a2c = rl_workload(validate(TrainConfig(algo="a2c", env="CartPole-v1", num_envs=2)), eval_steps=0)
    params, state = a2c.init(jax.random.PRNGKey(0))
    handle, lane = a2c.restart(state, params, 7)
    assert int(lane.updates) == 7 and handle is state[0]
    digits = digits_workload(batch_size=8, hidden=(4,))
    params, state = digits.init(jax.random.PRNGKey(0))
    assert int(digits.restart(state, params, 5).examples_seen) == 40
    assert restarted(digits, state, params, 0) is state  # a fresh run is left alone
