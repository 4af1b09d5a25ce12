"""Scaling of the multi-process runtime: sync efficiency, async master throughput, bytes per gradient step.

Every measurement is a real ``mpirun`` job of :mod:`jaxdp.runtime.mpi` on the digits MLP (64→64→10,
4.8 k float32 parameters, mini-batches of ``--batch-size`` per worker); the numbers come from each
job's ``summary.json``, whose ``wall_seconds`` excludes start-up and compilation (every rank compiles
and runs its step once before the clock starts).

Three markdown tables:

1. **Synchronous all-reduce, K = 1, 2, 3, 5 processes** (weak scaling: every rank computes a gradient
   on its own batch at every step). Efficiency E_K = T / (K · T_K) (lecture), where T_K is the time
   K processes take for U steps and T the time one process takes to compute the same K·U gradients,
   i.e. E_K = (examples/s with K) / (K · examples/s with 1).
2. **Asynchronous parameter server (Downpour, M = 1), K = 2, 3, 5 processes** (K − 1 workers):
   master updates per second and the mean staleness.
3. **Bytes per gradient step** for sync (B = 1), sync local SGD (B = ``--local-steps``), async
   (Downpour) and dpsgd (B = ``--local-steps``), from the runtime's own byte counts: local steps send
   once every B gradient steps, so their bytes per gradient step shrink B×.

On a machine with fewer cores than processes the jobs run oversubscribed (``mpirun --oversubscribe``):
the processes time-share the cores, so efficiencies below 1 there measure time-sharing and
communication, not what the same jobs would do with one core each. The script says so in its output.

Run: ``python benchmarks/scaling.py`` (a few minutes on 2 cores; needs ``mpirun`` on PATH, as ``make
bench`` arranges) or ``--quick``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import jax
import optax

from jaxdp.cli_args import OneLineParser, integer, positive_int


def mpirun_executable() -> str:
    found = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")
    if not os.path.exists(found):
        sys.exit("scaling.py: error: mpirun not found; put the environment's bin/ on PATH (make bench does)")
    return found


def run_job(num_processes: int, logdir: Path, *args: str) -> dict:
    """One mpirun job of ``python -m jaxdp.runtime.mpi``; returns its summary.json."""
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    command = [
        mpirun_executable(), *root, "--oversubscribe", "--bind-to", "none", "-n", str(num_processes),
        sys.executable, "-m", "jaxdp.runtime.mpi", "--logdir", str(logdir), *args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))  # fmt: skip
    if result.returncode != 0:
        sys.exit(f"scaling.py: error: {' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return json.loads((logdir / "summary.json").read_text())


def versions() -> str:
    mpirun_version = subprocess.run([mpirun_executable(), "--version"], capture_output=True, text=True).stdout
    # Package metadata, not imports: importing mpi4jax would initialise MPI in this (non-MPI) process.
    return (
        f"Python {platform.python_version()}, JAX {jax.__version__}, optax {optax.__version__}, "
        f"mpi4py {metadata.version('mpi4py')}, mpi4jax {metadata.version('mpi4jax')}, "
        f"{(mpirun_version.splitlines() or ['mpirun ?'])[0]}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=integer, nargs="+", default=[2, 3, 5], help="K values (default 2 3 5)")
    parser.add_argument("--sync-updates", type=positive_int, default=1000, help="sync steps per job")
    parser.add_argument("--async-updates", type=positive_int, default=2000, help="master updates per async job")
    parser.add_argument("--local-steps", type=positive_int, default=4, help="B for the local-steps rows")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--quick", action="store_true", help="smoke run: K in {2, 3}, fewer updates")
    args = parser.parse_args(argv)
    if args.quick:
        args.processes, args.sync_updates, args.async_updates = [2, 3], 60, 200
    if any(k < 2 for k in args.processes):
        parser.error(f"argument --processes: every K must be >= 2, got {args.processes}")
    cores = os.cpu_count() or 1
    common = ["--batch-size", str(args.batch_size), "--lr", "0.05"]

    print("# jaxdp multi-process scaling (benchmarks/scaling.py)\n")
    print(f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, {cores} CPU cores")
    print(f"- versions: {versions()}")
    print(f"- workload: digits MLP 64→64→10 (4.8 k parameters), batch {args.batch_size} per worker, CPU")
    oversubscribed = [k for k in args.processes if k > cores]
    if oversubscribed:
        print(
            f"- **oversubscribed**: K = {', '.join(map(str, oversubscribed))} processes on {cores} cores "
            "(`mpirun --oversubscribe`): processes time-share the cores, so these rows measure time-sharing "
            "and communication overhead, not hardware scaling."
        )
    print()

    with tempfile.TemporaryDirectory(prefix="jaxdp-scaling-") as scratch:
        scratch = Path(scratch)

        # 1. Synchronous all-reduce.
        sync = {k: run_job(k, scratch / f"sync{k}", "--mode", "sync", "--total-updates", str(args.sync_updates),
                           "--log-every", str(args.sync_updates), *common)  # fmt: skip
                for k in [1, *args.processes]}
        base = args.sync_updates * args.batch_size / sync[1]["wall_seconds"]
        print("## Synchronous all-reduce (mpi4jax), weak scaling\n")
        print("| K processes | steps/s | examples/s | T_K (s) | efficiency E_K = T/(K·T_K) |")
        print("|---:|---:|---:|---:|---:|")
        for k, summary in sync.items():
            examples = args.sync_updates * k * args.batch_size / summary["wall_seconds"]
            note = " (oversubscribed)" if k > cores else ""
            print(f"| {k}{note} | {summary['updates_per_second']:.0f} | {examples:.0f} | "
                  f"{summary['wall_seconds']:.2f} | {examples / (k * base):.2f} |")  # fmt: skip
        print(f"\nT = time of 1 process for the same K·{args.sync_updates} gradients "
              f"({base:.0f} examples/s with K = 1).\n")  # fmt: skip

        # 2. Asynchronous parameter server.
        print("## Asynchronous parameter server (Downpour, M = 1): master throughput\n")
        print("| K processes (workers) | master updates/s | mean staleness | max staleness | arrivals per worker |")
        print("|---:|---:|---:|---:|---|")
        downpour = {}
        for k in args.processes:
            summary = run_job(k, scratch / f"async{k}", "--mode", "async", "--total-updates", str(args.async_updates),
                              "--log-every", str(args.async_updates), *common)  # fmt: skip
            downpour[k] = summary
            note = " (oversubscribed)" if k > cores else ""
            arrivals = ", ".join(f"{n}" for n in summary["arrivals_per_worker"].values())
            print(f"| {k} ({k - 1}){note} | {summary['updates_per_second']:.0f} | {summary['staleness_mean']:.2f} | "
                  f"{summary['staleness_max']} | {arrivals} |")  # fmt: skip
        print()

        # 3. Bytes per gradient step.
        k = 3
        b = args.local_steps
        local_sync = run_job(k, scratch / "sync_local", "--mode", "sync", "--local-steps", str(b), "--outer-lr", "1.0",
                             "--total-updates", str(max(args.sync_updates // b, 1)), "--log-every", "1000000",
                             *common)  # fmt: skip
        dpsgd = run_job(k, scratch / "dpsgd", "--mode", "dpsgd", "--local-steps", str(b), "--total-updates",
                        str(max(args.async_updates // b, 1)), "--log-every", "1000000", *common)  # fmt: skip
        async_k = downpour.get(k) or run_job(k, scratch / "async_bytes", "--mode", "async", "--total-updates",
                                             str(args.async_updates), *common)  # fmt: skip
        sync_k = sync.get(k) or run_job(k, scratch / "sync_bytes", "--mode", "sync", "--total-updates",
                                        str(args.sync_updates), *common)  # fmt: skip
        print(f"## Bytes communicated per gradient step (K = {k} processes, B = {b})\n")
        print("| strategy | B | bytes per update | bytes per gradient step | vs. B = 1 |")
        print("|---|---:|---:|---:|---:|")
        rows = [
            ("sync all-reduce (gradients)", 1, sync_k, sync_k),
            ("sync local SGD (all-reduce of Δ)", b, local_sync, sync_k),
            ("async Downpour (push Δ, pull θ)", 1, async_k, async_k),
            ("dpsgd (push Δ every B steps)", b, dpsgd, async_k),
        ]
        for name, steps, summary, reference in rows:
            ratio = summary["bytes_per_gradient_step"] / reference["bytes_per_gradient_step"]
            print(f"| {name} | {steps} | {summary['bytes_per_update']:.0f} | {summary['bytes_per_gradient_step']:.0f} "
                  f"| {ratio:.3f} (1/{1 / ratio:.1f}) |")  # fmt: skip
        print("\nSync bytes count each rank's float32 vector handed to the all-reduce (the algorithm's wire "
              "traffic depends on Open MPI's choice of algorithm); async bytes are the pushes (Δ + header) and "
              "replies (θ + header) through the master.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
