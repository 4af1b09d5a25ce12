"""The experiment scripts (``experiments/``) run end to end: each ``--quick`` smoke run, as a user starts it.

Each script runs in its own process (``python experiments/<name>.py --quick --out DIR``) and must exit 0 and write
its CSVs, with the columns the README's tables and the plots read, and a real PNG -- into ``DIR``, never over the
committed results. A bad value stops the script with exit 2 and one line, before it creates any folder.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# script -> {CSV written: columns that must be there}
OUTPUTS = {
    "speedup": {
        "speedup.csv": {"num_workers", "speedup", "efficiency", "mean_staleness", "mean_time_to_target"},
        "speedup_runs.csv": {"num_workers", "seed", "time_to_target", "updates_to_target"},
    },
    "data_rate": {
        "data_rate.csv": {"model", "num_workers", "local_steps", "env_steps_per_sim_time",
                          "analytic_env_steps_per_sim_time", "env_steps_per_wall_second"},
    },
    "workers_scaling": {
        "workers_scaling.csv": {"num_workers", "local_steps", "seed", "steps_to_target", "sim_time_to_target",
                                "mean_staleness", "final_return"},
    },
    "pong_hsa2c": {
        "pong_hsa2c.csv": {"run", "step", "episodic_return", "episodes", "sim_time", "wall_seconds"},
    },
}


def _run(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXPERIMENTS / f"{script}.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "MPLBACKEND": "Agg"})


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(OUTPUTS))
def test_quick_run_writes_its_csvs_and_png(script: str, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "results"
    result = _run(script, "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    for name, columns in OUTPUTS[script].items():
        with open(out / name, newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows, f"{name} has no rows"
        assert columns <= set(rows[0]), f"{name} lacks {columns - set(rows[0])}"
    png = (out / f"{script}.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000  # a drawn figure, not an empty file
    # Nothing else: no temporary file left beside the results.
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUTS[script], f"{script}.png"])


@pytest.mark.parametrize("script, bad", [
    ("speedup", ["--seeds", "0"]),
    ("data_rate", ["--events", "0"]),
    ("workers_scaling", ["--num-envs", "0"]),
    ("pong_hsa2c", ["--lr", "-1"]),
    ("pong_hsa2c", ["--env", "Foo-v5"]),  # an unknown id, then a non-Atari one: each was a traceback
    ("pong_hsa2c", ["--env", "CartPole-v1"]),
    ("workers_scaling", ["--target", "0"]),  # reached by the first episode: a run that measures nothing
    # Each of these ran a whole experiment that measured nothing (a loss below 0 is never reached; an infinite
    # rate diverges), or was a traceback from the simulator (an infinite message time or jitter).
    ("speedup", ["--target-loss", "-1"]),
    ("speedup", ["--lr-scale", "inf"]),
    ("data_rate", ["--sigma", "inf"]),
    ("pong_hsa2c", ["--comm", "inf"]),
    ("workers_scaling", ["--global-lr", "nan"]),
])
def test_bad_value_is_one_line_exit_2_and_no_folder(script: str, bad: list[str], tmp_path: pathlib.Path) -> None:
    out = tmp_path / "results"
    result = _run(script, *bad, "--out", str(out), timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{script}.py: error: " in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("script", list(OUTPUTS))
def test_an_output_path_that_cannot_be_written_is_refused_before_the_run(script: str, tmp_path: pathlib.Path) -> None:
    """--out or --plot under a file, or --plot naming a folder: one line, exit 2, before the run (each was a
    traceback at the end, after the whole run, and workers_scaling's CSV was lost with it)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for args, needle in [(["--out", str(blocker / "results")], f"--out '{blocker / 'results'}' cannot be created"),
                         (["--out", str(blocker)], "is a file, not a folder"),
                         (["--plot", str(blocker / "fig.png")], f"'{blocker}' is a file, not a folder"),
                         (["--plot", str(tmp_path)], "is a folder: give the PNG's path")]:
        result = _run(script, *args, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        assert lines[0].startswith(f"{script}.py: error: ") and needle in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def _parse_args(script: str, argv: list[str]):
    """``script``'s own ``parse_args``, imported from its file (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"experiment_{script}", EXPERIMENTS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXPERIMENTS))  # each script imports its neighbour outputs.py
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXPERIMENTS))
    return module.parse_args(argv)


@pytest.mark.parametrize("script, given, quick", [
    # (script, options given beside --quick and what they must stay, the other --quick sizes and what they become)
    ("speedup", {"--workers": ([1, 2], [1, 2]), "--budget": (50, 50)}, {"seeds": 1, "target_loss": 0.2}),
    ("data_rate", {"--events": (5, 5)}, {"workers": [1, 2], "local_steps": [1, 2]}),
    ("workers_scaling", {"--max-steps": (1000, 1000), "--local-steps": ([4], [4])},
     {"workers": [1, 2], "target": 40.0}),
    ("pong_hsa2c", {"--total-steps": (800, 800)}, {}),
])
def test_options_given_beside_quick_win(script: str, given: dict, quick: dict, tmp_path: pathlib.Path) -> None:
    """``--quick`` sets the smoke run's sizes where the command line says nothing; an option given beside it is
    kept (``--quick --workers 1 2`` used to run ``--quick``'s N silently, whatever was asked for)."""
    argv = ["--quick", "--out", str(tmp_path)]
    for flag, (value, _) in given.items():
        argv += [flag, *map(str, value if isinstance(value, list) else [value])]
    args = _parse_args(script, argv)
    for flag, (_, expected) in given.items():
        assert getattr(args, flag[2:].replace("-", "_")) == expected, flag
    for name, expected in quick.items():
        assert getattr(args, name) == expected, name
    without = _parse_args(script, ["--quick", "--out", str(tmp_path)])
    for flag in given:  # the given values are not already --quick's own: the test would not see the old bug
        name = flag[2:].replace("-", "_")
        assert getattr(without, name) != getattr(args, name), flag


@pytest.mark.parametrize("script, flag, name", [
    ("speedup", "--budget", "budget"),
    ("data_rate", "--events", "events"),
    ("workers_scaling", "--max-steps", "max_steps"),
    ("pong_hsa2c", "--total-steps", "total_steps"),
])
def test_counts_take_whole_floats_like_train(script: str, flag: str, name: str, tmp_path: pathlib.Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """``--max-steps 1e3`` is a count as ``jaxdp train --total-steps 1e6`` is (it was "invalid int value"); a count
    that is not whole is still one line and exit 2."""
    args = _parse_args(script, ["--quick", "--out", str(tmp_path / "a"), flag, "8e2"])
    assert getattr(args, name) == 800 and isinstance(getattr(args, name), int)
    with pytest.raises(SystemExit) as stop:
        _parse_args(script, ["--quick", "--out", str(tmp_path / "b"), flag, "8.5"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"argument {flag}: '8.5' is not a whole number" in err[0], err
