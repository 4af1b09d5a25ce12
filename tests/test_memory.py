"""Memory a run can allocate (jaxdp.memory) and the DQN replays checked against it before any work.

A run whose replays exceed the memory left can only fail after it has started, when they are allocated and
zeroed or later: ``--seeds 0 1 2 3`` of Atari DQN asks for 4 x 7.07 GB, more than a 24 GB machine holds.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxdp import envs as envs_lib
from jaxdp import memory
from jaxdp import train as train_lib
from jaxdp.agents import replay
from jaxdp.config import ConfigError, TrainConfig, validate


def write(folder, **files):
    for name, text in files.items():
        (folder / name).write_text(text)


def test_host_memory_is_the_available_memory_bounded_by_the_cgroup(monkeypatch):
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < memory.host_available_bytes() <= total
    monkeypatch.setattr(memory, "cgroup_available_bytes", lambda: 12_345)
    assert memory.host_available_bytes() == 12_345  # a job's limit below the host's free memory is what counts
    monkeypatch.setattr(memory, "cgroup_available_bytes", lambda: 1 << 62)
    assert memory.host_available_bytes() <= total


def test_cgroup_limits_v2_and_v1(tmp_path, monkeypatch):
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir(), v1.mkdir()
    monkeypatch.setattr(memory, "_cgroup_dirs", lambda: [("v2", str(v2))])
    # The limit less what is used, the page cache the kernel can drop counted as free.
    write(v2, **{"memory.max": "8000000000\n", "memory.current": "3000000000\n",
                 "memory.stat": "anon 2000000000\ninactive_file 1000000000\n"})
    assert memory.cgroup_available_bytes() == 8_000_000_000 - 2_000_000_000
    write(v2, **{"memory.max": "max\n"})  # no limit
    assert memory.cgroup_available_bytes() is None
    monkeypatch.setattr(memory, "_cgroup_dirs", lambda: [("v1", str(tmp_path / "missing")), ("v1", str(v1))])
    write(v1, **{"memory.limit_in_bytes": "4000000000\n", "memory.usage_in_bytes": "1500000000\n",
                 "memory.stat": "cache 600000000\ntotal_inactive_file 500000000\n"})
    assert memory.cgroup_available_bytes() == 4_000_000_000 - 1_000_000_000
    write(v1, **{"memory.limit_in_bytes": "9223372036854771712\n"})  # v1's "no limit"
    assert memory.cgroup_available_bytes() is None


def test_this_process_cgroup_folders_are_under_sys_fs_cgroup():
    for version, folder in memory._cgroup_dirs():
        assert version in ("v1", "v2") and folder.startswith("/sys/fs/cgroup"), folder


def test_available_bytes_on_cpu_is_the_host_s():
    free, where = memory.available_bytes()
    assert free > 0 and where == "available on this host"
    assert memory.gigabytes(7_068_000_016) == "7.07 GB" and memory.gigabytes(14_136_000_000_000) == "14.1 TB"


PONG = envs_lib.make_spec("Pong-v5", 1)


def dqn(**kw) -> TrainConfig:
    return validate(TrainConfig(**{"algo": "dqn", "env": "Pong-v5", **kw}))


def one_replay(cfg: TrainConfig) -> int:
    capacity, stack = train_lib.replay_layout(cfg, PONG)
    return replay.bytes_required(capacity, PONG.obs_shape, stack, PONG.obs_dtype, cfg.envs_per_worker)


@pytest.mark.parametrize("kw, replays, layout", [
    (dict(seeds=(0, 1, 2, 3)), 4, "(4 seeds)"),
    (dict(seeds=(0, 1), strategy="sync", workers=2), 4, "(2 seeds x 2 workers)"),
    (dict(seeds=(0, 1), sweep=(("lr", (1e-4, 2e-4)),), strategy="sync", workers=2), 8,
     "(2 sweep points x 2 seeds x 2 workers)"),
    (dict(runtime="async_sim", strategy="async", workers=3), 3, "(3 workers)"),
    (dict(runtime="mpi", strategy="async"), 1, None),  # one worker's replay per process
    (dict(runtime="distributed", strategy="sync"), 1, None),
])
def test_replays_of_one_memory_are_refused_when_they_exceed_it(kw, replays, layout):
    cfg = dqn(**kw)
    one = one_replay(cfg)
    assert one == 1_000_000 * (84 * 84 + 12) + 8 + 4 * 4  # the Atari default: 1M transitions, each frame once
    train_lib.check_replay_memory(cfg, PONG, available=(replays * one, "available here"))  # exactly fits
    with pytest.raises(ConfigError) as refused:
        train_lib.check_replay_memory(cfg, PONG, available=(replays * one - 1, "available here"))
    message = str(refused.value)
    assert message.startswith("the default --buffer-size 1000000: ")
    assert "lower --buffer-size" in message and "available here" in message
    if layout is None:
        assert "a DQN replay of 1000000 transitions on Pong-v5 takes 7.07 GB" in message
    else:
        assert f"{replays} DQN replays {layout} of 1000000 transitions" in message
        assert f"({memory.gigabytes(one)} each)" in message and "at once" in message


def test_replay_memory_check_reads_the_given_capacity_and_only_dqn():
    cfg = dqn(buffer_size=50_000)
    with pytest.raises(ConfigError, match="^--buffer-size 50000: a DQN replay of 50000 transitions"):
        train_lib.check_replay_memory(cfg, PONG, available=(one_replay(cfg) - 1, "x"))
    # The lecture's ablation keeps only the latest steps: max(batch, 8 steps of every env).
    ablation = dqn(replay=False, batch_size=64)
    assert train_lib.replay_layout(ablation, PONG) == (64, 4)
    train_lib.check_replay_memory(ablation, PONG, available=(one_replay(ablation), "x"))
    a2c = validate(TrainConfig(algo="a2c", env="Pong-v5"))
    train_lib.check_replay_memory(a2c, PONG, available=(0, "x"))  # no replay at all


def test_make_train_refuses_replays_beyond_memory_before_allocating_them(monkeypatch, tmp_path):
    """From Python too: make_train raises before any lane (and its replay) exists."""
    cfg = validate(TrainConfig(algo="dqn", env="CartPole-v1", seeds=(0, 1), total_steps=20_000,
                               logdir=str(tmp_path / "run")))
    spec = envs_lib.make_spec("CartPole-v1", 1)
    needed = 2 * replay.bytes_required(10_000, spec.obs_shape, 1, spec.obs_dtype, cfg.envs_per_worker)
    assert needed == 2 * (10_000 * (4 * 4 + 12) + 8 + 4)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: (needed - 1, "available on this host"))
    with pytest.raises(ConfigError, match=r"2 DQN replays \(2 seeds\) of 10000 transitions on CartPole-v1"):
        train_lib.make_train(cfg)
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: (needed, "available on this host"))
    trainer = train_lib.make_train(cfg)
    lanes = trainer.init(train_lib.seed_keys(cfg))
    frames = lanes.replay.frames
    assert frames.shape[:3] == (2, 1, 10_000 // cfg.envs_per_worker) and frames.dtype == np.float32


def test_the_replays_of_processes_that_share_a_memory_are_summed_there():
    cfg = dqn(runtime="mpi", strategy="async")
    one = one_replay(cfg)
    # mpirun -n 5 over two hosts: rank 0 (the parameter server) holds no replay.
    fits = [("host a", 3 * one, False), ("host a", 3 * one, True), ("host a", 3 * one, True),
            ("host b", 2 * one, True), ("host b", 2 * one, True)]
    train_lib.check_shared_replay_memory(cfg, PONG, fits)
    # Host b's processes saw different free memory: the least counts, and the message names b.
    short = fits[:3] + [("host b", 2 * one, True), ("host b", 2 * one - 1, True)]
    with pytest.raises(ConfigError) as refused:
        train_lib.check_shared_replay_memory(cfg, PONG, short)
    assert str(refused.value) == (
        f"the default --buffer-size 1000000: 2 DQN replays (one per worker process on host b) of 1000000 transitions "
        f"on Pong-v5 take {memory.gigabytes(2 * one)} ({memory.gigabytes(one)} each), more than the "
        f"{memory.gigabytes(2 * one - 1)} available there; lower --buffer-size or start fewer processes on each host")
    # A parameter server's host with room for its workers only.
    train_lib.check_shared_replay_memory(cfg, PONG, [("host a", one, False), ("host a", one, True)])
    # jax.distributed on accelerators: one device per process, each its own memory.
    gpus = [(f"the H100 of process {i} (host a)", one, True) for i in range(3)]
    train_lib.check_shared_replay_memory(cfg, PONG, gpus)
    with pytest.raises(ConfigError, match=r"a DQN replay of 1000000 transitions on Pong-v5 takes 7.07 GB, more than "
                                          r"the 7.07 GB available on the H100 of process 2 \(host a\)"):
        train_lib.check_shared_replay_memory(cfg, PONG, gpus[:2] + [("the H100 of process 2 (host a)", one - 1, True)])
    a2c = validate(TrainConfig(algo="a2c", env="Pong-v5", runtime="mpi", strategy="async"))
    train_lib.check_shared_replay_memory(a2c, PONG, [("host a", 0, True)] * 4)  # no replays


def test_make_train_fn_counts_its_lanes(monkeypatch):
    """The pure train function allocates a replay per vmapped call (lane) and worker, inside one program."""
    cfg = validate(TrainConfig(algo="dqn", env="CartPole-v1", total_steps=20_000, strategy="sync", workers=2))
    spec = envs_lib.make_spec("CartPole-v1", 1)
    one = replay.bytes_required(10_000, spec.obs_shape, 1, spec.obs_dtype, cfg.envs_per_worker)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: (6 * one - 1, "available on this host"))
    with pytest.raises(ConfigError, match=r"6 DQN replays \(3 lanes x 2 workers\) .* or train fewer lanes and "
                                          r"workers at once"):
        train_lib.make_train_fn(cfg, lanes=3)
    train_lib.make_train_fn(cfg, lanes=2)  # 4 replays fit
