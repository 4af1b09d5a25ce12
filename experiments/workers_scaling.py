"""Steps and time to a target CartPole return vs the number of workers N and local updates B (paper Fig. 6, small).

Question: with N HSA2C workers pushing B-step update vectors to an asynchronous master, how many env steps and how
much (simulated) time does it take to reach a target return, and how do N and B trade communication for
variance? The paper (seeds/002, Fig. 6) measures the wall time to a benchmark score on six Atari games with
clusters of 20-60 nodes; here the same question at laptop scale: A2C on CartPole-v1, N in {1, 2, 4, 8},
B in {1, 2, 4}.

Setup (stated, all overridable by flags):

* Algorithm: HSA2C on ``jaxdp.train_async`` (``--strategy dpsgd``): each worker has E = 8 CartPole envs, rollouts of
  n = 8 steps, B local Adam steps (constant lr 1e-3: no annealing, so that the budget does not shape the curve;
  gradient clip 0.5) from its anchor, then pushes Δ; the master averages M = 1 Δ per update (asynchronous,
  Downpour-like) and applies θ ← θ − η_g Δ with η_g = 1, and answers the push.
* Time model (as in ``experiments/data_rate.py``, "shared" model): a local step lasts n·E = 64 units with
  log-normal jitter (σ = 0.25), and each one-way message (push, reply) ``comm · N`` units: the master's link is
  shared by the N workers. With ``--comm 0`` the time is pure compute.
* "Reached": the first time the mean return of 20 consecutive finished episodes is >= the target (default 200);
  steps = env steps of all workers at the event in which that episode finished, time = the simulated time of that
  event, wall = seconds of this simulator up to that event (all workers share this machine's cores, so wall time
  does not shrink with N; it is reported for completeness). A run stops at the end of the chunk (1/50 of the
  budget) in which it reached the target; "final return" is the mean of the last 10% of its episodes then. A run
  that does not reach the target within ``--max-steps`` is reported as not reached (blank).
* Randomness: two seeds per cell by default (``--seeds`` for more; the table shows the mean over the seeds that
  reached the target and how many did).

Writes ``experiments/results/workers_scaling.csv`` (one row per N, B, seed) and ``docs/img/workers_scaling.png``;
prints the table. Run: ``python experiments/workers_scaling.py`` (a few minutes on 2 cores; ``--quick`` for a smoke
run into a temporary folder).
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import time

import numpy as np

from jaxdp.cli_args import OneLineParser, integer, non_negative_float, positive_float

import outputs  # experiments/outputs.py: where results go


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=integer, nargs="+", default=[1, 2, 4, 8], help="values of N")
    parser.add_argument("--local-steps", type=integer, nargs="+", default=[1, 2, 4], help="values of B")
    parser.add_argument("--seeds", type=integer, default=2, help="seeds per (N, B)")
    parser.add_argument("--target", type=float, default=200.0, help="target mean return of 20 episodes")
    parser.add_argument("--max-steps", type=integer, default=600_000, help="env-step budget per run")
    parser.add_argument("--num-envs", type=integer, default=8, help="E, envs per worker")
    parser.add_argument("--rollout-len", type=integer, default=8, help="n, steps per rollout")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="local Adam learning rate")
    parser.add_argument("--global-lr", type=positive_float, default=1.0, help="η_g, the master's step on Δ")
    parser.add_argument("--comm", type=non_negative_float, default=16.0,
                        help="one-way message time per worker, in units")
    parser.add_argument("--sigma", type=non_negative_float, default=0.25,
                        help="log-normal jitter of the local-step time")
    parser.add_argument("--quick", action="store_true",
                        help="N, B in {1, 2}, a small budget: a smoke run; options given beside it win")
    parser.add_argument("--replot", action="store_true",
                        help="redraw the table and PNG from the CSV in --out without running anything")
    outputs.add_arguments(parser, "workers_scaling")
    args = outputs.parse_quick(parser, argv, dict(workers=[1, 2], local_steps=[1, 2], max_steps=40_000, target=40.0))
    for name in ("seeds", "max_steps", "num_envs", "rollout_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.workers) < 1 or min(args.local_steps) < 1:
        parser.error("--workers and --local-steps must all be >= 1")
    if not 1 < args.target <= 500:  # a CartPole-v1 episode returns 1 to 500: the first episode would reach 1
        parser.error(f"--target must be in (1, 500], CartPole-v1's returns, got {args.target}")
    outputs.resolve(args, "workers_scaling", parser)  # after the checks: a bad command line leaves no folder behind
    return args


def reached(episodes, target: float, window: int = 20):
    """Index of the episode at which the mean of the last ``window`` returns first reaches ``target``, or None."""
    returns = np.array([r for _, r, _ in episodes], dtype=np.float64)
    if len(returns) < window:
        return None
    rolling = np.convolve(returns, np.ones(window) / window, mode="valid")
    hits = np.flatnonzero(rolling >= target)
    return int(hits[0]) + window - 1 if hits.size else None


def run_one(args, n: int, b: int, seed: int) -> dict:
    from jaxdp import train_async
    from jaxdp.config import TrainConfig
    from jaxdp.runtime import async_sim

    step_time = float(args.rollout_len * args.num_envs)
    compute = async_sim.lognormal(step_time, args.sigma) if args.sigma > 0 else async_sim.constant(step_time)
    cfg = TrainConfig(algo="a2c", env="CartPole-v1", strategy="dpsgd", runtime="async_sim", workers=n,
                      local_steps=b, master_batch=1, num_envs=args.num_envs, rollout_len=args.rollout_len,
                      lr=args.lr, anneal_lr="off", global_lr=args.global_lr, total_steps=args.max_steps, seeds=(seed,),
                      progress=False, tensorboard=False, eval_episodes=0)
    trainer = train_async.make_async_train(cfg, compute_time=compute, comm_time=args.comm * n)
    # Stop once the target is reached (the rest of the budget would not change the answer).
    result = train_async.execute(trainer, stop=lambda episodes: reached(episodes, args.target) is not None)
    row = {"num_workers": n, "local_steps": b, "seed": seed, "target": args.target, "steps_to_target": None,
           "sim_time_to_target": None, "wall_seconds_to_target": None, "master_updates_to_target": None,
           "comm_rounds_to_target": None, "final_return": None,
           "mean_staleness": result.accounting["staleness_mean"], "steps_run": result.records[-1]["step"],
           "run_seconds": result.run_seconds}
    returns = [r for _, r, _ in result.episodes]
    row["final_return"] = float(np.mean(returns[-max(1, len(returns) // 10):]))
    i = reached(result.episodes, args.target)
    if i is not None:
        step = result.episodes[i][0]
        event = step // trainer.env_steps_per_event - 1  # the event in which the episode finished
        sched = trainer.sched
        row["steps_to_target"] = step
        row["sim_time_to_target"] = float(sched.events.time[event])
        row["master_updates_to_target"] = int(np.sum(sched.events.update_follows[:event + 1]))
        row["comm_rounds_to_target"] = int(event + 1 + np.sum(sched.events.pulls[:event + 1]))
        # Wall time: the simulator's run time up to that event (run time × the fraction of the events run).
        events_run = result.accounting["pushes"]
        row["wall_seconds_to_target"] = result.run_seconds * (event + 1) / events_run
    return row


def read_rows(path: pathlib.Path) -> list[dict]:
    """The per-run rows of a CSV written by this script (blank cells = not reached)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            r[k] = None if v == "" else (int(v) if k in ("num_workers", "local_steps", "seed") else float(v))
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.replot:
        rows = read_rows(args.out / "workers_scaling.csv")
        args.workers = sorted({r["num_workers"] for r in rows})
        args.local_steps = sorted({r["local_steps"] for r in rows})
        args.target = rows[0]["target"]
        table = summarise(rows, args)
        print_table(table, args)
        plot(table, args)
        return
    start = time.perf_counter()
    rows = []
    for n in args.workers:
        for b in args.local_steps:
            for seed in range(args.seeds):
                row = run_one(args, n, b, seed)
                rows.append(row)
                got = (f"{row['steps_to_target']:,} steps, sim time {row['sim_time_to_target']:,.0f}"
                       if row["steps_to_target"] is not None else "not reached")
                print(f"  N={n} B={b} seed={seed}: {got}; staleness {row['mean_staleness']:.2f}, "
                      f"final return {row['final_return']:.0f}", flush=True)
    path = args.out / "workers_scaling.csv"
    outputs.write_csv(path, rows)
    table = summarise(rows, args)
    print_table(table, args)
    plot(table, args)
    print(f"wrote {path} and {args.plot} in {time.perf_counter() - start:.0f} s")


def summarise(rows, args) -> list[dict]:
    out = []
    for n in args.workers:
        for b in args.local_steps:
            mine = [r for r in rows if r["num_workers"] == n and r["local_steps"] == b]
            hit = [r for r in mine if r["steps_to_target"] is not None]
            mean = lambda k: float(np.mean([r[k] for r in hit])) if hit else float("nan")  # noqa: E731
            out.append({"num_workers": n, "local_steps": b, "reached": len(hit), "runs": len(mine),
                        "steps": mean("steps_to_target"), "sim_time": mean("sim_time_to_target"),
                        "wall": mean("wall_seconds_to_target"), "updates": mean("master_updates_to_target"),
                        "rounds": mean("comm_rounds_to_target"),
                        "staleness": float(np.mean([r["mean_staleness"] for r in mine]))})
    return out


def print_table(table, args) -> None:
    print(f"\nTime to a 20-episode mean return of {args.target:g} (HSA2C, CartPole-v1, M = 1, "
          f"message time {args.comm:g}·N):")
    print("| N | B | reached | env steps | sim time | master updates | comm rounds | wall s (simulator) | "
          "mean staleness |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['num_workers']} | {r['local_steps']} | {r['reached']}/{r['runs']} | {r['steps']:,.0f} | "
              f"{r['sim_time']:,.0f} | {r['updates']:,.0f} | {r['rounds']:,.0f} | {r['wall']:.1f} | "
              f"{r['staleness']:.2f} |")


def plot(table, args) -> None:
    plt = outputs.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for b in args.local_steps:
        mine = [r for r in table if r["local_steps"] == b]
        ns = [r["num_workers"] for r in mine]
        for ax, key in zip(axes, ("sim_time", "steps")):
            line, = ax.plot(ns, [r[key] for r in mine], "o-", label=f"B = {b}")
            for r in mine:  # cells where not every seed reached the target: the mean is over those that did
                if 0 < r["reached"] < r["runs"]:
                    ax.annotate(f"{r['reached']}/{r['runs']}", (r["num_workers"], r[key]), textcoords="offset points",
                                xytext=(4, 4), fontsize=8, color=line.get_color())
    for ax, label in zip(axes, ("simulated time to target", "env steps to target")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.workers, [str(n) for n in args.workers])
        ax.set_yscale("log")
        ax.set_xlabel("N (workers)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"HSA2C on CartPole-v1: to a 20-episode mean return of {args.target:g} "
                 f"(M = 1, message time {args.comm:g}·N units, local step {args.rollout_len * args.num_envs} units)\n"
                 f"mean over the seeds that reached it (k/n: only k of n did)", fontsize=10)
    fig.tight_layout()
    outputs.save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
