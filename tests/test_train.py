"""Tests of the RL training loop: jaxdp.train (make_train, train) and jaxdp.loop (run), end to end.

* Learning: A2C and DQN solve CartPole-v1 (summary final_return >= 400) with settings found robust over seeds.
* Atari smoke: every algorithm runs Pong-v5 end to end through the CLI and writes every output.
* Resume: a run killed with SIGKILL continues from its checkpoint (subprocess), and the state it continues
  from is exactly the state it saved, with a fresh environment pool (in-process).
* Seed sweeps: ``seeds=(0, 1, 2)`` as one program equals three single-seed programs (episodes, parameters), and
  writes per-seed outputs with mean / std / 95% CI and learning_curves.png.
* make_train: jitted pieces, envpool's XLA step inside the scan, same seed -> identical run, exact step counts.

CPU budget: the learning tests are marked ``slow`` (about a minute together on 2 idle cores); the rest is small.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxdp import __version__ as jaxdp_version
from jaxdp import envs as envs_lib
from jaxdp import loop, stopping
from jaxdp import train as train_lib
from jaxdp.config import ConfigError, TrainConfig, validate


def make_cfg(tmp_path, name: str = "run", **kw) -> TrainConfig:
    """A validated config writing to tmp_path/name: no progress bar, few eval episodes, log points that depend on
    progress only (not on wall time), no checkpoints except the final one."""
    base = dict(logdir=str(tmp_path / name), progress=False, eval_episodes=2, tensorboard=False,
                log_interval=1e9, checkpoint_interval=1e9)
    return validate(TrainConfig(**{**base, **kw}))


def per_seed_episodes(trainer: train_lib.Trainer, warm_info, outs) -> list[list[tuple[float, int]]]:
    """(return, length) of every finished episode of each seed, in the order they finished."""
    S = len(trainer.cfg.seeds)
    episodes: list[list[tuple[float, int]]] = [[] for _ in range(S)]
    infos = ([warm_info] if warm_info is not None else []) + [info for info, _ in outs]
    for info in infos:
        for s, eps in enumerate(loop.episodes_by_seed(info, S)):
            episodes[s] += [(r, n) for _, r, n in eps]
    return episodes


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxdp.cli", "train", "--no-progress", *args],
                          capture_output=True, text=True, **kw)


# ---------------------------------------------------------------------------------------------------------------
# 1. Learning on CartPole-v1.
# ---------------------------------------------------------------------------------------------------------------
# Measured on this repository's defaults (500k steps; final_return then the mean of the last 10% of the training
# episodes, since 2026-12-07 of the episodes in the last 10% of the steps, loop.final_return):
#  * A2C defaults (the README's main job: lr 2e-3 annealed to 0, vf_coef 0.5), seeds 0..7 as one sweep
#    (2026-12-02): 439 456 452 500 499 488 443 437. The test trains with these defaults on seed 0.
#  * DQN on CartPole is seed-sensitive: late in training some seeds collapse, and any float-level change to the
#    program (e.g. running a single lane unbatched) reshuffles which. Single-seed runs, seeds 0..7 (2026-11-22):
#    defaults (CleanRL's: lr 2.5e-4 constant) 393 465 302 440 232 380 398 212; with the learning rate annealed to
#    0 over the run (--anneal-lr on) 480 443 400 451 259 407 488 164. The test runs the annealed recipe on seed 0.
LEARNING = {
    "a2c": dict(algo="a2c", total_steps=500_000),
    "dqn": dict(algo="dqn", total_steps=500_000, anneal_lr="on"),
}


@pytest.mark.slow
@pytest.mark.parametrize("algo", sorted(LEARNING))
def test_learns_cartpole(algo, tmp_path):
    cfg = make_cfg(tmp_path, seeds=(0,), **LEARNING[algo])
    summary = loop.run(cfg)
    assert summary["final_return"] >= 400, summary["final_return"]
    # Greedy evaluation of the final parameters is a real-game return in CartPole's range.
    assert 0 < summary["eval_return"] <= 500
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    early = [r["episodic_return"] for r in records[:3] if r["episodic_return"] is not None]
    assert early and max(early) < 100  # it learned: the first log points are near a random policy's ~22


# Acrobot-v1 (reward -1 per step, 500-step limit; solved at -100). With one torso under both heads, A2C's defaults
# collapse the policy to one action within 30k steps and end at -500 (seeds 0-2; lr 2.5e-4 to 1e-3: -175 to -258
# mean, unreliable). With --critic separate, seeds 0-7 as one sweep (Zen 5 EPYC, 2026-12-07) ended at -83.6 +- 0.8.
@pytest.mark.slow
def test_a2c_with_a_separate_critic_solves_acrobot(tmp_path):
    result = run_cli(["--algo", "a2c", "--env", "Acrobot-v1", "--critic", "separate", "--seeds", "0", "1",
                      "--eval-episodes", "3", "--no-tensorboard", "--logdir", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    finals = [seed["final_return"] for seed in summary["seeds"]]
    assert len(finals) == 2 and min(finals) >= -100, finals
    records = read_jsonl(tmp_path / "run" / "seed_0" / "metrics.jsonl")
    assert records[-1]["step"] >= 499_000
    early = [r["episodic_return"] for r in records[:2] if r["episodic_return"] is not None]
    assert not early or min(early) < -300  # it learned from a random policy's long episodes


# REINFORCE's defaults (the batch-mean baseline, lr 2e-3, 8 envs x 500-step rollouts): seeds 0-3 (Zen 5 EPYC,
# 2026-12-07) ended CartPole-v1 at 398-433 and Acrobot-v1 at -121 to -99. With the learned value baseline, the
# default until then, they ended at 47-51 and -500 to -456: a value fitted by one update per rollout.
@pytest.mark.slow
@pytest.mark.parametrize("env, floor", [("CartPole-v1", 350.0), ("Acrobot-v1", -150.0)])
def test_reinforce_defaults_learn_classic_control(env, floor, tmp_path):
    result = run_cli(["--algo", "reinforce", "--env", env, "--seeds", "0", "1", "--eval-episodes", "3",
                      "--no-tensorboard", "--logdir", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["baseline"] == "mean"
    finals = [seed["final_return"] for seed in summary["seeds"]]
    assert len(finals) == 2 and min(finals) >= floor, finals
    early = [r["episodic_return"] for r in read_jsonl(tmp_path / "run" / "seed_0" / "metrics.jsonl")[:2]
             if r["episodic_return"] is not None]
    assert early and max(early) < floor  # it started from a random policy's returns


# ---------------------------------------------------------------------------------------------------------------
# 2. Atari smoke: every algorithm, Pong-v5, through the CLI.
# ---------------------------------------------------------------------------------------------------------------
# Tiny on purpose: 2 envs; the Nature CNN costs ~30 ms per batch-32 update on this CPU.
PONG_SMOKE = {
    "a2c": ["--total-steps", "1024"],  # 2 envs x 8 steps = 16 per update
    "reinforce": ["--total-steps", "1024", "--rollout-len", "16"],
    # 2 envs x 5 steps = 10 per update (train_frequency 10): 40 warmup iterations, then 40 updates.
    "dqn": ["--total-steps", "800", "--learning-starts", "400", "--buffer-size", "5000", "--batch-size", "8"],
    "double_dqn": ["--total-steps", "800", "--learning-starts", "400", "--buffer-size", "5000",
                   "--batch-size", "8"],
}


@pytest.mark.parametrize("algo", list(PONG_SMOKE))
def test_pong_smoke_writes_every_output(algo, tmp_path):
    logdir = tmp_path / "pong"
    eval_episodes = "1" if algo in ("a2c", "dqn") else "0"
    out = run_cli(["--algo", algo, "--env", "Pong-v5", "--num-envs", "2", "--eval-episodes", eval_episodes,
                   "--logdir", str(logdir), *PONG_SMOKE[algo]], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr

    records = read_jsonl(logdir / "metrics.jsonl")
    assert records
    steps = [r["step"] for r in records]
    # Non-decreasing here; strictly increasing (no repeated final point) is test_metrics_have_one_record_....
    assert all(isinstance(s, int) for s in steps) and steps == sorted(steps) and steps[0] > 0
    assert any(r["sps"] > 0 for r in records)
    for r in records:
        assert {"step", "episodic_return", "sps"} <= set(r)
        assert r["sps"] >= 0
        assert r["episodic_return"] is None or -21 <= r["episodic_return"] <= 21
    learner = [r for r in records if "loss" in r]
    assert learner and all(math.isfinite(r["loss"]) for r in learner)

    summary = json.loads((logdir / "summary.json").read_text())
    assert {"total_steps", "wall_seconds", "final_return", "config"} <= set(summary)
    assert summary["total_steps"] == steps[-1] >= int(PONG_SMOKE[algo][1])
    assert summary["wall_seconds"] > 0
    assert summary["final_return"] is None or -21 <= summary["final_return"] <= 21
    assert summary["config"]["algo"] == algo and summary["config"]["env"] == "Pong-v5"
    assert summary["config"]["num_envs"] == 2
    assert json.loads((logdir / "config.json").read_text()) == summary["config"]  # what a --resume must match
    if eval_episodes == "1":
        assert -21 <= summary["eval_return"] <= 21

    assert glob.glob(str(logdir / "tb" / "events*"))
    saved = [d for d in os.listdir(logdir / "checkpoints") if d.isdigit()]
    assert saved, os.listdir(logdir / "checkpoints")


def test_metrics_have_one_record_per_log_point(tmp_path):
    """Every line of metrics.jsonl is a real log point: steps strictly increase, sps > 0, learner metrics present.

    A regression test: after the last chunk had logged (here every chunk logs: a point per 2% of the run),
    loop.run's final ``log_point(force=True)`` wrote the same step again with ``sps`` 0.0, ``updates_per_second``
    0.0 and no learner metrics. ``log_point`` now returns early when nothing is new since the last point.
    """
    summary = loop.run(make_cfg(tmp_path, algo="a2c", total_steps=128 * 50, eval_episodes=0))
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps[-1] == summary["total_steps"] == 128 * 50
    assert steps == sorted(set(steps)), f"repeated steps: {steps[-3:]}"
    assert all(r["sps"] > 0 and "loss" in r for r in records), records[-1]


@pytest.mark.parametrize("algo", ["dqn", "a2c"])
def test_a_game_that_observes_an_integer_state_trains_end_to_end(algo, tmp_path):
    """FrozenLake-v1 observes one integer state, which the envs deliver one-hot: the MLP agents train on it and
    the greedy evaluation plays it (a return is 0 or 1)."""
    extra = dict(learning_starts=500) if algo == "dqn" else {}
    summary = loop.run(make_cfg(tmp_path, algo=algo, env="FrozenLake-v1", total_steps=4_096, **extra))
    assert summary["total_steps"] == 4_096 and summary["final_return"] is not None
    assert 0.0 <= summary["eval_return"] <= 1.0
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


def test_greedy_evaluation_ends_in_a_game_without_a_time_limit(tmp_path, monkeypatch):
    """CliffWalking-v0 has no time limit, and a greedy policy that walks into the wall never ends a game: the
    evaluation stops after its step budget and reports no return, instead of hanging the run."""
    monkeypatch.setattr(loop, "EVAL_STEPS_WITHOUT_TIME_LIMIT", 300)
    cfg = make_cfg(tmp_path, algo="dqn", env="CliffWalking-v0")
    network = train_lib.make_network(cfg, envs_lib.make_spec("CliffWalking-v0", 1))
    params = network.init(jax.random.key(0), jnp.zeros((1, 48)))
    params = jax.tree.map(jnp.zeros_like, params)  # Q = 0 everywhere: argmax is action 0, up, into the wall
    start = time.perf_counter()
    assert loop.evaluate(cfg, network, params, episodes=2, seed=0) == []
    assert time.perf_counter() - start < 60


def test_greedy_evaluation_counts_the_first_game_of_each_env(monkeypatch):
    """A pool that replays its finished envs counts whichever games end first, which favours short games: each env
    must play one game. Checked against the host API stepped by hand with the same seeds and the same greedy policy,
    over two batches (EVAL_ENVS = 4, 6 games)."""
    monkeypatch.setattr(loop, "EVAL_ENVS", 4)
    cfg = validate(TrainConfig(algo="a2c", env="CartPole-v1"))
    network = train_lib.make_network(cfg, envs_lib.make_spec("CartPole-v1", 1))
    params = network.init(jax.random.key(3), jnp.zeros((1, 4)))
    expected = []
    for seed, n in ((10_007, 4), (10_007 + 1_000_003, 2)):
        env = envs_lib.make_host("CartPole-v1", n, seed=seed, episodic_life=False)
        obs, total, first_game = env.reset(), np.zeros(n), [None] * n
        while any(r is None for r in first_game):
            st = env.step(np.asarray(jnp.argmax(network.apply(params, obs)[0], axis=-1), dtype=np.int32))
            total += np.asarray(st.reward)
            for i in np.nonzero(np.asarray(st.game_over))[0]:
                first_game[i] = total[i] if first_game[i] is None else first_game[i]
            obs = st.obs
        env.close()
        expected += first_game
    assert loop.evaluate(cfg, network, params, episodes=6, seed=7) == pytest.approx(expected)
    assert len(set(expected)) > 1  # the games differ: the order of the envs is checked too


def test_eval_epsilon_plays_epsilon_greedy_games_drawn_from_the_seed():
    """--eval-epsilon: each action is uniformly random with probability ε, drawn from a generator seeded by the run's
    seed, so a call plays the same games every time. (A greedy Breakout policy that never presses FIRE played
    27,000 steps, 110 s, after a 25 s smoke run; at ε = 0.05 the evaluation took 4.6 s.) At ε = 1 the games do not
    depend on the network; at ε = 0.5 they do, and on the seed."""
    cfg = validate(TrainConfig(algo="a2c", env="CartPole-v1", eval_epsilon=1.0))
    network = train_lib.make_network(cfg, envs_lib.make_spec("CartPole-v1", 1))
    one, other = (network.init(jax.random.key(k), jnp.zeros((1, 4))) for k in (1, 2))
    games = loop.evaluate(cfg, network, one, episodes=5, seed=3)
    assert games == loop.evaluate(cfg, network, other, episodes=5, seed=3)
    assert 10 < np.mean(games) < 50  # random CartPole play: ~22

    half = dataclasses.replace(cfg, eval_epsilon=0.5)
    games = loop.evaluate(half, network, one, episodes=5, seed=3)
    assert len(games) == 5 and games == loop.evaluate(half, network, one, episodes=5, seed=3)
    assert games != loop.evaluate(half, network, one, episodes=5, seed=4)
    assert games != loop.evaluate(half, network, other, episodes=5, seed=3)
    greedy = dataclasses.replace(cfg, eval_epsilon=0.0)
    assert games != loop.evaluate(greedy, network, one, episodes=5, seed=3)


def test_the_summary_times_training_and_evaluation_apart(tmp_path, monkeypatch):
    """A stuck greedy Atari policy plays up to 27,000 steps per batch of games: minutes, after a smoke run of seconds.
    wall_seconds and sps are the training's; eval_seconds is the evaluation's."""
    started = time.time()
    evaluation_started = []

    def slow_evaluate(cfg, network, params, episodes, seed, bar=None, stop=()):
        evaluation_started.append(time.time())
        time.sleep(1.5)
        return [1.0] * episodes

    monkeypatch.setattr(loop, "evaluate", slow_evaluate)
    summary = loop.run(make_cfg(tmp_path, total_steps=16 * 8 * 4))
    assert summary["eval_return"] == 1.0 and summary["eval_seconds"] >= 1.5
    assert summary["wall_seconds"] <= evaluation_started[0] - started
    assert summary["sps"] == pytest.approx(summary["total_steps"] / summary["wall_seconds"])
    # What the numbers ran on, beside them.
    ran_on = summary["provenance"]
    assert ran_on["versions"]["jax"] == jax.__version__ and ran_on["versions"]["jaxdp"] == jaxdp_version
    assert ran_on["machine"]["backend"] == jax.default_backend() and ran_on["machine"]["devices"] >= 1


def test_the_summary_counts_the_evaluation_games_that_ended(tmp_path, monkeypatch):
    """eval_return is the mean of the games that ended: the summary says how many, per seed and in all."""
    ended_of_seed = {0: [3.0], 1: [5.0, 7.0]}  # of the 3 games each seed plays

    def evaluate(cfg, network, params, episodes, seed, bar=None, stop=()):
        assert episodes == 3
        return ended_of_seed[seed]

    monkeypatch.setattr(loop, "evaluate", evaluate)
    summary = loop.run(make_cfg(tmp_path, total_steps=16 * 8 * 4, seeds=(0, 1), eval_episodes=3))
    assert summary["eval_episodes_ended"] == 3
    assert [(r["seed"], r["eval_episodes_ended"], r["eval_return"]) for r in summary["seeds"]] == [(0, 1, 3.0),
                                                                                                   (1, 2, 6.0)]


def test_checkpoint_due_keeps_saving_under_its_share_of_the_time():
    assert not loop.checkpoint_due(59.0, 0.05, 60.0) and loop.checkpoint_due(60.0, 0.05, 60.0)  # the interval
    assert loop.checkpoint_due(1.0, 0.0, 1.0)  # the first save: nothing measured yet
    # A 6 s save (an Atari replay) puts the next one at least 6 / 0.05 = 120 s later, whatever the interval asks.
    assert not loop.checkpoint_due(119.0, 6.0, 60.0) and loop.checkpoint_due(120.0, 6.0, 60.0)
    assert loop.checkpoint_due(300.0, 6.0, 300.0) and not loop.checkpoint_due(299.0, 6.0, 300.0)


def test_slow_checkpoints_are_spaced_out(tmp_path, monkeypatch):
    """A run asking for a checkpoint every 10 ms, whose saves take 0.1 s, checkpoints about every 2 s: before,
    it saved after every chunk and spent most of its time saving (as an Atari DQN's 7 GB replay did at 60 s)."""
    saves: list[tuple[float, float]] = []
    save = loop.save_checkpoint

    def slow_save(manager, iteration, lanes, host_state):
        started = time.time()
        save(manager, iteration, lanes, host_state)
        time.sleep(max(0.0, 0.1 - (time.time() - started)))
        saves.append((started, time.time()))

    monkeypatch.setattr(loop, "save_checkpoint", slow_save)
    # A2C CartPole: 128 steps per iteration, 100 chunks of 80; about 8 s of training on 2 cores.
    cfg = make_cfg(tmp_path, total_steps=128 * 80 * 100, checkpoint_interval=0.01, eval_episodes=0)
    summary = loop.run(cfg)
    assert summary["total_steps"] == 128 * 80 * 100
    gaps = [later[0] - earlier[1] for earlier, later in zip(saves, saves[1:-1])]  # the last save is the forced one
    assert gaps and all(gap >= 0.1 / loop.CHECKPOINT_SHARE - 0.01 for gap in gaps), gaps
    assert len(saves) <= 2 + summary["wall_seconds"] / 2.0, (len(saves), summary["wall_seconds"])
    assert checkpoint_steps(cfg.logdir)[-1] == 80 * 100  # the final state is saved all the same


# ---------------------------------------------------------------------------------------------------------------
# 3. Resume.
# ---------------------------------------------------------------------------------------------------------------
def checkpoint_steps(logdir) -> list[int]:
    """Iterations of the finished checkpoints (orbax names a finished step directory by its number)."""
    path = os.path.join(logdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def signal_when(job: subprocess.Popen, ready, signum: int, settle: float = 0.0) -> str:
    """Sends ``signum`` to ``job`` once ``ready()`` holds (within 120 s, while the job runs) and ``settle`` seconds
    more, then waits for the job to end; returns its stderr. The job is killed if anything fails first."""
    try:
        deadline = time.monotonic() + 120
        while not ready():
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-2000:]
            time.sleep(0.1)
        time.sleep(settle)
        job.send_signal(signum)
        return job.communicate(timeout=60)[1]
    finally:
        if job.poll() is None:
            job.kill()


def first_return_at_least(records: list[dict], threshold: float) -> int | None:
    for r in records:
        if r["episodic_return"] is not None and r["episodic_return"] >= threshold:
            return r["step"]
    return None


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_run_with_a_checkpoint_that_resumes(signum, tmp_path):
    """Ctrl-C, or a scheduler's SIGTERM, stops a run after its current chunk: it logs, saves a checkpoint there,
    says so in one line and exits 128 + the signal. ``--resume`` continues from that very step, and nothing
    logged is lost or repeated."""
    logdir = tmp_path / "run"
    args = ["--logdir", str(logdir), "--no-tensorboard", "--eval-episodes", "0"]
    metrics_path = logdir / "metrics.jsonl"
    # Ctrl-C as an interactive shell delivers it: a background job (CI may run the tests as one) inherits SIGINT
    # ignored, and a run leaves an ignored signal ignored.
    cli = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "sys.argv[0] = 'jaxdp'; runpy.run_module('jaxdp.cli', run_name='__main__')")
    job = subprocess.Popen([sys.executable, "-c", cli, "train", "--no-progress", "--total-steps", "20000000", *args],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Past the compile: two log points.
    err = signal_when(job, lambda: metrics_path.exists() and len(read_jsonl(metrics_path)) >= 2, signum)
    assert job.returncode == 128 + signum, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0] and "--resume" in lines[0], err[-2000:]
    stopped_at = read_jsonl(metrics_path)[-1]["step"]
    assert checkpoint_steps(logdir) == [stopped_at // 128] and stopped_at < 20_000_000
    assert not (logdir / "summary.json").exists()  # the run has not ended

    total = stopped_at + 128 * 10
    done = run_cli([*args, "--resume", "--total-steps", str(total)], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [r["step"] for r in read_jsonl(metrics_path)]
    assert steps == sorted(set(steps)) and steps[-1] == total and stopped_at in steps


def test_a_signal_during_the_final_evaluation_is_one_line_and_resume_evaluates(tmp_path):
    """SIGTERM while the trained parameters play their evaluation games (an Atari one can take minutes) ends them at
    the next step with one line and exit 143: it was a traceback, or no word at all. The training's last checkpoint
    holds those parameters, so ``--resume`` trains nothing more, evaluates and writes the summary."""
    logdir = tmp_path / "run"
    args = ["--logdir", str(logdir), "--no-tensorboard", "--no-progress", "--total-steps", "2048"]
    cli = "import runpy, sys; sys.argv[0] = 'jaxdp'; runpy.run_module('jaxdp.cli', run_name='__main__')"
    # A2C CartPole: 128 steps per iteration, the run ends at iteration 16. A million games: it is stopped.
    job = subprocess.Popen([sys.executable, "-c", cli, "train", *args, "--eval-episodes", "1000000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Once the training's end is saved, and a second into the games (a signal a moment earlier stops them all the
    # same: the training's stop requests carry over to the evaluation).
    err = signal_when(job, lambda: checkpoint_steps(logdir) == [16], signal.SIGTERM, settle=1.0)
    assert job.returncode == 128 + signal.SIGTERM, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "stopped by SIGTERM during the final evaluation" in lines[0], err[-2000:]
    assert "--resume evaluates them and writes the summary" in lines[0], lines[0]
    assert not (logdir / "summary.json").exists()
    logged = read_jsonl(logdir / "metrics.jsonl")

    done = run_cli([*args, "--resume", "--eval-episodes", "3"], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["total_steps"] == summary["start_step"] == 2048 and summary["eval_return"] > 0
    assert read_jsonl(logdir / "metrics.jsonl") == logged  # nothing trained, nothing logged twice
    assert "greedy eval" in done.stdout


def test_a_full_disk_stops_the_run_in_one_line_and_its_last_checkpoint_resumes(tmp_path, monkeypatch, capsys,
                                                                                 disk_full_after_one_save):
    """A save that meets a full disk (orbax reports it as a ValueError carrying the system's text, from its own
    threads) was a traceback of hundreds of lines, and it left the half-written checkpoint. Now the run stops with one
    line naming the folder, the reason and the last whole checkpoint, exit 1; the unfinished checkpoint is removed;
    and once there is room ``--resume`` continues from that checkpoint. The disk is simulated here (the second save
    fails as orbax fails); the next test fills a real one."""
    from jaxdp import cli

    logdir = tmp_path / "run"
    saves = disk_full_after_one_save(logdir)
    args = ["train", "--total-steps", "2048", "--checkpoint-interval", "1e-9", "--eval-episodes", "1", "--no-progress",
            "--no-tensorboard", "--logdir", str(logdir)]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(saves) == 2 and checkpoint_steps(logdir) == [saves[0]]
    assert err == [f"jaxdp train: cannot write in --logdir {logdir} (No space left on device) while saving the "
                   f"checkpoint at step {saves[1] * 128}; the last checkpoint, at step {saves[0] * 128}, is whole: "
                   f"make room and continue with --resume"], err
    assert os.listdir(logdir / "checkpoints") == [str(saves[0])]  # the unfinished one is gone
    assert not (logdir / "summary.json").exists()

    monkeypatch.undo()  # room again
    assert cli.main(["train", "--resume", "--logdir", str(logdir), "--no-progress"]) == 0
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["start_step"] == saves[0] * 128 and summary["total_steps"] == 2048


def test_a_full_disk_before_the_first_checkpoint_removes_what_the_run_wrote(tmp_path, monkeypatch, capsys):
    """With no checkpoint there is nothing to resume, and the run's config.json and logs would make ``--logdir``
    refuse the same command again ("already holds a run"): they are removed, and only they (a file that was in the
    folder before stays)."""
    from jaxdp import cli

    def full(manager, iteration, lanes, host_state):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "save_checkpoint", full)
    logdir = tmp_path / "run"
    logdir.mkdir()
    (logdir / "notes.txt").write_text("mine")
    args = ["train", "--total-steps", "1024", "--checkpoint-interval", "1e-9", "--eval-episodes", "1", "--no-progress",
            "--logdir", str(logdir)]
    assert cli.main(args) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"jaxdp train: cannot write in --logdir {logdir} (No space left on device) while saving the checkpoint at "
        f"step 128; it had saved no checkpoint, and what it wrote was removed: make room and run the command again"]
    assert os.listdir(logdir) == ["notes.txt"]
    monkeypatch.undo()
    assert cli.main(args) == 0  # the same command, once there is room
    fresh = tmp_path / "fresh"  # a folder the run made is removed whole
    monkeypatch.setattr(loop, "save_checkpoint", full)
    assert cli.main([*args[:-1], str(fresh)]) == 1 and not fresh.exists()


def test_a_real_full_disk_stops_the_run_in_one_line(tmp_path):
    """The same on a real filesystem: a 300 kB tmpfs, which the run's logs and first checkpoints fill."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root with CAP_SYS_ADMIN: {mounted.stderr.strip()}")
    try:
        logdir = disk / "run"
        done = run_cli(["--total-steps", "100000", "--checkpoint-interval", "1e-9", "--eval-episodes", "1",
                        "--logdir", str(logdir)], timeout=600)
        assert done.returncode == 1, done.stderr[-3000:]
        ours = [line for line in done.stderr.splitlines() if line.startswith("jaxdp train:")]
        assert len(ours) == 1 and f"cannot write in --logdir {logdir} (No space left on device) while " in ours[0], (
            done.stderr[-3000:])
        left = os.listdir(logdir / "checkpoints")
        assert left and all(name.isdigit() for name in left), left  # whole checkpoints, no unfinished one
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_process_0_notes_a_full_disk_for_the_job_to_stop_on_and_passes_other_errors():
    """The multi-process runtimes' writes (jaxdp.stopping.disk_problems_noted): a full or read-only disk is kept
    for the job to stop on together, not raised into a collective the others wait in; any other error passes. The
    failure then counts its checkpoint in env steps for ``jaxdp train``, and says whether the run's files went."""
    from jaxdp.stopping import WriteFailed, disk_problems_noted

    noted = []
    with disk_problems_noted(noted, "saving the checkpoint"):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/runs/a/checkpoint.npz")
    assert [(n.reason, n.doing) for n in noted] == [("Read-only file system", "saving the checkpoint")]
    with pytest.raises(KeyError), disk_problems_noted(noted, "logging"):
        raise KeyError("not a disk")
    assert len(noted) == 1
    failed = noted[0].failed("/runs/a", 7)
    assert isinstance(failed, WriteFailed) and failed.report
    assert str(failed.counted(256)) == ("cannot write in --logdir /runs/a (Read-only file system) while saving the "
                                        "checkpoint; the last checkpoint, at step 1792, is whole: make room and "
                                        "continue with --resume")
    none_saved = WriteFailed("/runs/a", noted[0].reason, noted[0].doing, None, removed=False, report=False)
    assert not none_saved.report and str(none_saved).endswith(
        "it had saved no checkpoint: make room and run the command again")
    assert str(none_saved.counted(256, removed=True)).endswith(
        "it had saved no checkpoint, and what it wrote was removed: make room and run the command again")


def test_a_full_disk_reported_in_one_line_holds_back_orbaxs_own_reports_of_it(tmp_path, monkeypatch, caplog):
    """orbax's threads log a failed save's error with its traceback, and tensorstore's callbacks, still running once
    orbax has closed its event loop, report "Event loop is closed" as unraisable errors: 160 lines before jaxdp's one
    on a real full disk. ``loop.writes_in`` holds both while it runs and drops them when it raises WriteFailed, which
    says the same; without a disk failure they are reported as they came, and other reports are not held."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)

    class ClosedLoopCallback:  # an object whose finalizer fails as tensorstore's callbacks do
        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    def orbax_reports_the_failure(other: Exception) -> None:
        logging.getLogger("absl").error("_SignalingThread.run() raised an exception: RESOURCE_EXHAUSTED: Failed to "
                                        "write 188 bytes to file 21: No space left on device [os_error_code='28']")
        logging.getLogger("absl").error("an unrelated error")
        ClosedLoopCallback(RuntimeError("Event loop is closed"))  # finalized at once: an unraisable error
        ClosedLoopCallback(other)

    caplog.set_level(logging.WARNING)
    with pytest.raises(loop.WriteFailed), loop.writes_in(str(tmp_path), "saving", checkpoint_step=lambda: 7):
        orbax_reports_the_failure(ValueError("not the closed loop"))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert [r.getMessage() for r in caplog.records] == ["an unrelated error"]
    assert [str(u.exc_value) for u in reported] == ["not the closed loop"]  # reported at once, not held
    assert sys.unraisablehook == reported.append  # given back

    caplog.clear()
    reported.clear()
    with loop.writes_in(str(tmp_path), "saving", checkpoint_step=lambda: 7):  # no failure: nothing is dropped
        orbax_reports_the_failure(ValueError("not the closed loop"))
        assert [str(u.exc_value) for u in reported] == ["not the closed loop"]
    assert [str(u.exc_value) for u in reported] == ["not the closed loop", "Event loop is closed"]
    assert len(caplog.records) == 2 and "No space left on device" in caplog.records[1].getMessage()


def test_the_evaluation_alone_records_its_own_stop_requests(monkeypatch):
    """The multi-process and async_sim runs evaluate after their training's signal handling has ended: the
    evaluation installs its own, ends its games at the next step and gives the handlers back."""
    cfg = validate(TrainConfig(algo="a2c", env="CartPole-v1", eval_epsilon=0.5, progress=True))
    network = train_lib.make_network(cfg, envs_lib.make_spec("CartPole-v1", 1))
    params = network.init(jax.random.key(0), jnp.zeros((1, 4)))
    steps, names = [], []

    class SignallingBar:  # the progress bar is told each step: the third one brings a scheduler's SIGTERM
        def update(self, n):
            steps.append(n)
            if len(steps) == 3:
                os.kill(os.getpid(), signal.SIGTERM)

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    def progress(cfg, total, desc=None):
        names.append(desc)
        return SignallingBar()

    monkeypatch.setattr(loop, "_progress", progress)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(stopping.RunStopped, match="stopped by SIGTERM during the final evaluation") as stopped:
        loop.evaluate_runs(cfg, network, [params, params], [0, 1])
    assert stopped.value.evaluating and stopped.value.signum == signal.SIGTERM
    assert len(steps) == 3  # the step after the signal was not played, nor the second run's games
    assert names == ["eval at ε = 0.5 CartPole-v1 seed 0"]
    assert signal.getsignal(signal.SIGTERM) == before


def test_default_chunks_are_a_hundredth_of_the_run_but_short_enough_for_a_signal():
    """The host honours a stop request only between chunks: a long run's chunk stays within MAX_CHUNK_ENV_STEPS."""
    short = validate(TrainConfig(algo="dqn", total_steps=500_000))
    assert train_lib.default_chunk_iterations(short) == math.ceil(short.num_iterations / 100)
    # The chunks divide the learning iterations where a length of at least half the hundredth does: no shorter last
    # chunk to compile. A2C's 3,906 iterations (2·3²·7·31): 31, not 40; 3,905 (5·11·71): none, 40 as before;
    # REINFORCE's 125: 1, not 2.
    for algo, total, iterations, chunk in (("a2c", 499_968, 3906, 31), ("a2c", 499_920, 3905, 40),
                                           ("reinforce", 500_000, 125, 1)):
        cfg = validate(TrainConfig(algo=algo, total_steps=total))
        assert (cfg.num_iterations, train_lib.default_chunk_iterations(cfg)) == (iterations, chunk)
    long = validate(TrainConfig(algo="dqn", total_steps=50_000_000))
    chunk = train_lib.default_chunk_iterations(long)
    steps = long.steps_per_iteration
    assert chunk * steps <= train_lib.MAX_CHUNK_ENV_STEPS <= 2 * (chunk + 1) * steps


def test_stop_requests_records_a_signal_once_and_leaves_an_ignored_one_ignored():
    assert stopping.STOP_SIGNALS == (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    before_usr1 = signal.getsignal(signal.SIGUSR1)
    with stopping.stop_requests() as requested:
        os.kill(os.getpid(), signal.SIGUSR1)  # what mpirun passes on to its ranks
        time.sleep(0.05)
        assert requested == [signal.SIGUSR1] and signal.getsignal(signal.SIGUSR1) == before_usr1
    before = signal.getsignal(signal.SIGTERM)
    with stopping.stop_requests() as requested:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert requested == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) == before  # a second one would act at once
    assert signal.getsignal(signal.SIGTERM) == before
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with stopping.stop_requests() as requested:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert requested == [] and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


# Totals are multiples of whole chunks, so the run ends exactly at --total-steps (see test_run_length_...).
RESUME = {
    # a2c: 16 envs x 8 = 128 steps per iteration, 4000 iterations in 100 chunks of 40.
    "a2c": dict(args=["--algo", "a2c", "--lr", "1e-3", "--vf-coef", "0.1", "--total-steps", "512000"],
                steps_per_iteration=128, kill_after_return=100.0),
    # dqn: 4 envs x 2 = 8 steps per iteration, 1250 warmup iterations, 11250 learning iterations in 90 chunks.
    "dqn": dict(args=["--algo", "dqn", "--total-steps", "100000"], steps_per_iteration=8, kill_after_return=None),
}


@pytest.mark.parametrize("algo", list(RESUME))
def test_killed_run_resumes_and_keeps_learning(algo, tmp_path):
    spec = RESUME[algo]
    total = int(spec["args"][spec["args"].index("--total-steps") + 1])
    spi = spec["steps_per_iteration"]
    logdir = str(tmp_path / "run")
    common = [*spec["args"], "--logdir", logdir, "--eval-episodes", "1", "--log-interval", "0.2",
              "--no-tensorboard"]
    stderr_path = tmp_path / "killed_run.stderr"
    with open(stderr_path, "w") as stderr:  # a file, not a pipe: a full pipe would block the run
        proc = subprocess.Popen([sys.executable, "-m", "jaxdp.cli", "train", "--no-progress", *common,
                                 "--checkpoint-interval", "0.3"], stdout=subprocess.DEVNULL, stderr=stderr)
    # Kill once a checkpoint exists that was saved after learning started (DQN: after the warmup; A2C: after the
    # returns passed `kill_after_return`, so that a restart from scratch would be visible).
    deadline = time.time() + 400
    metrics_path = os.path.join(logdir, "metrics.jsonl")
    try:
        while True:
            assert proc.poll() is None, "the run ended before it was killed: " + stderr_path.read_text()[-2000:]
            assert time.time() < deadline, "no checkpoint to kill at"
            saved = checkpoint_steps(logdir)
            if saved:
                if spec["kill_after_return"] is None:
                    if saved[-1] * spi > 10_000 + 4 * spi:  # past learning_starts
                        break
                elif os.path.exists(metrics_path):
                    good = first_return_at_least(read_jsonl(metrics_path), spec["kill_after_return"])
                    if good is not None and saved[-1] * spi >= good:
                        break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt_step = checkpoint_steps(logdir)[-1] * spi
    assert 0 < ckpt_step < total
    before = read_jsonl(metrics_path)
    returns_before = [r["episodic_return"] for r in before if r["episodic_return"] is not None]

    resumed = run_cli([*common, "--resume", "--checkpoint-interval", "60"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = read_jsonl(metrics_path)
    # One curve across the kill: the killed run's records after its last checkpoint were dropped on resume, and
    # the resumed run continues from the checkpoint (a restart from 0 would repeat steps).
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[-1] == total
    assert [r for r in records if r["step"] <= ckpt_step] == [r for r in before if r["step"] <= ckpt_step]
    after = [r for r in records if r["step"] > ckpt_step]
    assert after, "the resumed run logged nothing"
    steps_after = [r["step"] for r in after]
    assert all("loss" in r and math.isfinite(r["loss"]) for r in after)  # the learner runs after the resume

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["total_steps"] == total and summary["start_step"] == ckpt_step
    # The resumed process's rate: the steps it trained, in its own wall time (not the whole run's steps).
    assert summary["sps"] == pytest.approx((total - ckpt_step) / summary["wall_seconds"])
    assert f"jaxdp train: {total} steps (resumed at step {ckpt_step}) in " in resumed.stdout
    first_after = next(r["episodic_return"] for r in after if r["episodic_return"] is not None)
    if algo == "a2c":
        # A restart from scratch would play like a random policy (~22) right after the resume.
        assert first_after >= 0.5 * spec["kill_after_return"], (first_after, returns_before[-5:])
    else:
        # The exploration schedule continues from the checkpoint's step: epsilon at the first point after the
        # resume is the schedule's value there, far below a fresh start's 1.0.
        cfg = TrainConfig(algo="dqn", total_steps=total)
        eps_at = lambda step: cfg.eps_start + min(step / (cfg.eps_fraction * total), 1.0) * (  # noqa: E731
            cfg.eps_end - cfg.eps_start)
        assert eps_at(steps_after[0]) - 1e-6 <= after[0]["epsilon"] <= eps_at(ckpt_step) + 1e-6
    assert summary["final_return"] is not None and summary["final_return"] > 30  # random play: ~22


def _spy_on_chunks(monkeypatch, calls: list):
    """Wraps make_train so every chunk call records (input lanes, output lanes) as host arrays."""
    real_make_train = train_lib.make_train

    def spying_make_train(cfg, **kw):
        trainer = real_make_train(cfg, **kw)
        real_chunk = trainer.chunk

        def chunk(handle, lanes, start, length):
            lanes_in = jax.device_get(lanes)  # before the call: chunk donates its lanes
            handle, lanes, out = real_chunk(handle, lanes, start, length)
            calls.append((int(start), lanes_in, jax.device_get(lanes)))
            return handle, lanes, out

        return trainer._replace(chunk=chunk)

    monkeypatch.setattr(train_lib, "make_train", spying_make_train)


@pytest.mark.parametrize("in_place", [False, True], ids=["orbax", "in_place"])
@pytest.mark.parametrize("algo", ["dqn", "a2c"])
def test_resume_continues_from_the_saved_state_with_a_fresh_pool(algo, in_place, tmp_path, monkeypatch):
    """In-process: run to the end (final checkpoint), then resume with a larger --total-steps. The first chunk after
    the resume must start from exactly the saved learner state (parameters, target, optimizer, replay, PRNG key,
    update count), and from the new pool's state: its first observations, fresh episode statistics, and
    ``first`` all True -- every env of the new pool is at the first observation of an episode. ``in_place``: every
    array leaf is restored as a DQN replay is (loop.restore_checkpoint's slices, read straight from the checkpoint).

    The last point is a bug today: loop.run restores ``first`` from the checkpoint
    (``saved._replace(obs=lanes.obs, stats=lanes.stats)`` keeps ``saved.first``), so DQN's replay links the last
    stored step before the kill to the new pool's reset observation as if it were its successor (a transition
    that never happened, with valid=True). Fix: ``saved._replace(obs=lanes.obs, stats=lanes.stats,
    first=lanes.first)``.
    """
    calls: list = []
    _spy_on_chunks(monkeypatch, calls)
    if in_place:
        monkeypatch.setattr(loop, "RESTORE_IN_PLACE_BYTES", 0)
    # Totals of whole chunks (so that neither run overshoots, see test_run_length_is_total_steps).
    if algo == "dqn":  # 8 steps per iteration, 50 warmup iterations; 150 then 350 iterations in chunks of 2, 4
        kw, spi, totals = dict(algo="dqn", learning_starts=400), 8, (8 * 150, 8 * 350)
    else:  # 128 steps per iteration, chunks of 1
        kw, spi, totals = dict(algo="a2c"), 128, (128 * 20, 128 * 40)
    kw.update(seeds=(0,), eval_episodes=0)
    first_run = loop.run(make_cfg(tmp_path, total_steps=totals[0], **kw))
    assert first_run["total_steps"] == totals[0]
    _, _, saved = calls[-1]
    calls.clear()
    second_run = loop.run(make_cfg(tmp_path, total_steps=totals[1], resume=True, **kw))
    assert second_run["total_steps"] == totals[1]
    start, resumed, _ = calls[0]
    assert start * spi == totals[0]  # the first chunk after the resume starts where the first run ended

    for field in ("params", "target_params", "opt_state", "replay", "key", "updates"):
        for a, b in zip(jax.tree.leaves(getattr(saved, field)), jax.tree.leaves(getattr(resumed, field))):
            np.testing.assert_array_equal(a, b, err_msg=f"lanes.{field} differs from the checkpoint")
    fresh = train_lib.make_train(make_cfg(tmp_path, "fresh", total_steps=totals[1], **kw))
    fresh_lanes = jax.device_get(fresh.init(train_lib.seed_keys(fresh.cfg)))
    np.testing.assert_array_equal(resumed.obs, fresh_lanes.obs)
    for a, b in zip(jax.tree.leaves(resumed.stats), jax.tree.leaves(fresh_lanes.stats)):
        np.testing.assert_array_equal(a, b)
    assert np.all(resumed.first), f"resumed lanes.first = {resumed.first} on a freshly reset pool"


def test_large_leaves_are_restored_in_place_equal_to_orbax_and_from_earlier_checkpoints(tmp_path):
    """A DQN replay is read from the checkpoint in slices into one buffer (loop.restore_checkpoint), not through
    orbax's host copy of the whole array: the same values, from jaxdp's checkpoints and from the earlier ones saved
    with orbax's default chunks (StandardSave). Every array leaf takes the in-place path here (in_place_bytes=0)."""
    import orbax.checkpoint as ocp

    cfg = make_cfg(tmp_path, algo="dqn", total_steps=4_000, learning_starts=1_000, seeds=(0, 1), eval_episodes=0)
    loop.run(cfg)
    trainer = train_lib.make_train(cfg)
    lanes = trainer.init(train_lib.seed_keys(cfg))
    manager = loop._checkpoint_manager(cfg.logdir)
    by_orbax, host = loop.restore_checkpoint(manager, lanes, in_place_bytes=1 << 62)
    assert np.count_nonzero(np.asarray(by_orbax.replay.frames)) > 0  # a replay with data in it
    earlier = ocp.CheckpointManager(str(tmp_path / "earlier" / "checkpoints"), options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False))
    earlier.save(7, args=ocp.args.Composite(lanes=ocp.args.StandardSave(by_orbax), host=ocp.args.JsonSave(host)))
    earlier.wait_until_finished()
    for source in (loop._checkpoint_manager(cfg.logdir), loop._checkpoint_manager(str(tmp_path / "earlier"))):
        in_place, in_place_host = loop.restore_checkpoint(source, lanes, in_place_bytes=0)
        assert in_place_host == host
        for a, b in zip(jax.tree.leaves(by_orbax), jax.tree.leaves(in_place)):
            if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            assert a.dtype == b.dtype and a.sharding == b.sharding
            np.testing.assert_array_equal(a, b)


def test_restored_slices_are_written_into_one_buffer():
    buffer = jnp.zeros((5, 3, 2), jnp.uint8)
    pointer = buffer.unsafe_buffer_pointer()
    out = loop._write_slice(buffer, np.full((2, 3, 2), 7, np.uint8), 3, 0)
    assert out.unsafe_buffer_pointer() == pointer  # donated: no second buffer of the leaf's size
    np.testing.assert_array_equal(out[3:], 7)
    np.testing.assert_array_equal(out[:3], 0)


def test_checkpoints_store_large_arrays_in_small_chunks(tmp_path):
    """orbax cut a 7 GB replay into four 1.76 GB chunks and held 3.4 GB more while compressing them; jaxdp asks for
    chunks of at most CHECKPOINT_CHUNK_BYTES."""
    import tensorstore as ts

    manager = loop._checkpoint_manager(str(tmp_path))
    loop.save_checkpoint(manager, 1, {"frames": jnp.zeros((3_000, 4, 84, 84), jnp.uint8)}, {})
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{tmp_path}/checkpoints/1/lanes/",
                                          "path": "frames"}}
    stored = ts.open(spec, open=True, read=True).result()
    assert tuple(stored.shape) == (3_000, 4, 84, 84)
    assert math.prod(stored.chunk_layout.read_chunk.shape) <= loop.CHECKPOINT_CHUNK_BYTES < 3_000 * 4 * 84 * 84


# ---------------------------------------------------------------------------------------------------------------
# 4. Seed sweeps.
# ---------------------------------------------------------------------------------------------------------------
SWEEP = {
    "a2c": dict(algo="a2c", total_steps=128 * 80),  # 80 iterations in chunks of 8
    "dqn": dict(algo="dqn", total_steps=8 * 500, learning_starts=1000),  # 125 warmup + 375 learning iterations
}
_single_runs: dict = {}


def run_train(tmp_path, seeds, **kw):
    cfg = make_cfg(tmp_path, seeds=tuple(seeds), **kw)
    trainer = train_lib.make_train(cfg, chunk_iterations=8 if cfg.algo == "a2c" else 25)
    lanes, warm_info, outs = train_lib.train(trainer, train_lib.seed_keys(cfg))
    return trainer, jax.device_get(lanes), per_seed_episodes(trainer, warm_info, outs)


def single_run(tmp_path, algo, seed):
    if (algo, seed) not in _single_runs:
        _single_runs[algo, seed] = run_train(tmp_path, (seed,), **SWEEP[algo])
    return _single_runs[algo, seed]


@pytest.mark.parametrize("algo,seeds", [("a2c", (0, 1, 2)), ("dqn", (0, 1, 2)), ("a2c", (0, 2))],
                         ids=["a2c-0-1-2", "dqn-0-1-2", "a2c-0-2"])
def test_seed_sweep_equals_single_seed_runs(algo, seeds, tmp_path):
    """Lane s of one vmapped program over ``seeds`` is the single-seed run of seed s: the same episodes (returns and
    lengths, bit for bit while the parameters agree) and the same parameters up to float rounding (a batched
    matmul may round differently).

    ``(0, 2)`` fails today: make_train seeds the pool with one base seed, ``seeds[0]·E·N``, so lane k gets
    ``(seeds[0] + k)·E·N`` -- right only for contiguous seeds (lane 1 of ``(0, 2)`` plays seed 1's envs).
    Fix: pass per-lane seeds, ``make_xla(..., seed=[s·E·N + w·E for s in cfg.seeds for w in range(N)])``.
    """
    sweep, sweep_lanes, sweep_episodes = run_train(tmp_path, seeds, **SWEEP[algo])
    assert sweep.env.lanes == len(seeds) * sweep.cfg.workers  # one pool for all lanes
    for index, seed in enumerate(seeds):
        _, single_lanes, single_episodes = single_run(tmp_path, algo, seed)
        assert len(single_episodes[0]) > 20
        assert sweep_episodes[index][:20] == single_episodes[0][:20], f"seed {seed}: different episodes"
        for a, b in zip(jax.tree.leaves(sweep_lanes.params), jax.tree.leaves(single_lanes.params)):
            np.testing.assert_allclose(a[index], b[0], rtol=1e-4, atol=1e-5, err_msg=f"seed {seed}")
    # Different seeds are different runs.
    assert sweep_episodes[0][:20] != sweep_episodes[-1][:20]


def test_seed_sweep_writes_per_seed_outputs_and_aggregates(tmp_path):
    seeds = (0, 1, 2)
    kw = dict(algo="a2c", total_steps=128 * 200, eval_episodes=1)
    summary = loop.run(make_cfg(tmp_path, "sweep", seeds=seeds, **kw))
    logdir = tmp_path / "sweep"
    per_seed = summary["seeds"]
    assert [p["seed"] for p in per_seed] == list(seeds)
    for p in per_seed:
        seed_dir = logdir / f"seed_{p['seed']}"
        records = read_jsonl(seed_dir / "metrics.jsonl")
        assert records and records[-1]["step"] == summary["total_steps"]
        seed_summary = json.loads((seed_dir / "summary.json").read_text())
        assert seed_summary["final_return"] == p["final_return"] and seed_summary["seed"] == p["seed"]
    finals = np.array([p["final_return"] for p in per_seed])
    agg = summary["final_return_over_seeds"]
    half = stats.t.ppf(0.975, len(seeds) - 1) * finals.std(ddof=1) / np.sqrt(len(seeds))
    np.testing.assert_allclose([agg["mean"], agg["std"], agg["ci95_low"], agg["ci95_high"]],
                               [finals.mean(), finals.std(ddof=1), finals.mean() - half, finals.mean() + half])
    assert agg["n"] == 3 and summary["final_return"] == pytest.approx(finals.mean())
    assert summary["eval_return_over_seeds"]["n"] == 3
    png = (logdir / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # The top-level metrics are the mean over seeds, point by point.
    top = read_jsonl(logdir / "metrics.jsonl")
    seed_records = [read_jsonl(logdir / f"seed_{s}" / "metrics.jsonl") for s in seeds]
    for i, rec in enumerate(top):
        rets = [recs[i]["episodic_return"] for recs in seed_records if recs[i]["episodic_return"] is not None]
        assert rec["step"] == seed_records[0][i]["step"]
        if rets:
            assert rec["episodic_return"] == pytest.approx(np.mean(rets))

    # Seed 1 of the sweep logs what a single-seed run of seed 1 logs (log points depend on progress only here).
    single = loop.run(make_cfg(tmp_path, "single", seeds=(1,), **kw))
    single_records = read_jsonl(tmp_path / "single" / "metrics.jsonl")
    for a, b in zip(seed_records[1][:4], single_records[:4]):
        assert a["step"] == b["step"] and a["episodes"] == b["episodes"]
        assert a["episodic_return"] == pytest.approx(b["episodic_return"], rel=1e-9)
    assert single["total_steps"] == summary["total_steps"]


def test_learning_curves_leave_the_callers_matplotlib_alone(tmp_path):
    """The plot is a Figure of its own: a notebook that trains keeps its backend and its open figures."""
    import matplotlib
    import matplotlib.pyplot as plt

    original = matplotlib.get_backend()
    plt.switch_backend("pdf")  # the caller's own choice, not Agg
    mine = plt.figure()
    try:
        curves = {"": [[(0, 1.0), (100, 3.0)], [(0, 2.0), (100, 5.0)]]}
        loop.plot_learning_curves(str(tmp_path / "curves.png"), curves, "two seeds")
        assert matplotlib.get_backend() == "pdf" and plt.get_fignums() == [mine.number]
    finally:
        plt.close(mine)
        plt.switch_backend(original)
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


# ---------------------------------------------------------------------------------------------------------------
# 5. make_train / train.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["a2c", "dqn"])
def test_make_train_is_jitted_and_same_seed_gives_the_same_run(algo, tmp_path):
    cfg = make_cfg(tmp_path, seeds=(0,), **SWEEP[algo])
    first = train_lib.make_train(cfg, chunk_iterations=8 if algo == "a2c" else 25)
    for piece in (first.init, first.chunk) + ((first.warmup,) if algo == "dqn" else ()):
        assert hasattr(piece, "lower"), f"{piece} is not a jitted function"
    assert (first.warmup is None) == (algo != "dqn")
    # The chunk is one XLA program: the env step is envpool's custom call inside the scan's while loop.
    handle, lanes = first.initial_handle(), first.init(train_lib.seed_keys(cfg))
    initial = jax.device_get(lanes.params)
    hlo = first.chunk.lower(handle, lanes, jnp.int32(0), first.chunk_iterations).as_text()
    assert "custom_call" in hlo and "while" in hlo
    assert first.env.lanes == 1 and first.env.spec.num_envs == cfg.envs_per_worker

    # Two separate pools and programs, same seed (the other run is run_train's, shared with the sweep test).
    lanes, warm_info, outs = train_lib.train(first, train_lib.seed_keys(cfg))
    lanes_a, episodes_a = jax.device_get(lanes), per_seed_episodes(first, warm_info, outs)
    _, lanes_b, episodes_b = single_run(tmp_path, algo, 0)
    assert episodes_a == episodes_b and len(episodes_a[0]) > 10
    for a, b in zip(jax.tree.leaves(lanes_a), jax.tree.leaves(lanes_b)):
        np.testing.assert_array_equal(a, b)
    assert int(lanes_a.updates[0, 0]) == first.num_chunks * first.chunk_iterations
    # It trained: the parameters moved away from their initial values.
    moved = sum(float(np.abs(a - b).sum()) for a, b in zip(jax.tree.leaves(lanes_a.params),
                                                          jax.tree.leaves(initial)))
    assert moved > 1e-2


# Whole numbers of iterations that are not whole numbers of default chunks (ceil(iterations / 100)).
RUN_LENGTH = {
    "a2c-101": dict(algo="a2c", total_steps=128 * 101),  # chunks of 2: 51 chunks would be 102 iterations
    "dqn-202": dict(algo="dqn", total_steps=8 * 202, learning_starts=1000),  # 125 warmup + 77 learning, chunks of 3
}


@pytest.mark.parametrize("name", list(RUN_LENGTH))
def test_train_takes_exactly_total_steps(name, tmp_path):
    """A run whose --total-steps is a whole number of iterations takes exactly --total-steps env steps.

    Fails today when the learning iterations are not a multiple of ``chunk_iterations`` (default
    ``ceil(iterations / 100)``): train() and loop.run run ``num_chunks = ceil(learn_iters / chunk_iterations)``
    whole chunks and overshoot by up to ``chunk_iterations - 1`` iterations (the default job, 1M A2C steps = 7812
    iterations in chunks of 79, runs 7821 iterations; summary.json says total_steps 1001088). Fix: run the
    remainder as a last, shorter chunk (``length`` is static: one more compile) in both train() and loop.run, or
    pick chunk_iterations as a divisor of the learning iterations.
    """
    cfg = make_cfg(tmp_path, **RUN_LENGTH[name])
    iterations = cfg.total_steps // cfg.steps_per_iteration
    assert iterations * cfg.steps_per_iteration == cfg.total_steps
    trainer = train_lib.make_train(cfg)
    lanes, warm_info, outs = train_lib.train(trainer, train_lib.seed_keys(cfg))
    warm = 0 if warm_info is None else warm_info.finished.shape[0]
    learned = sum(info.finished.shape[0] for info, _ in outs)
    assert (warm, warm + learned) == (trainer.warmup_iterations, iterations)
    assert int(lanes.updates[0, 0]) == learned


def test_loop_run_takes_exactly_total_steps(tmp_path):
    """The same through loop.run: summary.json's total_steps and the last metrics point are --total-steps."""
    summary = loop.run(make_cfg(tmp_path, eval_episodes=0, **RUN_LENGTH["a2c-101"]))
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert summary["total_steps"] == records[-1]["step"] == 128 * 101


@pytest.mark.parametrize("strategy,kw", [("async", dict(max_delay=2)), ("hogwild", dict(threads=2))])
def test_each_seed_of_a_sweep_draws_its_own_strategy_randomness(strategy, kw, tmp_path):
    """The optimizer is built once with seeds[0]; each lane's delayed / hogwild key must still be its own seed's
    (PRNGKey(seed), what a single-seed run holds), so a sweep does not replay one delay sequence S times."""
    from jaxdp.strategies.delayed import DelayedState
    from jaxdp.strategies.hogwild import HogwildState

    def strategy_keys(seeds):
        cfg = make_cfg(tmp_path, f"{strategy}-{len(seeds)}", algo="a2c", strategy=strategy, workers=2,
                       seeds=seeds, **kw)
        lanes = jax.device_get(train_lib.make_train(cfg).init(train_lib.seed_keys(cfg)))
        kinds = (DelayedState, HogwildState)
        found = [x for x in jax.tree.leaves(lanes.opt_state, is_leaf=lambda x: isinstance(x, kinds))
                 if isinstance(x, kinds)]
        assert len(found) == 1
        return np.asarray(found[0].key)  # [S, N, 2]

    sweep = strategy_keys((3, 5))
    for index, seed in enumerate((3, 5)):
        np.testing.assert_array_equal(sweep[index], np.broadcast_to(jax.random.PRNGKey(seed), (2, 2)))
        np.testing.assert_array_equal(strategy_keys((seed,))[0], sweep[index])


def _convolutions(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("conv_general_dilated")


def test_cnn_on_cpu_applies_at_most_32_frames_per_call():
    # network_apply slices large batches for XLA:CPU's convolutions (2.2x faster A2C update on Pong, see its
    # docstring); the MLP and small batches are left alone.
    pong = validate(TrainConfig(algo="a2c", env="Pong-v5", total_steps=10_000))
    spec = envs_lib.make_spec(pong.env, pong.envs_per_worker)
    net = train_lib.make_network(pong, spec)
    apply = train_lib.network_apply(pong, net, spec)
    frames = jnp.zeros((128, *spec.obs_shape), jnp.uint8)
    params = jax.eval_shape(net.init, jax.random.key(0), frames[:1])
    assert jax.default_backend() == "cpu" and train_lib.cnn_on_cpu(pong, spec)
    per_call = _convolutions(net.apply, params, frames[:1])  # the Nature CNN: 3 convolutions
    assert per_call == 3
    assert _convolutions(apply, params, frames) == 4 * per_call  # 128 frames: four calls of 32
    assert _convolutions(apply, params, frames[:16]) == per_call  # an acting batch of 16 envs: one call
    cartpole = validate(TrainConfig(algo="a2c", total_steps=10_000))
    cp_spec = envs_lib.make_spec(cartpole.env, cartpole.envs_per_worker)
    cp_net = train_lib.make_network(cartpole, cp_spec)
    assert not train_lib.cnn_on_cpu(cartpole, cp_spec)
    assert train_lib.network_apply(cartpole, cp_net, cp_spec) == cp_net.apply  # the bound method itself


def test_vmap_lanes_single_lane_equals_the_lane_vmap():
    """One lane runs unbatched (no layout ops around its convolutions) under a size-1 vmap that still binds the
    workers axis: same values and shapes as the [seeds, workers] vmap, shared inputs and outputs left alone."""

    def fn(handle, lane, scale):
        y = jnp.tanh(lane["w"] * scale + handle["pending"].sum())
        return handle, {"w": y, "mean": jax.lax.pmean(y, train_lib.WORKERS)}, scale * 2.0

    in_axes = ({"pool": None, "pending": 0}, 0, None)
    out_axes = ({"pool": None, "pending": 0}, 0, 0)
    handle = {"pool": jnp.float32(3.0), "pending": jnp.ones((1, 1, 4))}
    lane = {"w": jnp.arange(3.0).reshape(1, 1, 3)}
    single = jax.jit(train_lib.vmap_lanes(fn, in_axes, out_axes, single=True))(handle, lane, 0.5)
    batched = jax.jit(train_lib.vmap_lanes(fn, in_axes, out_axes, single=False))(handle, lane, 0.5)
    assert jax.tree.structure(single) == jax.tree.structure(batched)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(batched)):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert single[2].shape == (1, 1) and single[0]["pool"].shape == ()
    # The single-lane program has no lane axis inside: fn's tanh sees the unbatched (3,) vector.
    jaxpr = jax.make_jaxpr(train_lib.vmap_lanes(fn, in_axes, out_axes, single=True))(handle, lane, 0.5)
    tanh = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "tanh"]
    assert [e.invars[0].aval.shape for e in tanh] == [(3,)]


# ---------------------------------------------------------------------------------------------------------------
# The learner's optimizer: any optax chain.
# ---------------------------------------------------------------------------------------------------------------
def test_the_learner_takes_any_optax_chain(tmp_path):
    """make_train(cfg, inner=chain) learns with the given chain, wrapped by the strategy as the configured one is:
    the configured chain given as ``inner`` is the default run bit for bit; a zero-rate chain leaves θ_0 in place
    (under sync all-reduce too) while the default run moves it; loop.run and make_train_fn take it as well. A sweep
    of lr cannot go with a chain that has its own rate."""
    import optax

    def final_params(cfg, inner=None):
        trainer = train_lib.make_train(cfg, chunk_iterations=4, inner=inner)
        lanes, _, _ = train_lib.train(trainer, train_lib.seed_keys(cfg))
        return jax.device_get(lanes.params)

    for kw in (dict(algo="a2c"), dict(algo="dqn", learning_starts=400, strategy="sync", workers=2)):
        cfg = make_cfg(tmp_path, total_steps=128 * 8 if kw["algo"] == "a2c" else 8 * 2 * 100, **kw)
        start = jax.device_get(train_lib.make_train(cfg).init(train_lib.seed_keys(cfg)).params)
        default = final_params(cfg)
        same = final_params(cfg, inner=train_lib.make_inner_optimizer(cfg))
        frozen = final_params(cfg, inner=optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.0)))
        for d, s, f, s0 in zip(*map(jax.tree.leaves, (default, same, frozen, start))):
            np.testing.assert_array_equal(d, s)
            np.testing.assert_array_equal(f, s0)
        assert any(not np.array_equal(d, s0) for d, s0 in zip(jax.tree.leaves(default), jax.tree.leaves(start)))

    cfg = make_cfg(tmp_path, "logged", algo="a2c", total_steps=128 * 8, eval_episodes=0)
    summary = loop.run(cfg, inner=optax.adamw(1e-3, weight_decay=1e-2))
    assert summary["total_steps"] == 128 * 8
    # A resume with another chain whose state differs is one clear error (it was orbax's "tree structures do not
    # match ... pass partial_restore=True"), and the run's config.json is left as it was.
    saved_config = (tmp_path / "logged" / "config.json").read_text()
    longer = dataclasses.replace(cfg, resume=True, total_steps=128 * 12)
    for other in (optax.sgd(1e-3), None):
        with pytest.raises(ConfigError, match="holds another state than this run builds .*opt_state.* resume with "
                                              "the optimizer chain"):
            loop.run(longer, inner=other)
        assert (tmp_path / "logged" / "config.json").read_text() == saved_config
    assert loop.run(longer, inner=optax.adamw(1e-3, weight_decay=1e-2))["total_steps"] == 128 * 12
    train_fn, _ = train_lib.make_train_fn(validate(TrainConfig(algo="a2c", total_steps=128 * 4)),
                                          inner=optax.sgd(0.0))
    out = jax.jit(train_fn)(jax.random.PRNGKey(0))
    alone = train_lib.make_train(validate(TrainConfig(algo="a2c", total_steps=128 * 4)))
    start = alone.init(train_lib.seed_keys(alone.cfg)).params
    for a, b in zip(jax.tree.leaves(out.lanes.params), jax.tree.leaves(start)):
        np.testing.assert_array_equal(a[0], b[0, 0])

    with pytest.raises(ValueError, match="cannot be swept over lr"):
        train_lib.make_train(make_cfg(tmp_path, "sweep", algo="a2c", sweep=(("lr", (1e-3, 2e-3)),)),
                             inner=optax.adam(1e-3))
    with pytest.raises(ValueError, match="cannot be swept over lr"):
        jax.eval_shape(train_fn, jax.random.PRNGKey(0), train_lib.Hyperparams(learning_rate=1e-3))
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        train_lib.make_train(cfg, inner="adam")


def test_the_learning_curves_band_is_a_bootstrap_interval_within_the_runs_range():
    """The band of a seed sweep's plot: over two seeds a Student-t interval (t = 12.7) spread CartPole returns from
    -300 to 500; the bootstrap band is the two seeds' min and max. With many runs it approaches the normal
    interval, and it is the same on every call."""
    two = np.array([[10.0, 20.0, 30.0], [12.0, 50.0, 25.0]])
    low, high = loop.bootstrap_band(two)
    np.testing.assert_array_equal(low, two.min(axis=0))
    np.testing.assert_array_equal(high, two.max(axis=0))

    runs = np.random.default_rng(1).normal(100.0, 20.0, size=(40, 3))
    low, high = loop.bootstrap_band(runs)
    assert np.all(runs.min(axis=0) <= low) and np.all(high <= runs.max(axis=0))
    sem = runs.std(axis=0, ddof=1) / np.sqrt(40)
    np.testing.assert_allclose(high - low, 2 * 1.96 * sem, rtol=0.15)
    np.testing.assert_array_equal(loop.bootstrap_band(runs)[0], low)

    gap = np.array([[1.0, np.nan], [2.0, 3.0]])  # a point where one run has no value has no band
    low, high = loop.bootstrap_band(gap)
    assert low[0] == 1.0 and high[0] == 2.0 and np.isnan(low[1]) and np.isnan(high[1])
    with pytest.raises(AssertionError):
        loop.bootstrap_band(np.ones(3))


def test_the_final_return_averages_the_episodes_of_the_last_tenth_of_the_steps():
    """An agent's episodes lengthen as it learns: 900 random games of 20 steps, then games of 200 and 500. The last
    10% of the episodes (96 of them) reached back into the random games and said 186; the episodes that ended in the
    last 10% of the steps are the learned ones: 500."""
    steps, returns = [], []
    for length, count in ((20, 900), (200, 30), (500, 22)):
        for _ in range(count):
            steps.append((steps[-1] if steps else 0) + length)
            returns.append(float(length))
    total = steps[-1]  # 35,000 env steps
    late = [r for s, r in zip(steps, returns) if s > 0.9 * total]
    assert loop.final_return(steps, returns, total) == pytest.approx(np.mean(late)) == 500.0
    assert np.mean(returns[-96:]) == pytest.approx(186.25)  # the old window
    # No episode ended in the window (a long game): the last one that ended; none at all: None.
    assert loop.final_return([100, 900], [3.0, 7.0], 10_000) == 7.0
    assert loop.final_return([], [], 10_000) is None
    with pytest.raises(ValueError, match="2 steps for 1 returns"):
        loop.final_return([1, 2], [1.0], 10)


def test_loop_run_validates_its_config_before_writing_anything(tmp_path):
    """A script that skips the command line gets its checks: ``total_steps=-5`` trained DQN's 10k warm-up steps and
    wrote a summary; it is a ConfigError now, and the logdir is not created."""
    with pytest.raises(ConfigError, match="total-steps"):
        loop.run(TrainConfig(algo="dqn", total_steps=-5, logdir=str(tmp_path / "run"), progress=False))
    assert not (tmp_path / "run").exists()


def test_a_diverged_run_is_named_in_its_summary_and_a_sweep_does_not_pick_it(tmp_path, monkeypatch):
    """SGD at lr 1e4 without clipping drives A2C's loss to NaN within a few updates. The run trained on to its end
    and reported "final return 9.3, greedy eval 9.1", a NaN policy's (argmax of NaN is action 0), with nothing to
    tell it from a poor agent. Its summary now says where the loss stopped being finite and that θ is not."""
    base = dict(algo="a2c", optimizer="sgd", max_grad_norm=0.0, total_steps=8 * 16 * 8, log_interval=1e-9)
    summary = loop.run(make_cfg(tmp_path, "diverged", lr=1e4, **base))
    assert summary["diverged_runs"] == 1 and summary["params_finite"] is False
    records = read_jsonl(tmp_path / "diverged" / "metrics.jsonl")
    first = next(r["step"] for r in records if "loss" in r and not math.isfinite(r["loss"]))
    assert summary["diverged_at_step"] == first
    healthy = loop.run(make_cfg(tmp_path, "healthy", lr=1e-3, **base))
    assert healthy["diverged_runs"] == 0 and healthy["diverged_at_step"] is None and healthy["params_finite"]

    # A sweep picks its best point among those none of whose runs diverged: mark the better point's runs as
    # diverged (a broken policy can out-score a poor one), and the other becomes the best.
    sweep = make_cfg(tmp_path, "sweep", lr=1e-3, **{**base, "total_steps": 4 * 16 * 8})
    sweep = validate(dataclasses.replace(sweep, sweep=(("lr", (1e-3, 3e-3)),)))
    honest = loop.run(sweep)
    assert honest["diverged_runs"] == 0 and all(q["diverged_runs"] == 0 for q in honest["grid"])
    better = honest["best"]
    worse = next(q["hyperparams"] for q in honest["grid"] if q["hyperparams"] != better)
    rerun = validate(dataclasses.replace(sweep, logdir=str(tmp_path / "sweep2")))
    lr_of_dir = {os.path.join(rerun.logdir, loop.point_label(q["hyperparams"])): q["hyperparams"]
                 for q in honest["grid"]}
    real = loop.divergence_fields

    def better_point_diverged(params, metrics_path):
        fields = real(params, metrics_path)
        if lr_of_dir.get(os.path.dirname(metrics_path)) == better:
            fields = {"diverged_at_step": 128, "params_finite": False}
        return fields

    monkeypatch.setattr(loop, "divergence_fields", better_point_diverged)
    shifted = loop.run(rerun)
    assert shifted["diverged_runs"] == 1 and shifted["best"] == worse


def test_divergence_fields_read_the_first_non_finite_loss_and_the_parameters(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "episodic_return": None}, {"step": 100, "loss": 1.5}, {"step": 200, "loss": math.inf},
             {"step": 300, "loss": math.nan}]
    path.write_text("".join(json.dumps(record) + "\n" for record in lines))
    finite = {"w": jnp.ones(3)}
    assert loop.divergence_fields(finite, str(path)) == {"diverged_at_step": 200, "params_finite": True}
    assert loop.divergence_fields(finite, lines) == {"diverged_at_step": 200, "params_finite": True}  # read already
    assert loop.divergence_fields(finite, str(tmp_path / "none.jsonl"))["diverged_at_step"] is None
    broken = {"w": jnp.array([1.0, jnp.nan])}
    path.write_text('{"step": 0, "train_loss": 0.5}\n')  # the MPI runtime's name for the workers' loss
    assert loop.divergence_fields(broken, str(path)) == {"diverged_at_step": None, "params_finite": False}
    assert loop.diverged({"diverged_at_step": None, "params_finite": False})
    assert not loop.diverged({"diverged_at_step": None, "params_finite": True})


def test_a_signal_while_the_run_is_built_stops_it_before_training_and_writes_nothing(tmp_path, monkeypatch):
    """A Ctrl-C 1.5 s after `jaxdp train` started, while JAX loaded and the run was built, raised its
    KeyboardInterrupt inside JAX's garbage-collection hook, which swallows exceptions: the run trained to its end
    and exited 0. The handlers now come first, and a signal during the build stops the run once it is built: a fresh
    run leaves no folder behind, and a resumed one leaves its checkpoint, config.json and metrics as they were."""
    cfg = make_cfg(tmp_path, algo="a2c", total_steps=128 * 8, eval_episodes=0)
    real_make_train = train_lib.make_train

    def make_train_then(signum):
        def make_train(*args, **kwargs):
            trainer = real_make_train(*args, **kwargs)
            os.kill(os.getpid(), signum)  # as if it came while envpool started and the network was built
            return trainer
        return make_train

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(train_lib, "make_train", make_train_then(signal.SIGINT))
    with pytest.raises(stopping.RunStopped, match="stopped by SIGINT before training began") as stopped:
        loop.run(cfg)
    assert stopped.value.starting and stopped.value.logdir is None and not (tmp_path / "run").exists()
    assert signal.getsignal(signal.SIGINT) == before

    monkeypatch.setattr(train_lib, "make_train", real_make_train)
    loop.run(cfg)
    written = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    monkeypatch.setattr(train_lib, "make_train", make_train_then(signal.SIGTERM))
    with pytest.raises(stopping.RunStopped, match="stopped by SIGTERM before training began") as stopped:
        loop.run(dataclasses.replace(cfg, resume=True, total_steps=128 * 16))
    assert stopped.value.starting and stopped.value.logdir == cfg.logdir and stopped.value.step == 128 * 8
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == written
    assert "the run is as its last checkpoint left it: continue with the same command and --resume" in (
        _stop_line(stopped.value))


def _stop_line(stop: stopping.RunStopped) -> str:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert stopping.exit_status(stop, "jaxdp train") == 128 + stop.signum
    return err.getvalue()
