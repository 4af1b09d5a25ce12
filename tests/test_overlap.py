"""Tests of ``--pipeline overlap``: an actor thread acts with parameters one update old while the learner updates.

* The schedule: the overlapped run equals the lag-one schedule written out serially with the public
  :class:`jaxdp.train.LaneFunctions` (``data_k = act(θ_{k-1})``, ``θ_k = learn(θ_{k-1}, data_{k-1})``), and it is
  not the fused run (the lag is real).
* Determinism: two overlapped runs with one seed are identical (threads add no race); a seed sweep's lanes are
  the single-seed runs, and a synchronous strategy's workers stay in step.
* Accounting: exactly ``--total-steps`` env steps, one update fewer than fused; the pending data is checkpointed.
* Learning: A2C solves CartPole-v1 with the lag.
* Bad input: ``--pipeline`` values and combinations are rejected before any work (exit 2, one line).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxdp import envs as envs_lib
from jaxdp import loop
from jaxdp import train as train_lib
from jaxdp.config import TrainConfig, validate


def make_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(logdir=str(tmp_path / "run"), progress=False, eval_episodes=0, tensorboard=False,
                log_interval=1e9, checkpoint_interval=1e9)
    return validate(TrainConfig(**{**base, **kw}))


def lag_one_reference(cfg: TrainConfig, iterations: int):
    """The overlapped schedule written out serially with the lane functions of a fused trainer (its own pool).

    Returns the lanes after ``iterations`` overlapped iterations (the first acting-only one included) and the
    episode returns in the order they finished."""
    fused = train_lib.make_train(validate(dataclasses.replace(cfg, pipeline="fused")))
    fns = train_lib.lane_functions(cfg, fused.env, fused.network, train_lib.make_optimizer(cfg))
    axes = envs_lib.XlaHandle(pool=None, pending_reset=0)
    act = jax.jit(train_lib.vmap_lanes(fns.act, (axes, 0, None), (axes, 0, 0, 0), single=True))
    learn = jax.jit(train_lib.vmap_lanes(fns.learn, (0, 0, None), (0, 0), single=True))
    spi = cfg.steps_per_iteration
    handle, lanes = fused.initial_handle(), fused.init(train_lib.seed_keys(cfg))
    returns = []

    def record(info):
        returns.extend(np.asarray(info.returns)[np.asarray(info.finished)].tolist())

    handle, lanes, data, info = act(handle, lanes, 0)  # data_0 = act(θ_0)
    record(info)
    for k in range(1, iterations):
        handle, acted, new_data, info = act(handle, lanes, k * spi)  # data_k = act(θ_{k-1})
        learned, _ = learn(lanes, data, (k - 1) * spi)  # θ_k = learn(θ_{k-1}, data_{k-1})
        lanes = learned._replace(obs=acted.obs, first=acted.first, stats=acted.stats, key=acted.key)
        data = new_data
        record(info)
    return jax.device_get(lanes), returns


def run_overlapped(cfg: TrainConfig):
    trainer = train_lib.make_train(cfg, chunk_iterations=5)
    lanes, warm_info, outs = train_lib.train(trainer, train_lib.seed_keys(cfg))
    infos = [warm_info] + [info for info, _ in outs]
    returns = [r for info in infos for r in np.asarray(info.returns)[np.asarray(info.finished)].tolist()]
    return trainer, jax.device_get(lanes), returns


@pytest.mark.parametrize("algo", ["a2c", "reinforce"])
def test_overlap_is_the_lag_one_schedule(algo, tmp_path):
    kw = dict(algo=algo, total_steps=128 * 30) if algo == "a2c" else dict(algo=algo, total_steps=8 * 50 * 12,
                                                                          rollout_len=50)
    cfg = make_cfg(tmp_path, pipeline="overlap", **kw)
    trainer, lanes, returns = run_overlapped(cfg)
    ref_lanes, ref_returns = lag_one_reference(cfg, cfg.num_iterations)
    assert trainer.warmup_iterations == 1 and trainer.total_iterations == cfg.num_iterations
    assert int(lanes.updates[0, 0]) == int(ref_lanes.updates[0, 0]) == cfg.num_iterations - 1
    assert returns == ref_returns and len(returns) > 10
    for a, b in zip(jax.tree.leaves(lanes.params), jax.tree.leaves(ref_lanes.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The data not learned yet is the last rollout, acted with the parameters before the last update.
    assert jax.tree.leaves(lanes.pending)

    # The lag is real: the fused run of the same length ends elsewhere.
    fused = train_lib.make_train(validate(dataclasses.replace(cfg, pipeline="fused")))
    fused_lanes, _, _ = train_lib.train(fused, train_lib.seed_keys(cfg))
    gap = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(fused_lanes.params),
                                                                      jax.tree.leaves(lanes.params)))
    assert gap > 1e-4


def test_overlapped_dqn_is_deterministic_and_learns_from_its_replay(tmp_path):
    """DQN's actor only plays; the learner stores the played steps, then samples. Two runs are identical."""
    cfg = make_cfg(tmp_path, algo="dqn", total_steps=8 * 300, learning_starts=800, pipeline="overlap")
    trainer, a, returns_a = run_overlapped(cfg)
    _, b, returns_b = run_overlapped(cfg)
    assert trainer.warmup_iterations == 800 // 8 + 1
    assert returns_a == returns_b and len(returns_a) > 20
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert int(a.updates[0, 0]) == 300 - trainer.warmup_iterations
    # Every played step but the pending ones is in the replay: warmup and learned iterations, 2 steps each.
    assert int(a.replay.count[0, 0]) == 2 * (300 - 1)


def test_overlapped_seed_sweep_equals_single_seed_runs(tmp_path):
    """Seeds and workers stay vmapped lanes under the overlap: lane s of --seeds 0 1 is the single-seed run."""
    kw = dict(algo="a2c", total_steps=128 * 20, pipeline="overlap")
    _, sweep, _ = run_overlapped(make_cfg(tmp_path, seeds=(0, 1), **kw))
    for s in (0, 1):
        _, single, _ = run_overlapped(make_cfg(tmp_path, seeds=(s,), **kw))
        for a, b in zip(jax.tree.leaves(sweep.params), jax.tree.leaves(single.params)):
            np.testing.assert_allclose(a[s], b[0], rtol=1e-4, atol=1e-5)
    # A synchronous strategy's all-reduce runs inside the learner program, across the workers axis.
    _, workers, _ = run_overlapped(make_cfg(tmp_path, strategy="sync", workers=2, num_envs=8, **kw))
    for leaf in jax.tree.leaves(workers.params):
        np.testing.assert_array_equal(leaf[0, 0], leaf[0, 1])  # every worker applies the same mean gradient


@pytest.mark.parametrize("algo", ["a2c", "dqn"])
def test_overlapped_run_resumes_with_its_pending_data(algo, tmp_path):
    """loop.run end to end; the checkpoint holds the acted-but-unlearned data, and a resumed run learns it."""
    kw = dict(algo=algo, learning_starts=400) if algo == "dqn" else dict(algo=algo)
    spi = 8 if algo == "dqn" else 128
    first = loop.run(make_cfg(tmp_path, total_steps=spi * 100, pipeline="overlap", **kw))
    assert first["total_steps"] == spi * 100
    assert first["updates"] == 100 - (400 // 8 + 1 if algo == "dqn" else 1)
    trainer = train_lib.make_train(make_cfg(tmp_path, total_steps=spi * 100, pipeline="overlap", **kw))
    template = trainer.init(train_lib.seed_keys(trainer.cfg))
    saved, host = loop.restore_checkpoint(loop._checkpoint_manager(str(tmp_path / "run")), template)
    assert host["iteration"] == 100 and jax.tree.leaves(saved.pending)
    assert np.any(np.asarray(jax.tree.leaves(saved.pending)[0]) != 0)

    second = loop.run(make_cfg(tmp_path, total_steps=spi * 150, pipeline="overlap", resume=True, **kw))
    assert second["total_steps"] == spi * 150 and second["updates"] == first["updates"] + 50
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == sorted(set(steps)) and steps[-1] == spi * 150


@pytest.mark.slow
def test_overlapped_a2c_learns_cartpole(tmp_path):
    # The recipe of test_train.py's A2C learning test, acting with parameters one update old.
    summary = loop.run(make_cfg(tmp_path, algo="a2c", total_steps=500_000, lr=1e-3, vf_coef=0.1,
                                pipeline="overlap", eval_episodes=2))
    assert summary["final_return"] >= 400, summary["final_return"]


@pytest.mark.parametrize("algo,args", [
    ("a2c", ["--total-steps", "1024"]),  # 2 envs x 8 steps: 64 iterations, 63 updates
    ("dqn", ["--total-steps", "800", "--learning-starts", "400", "--buffer-size", "5000", "--batch-size", "8"]),
])
def test_overlapped_pong_runs_through_the_cli(algo, args, tmp_path):
    """The Atari path (Nature CNN, one unrolled iteration per program on CPU) under the overlap, end to end."""
    logdir = tmp_path / "pong"
    out = subprocess.run([sys.executable, "-m", "jaxdp.cli", "train", "--no-progress", "--algo", algo, "--env",
                          "Pong-v5", "--num-envs", "2", "--pipeline", "overlap", "--eval-episodes", "0",
                          "--no-tensorboard", "--logdir", str(logdir), *args],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((logdir / "summary.json").read_text())
    total = int(args[1])
    spi = 16 if algo == "a2c" else 4  # DQN: 2 envs x 2 steps (Atari's --train-frequency 4) per iteration
    warmup = 1 if algo == "a2c" else 400 // spi + 1
    assert summary["total_steps"] == total and summary["config"]["pipeline"] == "overlap"
    assert summary["updates"] == total // spi - warmup
    with open(logdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    learner = [r for r in records if "loss" in r]
    assert learner and all(np.isfinite(r["loss"]) for r in learner)


def test_make_train_fn_refuses_overlap(tmp_path):
    with pytest.raises(ValueError, match="cannot overlap"):
        train_lib.make_train_fn(make_cfg(tmp_path, pipeline="overlap"))


@pytest.mark.parametrize("args,message", [
    (["--pipeline", "threads"], "--pipeline 'threads' is not one of fused, overlap"),
    (["--pipeline", "overlap", "--runtime", "devices", "--strategy", "sync", "--workers", "2"],
     "--pipeline overlap runs an actor thread beside the learner in one process: use --runtime vmap"),
    (["--pipeline", "overlap", "--total-steps", "128"], "--pipeline overlap learns the data of one iteration"),
])
def test_bad_pipeline_options_exit_2_before_any_work(args, message, tmp_path):
    logdir = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "jaxdp.cli", "train", "--no-progress", "--logdir", str(logdir),
                           *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not logdir.exists()
