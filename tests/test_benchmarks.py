"""The benchmarks' own plumbing: the same-machine CleanRL reference and its command line, and the equivalence
of the Nature-CNN gradient rewrites that `nature_cnn_layers.py` times.

The measurements themselves are not tests (they need a quiet machine, and ``cleanrl_peer.py`` a separate peer
environment of several GB and ~12 minutes); what is tested is that a bad command line stops at once, and that
``rl_throughput.py --cleanrl-json`` reads what ``cleanrl_peer.py --json`` writes (the committed run included), and
that the GPU call's first step (``gpu/probe.py``) and its missing-bundle stop work here.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as `python benchmarks/<name>.py` has it: siblings import
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, names", [
    (["--python", "/nonexistent/python"], "is not an executable"),
    # The project's own python lacks the peer's packages (ale_py, stable_baselines3, torch, ...).
    (["--python", sys.executable], "lacks"),
    (["--python", sys.executable, "--pong-seconds", "5"], "--pong-seconds"),
])
def test_cleanrl_peer_rejects_a_bad_command_line_in_one_line(args: list[str], names: str, tmp_path) -> None:
    workdir = tmp_path / "work"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "cleanrl_peer.py"), *args, "--workdir", str(workdir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0], result.stderr
    assert not workdir.exists()


def test_cleanrl_peer_refuses_a_json_path_it_could_not_write_before_running(tmp_path) -> None:
    """--json is written after ~12 minutes of runs: a path under a file, or a folder, is refused first, in one line."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = subprocess.run([sys.executable, str(BENCHMARKS / "cleanrl_peer.py"), "--python", sys.executable,
                             "--json", str(blocker / "cleanrl.json"), "--workdir", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"--json '{blocker / 'cleanrl.json'}': '{blocker}' is a file, not a folder" in lines[0]
    # A folder where the JSON file should go.
    result = subprocess.run([sys.executable, str(BENCHMARKS / "cleanrl_peer.py"), "--python", sys.executable,
                             "--json", str(tmp_path), "--workdir", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"--json '{tmp_path}' is a folder: give the JSON file's path" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("script, args, names", [
    # Each was a traceback: --repeats 0 after the first measurements (no median), a replay smaller than the batch
    # after the Pong tables began, a --cleanrl-json that is missing or not cleanrl_peer.py's.
    ("rl_throughput", ["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    ("rl_throughput", ["--dqn-buffer", "10"], "--dqn-buffer 10: --batch-size 32 is larger than --buffer-size 10"),
    ("rl_throughput", ["--cleanrl-json", "/nonexistent/cleanrl.json"], "FileNotFoundError"),
    ("rl_throughput", ["--cleanrl-json", str(BENCHMARKS / "README.md")], "JSONDecodeError"),
    # A usage block before the error: two or more lines, where every other entry point prints one.
    ("strategies", ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    ("nature_cnn_layers", ["--calls", "0"], "argument --calls: must be >= 1, got 0"),
    # No check at all: a job of 0 updates went to mpirun.
    ("scaling", ["--sync-updates", "0"], "argument --sync-updates: must be >= 1, got 0"),
    ("scaling", ["--processes", "1"], "every K must be >= 2"),
])
def test_benchmark_rejects_a_bad_command_line_in_one_line_before_measuring(script: str, args: list[str],
                                                                           names: str) -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), *args],
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"{script}.py: error: ") and names in lines[0], lines[0]
    assert result.stdout == ""  # stopped before the first table


def test_rl_throughput_compares_with_the_committed_cleanrl_run(monkeypatch: pytest.MonkeyPatch) -> None:
    rl_throughput = _load("rl_throughput", monkeypatch)
    path = BENCHMARKS / "results" / "cleanrl-intel-xeon-2026-12-02.json"
    reference, source = rl_throughput.cleanrl_reference(str(path))
    peer = json.loads(path.read_text())["steps_per_second"]
    # DQN is compared with CleanRL's DQN in its steady state (ε = 0.01), A2C with CleanRL's PPO.
    assert reference == {("dqn", "CartPole-v1"): peer["dqn/CartPole-v1"], ("dqn", "Pong-v5"): peer["dqn/Pong-v5"],
                         ("a2c", "Pong-v5"): peer["ppo/Pong-v5"]}
    assert "measured on Intel" in source and "2026-12-02" in source
    assert rl_throughput.versus(86.9, reference[("dqn", "Pong-v5")]) == "1.25× (69.4)"
    assert rl_throughput.versus(100.0, None) == "n/a"
    # Without the JSON: CleanRL's reported numbers, labelled as from other hardware.
    reported, source = rl_throughput.cleanrl_reference(None)
    assert reported[("dqn", "Pong-v5")] == 85.0 and "other hardware" in source


def test_nature_cnn_layers_rewrites_compute_the_same_weight_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first convolution's weight gradient in ``nature_cnn_layers.py``'s three rewrites equals lax.conv's."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    bench = _load("nature_cnn_layers", monkeypatch)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((3, 84, 84, 4), np.float32))
    w = jnp.asarray(rng.standard_normal((8, 8, 4, 32), np.float32))
    g = jnp.asarray(rng.standard_normal((3, 20, 20, 32), np.float32))
    reference = bench.weight_grad_lax(x, g, w, 4)
    np.testing.assert_array_equal(bench.kernel_from_depth(bench.kernel_to_depth(w, 4), 4), w)
    for rewrite in (bench.weight_grad_space_to_depth, bench.weight_grad_im2col, bench.weight_grad_slices):
        np.testing.assert_allclose(jax.jit(rewrite, static_argnums=3)(x, g, w, 4), reference, rtol=1e-4, atol=1e-3)


def test_gpu_probe_finds_the_xla_interface_bit_identical_here() -> None:
    """benchmarks/gpu/probe.py, what the GPU call runs first, on this machine's default backend: both envs' XLA
    functions carry a GPU target in envpool's wheel, and a jitted scan matches the host API bit for bit."""
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu" / "probe.py")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| Pong-v5", "| CartPole-v1"))]
    assert len(rows) == 2, result.stdout
    for row in rows:
        assert "recv: yes, send: yes" in row and "bit-identical to the host API" in row, row


def test_gpu_run_script_stops_in_one_line_without_its_bundle(tmp_path) -> None:
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu" / "run.sh")], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "BUNDLE": str(tmp_path / "missing.tar.xz"),
                                 "OUT": str(tmp_path / "out"), "SITE": str(tmp_path / "site")})
    lines = result.stdout.strip().splitlines()  # (tar says on stderr what it could not open)
    assert result.returncode == 2 and len(lines) == 1 and "benchmarks/gpu/bundle.sh" in lines[0], result.stdout
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
