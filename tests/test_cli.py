"""Tests of the ``jaxdp`` command line: help, and bad input rejected before any work.

A bad option or value must stop the CLI with exit status 2, exactly one line on stderr that names the
option, no traceback, and no log directory (nor any file in an existing one). All of this happens before
``jaxdp.train`` is imported, so these tests run in-process through :func:`jaxdp.cli.main` (no JAX compile);
two of them run the real ``python -m jaxdp.cli`` process to check what a user sees end to end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from jaxdp import cli
from jaxdp.config import TrainConfig, flag_of

def expected_train_flags() -> list[str]:
    """Every TrainConfig field's option (a sweep's are its fields' own), plus the two other ways to give seeds."""
    flags = [flag_of(f.name) for f in dataclasses.fields(TrainConfig) if f.name != "sweep"]
    return flags + ["--seed", "--num-seeds"]


def run_main(argv: list[str]) -> int:
    """cli.main's exit status, whether it returns it or argparse raises SystemExit."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def test_top_level_help_exits_0_and_names_the_train_command(capsys):
    assert run_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "usage: jaxdp" in out
    assert "Distributed-Parallel SGD" in out  # says which DPSGD this is


def test_train_help_exits_0_and_documents_every_option(capsys):
    assert run_main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    # A flag counts as documented when it appears as a word of the help text.
    words = set(out.replace(",", " ").replace("[", " ").replace("]", " ").split())
    missing = [flag for flag in expected_train_flags() if flag not in words]
    assert not missing, f"jaxdp train --help does not mention {missing}"
    # Defaults are shown (ArgumentDefaultsHelpFormatter): the main job's defaults are visible.
    assert f"(default: {TrainConfig().total_steps})" in out


def test_train_help_shows_no_default_a_reader_would_misread(capsys):
    # argparse would print "(default: True)" beside --no-replay (a store_false flag: the ablation reads as on),
    # "(default: None)" beside --seed and "(default: )" beside --logdir, whose empty value means "decided at run time".
    assert run_main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: True)", "(default: False)", "(default: None)", "(default: )"):
        assert shown not in out, shown
    assert "--no-replay DQN ablation: learn from the latest transitions only --no-target-network" in out
    assert "--seed SEED one seed (default: 0) --seeds" in out
    assert "empty = runs/<algo>_<env>_<strategy>_<time> --log-interval" in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert run_main([]) == 2
    assert "train" in capsys.readouterr().out


# (argv after `train`, the option the error line must name). Every case would otherwise be a valid run.
BAD_INPUTS = [
    (["--env", "NoSuchGame-v5"], "--env"),
    (["--env", "Pendulum-v1"], "--env"),  # continuous actions
    # envpool ids jaxdp cannot play: each was a traceback after the log folder was made.
    # A minibatch larger than the replay's default capacity (10k; 1M on Atari) ran, sampling repeats.
    (["--algo", "dqn", "--batch-size", "20000"], "20000 is larger than the replay's default capacity 10000"),
    (["--algo", "dqn", "--env", "Pong-v5", "--batch-size", "2000000"], "default capacity 1000000 (--buffer-size)"),
    (["--algo", "dqn", "--num-envs", "2000"], "must hold at least 8 steps of --num-envs 2000 (16000)"),
    # REINFORCE's value-loss weight beside a baseline that learns no value: ignored in silence before.
    (["--algo", "reinforce", "--baseline", "mean", "--vf-coef", "0.3"], "--baseline mean learns none"),
    (["--algo", "reinforce", "--baseline", "none", "--vf-coef", "0.5", "1.0"], "--baseline none learns none"),
    # A strategy's or runtime's option given to one that does not read it: each trained, ignoring it in silence.
    (["--strategy", "sync", "--workers", "2", "--global-lr", "0.5"], "--global-lr is for --strategy dpsgd"),
    (["--delay", "fixed"], "--delay is for --strategy async on --runtime vmap or devices"),
    (["--runtime", "async_sim", "--strategy", "async", "--workers", "2", "--max-delay", "3"],
     "--strategy async on --runtime async_sim does not read it"),
    (["--strategy", "async", "--workers", "2", "--threads", "2"], "--threads is for --strategy hogwild"),
    (["--overwrite-prob", "0.1"], "--overwrite-prob is for --strategy hogwild"),
    (["--strategy", "dpsgd", "--workers", "2", "--comm-time", "3"], "--comm-time is for --runtime async_sim"),
    (["--env", "Pong-v5", "--hidden", "32"], "this run's torso is the nature CNN"),  # was ignored in silence
    (["--env", "TicTacToe-v1"], "is a game of 2 players"),
    (["--env", "MiniGrid-Empty-5x5-v0"], "its observation is several arrays (direction, image, mission)"),
    (["--env", "VizdoomCustom-v1"], "envpool cannot make it here"),
    (["--algo", "ppo"], "--algo"),
    (["--strategy", "gossip"], "--strategy"),
    (["--num-envs", "-1"], "--num-envs"),
    (["--num-envs", "four"], "--num-envs"),  # argparse type error: also one line
    (["--total-steps", "2.5e0"], "argument --total-steps: '2.5e0' is not a whole number"),
    (["--buffer-size", "1e400"], "argument --buffer-size: '1e400' is not a whole number"),  # inf
    (["--total-steps", "0"], "--total-steps"),
    (["--workers", "0"], "--workers"),
    (["--rollout-len", "-8"], "--rollout-len"),
    (["--eval-episodes", "-1"], "--eval-episodes"),
    (["--eval-epsilon", "1.5"], "--eval-epsilon must be in [0, 1], got 1.5"),
    (["--lr", "-0.1"], "--lr"),
    (["--gamma", "0"], "--gamma"),
    (["--hidden", "64", "0"], "--hidden"),
    (["--seeds", "1", "1"], "--seeds"),
    (["--num-seeds", "0"], "--num-seeds"),
    (["--algo", "dqn", "--batch-size", "64", "--buffer-size", "32"], "--batch-size"),
    (["--strategy", "sync", "--workers", "2", "--master-batch", "4"], "--master-batch"),
    (["--strategy", "sync", "--workers", "2", "--local-steps", "4"], "--local-steps"),
    (["--strategy", "single", "--workers", "4"], "--workers"),
    (["--total-steps", "100"], "--total-steps"),  # a2c: one iteration is 16 envs x 8 steps = 128
    (["--algo", "dqn", "--total-steps", "5000"], "--learning-starts"),  # learning_starts 10k >= total
    (["--algo", "dqn", "--env", "Pong-v5", "--total-steps", "50000"], "--learning-starts"),  # Atari: 80k
    (["--runtime", "devices", "--strategy", "single"], "--runtime devices"),
    # An option the agent does not read was ignored in silence (CleanRL's scripts take only their own flags).
    (["--algo", "a2c", "--eps-start", "0.5"], "--eps-start"),
    (["--algo", "reinforce", "--no-replay"], "--no-replay"),
    (["--algo", "a2c", "--batch-size", "64"], "--batch-size"),
    (["--algo", "dqn", "--rollout-len", "16"], "--rollout-len"),
    (["--algo", "double_dqn", "--ent-coef", "0.1"], "--ent-coef"),
    (["--algo", "a2c", "--baseline", "value"], "--baseline"),
    (["--algo", "dqn", "--critic", "separate"], "--critic is for A2C / REINFORCE only"),  # a Q-network has no critic
    # The same, given at its default value: passed in silence, as a comparison with the default found nothing.
    (["--algo", "a2c", "--baseline", "mean"], "--baseline is for REINFORCE only"),
    (["--algo", "a2c", "--eps-start", "1.0"], "--eps-start is for DQN only"),
    (["--algo", "dqn", "--rollout-len", "0"], "--rollout-len is for A2C / REINFORCE only"),
    (["--algo", "reinforce", "--vf-coef", "0.5"], "--baseline mean learns none"),
    (["--algo", "reinforce", "--critic", "shared"], "--baseline mean learns none"),
    (["--algo", "dqn", "--no-target-network", "--tau", "1"], "--tau sets the target network"),
    (["--strategy", "sync", "--workers", "2", "--global-lr", "1.0"], "--global-lr is for --strategy dpsgd"),
    (["--env", "Pong-v5", "--hidden", "64", "64"], "this run's torso is the nature CNN"),
    # Counts beyond int32, which the compiled loop holds: an OverflowError in the first jitted call, after --logdir.
    (["--total-steps", "1000000000000"], "--total-steps 1000000000000 is beyond 2147483647"),
    # NaN seconds: no comparison with them is true, so the run never checkpointed before its end.
    (["--checkpoint-interval", "nan"], "--checkpoint-interval must be a positive number of seconds"),
    (["--log-interval", "nan"], "--log-interval must be a positive number of seconds"),
    (["--log-interval", "0"], "--log-interval must be a positive number of seconds"),
    (["--algo", "dqn", "--buffer-size", "2147483648"], "--buffer-size 2147483648 is beyond 2147483647"),
    (["--seed", "3000000000"], "the largest seed of this run is 134217727"),  # envpool's 31-bit env seeds
    (["--seeds", "0", "33554432", "--num-envs", "4", "--strategy", "sync", "--workers", "16"],
     "seed 33554432 is too large"),
    # DQN replays larger than the memory left: the run could only fail after it had started. 2e9 Atari
    # transitions take 14 TB, more than any machine that runs these tests.
    (["--algo", "dqn", "--env", "Pong-v5", "--buffer-size", "2000000000"], "takes 14.1 TB, more than the"),
    (["--critic", "own"], "--critic 'own' is not one of shared, separate"),
    (["--algo", "reinforce", "--baseline", "none", "--critic", "separate"], "--baseline none learns none"),
    # DQN target options the run would ignore: Polyak averaging runs every update, not every --target-update steps.
    (["--algo", "dqn", "--tau", "0.005", "--target-update", "1000"], "--target-update 1000 is the period"),
    (["--algo", "double_dqn", "--no-target-network", "--tau", "0.5"], "--tau sets the target network"),
    (["--algo", "dqn", "--no-target-network", "--target-update", "100"], "--target-update sets the target"),
    # The buffer is sized to the batch without replay: --buffer-size was ignored in silence.
    (["--algo", "dqn", "--no-replay", "--buffer-size", "10000"], "--buffer-size 10000 sizes the replay, which "
                                                                  "--no-replay turns off"),
    # A CNN torso on vector observations failed inside the first trace, after --logdir was made (traceback, exit 1).
    (["--torso", "nature"], "--torso nature"),
    (["--algo", "dqn", "--torso", "a3c"], "--torso a3c"),
    (["--env", "FrozenLake-v1", "--torso", "nature"], "--torso nature"),  # one-hot states are vectors too
    # Hyperparameter sweeps: every value is checked as the option's own value, before any work.
    (["--lr", "1e-3", "-1"], "--lr"),
    (["--lr", "1e-3", "1e-3"], "--lr"),  # duplicates
    (["--lr", "1e-3", "nan"], "--lr"),
    (["--algo", "dqn", "--eps-fraction", "0.5", "1.5"], "--eps-fraction"),
    (["--algo", "a2c", "--eps-end", "0.1", "0.2"], "--eps-end"),  # A2C has no epsilon schedule
    (["--gamma", "0.99", "0"], "--gamma"),
    (["--algo", "dqn", "--ent-coef", "0.01", "0.1"], "--ent-coef"),  # DQN's loss has no entropy term
    (["--strategy", "async", "--max-delay", "1", "2"], "--max-delay"),  # a uniform delay: not each run's alone
    (["--strategy", "sync", "--workers", "2", "--delay", "fixed", "--max-delay", "1", "2"], "--max-delay"),
    (["--lr", "1e-3", "2e-3", "--runtime", "async_sim", "--strategy", "async", "--workers", "2"],
     "--runtime async_sim trains one run: give each option one value per command (--runtime vmap and devices sweep)"),
    (["--seeds", "0", "1", "--runtime", "async_sim", "--strategy", "async", "--workers", "2"],
     "--runtime async_sim trains one run: give one --seed per command (--runtime vmap and devices train them"),
    # A job whose size sets the workers: a --workers given must be its size. Run outside mpirun, `--workers 2`
    # trained one worker in silence (a job of one process).
    (["--runtime", "mpi", "--strategy", "sync", "--workers", "2"], "needs 2 MPI processes, this job has 1"),
    (["--runtime", "mpi", "--strategy", "dpsgd", "--workers", "2"], "needs 3 MPI processes (rank 0 serves"),
    # B and M given as 1 where they are not read: ignored in silence before.
    (["--strategy", "sync", "--workers", "2", "--local-steps", "1"], "--local-steps is for --strategy dpsgd"),
    (["--runtime", "mpi", "--strategy", "sync", "--master-batch", "1"], "--master-batch is for an asynchronous master"),
    (["--runtime", "distributed", "--strategy", "sync", "--workers", "3", "--coordinator", "localhost:1234",
      "--num-processes", "2", "--process-id", "0"], "--workers 3: the job has 2 processes"),
]


@pytest.mark.parametrize("argv,option", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_naming_the_option(argv, option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default --logdir would land in tmp_path/runs
    for name in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "SLURM_NTASKS",
                 "SLURM_PROCID"):  # not a rank of a launcher's job, whatever ran the tests
        monkeypatch.delenv(name, raising=False)
    logdir = tmp_path / "run"
    rc = run_main(["train", *argv, "--logdir", str(logdir), "--no-progress"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2
    assert len(lines) == 1, captured.err
    assert option in lines[0], lines[0]
    assert lines[0].startswith("jaxdp train: error:")
    assert "Traceback" not in captured.err + captured.out
    assert not logdir.exists()
    assert os.listdir(tmp_path) == []


def test_gymnasium_only_env_is_rejected_before_any_work(tmp_path, capsys):
    """Taxi-v4 is a gymnasium id (envpool has no Taxi); training steps envpool's XLA API only.

    Bug: validate_env_id accepts every gymnasium id, so the run starts, creates --logdir and dies in
    make_xla with a traceback (``make_xla: 'Taxi-v4' is a gymnasium id``).
    """
    from jaxdp.envs import backend_of

    assert backend_of("Taxi-v4") == "gymnasium"
    logdir = tmp_path / "run"
    try:
        rc = run_main(["train", "--env", "Taxi-v4", "--total-steps", "1024", "--logdir", str(logdir),
                       "--no-progress", "--eval-episodes", "0"])
    except ValueError as e:  # what the bug looks like in-process
        pytest.fail(f"--env Taxi-v4 passed validation and failed inside training: {e}")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--env" in err[0]
    assert not logdir.exists()


@pytest.mark.parametrize("where", ["a file", "below a file", "a virtual filesystem"])
def test_a_logdir_that_cannot_be_written_exits_2_before_any_work(where, tmp_path, capsys):
    """A --logdir that is a file, lies below one, or cannot be made (/proc takes no new folders, even from root)
    is one line naming --logdir and exit 2, before any env or compile; nothing is created."""
    if where == "a virtual filesystem" and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    logdir = {"a file": blocker, "below a file": blocker / "run", "a virtual filesystem": "/proc/jaxdp-run"}[where]
    rc = run_main(["train", "--logdir", str(logdir), "--no-progress", "--total-steps", "1024"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--logdir" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["blocker"] and blocker.read_text() == ""


def test_resume_without_a_run_exits_2_and_creates_nothing(tmp_path, capsys):
    logdir = tmp_path / "never_ran"
    rc = run_main(["train", "--resume", "--logdir", str(logdir), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--resume" in err[0]
    assert not logdir.exists()


def test_resume_without_a_logdir_asks_for_one(tmp_path, monkeypatch, capsys):
    # It used to name the fresh runs/<algo>_<env>_<strategy>_<time> it had made up: "no checkpoints in" that.
    monkeypatch.chdir(tmp_path)
    rc = run_main(["train", "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["jaxdp train: error: --resume needs --logdir, the folder of the run to continue"]
    assert os.listdir(tmp_path) == []


def test_resume_with_an_empty_checkpoints_dir_exits_2(tmp_path, capsys):
    """A run killed before its first checkpoint leaves ``checkpoints/`` empty (orbax creates the directory
    when the manager is built, at the start of the run). --resume must be refused up front like any other
    missing checkpoint, not after building and compiling the run.

    Bug: resolve_logdir only checks that ``checkpoints/`` is a directory; the run then starts, compiles
    and stops in loop.run with ``SystemExit("... no checkpoint ...")`` (exit status 1).
    """
    logdir = tmp_path / "killed_early"
    (logdir / "checkpoints").mkdir(parents=True)
    (logdir / "metrics.jsonl").write_text("")
    before = sorted(p.relative_to(logdir) for p in logdir.rglob("*"))
    rc = run_main(["train", "--resume", "--logdir", str(logdir), "--no-progress", "--eval-episodes", "0",
                   "--total-steps", "1024"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, f"exit status {rc}, stderr {err}"
    assert len(err) == 1 and "--resume" in err[0]
    assert sorted(p.relative_to(logdir) for p in logdir.rglob("*")) == before


def _saved_run(logdir, argv: list[str]):
    """A run's folder as loop.run leaves it after a checkpoint: config.json, metrics.jsonl, checkpoints/<step>/."""
    from jaxdp import atomic

    cfg = cli.config_from_args(cli.build_parser().parse_args(["train", *argv, "--logdir", str(logdir)]))
    (logdir / "checkpoints" / "128").mkdir(parents=True)
    (logdir / "metrics.jsonl").write_text('{"step": 128}\n')
    atomic.write_json(logdir / "config.json", dataclasses.asdict(cfg))
    return {p: p.stat().st_mtime_ns for p in logdir.rglob("*")}


@pytest.mark.parametrize("change,option", [
    (["--lr", "3e-3"], "--lr"),
    (["--seeds", "0", "1"], "--seeds"),  # another lane layout: the checkpoint would not restore
    (["--lr", "1e-3", "3e-3"], "the run being resumed swept nothing, this command sweeps --lr 0.001 0.003"),
    (["--algo", "reinforce"], "--algo"),
    (["--ent-coef", "0.02"], "--ent-coef"),
])
def test_resume_with_other_settings_exits_2_naming_the_option(change, option, tmp_path, capsys):
    """--resume continues THE run in --logdir: a setting that differs (but for its length and reporting) is
    refused before any work, naming the option, instead of failing inside orbax or continuing another run."""
    logdir = tmp_path / "run"
    before = _saved_run(logdir, ["--lr", "1e-3"])
    rc = run_main(["train", "--resume", "--logdir", str(logdir), "--no-progress", "--lr", "1e-3", *change])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("jaxdp train: error: --resume: " + option), err[0]
    assert {p: p.stat().st_mtime_ns for p in logdir.rglob("*")} == before


def test_resume_may_change_the_length_and_reporting(tmp_path):
    logdir = tmp_path / "run"
    _saved_run(logdir, ["--lr", "1e-3"])
    argv = ["train", "--resume", "--logdir", str(logdir), "--lr", "1e-3", "--total-steps", "900000",
            "--eval-episodes", "0", "--no-progress", "--no-tensorboard", "--log-interval", "9",
            "--checkpoint-interval", "9", "--eval-epsilon", "0.05"]
    cfg = cli.resolve_logdir(cli.config_from_args(cli.build_parser().parse_args(argv)))  # raises if refused
    assert cfg.total_steps == 900_000 and cfg.resume


def test_resume_alone_continues_the_run_as_it_was(tmp_path, monkeypatch, capsys):
    """``jaxdp train --resume --logdir DIR`` takes every option it does not give from the run (config.json). It
    compared the defaults with the run's instead: a DQN run was refused as "--algo is 'a2c' here but 'dqn'", so
    the whole command had to be typed again, and a run resumed without its --total-steps went on to 500k."""
    from jaxdp import train as train_lib

    logdir = tmp_path / "run"
    _saved_run(logdir, ["--algo", "dqn", "--lr", "1e-3", "--total-steps", "20000", "--no-tensorboard", "--gamma",
                        "0.9", "0.99", "--seeds", "3", "4", "--no-progress"])
    started: list[TrainConfig] = []
    monkeypatch.setattr(train_lib, "run", lambda cfg: started.append(cfg))  # a summary of None: nothing printed
    assert run_main(["train", "--resume", "--logdir", str(logdir)]) == 0
    assert run_main(["train", "--resume", "--logdir", str(logdir), "--total-steps", "40000", "--seeds", "3", "4",
                     "--gamma", "0.9", "0.99", "--eval-episodes", "0"]) == 0
    alone, given = started
    assert (alone.algo, alone.lr, alone.total_steps, alone.seeds) == ("dqn", 1e-3, 20000, (3, 4))
    assert alone.sweep == (("gamma", (0.9, 0.99)),) and alone.resume and alone.logdir == str(logdir)
    # The progress bar and TensorBoard are this invocation's: their flags can only turn them off.
    assert alone.progress and alone.tensorboard
    assert (given.total_steps, given.eval_episodes, given.algo, given.sweep) == (40000, 0, "dqn", alone.sweep)
    # A given option is still compared with the run's: the sweep's values, and a setting outside the length.
    for change, said in ((["--gamma", "0.9"], "swept --gamma 0.9 0.99, this command sweeps nothing"),
                         (["--lr", "3e-3"], "--lr is 0.003 here but 0.001")):
        assert run_main(["train", "--resume", "--logdir", str(logdir), *change]) == 2, change
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
    assert len(started) == 2


def test_an_async_sim_run_is_resumed_at_its_own_length(tmp_path, capsys):
    """async_sim draws its schedule for the whole run: on a resume its --total-steps is refused like any setting,
    and the list of what may change leaves it out."""
    logdir = tmp_path / "run"
    sim = ["--runtime", "async_sim", "--strategy", "dpsgd", "--workers", "2", "--total-steps", "50000"]
    before = _saved_run(logdir, sim)
    for change, option in ((["--total-steps", "90000"], "--total-steps"), (["--lr", "3e-3"], "--lr")):
        rc = run_main(["train", "--resume", "--logdir", str(logdir), "--no-progress", *sim, *change])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("jaxdp train: error: --resume: " + option), err
        assert ("--total-steps" in err[0]) == (option == "--total-steps"), err[0]
    assert {p: p.stat().st_mtime_ns for p in logdir.rglob("*")} == before
    argv = ["train", "--resume", "--logdir", str(logdir), *sim, "--eval-episodes", "0", "--log-interval", "9"]
    assert cli.resolve_logdir(cli.config_from_args(cli.build_parser().parse_args(argv))).resume


def test_a_multi_process_job_is_resumed_at_its_own_size_wherever_it_meets(tmp_path):
    """The mpi and distributed runtimes save ``workers`` as the job's size (their --workers is ignored): the command
    line does not compare it, the started job does (``cfg.workers`` is then the job's size). A restarted
    jax.distributed job may meet at another --coordinator, and each of its processes has its own --process-id."""
    from jaxdp import config as config_lib

    logdir = tmp_path / "run"
    first = ["--runtime", "distributed", "--strategy", "sync", "--algo", "a2c", "--num-processes", "2",
             "--coordinator", "10.0.0.1:1234", "--process-id", "0"]
    cfg = cli.config_from_args(cli.build_parser().parse_args(["train", *first, "--logdir", str(logdir)]))
    config_lib.save_run_config(dataclasses.replace(cfg, workers=2), str(logdir))  # as jaxdp.train saves it
    (logdir / "checkpoint.npz").write_bytes(b"")
    argv = ["train", "--runtime", "distributed", "--strategy", "sync", "--algo", "a2c", "--num-processes", "2",
            "--coordinator", "10.0.0.2:999", "--process-id", "1", "--resume", "--logdir", str(logdir)]
    resumed = cli.resolve_logdir(cli.config_from_args(cli.build_parser().parse_args(argv)))  # raises if refused
    assert resumed.workers == 1  # the default, not compared here
    config_lib.check_resumable(dataclasses.replace(resumed, workers=2), str(logdir))
    with pytest.raises(config_lib.ConfigError, match="had 2 workers, this job has 3"):
        config_lib.check_resumable(dataclasses.replace(resumed, workers=3), str(logdir))
    with pytest.raises(config_lib.ConfigError, match="--num-processes is 3"):
        cli.resolve_logdir(dataclasses.replace(resumed, num_processes=3))


@pytest.mark.parametrize("marker", ["metrics.jsonl", "checkpoints"])
def test_existing_run_without_resume_exits_2_and_leaves_it_alone(marker, tmp_path, capsys):
    logdir = tmp_path / "old_run"
    logdir.mkdir()
    if marker == "checkpoints":
        (logdir / "checkpoints").mkdir()
    else:
        (logdir / "metrics.jsonl").write_text('{"step": 128}\n')
    before = {p: p.stat().st_mtime_ns for p in logdir.rglob("*")}
    rc = run_main(["train", "--logdir", str(logdir), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "--logdir" in err[0] and "--resume" in err[0]  # says what to do
    assert {p: p.stat().st_mtime_ns for p in logdir.rglob("*")} == before


# Each option given at its default value to a run that reads it: accepted (the refusals above are of options the run
# does not read, whatever their values).
OPTIONS_AT_THEIR_DEFAULTS = [
    ["--algo", "dqn", "--tau", "1", "--target-update", "500"],  # --tau 1: hard copies, every --target-update steps
    ["--algo", "a2c", "--ent-coef", "0.01", "--vf-coef", "0.5", "--critic", "shared", "--hidden", "64", "64"],
    ["--algo", "reinforce", "--baseline", "value", "--vf-coef", "0.5", "--critic", "shared"],
    ["--strategy", "dpsgd", "--workers", "2", "--global-lr", "1.0", "--local-steps", "1"],
]


@pytest.mark.parametrize("argv", OPTIONS_AT_THEIR_DEFAULTS, ids=" ".join)
def test_options_a_run_reads_are_accepted_at_their_defaults(argv, tmp_path, monkeypatch):
    from jaxdp import train

    started = []
    monkeypatch.setattr(train, "run", lambda cfg: started.append(cfg))  # None: the summary of a non-zero MPI rank
    assert run_main(["train", *argv, "--logdir", str(tmp_path / "run"), "--no-progress"]) == 0
    assert len(started) == 1


def test_a_total_that_whole_iterations_cut_short_is_told_before_training(tmp_path, capsys, monkeypatch):
    """REINFORCE's 500-step rollouts of 3 workers x 8 envs make one iteration 12,000 steps: --total-steps 20000
    trained 12,000, which only the closing line told, once the run was over. A line now says so before training,
    with the number the run then trains; a total that whole iterations keep to within 1% gets no line."""
    argv = ["train", "--algo", "reinforce", "--strategy", "sync", "--workers", "3", "--total-steps", "20000",
            "--eval-episodes", "1", "--no-progress", "--no-tensorboard", "--logdir", str(tmp_path / "cut")]
    assert run_main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("jaxdp train: --total-steps 20000 trains 12000 steps, 1 whole iteration of 12000 (workers x "
                      "num-envs x rollout); a multiple of 12000 trains them all"), err
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["total_steps"] == 12000

    from jaxdp import train

    monkeypatch.setattr(train, "run", lambda cfg: None)
    for kept in (["--total-steps", "500000"],  # A2C: 499,968 steps, 3,906 iterations of 128
                 ["--algo", "dqn", "--total-steps", "10001", "--learning-starts", "1000"]):
        assert run_main(["train", *kept, "--no-progress", "--logdir", str(tmp_path / "kept")]) == 0
        assert "whole iteration" not in capsys.readouterr().err
    assert run_main(["train", "--algo", "dqn", "--num-envs", "8", "--train-frequency", "64", "--total-steps", "1000",
                     "--learning-starts", "100", "--no-progress", "--logdir", str(tmp_path / "dqn")]) == 0
    assert ("--total-steps 1000 trains 960 steps, 15 whole iterations of 64 (workers x num-envs x env steps per "
            "update); a multiple of 64 trains them all") in capsys.readouterr().err


def test_given_fields_names_the_options_given_whatever_their_values():
    assert cli.given_fields(["train"]) == frozenset()
    assert cli.given_fields(["train", "--algo", "a2c", "--baseline", "mean", "--lr", "1e-3", "2e-3", "--seeds", "0",
                             "1", "--no-replay", "--hidden", "64", "64"]) == {"algo", "baseline", "lr", "seeds",
                                                                               "replay", "hidden"}


def test_given_options_counts_an_option_given_at_its_default_on_a_parser_or_a_subparser():
    from jaxdp.cli_args import given_options

    def parser_and_sub():
        parser = argparse.ArgumentParser()
        parser.add_argument("--top", type=int, default=1)
        sub = parser.add_subparsers(dest="command").add_parser("go")
        sub.add_argument("--lr", type=float, default=0.1)
        sub.add_argument("--name", default="x")  # a string default, which argparse would run through its type
        return parser, sub

    parser, sub = parser_and_sub()
    assert given_options(parser, ("top",), ["--top", "1", "go"]) == {"top"}
    parser, sub = parser_and_sub()
    assert given_options(parser, ("lr", "name"), ["go", "--lr", "0.1"], holder=sub) == {"lr"}
    parser, sub = parser_and_sub()
    assert given_options(parser, ("lr", "name"), ["go"], holder=sub) == frozenset()


@pytest.mark.parametrize("argv,seeds", [
    ([], (0,)),
    (["--seed", "5"], (5,)),
    (["--seeds", "0", "1", "2"], (0, 1, 2)),
    (["--num-seeds", "3"], (0, 1, 2)),
])
def test_seed_options_give_the_seeds(argv, seeds):
    args = cli.build_parser().parse_args(["train", *argv])
    assert cli.config_from_args(args).seeds == seeds


def test_counts_may_be_written_as_whole_floats():
    """``--total-steps 1e6``, as run lengths are written in papers and scripts, was an argparse error."""
    args = cli.build_parser().parse_args(["train", "--algo", "dqn", "--total-steps", "1e6", "--buffer-size", "2.5e4",
                                          "--hidden", "1.28e2", "64", "--seeds", "0", "1e1"])
    cfg = cli.config_from_args(args)
    assert (cfg.total_steps, cfg.buffer_size, cfg.hidden, cfg.seeds) == (1_000_000, 25_000, (128, 64), (0, 10))
    assert all(isinstance(v, int) for v in (cfg.total_steps, cfg.buffer_size, *cfg.hidden, *cfg.seeds))


def test_seed_and_seeds_are_exclusive(capsys):
    assert run_main(["train", "--seed", "1", "--seeds", "2", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seeds" in err[0] and "--seed" in err[0]


def test_unknown_command_exits_2_with_one_line(capsys):
    assert run_main(["fly"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fly" in err[0]


def test_validation_imports_no_training_code():
    """Bad input is rejected before jaxdp.train (and so before any JAX compile) is imported."""
    code = ("import sys; from jaxdp import cli; rc = cli.main(['train', '--algo', 'ppo']); "
            "print(rc, 'jaxdp.train' in sys.modules, 'jaxdp.loop' in sys.modules, 'envpool' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False", "False", "False"], out.stdout + out.stderr


def test_the_command_line_loads_jax_only_to_train():
    """``import jaxdp`` loads the strategies (and JAX) on first use: ``jaxdp --help`` took 1.4 s, and a Ctrl-C while
    JAX loaded was raised inside JAX's import, where its garbage-collection hook could swallow it."""
    code = ("import sys, jaxdp.cli; print('jax' in sys.modules); import jaxdp; "
            "print(callable(jaxdp.delayed), 'jax' in sys.modules, 'local_steps' in dir(jaxdp))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True", "True", "True"], out.stdout + out.stderr
    with pytest.raises(AttributeError, match="no attribute 'delay'"):
        import jaxdp

        jaxdp.delay  # noqa: B018


def test_a_signal_before_training_ends_the_command_in_one_line(tmp_path, monkeypatch, capsys):
    """A signal while the command line is checked and JAX loads: one line, 128 + the signal, nothing written, no
    training started (the run's own loop takes the signals over once it starts)."""
    import signal

    from jaxdp import train as train_lib

    checked = cli._checked_config

    def checked_then_signalled(args, argv):
        cfg = checked(args, argv)
        os.kill(os.getpid(), signal.SIGTERM)
        return cfg

    monkeypatch.setattr(cli, "_checked_config", checked_then_signalled)
    monkeypatch.setattr(train_lib, "run", lambda cfg: pytest.fail("training started after the signal"))
    before = signal.getsignal(signal.SIGTERM)
    assert run_main(["train", "--logdir", str(tmp_path / "run"), "--total-steps", "1000"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["jaxdp train: stopped by SIGTERM before training began; nothing was written: run the command "
                   "again"], err
    assert not (tmp_path / "run").exists() and signal.getsignal(signal.SIGTERM) == before


def test_real_process_bad_input_and_help(tmp_path):
    """What a user sees: ``python -m jaxdp.cli``, exit statuses, one line, no traceback."""
    bad = subprocess.run([sys.executable, "-m", "jaxdp.cli", "train", "--workers", "0", "--logdir",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "--workers" in bad.stderr
    assert "Traceback" not in bad.stderr and bad.stdout == ""
    assert os.listdir(tmp_path) == []
    ok = subprocess.run([sys.executable, "-m", "jaxdp.cli", "train", "--help"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and "--total-steps" in ok.stdout and ok.stderr == ""
    # --runtime distributed with nothing to join (no --coordinator, no srun) was jax's traceback; in a process of
    # its own, since it reaches jax.distributed.initialize.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    lone = subprocess.run([sys.executable, "-m", "jaxdp.cli", "train", "--runtime", "distributed", "--strategy", "sync",
                           "--logdir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    lines = lone.stderr.strip().splitlines()
    assert lone.returncode == 2 and len(lines) == 1, lone.stderr[-2000:]
    assert lines[0].startswith("jaxdp train: error: --runtime distributed found no cluster to join")
    assert os.listdir(tmp_path) == []


def test_dqn_on_atari_takes_the_nature_dqn_defaults_for_options_not_given():
    """CleanRL's dqn_atari values (Mnih et al. 2015) for a DQN on an Atari game; what the user gives wins; vector
    observations and actor-critic keep the dataclass defaults."""
    from jaxdp.config import ATARI_DQN_DEFAULTS

    parse = lambda *argv: cli.config_from_args(cli.build_parser().parse_args(["train", *argv]))  # noqa: E731
    pong = parse("--algo", "dqn", "--env", "Pong-v5", "--batch-size", "64")
    assert pong.batch_size == 64  # given
    for field, value in ATARI_DQN_DEFAULTS.items():
        if field != "batch_size":
            assert getattr(pong, field) == value, field
    assert pong.learning_rate == 1e-4 and pong.env_steps_per_update == 1  # 4 envs x 1 step = train frequency 4
    assert parse("--algo", "double_dqn", "--env", "Breakout-v5").learning_starts == 80_000
    defaults = TrainConfig()
    for argv in (["--algo", "dqn", "--env", "CartPole-v1"], ["--algo", "a2c", "--env", "Pong-v5"]):
        cfg = parse(*argv)
        for field in ATARI_DQN_DEFAULTS:
            assert getattr(cfg, field) == getattr(defaults, field), (argv, field)
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "(default: 128; DQN on Atari: 32)" in " ".join(help_text.split())


@pytest.mark.parametrize("fields, message", [
    (dict(seeds=(0.5,)), "--seeds must be integers, got [0.5]"),  # failed in make_xla, after --logdir was made
    (dict(seeds=(True,)), "--seeds must be integers"),
    (dict(hidden=(64.5,)), "--hidden sizes must be integers, got [64.5]"),
    (dict(checkpoint_interval=float("nan")), "--checkpoint-interval must be a positive number of seconds"),
    (dict(total_steps=2**31), "--total-steps 2147483648 is beyond 2147483647"),
])
def test_validate_refuses_from_python_what_the_command_line_cannot_give(fields, message):
    """A TrainConfig built in Python can hold values no flag parses to; validate refuses them before any work."""
    from jaxdp.config import ConfigError, validate

    with pytest.raises(ConfigError) as refused:
        validate(TrainConfig(**fields))
    assert message in str(refused.value)


def test_validate_takes_numpy_integers_and_lists_of_seeds():
    import numpy as np

    from jaxdp.config import validate

    assert validate(TrainConfig(seeds=tuple(np.arange(3)), hidden=[np.int64(32)])).seeds == (0, 1, 2)


def test_version_names_the_libraries_and_machine_behind_the_numbers():
    """``jaxdp --version``: what a summary.json records under provenance, without starting JAX."""
    import jax

    import jaxdp

    done = subprocess.run([sys.executable, "-m", "jaxdp.cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"jaxdp {jaxdp.__version__}"
    assert f"  jax {jax.__version__}" in lines and any(line.startswith("  envpool ") for line in lines)
    assert lines[-1].startswith("  machine: ") and f"{os.cpu_count()} cores" in lines[-1]


@pytest.mark.parametrize("summary,said", [
    # vmap, devices, async_sim: one clock from the start, compilation included.
    ({"wall_seconds": 5.52, "compile_seconds": 1.94, "eval_seconds": 0.11}, "5.5 s (1.9 s of it compiling, then 0.1 s "
                                                                           "of evaluation)"),
    ({"wall_seconds": 5.52, "compile_seconds": 1.94, "eval_seconds": 0.01}, "5.5 s (1.9 s of it compiling)"),
    # mpi, distributed: every rank compiles before the clock starts. Said as one number before, 0.8 s beside a vmap
    # run's 5.5 s, it compared the two runtimes on different clocks.
    ({"wall_seconds": 0.75, "startup_seconds": 7.1, "eval_seconds": 0.09}, "0.8 s after 7.1 s of start-up and "
                                                                          "compilation (then 0.1 s of evaluation)"),
])
def test_the_closing_line_says_what_its_seconds_hold(summary, said):
    assert cli._seconds(summary) == said


@pytest.mark.parametrize("eval_epsilon, seeds, ended, said", [
    (0.0, (0,), 10, None),  # every game ended: nothing to add
    (0.0, (0,), 3, "3 of the 10 evaluation games ended within their time limit; the evaluation's return is their "
                   "mean; a greedy policy can stall a game: --eval-epsilon 0.05 plays ε-greedy games"),
    (0.0, (0, 1), 0, "0 of the 20 evaluation games ended within their time limit; "
                     "a greedy policy can stall a game: --eval-epsilon 0.05 plays ε-greedy games"),
    (0.05, (0,), 9, "9 of the 10 evaluation games ended within their time limit; the evaluation's return is their "
                    "mean"),
])
def test_the_closing_lines_say_when_evaluation_games_did_not_end(eval_epsilon, seeds, ended, said):
    """The evaluation's return averages the games that ended: "greedy eval 12.0" over 3 of 10 games said nothing of
    the 7 a stalled policy played to the time limit (27,000 steps of Breakout each)."""
    cfg = dataclasses.replace(TrainConfig(), eval_episodes=10, eval_epsilon=eval_epsilon, seeds=seeds)
    assert cli._unfinished_evaluation(cfg, {"eval_episodes_ended": ended}) == said
    assert cli._unfinished_evaluation(cfg, {}) is None  # a summary written before the count existed


@pytest.mark.parametrize("max_grad_norm, summary, said", [
    (-1.0, {"diverged_at_step": None, "params_finite": True}, None),
    (-1.0, {}, None),  # a summary written before the fields existed
    (0.0, {"diverged_at_step": 10200, "params_finite": False},
     "the run diverged (loss NaN or infinite from step 10200): its returns are a broken policy's; try a lower --lr "
     "or --max-grad-norm"),
    (-1.0, {"diverged_at_step": None, "params_finite": False},
     "the run diverged (final parameters not finite): its returns are a broken policy's; try a lower --lr"),
    (-1.0, {"seeds": [{"seed": 0, "diverged_at_step": 384, "params_finite": False},
                      {"seed": 1, "diverged_at_step": None, "params_finite": True}]},
     "1 of 2 runs diverged (seed 0: loss NaN or infinite from step 384); try a lower --lr"),
    (-1.0, {"runs": [{"seed": 0, "hyperparams": {"lr": 1000.0}, "diverged_at_step": 384, "params_finite": False},
                     {"seed": 0, "hyperparams": {"lr": 0.001}, "diverged_at_step": None, "params_finite": True}]},
     "1 of 2 runs diverged (--lr 1000 seed 0: loss NaN or infinite from step 384); try a lower --lr"),
])
def test_the_closing_lines_name_the_runs_that_diverged(max_grad_norm, summary, said):
    """A diverged run trains on to its end, and its NaN policy's returns read as a poor agent's."""
    cfg = dataclasses.replace(TrainConfig(), max_grad_norm=max_grad_norm)
    assert cli._diverged_runs(cfg, summary) == said


def test_an_option_given_again_takes_its_last_values():
    """argparse's convention, which a base command line followed by an override needs (``$BASE --lr 2e-3``): the
    last values given win, for an option that sweeps too. ``--lr 1e-3 --lr 2e-3`` trains 2e-3 alone, as README says;
    ``--lr 1e-3 2e-3`` sweeps both."""
    args = cli.build_parser().parse_args(["train", "--total-steps", "1000", "--lr", "1e-3", "--seeds", "0", "1",
                                          "--total-steps", "2e5", "--lr", "1e-3", "2e-3", "--seeds", "3"])
    cfg = cli.config_from_args(args)
    assert (cfg.total_steps, dict(cfg.sweep)["lr"], cfg.seeds) == (200_000, (1e-3, 2e-3), (3,))
    overridden = cli.config_from_args(cli.build_parser().parse_args(["train", "--lr", "1e-3", "2e-3", "--lr", "3e-3"]))
    assert (overridden.lr, overridden.sweep) == (3e-3, ())
    assert cli.given_fields(["train", "--lr", "1e-3", "2e-3", "--tau", "1"]) == {"lr", "tau"}
