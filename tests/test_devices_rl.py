"""RL on the devices runtime: one worker per device under ``shard_map`` computes what the vmap runtime computes.

The devices trainer gives every worker its own envpool pool (stepped only by that worker's device, through a
``lax.switch`` on the mesh index) seeded exactly like that worker's lanes of the vmap runtime's single pool, so the
same seed must give the same episodes and -- up to float rounding of the collectives -- the same parameters, for
every strategy and a seed sweep (2 seeds x 2 workers), and a learning-rate sweep (2 rates x 2 seeds x 2 workers).
The devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` before JAX starts, so the comparison runs in a
subprocess (this file is the script); the command-line tests check that ``jaxdp train --runtime devices`` sets that flag
itself, resumes, and refuses more workers than devices with one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

CASES = {  # name: TrainConfig overrides (CartPole-v1, 2 workers, seeds 0 and 1)
    "a2c-sync": dict(algo="a2c", strategy="sync"),
    "a2c-dpsgd": dict(algo="a2c", strategy="dpsgd", local_steps=2),
    "a2c-async": dict(algo="a2c", strategy="async", max_delay=2),
    "dqn-sync": dict(algo="dqn", strategy="sync"),
    "dqn-hogwild": dict(algo="dqn", strategy="hogwild", threads=2),
    # A hyperparameter sweep: 2 learning rates x 2 seeds = 4 lanes per worker, each with its own rate. Rates up to
    # the default (2e-3), for which the tolerances below hold: at 4e-3 the all-reduce's rounding grew to 3.5e-5 in
    # 2 of 512 weights of one layer after 20 updates (episodes and losses still identical).
    "a2c-sync-lr-sweep": dict(algo="a2c", strategy="sync", sweep=(("lr", (5e-4, 2e-3)),)),
}
CHUNKS, CHUNK_ITERATIONS = 4, 5


def _run_case(runtime: str, overrides: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxdp import train as train_lib
    from jaxdp.config import TrainConfig, validate

    cfg = validate(TrainConfig(env="CartPole-v1", runtime=runtime, workers=2, num_envs=4, total_steps=40_000,
                               learning_starts=1_000, seeds=(0, 1), progress=False, tensorboard=False, **overrides))
    trainer = train_lib.make_train(cfg, chunk_iterations=CHUNK_ITERATIONS)
    handle, lanes = trainer.initial_handle(), trainer.init(train_lib.seed_keys(cfg))
    initial = jax.device_get(lanes.params)
    iteration = 0
    if trainer.warmup is not None:
        handle, lanes, _ = trainer.warmup(handle, lanes, trainer.warmup_iterations)
        iteration = trainer.warmup_iterations
    infos, losses = [], []
    for _ in range(CHUNKS):
        handle, lanes, (info, metrics) = trainer.chunk(handle, lanes, jnp.int32(iteration), CHUNK_ITERATIONS)
        iteration += CHUNK_ITERATIONS
        infos.append(jax.device_get(info))
        losses.append(jax.device_get(metrics["loss"]))
    out = {f"param/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(jax.device_get(lanes.params)))}
    out.update({f"initial/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(initial))})
    out["finished"] = np.stack([i.finished for i in infos])
    out["returns"] = np.stack([i.returns for i in infos])
    out["loss"] = np.stack(losses)
    if runtime == "devices":
        leaf = jax.tree.leaves(lanes.params)[0]
        out["num_shards"] = np.asarray(len({s.device for s in leaf.addressable_shards}))
    return out


def _script(path: str) -> None:
    results = {}
    for name, overrides in CASES.items():
        for runtime in ("vmap", "devices"):
            for key, value in _run_case(runtime, overrides).items():
                results[f"{name}/{runtime}/{key}"] = value
    np.savez(path, **results)


def _env(**extra) -> dict:
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = os.pathsep.join([repo_root, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("devices_rl") / "results.npz"
    completed = subprocess.run([sys.executable, __file__, str(path)], capture_output=True, text=True, timeout=900,
                               env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert completed.returncode == 0, completed.stderr[-4000:]
    with np.load(path) as data:
        return dict(data)


@pytest.mark.parametrize("name", sorted(CASES))
def test_devices_runtime_matches_vmap_runtime(results, name):
    vmap = {k.split("/", 2)[2]: v for k, v in results.items() if k.startswith(f"{name}/vmap/")}
    dev = {k.split("/", 2)[2]: v for k, v in results.items() if k.startswith(f"{name}/devices/")}
    assert int(dev.pop("num_shards")) == 2  # the workers really live on two devices
    assert set(vmap) == set(dev)
    # The same environments, seeded the same: identical episodes, step for step.
    np.testing.assert_array_equal(dev["finished"], vmap["finished"])
    np.testing.assert_array_equal(dev["returns"], vmap["returns"])
    assert dev["finished"].any()  # episodes did end within the compared window
    np.testing.assert_allclose(dev["loss"], vmap["loss"], rtol=1e-4, atol=1e-6)
    moved = 0.0
    for key in (k for k in vmap if k.startswith("param/")):
        runs = 4 if "sweep" in name else 2
        assert dev[key].shape[:2] == (runs, 2)  # [runs (points x seeds), workers, ...]
        np.testing.assert_allclose(dev[key], vmap[key], rtol=1e-4, atol=1e-5, err_msg=key)
        moved = max(moved, float(np.max(np.abs(vmap[key] - vmap[key.replace("param/", "initial/")]))))
    assert moved > 1e-3  # training moved the parameters: the comparison is not of two initialisations


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "jaxdp.cli", "train", "--no-progress", "--no-tensorboard", *args],
                          capture_output=True, text=True, timeout=timeout, env=env or _env())


def test_cli_runs_devices_runtime_and_resumes(tmp_path):
    """No XLA_FLAGS given: ``jaxdp train --runtime devices`` provides the host devices itself."""
    env = _env()
    env.pop("XLA_FLAGS", None)
    logdir = str(tmp_path / "run")
    common = ["--algo", "a2c", "--strategy", "sync", "--runtime", "devices", "--workers", "2", "--num-envs", "8",
              "--logdir", logdir, "--eval-episodes", "1"]
    first = _cli(*common, "--total-steps", "60000", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _cli(*common, "--total-steps", "120000", "--resume", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(open(os.path.join(logdir, "summary.json")).read())
    assert summary["config"]["runtime"] == "devices"
    assert summary["total_steps"] == 120_000 - 120_000 % 128  # 2 workers x 8 envs x 8 steps
    steps = [json.loads(line)["step"] for line in open(os.path.join(logdir, "metrics.jsonl"))]
    assert steps == sorted(set(steps)) and steps[-1] == summary["total_steps"]
    assert summary["eval_return"] is not None and summary["final_return"] > 20


RESTORE_ON_DEVICES = """
import sys, jax, numpy as np
from jaxdp import loop, train as train_lib
from jaxdp.config import TrainConfig, validate
cfg = validate(TrainConfig(algo="dqn", env="CartPole-v1", total_steps=8_000, logdir=sys.argv[1], learning_starts=1_000,
                           progress=False, eval_episodes=0, tensorboard=False, runtime="devices", strategy="sync",
                           workers=2))
loop.run(cfg)
trainer = train_lib.make_train(cfg)
lanes = trainer.init(train_lib.seed_keys(cfg))
by_orbax, _ = loop.restore_checkpoint(loop._checkpoint_manager(sys.argv[1]), lanes, in_place_bytes=1 << 62)
in_place, _ = loop.restore_checkpoint(loop._checkpoint_manager(sys.argv[1]), lanes, in_place_bytes=0)
data = lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
for a, b in zip(jax.tree.leaves(by_orbax), jax.tree.leaves(in_place)):
    assert a.sharding == b.sharding, (a.sharding, b.sharding)
    np.testing.assert_array_equal(np.asarray(data(a)), np.asarray(data(b)))
replay = jax.tree.leaves(in_place.replay)[0]
print(len({s.device for s in replay.addressable_shards}))
"""


def test_a_replay_restored_in_place_keeps_its_layout_over_devices(tmp_path):
    """loop.restore_checkpoint reads a large leaf (a DQN replay) in slices into one buffer; over two devices the
    buffer is laid out as the run's own replay is, one worker's share on each device, with the same values."""
    done = subprocess.run([sys.executable, "-c", RESTORE_ON_DEVICES, str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=600, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "2"


def test_cli_refuses_more_workers_than_devices(tmp_path):
    logdir = tmp_path / "never"
    done = _cli("--runtime", "devices", "--strategy", "sync", "--workers", "3", "--logdir", str(logdir),
                env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"), timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "--workers 3 needs 3 devices, found 2 cpu" in lines[0] and "--runtime vmap" in lines[0]
    assert not logdir.exists()


if __name__ == "__main__":
    _script(sys.argv[1])
