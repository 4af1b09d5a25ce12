"""Hyperparameter sweeps from the command line: ``jaxdp train --lr 1e-3 3e-3 --seeds 0 1`` trains every point of the
grid with every seed as one vmapped program (``TrainConfig.sweep``).

* The grid and its runs: every combination, the first swept option varying slowest, each with every seed.
* Each run of a sweep is the single-seed run of its own config (``cfg.run_config(r)``): the same episodes while the
  parameters agree and the same parameters up to float rounding -- for A2C (learning rate; discount x loss
  weights; stale-gradient delay), DQN (learning rate x ε schedule; discount) and ``--pipeline overlap``.
* The outputs: a folder per point (and per seed), the mean, std and 95% CI over seeds per point, the best point,
  one band per point in the PNG (its range over seeds), and a run's metrics equal to those of the same run alone.
Bad sweep values are refused by ``tests/test_cli.py`` (exit 2, one line, nothing created).
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxdp import cli
from jaxdp import loop
from jaxdp import train as train_lib
from jaxdp.config import TrainConfig, validate


def make_cfg(tmp_path, name: str = "run", **kw) -> TrainConfig:
    base = dict(logdir=str(tmp_path / name), progress=False, eval_episodes=1, tensorboard=False,
                log_interval=1e9, checkpoint_interval=1e9)
    return validate(TrainConfig(**{**base, **kw}))


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_train(cfg: TrainConfig):
    """Final lanes and every run's finished episodes (return, length), in the order they finished."""
    trainer = train_lib.make_train(cfg, chunk_iterations=8 if cfg.algo == "a2c" else 25)
    lanes, warm_info, outs = train_lib.train(trainer, train_lib.seed_keys(cfg))
    S = len(cfg.runs)
    episodes: list[list[tuple[float, int]]] = [[] for _ in range(S)]
    for info in ([warm_info] if warm_info is not None else []) + [info for info, _ in outs]:
        for r, eps in enumerate(loop.episodes_by_seed(info, S)):
            episodes[r] += [(ret, n) for _, ret, n in eps]
    return jax.device_get(lanes), episodes


def test_cli_sweep_is_the_grid_times_the_seeds():
    args = cli.build_parser().parse_args(
        ["train", "--algo", "dqn", "--lr", "1e-3", "3e-3", "--eps-end", "0.05", "0.1", "0.2", "--seeds", "0", "1"])
    cfg = validate(cli.config_from_args(args))
    assert cfg.sweep == (("lr", (1e-3, 3e-3)), ("eps_end", (0.05, 0.1, 0.2)))
    assert cfg.grid == tuple({"lr": lr, "eps_end": e} for lr in (1e-3, 3e-3) for e in (0.05, 0.1, 0.2))
    assert len(cfg.runs) == 12 and cfg.runs[:3] == ((0, 0), (0, 1), (1, 0))
    assert cfg.run_config(9) == validate(TrainConfig(algo="dqn", lr=3e-3, eps_end=0.1, seeds=(1,)))
    np.testing.assert_allclose(train_lib.run_hyperparams(cfg).learning_rate, [1e-3] * 6 + [3e-3] * 6, rtol=1e-7)
    np.testing.assert_allclose(train_lib.run_hyperparams(cfg).eps_end, [0.05, 0.05, 0.1, 0.1, 0.2, 0.2] * 2,
                               rtol=1e-7)
    assert train_lib.run_hyperparams(cfg).eps_start is None  # not swept: the config's value, a constant
    # One value is no sweep; a rate left out resolves per algorithm; a swept 0 is a rate of 0, as its label says.
    one = validate(cli.config_from_args(cli.build_parser().parse_args(["train", "--lr", "1e-3"])))
    assert one.sweep == () and one.lr == 1e-3 and one.grid == ({},) and one.runs == ((0, 0),)
    assert validate(TrainConfig(algo="a2c")).learning_rate == 2e-3
    assert validate(TrainConfig(algo="dqn")).learning_rate == 2.5e-4
    zero = validate(TrainConfig(algo="a2c", sweep=(("lr", (0.0, 1e-3)),)))
    np.testing.assert_allclose(train_lib.run_hyperparams(zero).learning_rate, [0.0, 1e-3], rtol=1e-7)
    # A swept --max-delay (under --delay fixed) is each run's delay; the program's ring holds the largest.
    stale = validate(TrainConfig(algo="a2c", strategy="async", delay="fixed", seeds=(0, 1),
                                 sweep=(("max_delay", (0, 1, 4)),)))
    delays = train_lib.run_hyperparams(stale).delay
    assert delays.dtype == np.int32 and delays.tolist() == [0, 0, 1, 1, 4, 4]
    assert stale.build_config.max_delay == 4 and stale.run_config(3).max_delay == 1


SWEEPS = {
    # A2C: the learning rate (annealed: the schedule starts from each lane's value), two seeds.
    "a2c-lr": dict(algo="a2c", total_steps=128 * 150, seeds=(0, 1), sweep=(("lr", (1e-3, 4e-3)),)),
    # DQN: the learning rate x the ε schedule's end and length.
    "dqn-lr-eps": dict(algo="dqn", total_steps=8 * 500, learning_starts=1000, seeds=(0,),
                       sweep=(("lr", (2.5e-4, 1e-3)), ("eps_end", (0.05, 0.3)), ("eps_fraction", (0.2,)))),
    # A2C's discount and loss weights (read by the loss, not the optimizer).
    "a2c-gamma-ent-vf": dict(algo="a2c", total_steps=128 * 120, seeds=(0,),
                             sweep=(("gamma", (0.99, 0.9)), ("ent_coef", (0.01, 0.1)), ("vf_coef", (0.25,)))),
    # DQN's discount (read by the replay's targets). One-step targets: a lane and its run alone differ by float
    # rounding (batched vs unbatched matmuls; <= 7e-7 in the metrics here), and with --n-step 3 the training of seed
    # 2 amplifies it ~10x every 40 updates, to 1.7e-3 after these 375 (same episodes; seed 3 stays at 7e-8), past
    # the tolerance below. Measured: an n-step sum in a fixed order changes nothing, so it is not the source.
    "dqn-gamma": dict(algo="dqn", total_steps=8 * 500, learning_starts=1000, seeds=(2,),
                      sweep=(("gamma", (0.99, 0.8)),)),
    # n-step targets with each lane's discount (γ^k of the replay's n-step sum), over a run short enough (175
    # updates) that the amplified rounding above stays ~1e-7.
    "dqn-gamma-n-step": dict(algo="dqn", total_steps=8 * 300, learning_starts=1000, n_step=3, seeds=(2,),
                             sweep=(("gamma", (0.99, 0.8)),)),
    # Stale gradients: a fixed delay per run, in one ring sized for the largest (0 is the inner optimizer alone).
    "a2c-async-delay": dict(algo="a2c", strategy="async", delay="fixed", total_steps=128 * 120, seeds=(0,),
                            sweep=(("max_delay", (0, 3)),)),
    # Acting and learning on two threads, one update apart: the lane's values reach both halves.
    "a2c-overlap": dict(algo="a2c", total_steps=128 * 120, seeds=(1,), pipeline="overlap",
                        sweep=(("lr", (1e-3, 4e-3)),)),
}


@pytest.mark.parametrize("name", list(SWEEPS))
def test_each_run_of_a_sweep_is_its_own_single_run(name, tmp_path):
    cfg = make_cfg(tmp_path, **SWEEPS[name])
    lanes, episodes = run_train(cfg)
    for r in range(len(cfg.runs)):
        single_lanes, single_episodes = run_train(cfg.run_config(r))
        assert len(single_episodes[0]) > 20
        assert episodes[r][:20] == single_episodes[0][:20], f"run {r} {cfg.runs[r]}: different episodes"
        for a, b in zip(jax.tree.leaves(lanes.params), jax.tree.leaves(single_lanes.params)):
            np.testing.assert_allclose(a[r], b[0], rtol=1e-4, atol=1e-5, err_msg=f"run {r} {cfg.runs[r]}")
    # Different points are different runs: the same seed with another learning rate ends elsewhere.
    other = len(cfg.runs) - len(cfg.seeds)  # the last point's first seed: the same seed as run 0
    assert max(float(np.max(np.abs(leaf[0] - leaf[other]))) for leaf in jax.tree.leaves(lanes.params)) > 1e-3


def test_a_learning_rate_of_0_trains_nothing_alone_and_in_a_sweep(tmp_path):
    """``--lr 0`` is a rate of 0, a control run whose parameters never move. It used to stand for the algorithm's
    default, so ``--lr 0 2e-3`` trained the default twice and labelled one of them "--lr 0"."""
    alone = make_cfg(tmp_path, "alone", algo="a2c", total_steps=128 * 20, lr=0.0)
    initial = jax.device_get(train_lib.make_train(alone).init(train_lib.seed_keys(alone)).params)
    lanes, _ = run_train(alone)
    for a, b in zip(jax.tree.leaves(lanes.params), jax.tree.leaves(initial)):
        np.testing.assert_array_equal(a, b)
    swept = make_cfg(tmp_path, "swept", algo="a2c", total_steps=128 * 20, sweep=(("lr", (0.0, 2e-3)),))
    lanes, _ = run_train(swept)
    moved = [float(np.max(np.abs(a[r] - b[0]))) for r in (0, 1)
             for a, b in zip(jax.tree.leaves(lanes.params), jax.tree.leaves(initial))]
    half = len(moved) // 2
    assert max(moved[:half]) == 0.0 and max(moved[half:]) > 1e-3, moved


def test_a_point_is_shown_as_its_options_and_named_as_its_folder():
    """The closing lines and the learning curves' legend show a point as the options that give it; its folder has a
    name without spaces or dashes."""
    from jaxdp.config import point_shown

    point = {"lr": 1e-3, "eps_fraction": 0.25}
    assert point_shown(point) == "--lr 0.001 --eps-fraction 0.25"
    assert loop.point_label(point) == "lr_0.001-eps_fraction_0.25"


def test_cli_sweep_writes_every_point_and_its_runs(tmp_path):
    logdir = tmp_path / "sweep"
    common = ["--algo", "a2c", "--total-steps", str(128 * 100), "--eval-episodes", "1", "--no-tensorboard",
              "--log-interval", "1e9"]  # log points that depend on progress only, as in make_cfg
    done = subprocess.run([sys.executable, "-m", "jaxdp.cli", "train", "--no-progress", *common,
                           "--lr", "1e-3", "4e-3", "--seeds", "0", "1", "--logdir", str(logdir)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.strip().splitlines()
    assert out[0].startswith("jaxdp train: 4 runs (2 points x 2 seeds) of 12800 steps")
    assert [line.split(":")[0].strip() for line in out[1:3]] == ["--lr 0.001", "--lr 0.004"]
    assert sum("(best)" in line for line in out[1:]) == 1
    assert out[3].strip() == "(mean ± std over 2 seeds; 95% confidence intervals in summary.json)"

    summary = json.loads((logdir / "summary.json").read_text())
    for line, point in zip(out[1:3], summary["grid"]):  # each point's line states its statistics over the seeds
        stats = point["final_return_over_seeds"]
        assert f"final return {round(stats['mean'], 1)} ± {round(stats['std'], 1)}," in line
    assert [p["hyperparams"] for p in summary["grid"]] == [{"lr": 1e-3}, {"lr": 4e-3}]
    assert [(r["hyperparams"]["lr"], r["seed"]) for r in summary["runs"]] == [
        (1e-3, 0), (1e-3, 1), (4e-3, 0), (4e-3, 1)]
    for point in summary["grid"]:
        folder = logdir / f"lr_{point['hyperparams']['lr']:g}"
        finals = [json.loads((folder / f"seed_{s}" / "summary.json").read_text())["final_return"] for s in (0, 1)]
        assert point["final_return_over_seeds"]["mean"] == pytest.approx(np.mean(finals))
        assert point["final_return_over_seeds"]["std"] == pytest.approx(np.std(finals, ddof=1))
        assert point["final_return_over_seeds"]["n"] == 2 and point["seeds"] == [0, 1]
        assert json.loads((folder / "summary.json").read_text())["final_return"] == point["final_return"]
        # The point's metrics.jsonl is the mean over its seeds, point by point.
        mean = read_jsonl(folder / "metrics.jsonl")
        per_seed = [read_jsonl(folder / f"seed_{s}" / "metrics.jsonl") for s in (0, 1)]
        for i, rec in enumerate(mean):
            rets = [recs[i]["episodic_return"] for recs in per_seed if recs[i]["episodic_return"] is not None]
            if rets:
                assert rec["episodic_return"] == pytest.approx(np.mean(rets))
    best = max(summary["grid"], key=lambda p: p["final_return"])
    assert summary["best"] == best["hyperparams"] and summary["final_return"] == best["final_return"]
    png = (logdir / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (logdir / "metrics.jsonl").exists()  # the top level: the mean over every run (and what --resume finds)

    # Run (lr 4e-3, seed 1) of the sweep logs what that run alone logs (log points depend on progress only here).
    alone = loop.run(make_cfg(tmp_path, "alone", algo="a2c", total_steps=128 * 100, lr=4e-3, seeds=(1,)))
    swept = read_jsonl(logdir / "lr_0.004" / "seed_1" / "metrics.jsonl")
    single = read_jsonl(tmp_path / "alone" / "metrics.jsonl")
    for a, b in zip(swept[:4], single[:4]):
        assert a["step"] == b["step"] and a["episodes"] == b["episodes"]
        assert a["episodic_return"] == pytest.approx(b["episodic_return"], rel=1e-9)
    assert alone["total_steps"] == summary["total_steps"]


def test_a_killed_sweep_resumes_with_each_runs_values(tmp_path):
    """The lanes' values are part of the checkpoint: resuming a sweep continues every point where it stopped."""
    kw = dict(algo="dqn", learning_starts=1000, seeds=(0,), sweep=(("eps_end", (0.05, 0.5)),), eval_episodes=0)
    loop.run(make_cfg(tmp_path, "sweep", total_steps=2000, **kw))
    resumed = loop.run(make_cfg(tmp_path, "sweep", total_steps=4000, resume=True, **kw))
    assert resumed["total_steps"] == 4000 and [p["hyperparams"] for p in resumed["grid"]] == [
        {"eps_end": 0.05}, {"eps_end": 0.5}]
    for label in ("eps_end_0.05", "eps_end_0.5"):
        steps = [r["step"] for r in read_jsonl(tmp_path / "sweep" / label / "metrics.jsonl")]
        assert steps == sorted(set(steps)) and steps[-1] == 4000


def test_cli_seeds_report_the_mean_and_std_and_each_seed(tmp_path):
    """Several seeds without a sweep: the closing lines give the mean ± std over seeds, then each seed's run."""
    logdir = tmp_path / "seeds"
    done = subprocess.run([sys.executable, "-m", "jaxdp.cli", "train", "--no-progress", "--no-tensorboard",
                           "--algo", "a2c", "--total-steps", str(128 * 60), "--eval-episodes", "1",
                           "--seeds", "0", "1", "--logdir", str(logdir)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.strip().splitlines()
    summary = json.loads((logdir / "summary.json").read_text())
    assert out[0].startswith("jaxdp train: 2 seeds of 7680 steps in ")
    final, greedy = summary["final_return_over_seeds"], summary["eval_return_over_seeds"]
    assert out[1].strip() == (f"mean ± std over seeds: final return {round(final['mean'], 1)} ± "
                              f"{round(final['std'], 1)}, greedy eval {round(greedy['mean'], 1)} ± "
                              f"{round(greedy['std'], 1)} (95% confidence intervals in summary.json)")
    assert [line.strip() for line in out[2:]] == [
        f"seed {r['seed']}: final return {round(r['final_return'], 1)}, greedy eval {round(r['eval_return'], 1)}"
        for r in summary["seeds"]]
    assert [r["seed"] for r in summary["seeds"]] == [0, 1]


def test_atari_seeds_initialise_without_hanging_and_as_each_seed_alone(tmp_path):
    """`jaxdp train --env Pong-v5 --seeds 0 1` hung in its init (2 of 2 tries): the orthogonal initialisers' QR
    of a batch of seeds is LAPACK's batched geqrf, which jaxlib 0.10 on CPU splits over the thread pool running it,
    and two at once waited for each other. jaxdp's orthogonal initialiser draws one seed at a time under vmap; each
    lane's parameters equal the single-seed run's. In a subprocess, so that a hang fails this test instead of the
    session."""
    script = """
import jax, numpy as np
from jaxdp import train
from jaxdp.config import TrainConfig, validate
cfg = validate(TrainConfig(algo="a2c", env="Pong-v5", total_steps=100_000, seeds=(0, 1)))
lanes = train.make_train(cfg).init(train.seed_keys(cfg))
for r, seed in enumerate(cfg.seeds):
    one = validate(TrainConfig(algo="a2c", env="Pong-v5", total_steps=100_000, seeds=(seed,)))
    alone = train.make_train(one).init(train.seed_keys(one))
    for a, b in zip(jax.tree.leaves(lanes.params), jax.tree.leaves(alone.params)):
        np.testing.assert_array_equal(np.asarray(a[r]), np.asarray(b[0]))
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
