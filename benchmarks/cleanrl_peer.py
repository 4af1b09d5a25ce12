"""CleanRL's own scripts on this machine: the peer numbers that ``rl_throughput.py`` compares jaxdp with.

CleanRL's published throughput comes from other hardware; a ratio against it says little. This script runs
CleanRL 1.2.0's ``dqn_jax.py`` (CartPole-v1), ``dqn_atari_jax.py`` (Pong) and ``ppo_atari_envpool_xla_jax_scan.py``
(Pong-v5) here, with their default hyperparameters, the same jax / flax / optax / envpool versions as jaxdp, and only
the API-compatibility edits of ``peers/cleanrl-1.2.0.patch``. It prints a table and writes JSON that
``rl_throughput.py --cleanrl-json`` reads.

What is measured -- env steps per second *while learning*, from the scripts' own TensorBoard records (``charts/SPS``
at known steps and wall times), so neither compilation nor the random-action warm-up counts:

* ``dqn_jax.py``: every default (500k steps, updates from step 10k); the rate from step 12k to the end.
* ``dqn_atari_jax.py --env-id PongNoFrameskip-v4``: defaults except ``--learning-starts 20000`` (the 80k-step warm-up
  only delays the measurement) and ``--buffer-size 100000`` (the default 1M frames need 28 GB; capacity does not
  change the speed); run for ``--pong-seconds``. Twice: early in a run (ε ≈ 0.98, the Q-network is rarely evaluated
  to act) and in the steady state of most of a run (``--exploration-fraction 0.001``: ε = 0.01, it acts greedily
  every step). jaxdp's speed does not depend on ε: it evaluates the network for every env every step.
* ``ppo_atari_envpool_xla_jax_scan.py --env-id Pong-v5``: defaults, for ``--ppo-seconds``; the rate of the updates
  after the first (``charts/SPS_update``). On CPU its update runs convolution gradients inside ``lax.scan``, which
  XLA:CPU runs 10-60x slower (jax-ml/jax#12868): expect single-digit steps/s.

Set-up (once; see ``peers/cleanrl-requirements.txt``)::

    python3 -m venv /tmp/cleanrl_venv
    /tmp/cleanrl_venv/bin/pip install torch==2.13.0
    /tmp/cleanrl_venv/bin/pip install -r benchmarks/peers/cleanrl-requirements.txt
    python benchmarks/cleanrl_peer.py --python /tmp/cleanrl_venv/bin/python --json cleanrl.json   # ~10 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
import zipfile

from jaxdp import atomic
from jaxdp.cli_args import OneLineParser, file_problem, folder_problem
from jaxdp.provenance import cpu_model

HERE = pathlib.Path(__file__).resolve().parent
PATCH = HERE / "peers" / "cleanrl-1.2.0.patch"
SCRIPTS = ("dqn_jax.py", "dqn_atari_jax.py", "ppo_atari_envpool_xla_jax_scan.py")
PEER_MODULES = ("jax", "flax", "gymnasium", "ale_py", "envpool", "stable_baselines3", "tensorboard", "torch")

# Reads a run's TensorBoard records in the peer environment (tensorboard is installed there) and prints JSON.
READ_RECORDS = """
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0}); ea.Reload()
tags = ea.Tags()["scalars"]
print(json.dumps({t: [(e.step, e.wall_time, e.value) for e in ea.Scalars(t)] for t in ("charts/SPS", "charts/SPS_update") if t in tags}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True, type=pathlib.Path,
                        help="the peer environment's python (see peers/cleanrl-requirements.txt)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the results here too")
    parser.add_argument("--workdir", type=pathlib.Path, default=None,
                        help="where the patched scripts run and log (default: a temporary folder)")
    parser.add_argument("--pong-seconds", type=float, default=150.0, help="wall time of each Pong DQN run")
    parser.add_argument("--ppo-seconds", type=float, default=400.0, help="wall time of the PPO run (0: skip it)")
    parser.add_argument("--skip-cartpole", action="store_true")
    args = parser.parse_args(argv)
    if not os.access(args.python, os.X_OK):
        parser.error(f"--python: {args.python} is not an executable")
    # Before ~12 minutes of runs, not after them.
    problem = ((args.workdir and folder_problem(str(args.workdir), "--workdir"))
               or (args.json and file_problem(str(args.json), "--json", "the JSON file")))
    if problem:
        parser.error(problem)
    if args.pong_seconds < 60 or (args.ppo_seconds and args.ppo_seconds < 200):
        parser.error("--pong-seconds must be >= 60 and --ppo-seconds 0 or >= 200 (warm-up and compilation come first)")
    missing = subprocess.run([str(args.python), "-c", f"import importlib.util as u; print(' '.join(m for m in "
                              f"{PEER_MODULES!r} if u.find_spec(m) is None))"], capture_output=True, text=True)
    if missing.returncode or missing.stdout.strip():
        parser.error(f"--python: {args.python} lacks {missing.stdout.strip() or missing.stderr.strip()[-200:]} "
                     "(install peers/cleanrl-requirements.txt)")
    return args


def fetch_scripts(python: pathlib.Path, workdir: pathlib.Path) -> None:
    """CleanRL 1.2.0's three scripts from its PyPI wheel, patched, into ``workdir``."""
    wheels = workdir / "wheel"
    # The wheel declares Python < 3.11; the scripts themselves run on 3.11, so fetch it for 3.9 without deps.
    subprocess.run([str(python), "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.9", "cleanrl==1.2.0", "-d", str(wheels)], check=True)
    with zipfile.ZipFile(next(wheels.glob("cleanrl-1.2.0-*.whl"))) as wheel:
        for name in SCRIPTS:
            (workdir / name).write_bytes(wheel.read(f"cleanrl/{name}"))
    subprocess.run(["patch", "--quiet", "-p1", "-d", str(workdir), "-i", str(PATCH)], check=True)


def run_for(python: pathlib.Path, workdir: pathlib.Path, script: str, args: list[str], seconds: float | None,
            exp_name: str) -> dict:
    """Runs ``script`` (until it ends or for ``seconds``) and returns its SPS records."""
    cmd = [str(python), script, *args, "--exp-name", exp_name]
    start = time.time()
    try:
        subprocess.run(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       timeout=seconds, check=True)
    except subprocess.TimeoutExpired:
        pass  # the expected end of a timed run
    runs = sorted((workdir / "runs").glob(f"*__{exp_name}__*"))
    if not runs:
        raise RuntimeError(f"{script} wrote no TensorBoard run ({' '.join(cmd)})")
    out = subprocess.run([str(python), "-c", READ_RECORDS, str(runs[-1])], capture_output=True, text=True, check=True)
    records = json.loads(out.stdout)
    records["seconds"] = time.time() - start
    return records


def rate(records: list, skip_steps: int = 0, skip_records: int = 0) -> float:
    """Steps per wall second between the first record at least ``skip_steps`` after the first (or the
    ``skip_records``-th) and the last."""
    kept = [r for r in records if r[0] >= records[0][0] + skip_steps][skip_records:]
    if len(kept) < 2:
        raise RuntimeError(f"too few SPS records to measure a rate ({len(records)}): run longer")
    (s0, t0, _), (s1, t1, _) = kept[0], kept[-1]
    return (s1 - s0) / (t1 - t0)


def main(argv=None) -> None:
    args = parse_args(argv)
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="jaxdp_cleanrl_"))
    workdir.mkdir(parents=True, exist_ok=True)
    fetch_scripts(args.python, workdir)
    version = subprocess.run([str(args.python), "-c", "import jax, flax, envpool, gymnasium; print(jax.__version__, "
                              "flax.__version__, envpool.__version__, gymnasium.__version__)"],
                             capture_output=True, text=True, check=True).stdout.split()
    rows = []
    pong = ["--env-id", "PongNoFrameskip-v4", "--learning-starts", "20000", "--buffer-size", "100000"]
    measurements = [
        ("dqn/Pong-v5 early", "dqn_atari_jax.py", pong, args.pong_seconds, "pong_early", 400, "ε ≈ 0.98"),
        ("dqn/Pong-v5", "dqn_atari_jax.py", [*pong, "--exploration-fraction", "0.001"], args.pong_seconds,
         "pong_steady", 400, "ε = 0.01 (most of a run)"),
    ]
    if not args.skip_cartpole:
        measurements.append(("dqn/CartPole-v1", "dqn_jax.py", [], None, "cartpole", 2000, "all defaults, 500k steps"))
    if args.ppo_seconds:
        measurements.append(("ppo/Pong-v5", "ppo_atari_envpool_xla_jax_scan.py", ["--env-id", "Pong-v5"],
                             args.ppo_seconds, "ppo", None, "defaults; updates after the first"))
    for key, script, script_args, seconds, name, skip, note in measurements:
        records = run_for(args.python, workdir, script, script_args, seconds, name)
        if skip is None:  # PPO: one record per update; the first includes compilation
            steps_per_second = rate(records["charts/SPS_update"], skip_records=1) \
                if len(records["charts/SPS_update"]) >= 3 else records["charts/SPS_update"][-1][2]
        else:
            steps_per_second = rate(records["charts/SPS"], skip_steps=skip)
        rows.append((key, script, note, steps_per_second, records["seconds"]))
        print(f"  {key}: {steps_per_second:,.1f} steps/s ({records['seconds']:.0f} s)", file=sys.stderr, flush=True)

    print("# CleanRL 1.2.0 on this machine\n")
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}; jax {version[0]}, "
          f"flax {version[1]}, envpool {version[2]}, gymnasium {version[3]}\n")
    print("| measurement | script | setting | env steps/s while learning | wall s |")
    print("|---|---|---|---|---|")
    for key, script, note, sps, seconds in rows:
        print(f"| {key} | `{script}` | {note} | {sps:,.1f} | {seconds:.0f} |")
    if args.json:
        steps_per_second = {key: sps for key, _, _, sps, _ in rows}
        atomic.write_json(args.json, {"cpu": cpu_model(), "cores": os.cpu_count(), "versions": version,
                                      "steps_per_second": steps_per_second, "date": time.strftime("%Y-%m-%d")})
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
