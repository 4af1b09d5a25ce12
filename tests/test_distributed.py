"""Multi-controller JAX with real processes: two local jax.distributed processes (gloo CPU collectives)
compute exactly what the vmap runtime computes in one process, and a resumed job continues the run.

Each process runs ``tests/mpi_scripts/distributed_run.py`` (the runtime's command line plus
``--dump-params``) with one CPU device, so the job has two workers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jaxdp.runtime import vmap
from jaxdp.runtime import _mpi_protocol as protocol
from jaxdp.runtime._mpi_protocol import worker_key
from jaxdp.runtime.distributed import make_sync_step, worker_keys
from jaxdp.workloads.supervised import digits_workload

SCRIPT = Path(__file__).parent / "mpi_scripts" / "distributed_run.py"
LR = 0.1
SMALL = ["--batch-size", "16", "--hidden", "16", "--lr", str(LR), "--seed", "0"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_environment() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # One CPU device per process, whatever the calling environment forces: two processes, two workers.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def kill_leftovers(processes: list[subprocess.Popen]) -> None:
    """SIGKILL every process of the job still running (each leads its own session) and reap it: a failed or
    timed-out test leaves nothing behind."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_job(logdir: Path, *args: str, timeout: float = 180.0) -> list[str]:
    """Start both processes, wait for both; return their outputs. Fails (and kills both) on error or timeout."""
    logdir.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    processes = []
    for process_id in range(2):
        command = [
            sys.executable, str(SCRIPT), "--coordinator", address, "--num-processes", "2",
            "--process-id", str(process_id), "--logdir", str(logdir), "--initialization-timeout", "120", *args,
        ]  # fmt: skip
        output = open(logdir / f"output{process_id}.txt", "w")
        processes.append(
            subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=child_environment(),
                             start_new_session=True)  # fmt: skip
        )
    outputs = []
    try:
        for process_id, process in enumerate(processes):
            returncode = process.wait(timeout=timeout)
            text = (logdir / f"output{process_id}.txt").read_text()
            assert returncode == 0, f"process {process_id} exited {returncode}:\n{text[-3000:]}"
            outputs.append(text)
    finally:
        kill_leftovers(processes)
    return outputs


def executed_local_steps(logdir: Path, process_id: int) -> int:
    """Local steps process ``process_id`` executed, over all its runs in ``logdir`` (``--count-steps``)."""
    path = logdir / f"local_steps_process{process_id}.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def vmap_reference(steps: int) -> np.ndarray:
    """The same sync step, two workers, jaxdp's vmap runtime in this process: worker-stacked final params."""
    workload = digits_workload(batch_size=16, hidden=(16,), seed=0)
    step, optimizer = make_sync_step(workload, optax.sgd(LR))
    params, worker_state = workload.init(jax.random.PRNGKey(0))
    stacked = vmap.replicate((params, optimizer.init(params), worker_state), 2)
    mapped = jax.jit(vmap.map_workers(step, 2))
    for t in range(steps):
        *stacked, _ = mapped(*stacked, worker_keys(0, 2, t))
    return np.stack([np.asarray(ravel_pytree(jax.tree.map(lambda x: x[w], stacked[0]))[0]) for w in range(2)])


def hand_reference(steps: int) -> np.ndarray:
    """Mean-gradient SGD written out: θ ← θ − lr · ½ (g_0 + g_1), g_w on worker w's batch."""
    workload = digits_workload(batch_size=16, hidden=(16,), seed=0)
    params, worker_state = workload.init(jax.random.PRNGKey(0))
    for t in range(steps):
        grads = [workload.local_step(worker_state, params, worker_key(0, w, t))[1] for w in range(2)]
        params = jax.tree.map(lambda p, g0, g1: p - LR * (g0 + g1) / 2, params, *grads)
    return np.asarray(ravel_pytree(params)[0])


def test_two_processes_match_the_vmap_runtime_and_resume(tmp_path):
    run_job(tmp_path, *SMALL, "--total-updates", "4", "--log-every", "2", "--checkpoint-every", "4", "--dump-params",
            "--count-steps")  # fmt: skip
    # Each process executed exactly its 4 steps: the warm-up compiles, it does not run a step (a thrown-away
    # run would advance an RL worker's env pool behind its state's back).
    assert [executed_local_steps(tmp_path, i) for i in range(2)] == [4, 4]
    expected = vmap_reference(4)
    np.testing.assert_array_equal(expected[0], expected[1])
    for process_id in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"params_process{process_id}.npy"), expected[0], atol=1e-6)
    np.testing.assert_allclose(expected[0], hand_reference(4), atol=1e-6)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_workers"] == 2 and summary["total_updates"] == 4

    # Resume from the checkpoint at step 4 (process 0 reads it and broadcasts it) and go on to 6.
    run_job(tmp_path, *SMALL, "--total-updates", "6", "--log-every", "2", "--resume", "--dump-params", "--count-steps")
    assert [executed_local_steps(tmp_path, i) for i in range(2)] == [6, 6]  # 4 + the 2 after the checkpoint
    expected = vmap_reference(6)
    for process_id in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"params_process{process_id}.npy"), expected[0], atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4, 6]
    assert json.loads((tmp_path / "summary.json").read_text())["start_step"] == 4


def test_log_points_and_checkpoints_also_follow_process_0s_clock(tmp_path):
    """``jaxdp train --runtime distributed`` ignored --log-interval and --checkpoint-interval: points and checkpoints
    fell at counted steps only. With a tiny ``log_seconds`` / ``checkpoint_seconds`` every step is a point and a
    checkpoint, where the counts alone (a point at the end, no checkpoint) give neither."""
    run_job(tmp_path, *SMALL, "--total-updates", "5", "--log-every", "1000", "--log-seconds", "1e-9",
            "--checkpoint-seconds", "1e-9")
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5]
    assert int(protocol.load_checkpoint(str(tmp_path / "checkpoint.npz"))["step"]) == 5


def test_a_signal_to_one_process_stops_the_job_at_one_step_with_a_checkpoint_that_resumes(tmp_path):
    """SIGTERM (a scheduler's notice) to process 1 alone: both processes learn of it through the step's own
    collective, stop after the same step, exit 143, and process 0 -- alone -- says so in one line, with a log point
    and a checkpoint at that step and no summary. Resumed, the job lands exactly where an uninterrupted run does."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    processes = [
        subprocess.Popen([sys.executable, str(SCRIPT), "--coordinator", address, "--num-processes", "2",
                          "--process-id", str(i), "--logdir", str(tmp_path), "--initialization-timeout", "120",
                          *SMALL, "--total-updates", "100000000", "--log-every", "50"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_environment(),
                         start_new_session=True)
        for i in range(2)
    ]  # fmt: skip
    metrics_path = tmp_path / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 3):  # past compiling
            assert all(p.poll() is None for p in processes) and time.monotonic() < deadline
            time.sleep(0.1)
        processes[1].send_signal(signal.SIGTERM)
        errors = [p.communicate(timeout=60)[1] for p in processes]
    finally:
        kill_leftovers(processes)
    assert [p.returncode for p in processes] == [128 + signal.SIGTERM] * 2, errors
    lines = errors[0].strip().splitlines()
    assert len(lines) == 1 and "stopped by SIGTERM at step" in lines[0] and "--resume" in lines[0], errors[0]
    assert "stopped" not in errors[1], errors[1]
    stopped_at = json.loads(metrics_path.read_text().splitlines()[-1])["step"]
    assert 100 <= stopped_at < 100_000_000 and int(np.load(tmp_path / "checkpoint.npz")["step"]) == stopped_at
    assert not (tmp_path / "summary.json").exists()

    total = stopped_at + 3
    run_job(tmp_path, *SMALL, "--total-updates", str(total), "--log-every", "50", "--resume", "--dump-params")
    steps = [json.loads(line)["step"] for line in metrics_path.read_text().splitlines()]
    assert steps == sorted(set(steps)) and stopped_at in steps and steps[-1] == total
    expected = vmap_reference(total)[0]
    for process_id in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"params_process{process_id}.npy"), expected, atol=1e-5)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--coordinator", "nowhere", "--num-processes", "2", "--process-id", "0"], "--coordinator"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "--process-id"),
    ],
)
def test_command_line_rejects_bad_values_in_one_line(args, needle):
    result = subprocess.run([sys.executable, "-m", "jaxdp.runtime.distributed", *args], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_make_sync_step_averages_over_the_worker_axis():
    """Under vmap with 3 workers, one sync step is SGD on the mean of the 3 workers' gradients."""
    workload = digits_workload(batch_size=4, hidden=(8,), seed=0)
    step, optimizer = make_sync_step(workload, optax.sgd(0.5))
    params, worker_state = workload.init(jax.random.PRNGKey(1))
    stacked = vmap.replicate((params, optimizer.init(params), worker_state), 3)
    new_params, _, new_state, metrics = vmap.map_workers(step, 3)(*stacked, worker_keys(7, 3, 0))
    grads = [workload.local_step(worker_state, params, worker_key(7, w, 0))[1] for w in range(3)]
    expected = jax.tree.map(lambda p, *g: p - 0.5 * sum(g) / 3, params, *grads)
    for w in range(3):
        worker_params = jax.tree.map(lambda x: x[w], new_params)
        np.testing.assert_allclose(ravel_pytree(worker_params)[0], ravel_pytree(expected)[0], atol=1e-6)
    assert metrics["loss"].shape == (3,) and jnp.all(new_state.examples_seen == 4)


def train_job(total_steps: int, *args: str, status: int = 0) -> list[str]:
    """``jaxdp train --runtime distributed`` as two local processes; their outputs, once both exited ``status``."""
    address = f"127.0.0.1:{free_port()}"
    processes = [
        subprocess.Popen([sys.executable, "-m", "jaxdp.cli", "train", "--runtime", "distributed",
                          "--coordinator", address, "--num-processes", "2", "--process-id", str(i),
                          "--total-steps", str(total_steps), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_environment(),
                         start_new_session=True)
        for i in range(2)
    ]  # fmt: skip
    try:
        outputs = [p.communicate(timeout=400)[0] for p in processes]
    finally:
        kill_leftovers(processes)
    for i, (p, out) in enumerate(zip(processes, outputs)):
        assert p.returncode == status, f"process {i} exited {p.returncode}:\n{out[-3000:]}"
    return outputs


def test_a_resumed_distributed_dqn_job_keeps_its_epsilon_and_refills_its_replays(tmp_path):
    """The workers' env pools and replays are not checkpointed: a resumed job's workers start empty. They must not
    start their schedules again (ε back at 1, learning at once from an empty replay): each worker continues its ε
    where the run was and learns again once its replay holds its share of --learning-starts (Workload.restart)."""
    logdir = tmp_path / "dqn"
    common = ["--algo", "dqn", "--strategy", "sync", "--num-envs", "4", "--learning-starts", "2000",
              "--eps-fraction", "0.5", "--no-progress", "--no-tensorboard", "--eval-episodes", "0",
              "--logdir", str(logdir)]
    train_job(16_000, *common)
    first = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    stopped = first[-1]["step"]
    train_job(32_000, *common, "--resume")
    records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in records if r["step"] > stopped]
    # ε decays over half of the (new) 32k steps: at the resume point it is (1 - 16k/16k) of the way, eps_end.
    assert after and all(r["epsilon"] <= 0.06 for r in after), [(r["step"], r["epsilon"]) for r in after[:5]]
    assert first[1]["epsilon"] > 0.5  # the first run did explore
    # The first points after the resume learn nothing (empty replays refill to 1000 steps each), later ones do.
    refill = [r for r in after if r["step"] <= stopped + 2000]
    assert refill and all(r["learning"] == 0.0 for r in refill), [(r["step"], r["learning"]) for r in refill]
    assert all(r["learning"] == 1.0 for r in after if r["step"] > stopped + 2000 + 640)
    assert all(r["learning"] == 1.0 for r in first if 2000 + 640 < r["step"])


def test_processes_of_one_host_are_refused_replays_that_it_cannot_hold(tmp_path):
    """Both processes of a job on one host hold a DQN replay: two Pong replays of 0.6x its free memory fit one by
    one but not together. Each process gathers every host's name and free memory, and both stop with one line and
    exit 2 before --logdir exists (started, the job would fail once the replays were allocated and zeroed)."""
    from jaxdp import memory

    buffer = int(0.6 * memory.host_available_bytes() / (84 * 84 + 12))  # Pong: one 84x84 frame + 12 bytes a step
    logdir = tmp_path / "dqn"
    outputs = train_job(500_000, "--algo", "dqn", "--env", "Pong-v5", "--strategy", "sync", "--buffer-size",
                        str(buffer), "--no-progress", "--logdir", str(logdir), status=2)
    # Beside gloo's own line on connecting, each process prints the one line (no traceback).
    for out in outputs:
        said = [line for line in out.splitlines() if not line.startswith("[Gloo]")]
        assert len(said) == 1, out
        assert f"--buffer-size {buffer}: 2 DQN replays (one per worker process on host " in said[0], said[0]
    assert not logdir.exists()


def test_jaxdp_train_runtime_distributed_learns_cartpole_and_resumes(tmp_path):
    """``jaxdp train --runtime distributed``: two processes, one worker (one envpool pool) each, A2C gradients
    all-reduced over gloo every step. The job learns, process 0 writes the RL outputs (env steps, the return of
    both workers' episodes), and ``--resume`` continues from the checkpoint."""
    logdir = tmp_path / "rl"
    common = ["--algo", "a2c", "--strategy", "sync", "--num-envs", "8", "--lr", "1e-3", "--vf-coef", "0.1",
              "--logdir", str(logdir)]

    def job(total_steps: int, *extra: str, status: int = 0) -> list[str]:
        return train_job(total_steps, *common, *extra, status=status)

    outputs = job(400_000, "--no-tensorboard", "--no-progress")
    assert "[jaxdp.distributed] step" not in outputs[0]  # --no-progress: no line per log point
    assert "final return" in outputs[0] and "final return" not in outputs[1]  # process 0 reports
    summary = json.loads((logdir / "summary.json").read_text())
    per_update = 2 * 8 * 8  # workers x envs x rollout
    assert summary["num_workers"] == 2 and summary["total_steps"] == (400_000 // per_update) * per_update
    assert summary["config"]["runtime"] == "distributed"
    assert summary["sps"] > 0 and "params" not in summary  # the parameters are the checkpoint's
    assert summary["provenance"]["versions"]["jax"] == jax.__version__  # after jax.distributed's shutdown too
    assert summary["final_return"] >= 150, summary["final_return"]  # random play: ~22
    # Process 0 plays --eval-episodes greedy games of the all-reduced θ after jax.distributed has shut down.
    assert 0 < summary["eval_return"] <= 500 and summary["eval_seconds"] > 0, summary
    assert summary["eval_episodes_ended"] == 10  # CartPole's time limit ends every game
    assert summary["diverged_runs"] == 0 and summary["diverged_at_step"] is None and summary["params_finite"]
    assert f"greedy eval {round(summary['eval_return'], 1)}" in outputs[0]
    # The clock starts once every rank has compiled; what came before is counted apart, and the line says so.
    assert summary["startup_seconds"] > 0
    assert (f"in {summary['wall_seconds']:.1f} s after {summary['startup_seconds']:.1f} s of start-up and "
            f"compilation") in outputs[0]
    assert not (logdir / "tb").exists()  # --no-tensorboard
    records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step"] % per_update == 0 for r in records)
    assert sum(r["episodes"] for r in records) > 100 and records[0]["step"] == 0

    # Bad input stops both processes before jax.distributed starts (one that went on would wait for the other):
    # each prints one line, exits 2, and the run's files stay as they were.
    files = {p.name: p.read_bytes() for p in logdir.iterdir() if p.is_file()}
    for extra, needle in [((), "already holds a run"), (("--resume", "--gamma", "0.9"), "--resume: --gamma is 0.9")]:
        for out in job(500_000, *extra, status=2):
            assert out.strip().splitlines() == [out.strip()] and needle in out, out
        assert {p.name: p.read_bytes() for p in logdir.iterdir() if p.is_file()} == files

    outputs = job(500_000, "--resume")  # another coordinator port, TensorBoard and progress on: allowed
    assert "[jaxdp.distributed] step" in outputs[0]
    resumed = json.loads((logdir / "summary.json").read_text())
    assert resumed["start_update"] == 400_000 // per_update  # continued from the final checkpoint
    assert resumed["start_step"] == resumed["start_update"] * per_update  # env steps, as total_steps
    assert resumed["total_steps"] == (500_000 // per_update) * per_update
    steps = [json.loads(line)["step"] for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == resumed["total_steps"]
    # Process 0 mirrored each log point of the resumed job to TensorBoard (a multi-process run wrote none before).
    from tensorboard_events import scalar_steps

    assert scalar_steps(logdir / "tb")["updates"] == [s for s in steps if s > resumed["start_step"]]


def test_a_full_disk_on_process_0_stops_jaxdp_train_in_one_line_and_its_last_checkpoint_resumes(tmp_path):
    """Process 0 cannot save its second checkpoint (its disk fills: tests/mpi_scripts/full_disk.py). Both processes
    stop after the next step, the request riding with the step's all-reduce as a signal's does; nothing more is
    written; process 0 says so in one line, naming the last whole checkpoint, and both exit 1 without a traceback
    (before, process 0's traceback ended it and process 1 waited for the coordination service to give up on it).
    ``--resume`` continues from that checkpoint."""
    logdir = tmp_path / "rl"
    address = f"127.0.0.1:{free_port()}"
    args = ["train", "--runtime", "distributed", "--strategy", "sync", "--algo", "a2c", "--total-steps", "20000",
            "--coordinator", address, "--num-processes", "2", "--logdir", str(logdir), "--no-progress"]
    full_disk = Path(__file__).parent / "mpi_scripts" / "full_disk.py"
    processes = [
        subprocess.Popen([sys.executable, str(full_disk), "jaxdp.cli", *args, "--process-id", str(i)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=dict(child_environment(), FULL_DISK_AT="checkpoint.npz:2" if i == 0 else "none:1"))
        for i in range(2)
    ]  # fmt: skip
    try:
        outputs = [p.communicate(timeout=400) for p in processes]
    finally:
        kill_leftovers(processes)
    per_update = 2 * 16 * 8  # workers x envs x rollout
    saved = int(protocol.load_checkpoint(str(logdir / "checkpoint.npz"))["step"])
    assert saved == (20000 // per_update) // 10  # the first of ten
    for i, (p, (out, err)) in enumerate(zip(processes, outputs)):
        ours = [line for line in err.splitlines() if "jaxdp" in line]
        assert p.returncode == 1 and "Traceback" not in out + err, f"process {i} exited {p.returncode}:\n{err[-3000:]}"
        assert ours == ([f"jaxdp train: cannot write in --logdir {logdir} (No space left on device) while saving the "
                         f"checkpoint; the last checkpoint, at step {saved * per_update}, is whole: make room and "
                         f"continue with --resume"] if i == 0 else []), err[-3000:]
    updates = [json.loads(line)["updates"] for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert max(updates) == 2 * saved and not (logdir / "summary.json").exists()  # nothing after the failure
    train_job(20000, "--strategy", "sync", "--algo", "a2c", "--logdir", str(logdir), "--no-progress", "--resume")
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["start_step"] == saved * per_update and summary["total_steps"] == (20000 // per_update) * per_update


@pytest.mark.parametrize("bad, message", [
    (dict(total_updates=0), "run_distributed: total_updates must be >= 1, got 0"),
    (dict(seed=-1), "run_distributed: seed must be >= 0, got -1"),
    (dict(log_every=0), "run_distributed: log_every must be >= 1, got 0"),
    (dict(checkpoint_every=-1), "run_distributed: checkpoint_every must be >= 0, got -1"),
    (dict(log_seconds=float("nan")), "run_distributed: log_seconds must be a finite number > 0, got nan"),
    (dict(checkpoint_seconds=0.0), "run_distributed: checkpoint_seconds must be a finite number > 0, got 0.0"),
])
def test_run_distributed_checks_its_schedule_before_joining_a_job(bad, message):
    """A bad length, seed or interval is one error naming it, before jax.distributed is touched: no coordinator is
    given here, so a call that went on would fail on that instead."""
    from jaxdp.runtime.distributed import run_distributed

    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        run_distributed(lambda: digits_workload(batch_size=4, hidden=(4,)), inner=optax.sgd(0.1),
                        **{"total_updates": 1, **bad})
