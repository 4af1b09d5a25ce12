"""Data-generation rate of HSA2C vs the number of local updates B, for N workers (the paper's Fig. 5).

Question: how many data points (env steps) do all actors generate per unit of time, as a function of B (local
updates between two exchanges with the master) and N (workers)? The paper (seeds/002, sec. 8 and Fig. 5) reports
that at B = 1 the rate barely grows with N, because every exchange with the one master gets more expensive as N
grows, and that larger B amortises the exchanges so the rate grows with N again.

Timing model (simulated time; all stated, all overridable by flags):

* One local step = one A2C rollout of n steps of the worker's E envs plus its gradient. Its duration is
  proportional to that rollout work: ``n·E`` time units (one unit = one env step of one env), with log-normal
  jitter (σ = 0.25 in log space, mean kept at n·E).
* Each exchange is two one-way messages, a push of Δ and a reply with θ (``reply="on_update"``, M = 1: an
  asynchronous master answers every push at once). Two communication models:

  - ``latency``: every message takes a fixed ``comm`` units, whatever N (an ideal network; the master is
    never a bottleneck);
  - ``shared``: the master's link is shared by the N workers, so one message takes ``comm · N`` units (fair
    share of one link when all workers talk to the master; the paper's "expected waiting time of each node's
    exchange with the master increases" with N).

  With constant durations and no waiting, a worker's cycle is ``B·n·E + 2·comm_N`` units for ``B·n·E`` data
  points, so the rate of all actors is ``N·B·n·E / (B·n·E + 2·comm_N)`` -- printed next to the simulated value.
  Under ``latency`` the rate is linear in N for every B; under ``shared`` it saturates at ``B·n·E / (2·comm)``,
  which B raises: the paper's Fig. 5.
* The simulated rate comes from the schedule of a real async_sim run (A2C on CartPole-v1, the run's own
  ``accounting``); the same runs give the rate per wall second of this simulator (the best of the run's 8 chunks,
  compilation excluded), which steps all N workers' envs one event at a time on this machine's cores: it is the
  simulator's throughput, not a cluster's.

Writes ``experiments/results/data_rate.csv`` and ``docs/img/data_rate.png``; prints the table. Run:
``python experiments/data_rate.py`` (a few minutes on 2 cores; ``--quick`` for a smoke run into a temporary
folder).
"""

from __future__ import annotations

import argparse
import time

from jaxdp.cli_args import OneLineParser, integer, non_negative_float

import outputs  # experiments/outputs.py: where results go


MODELS = ("latency", "shared")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=integer, nargs="+", default=[1, 2, 4, 8], help="values of N")
    parser.add_argument("--local-steps", type=integer, nargs="+", default=[1, 2, 4, 8], help="values of B")
    parser.add_argument("--num-envs", type=integer, default=16, help="E, actor envs per worker")
    parser.add_argument("--rollout-len", type=integer, default=8, help="n, steps per rollout")
    parser.add_argument("--comm", type=non_negative_float, default=64.0,
                        help="one-way message time in units (one unit = one env step of one env)")
    parser.add_argument("--sigma", type=non_negative_float, default=0.25,
                        help="log-normal jitter of the local-step time")
    parser.add_argument("--events", type=integer, default=200, help="arrival events (pushes) simulated per run")
    parser.add_argument("--seed", type=integer, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="N, B in {1, 2}, few events: a smoke run; options given beside it win")
    outputs.add_arguments(parser, "data_rate")
    args = outputs.parse_quick(parser, argv, dict(workers=[1, 2], local_steps=[1, 2], events=16))
    for name in ("num_envs", "rollout_len", "events"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.workers) < 1 or min(args.local_steps) < 1:
        parser.error("--workers and --local-steps must all be >= 1")
    outputs.resolve(args, "data_rate", parser)  # after the checks: a bad command line leaves no folder behind
    return args


def comm_time(model: str, comm: float, workers: int) -> float:
    """One-way message time under ``model`` (see the module docstring)."""
    return comm * workers if model == "shared" else comm


def analytic_rate(workers: int, local_steps: int, step_time: float, message_time: float) -> float:
    """N·B·n·E / (B·n·E + 2·comm_N) env steps per unit (constant durations, nobody waits)."""
    return workers * local_steps * step_time / (local_steps * step_time + 2.0 * message_time)


def main(argv=None) -> None:
    args = parse_args(argv)
    from jaxdp import train_async
    from jaxdp.config import TrainConfig
    from jaxdp.runtime import async_sim

    start = time.perf_counter()
    step_time = float(args.rollout_len * args.num_envs)
    compute = async_sim.lognormal(step_time, args.sigma) if args.sigma > 0 else async_sim.constant(step_time)
    rows = []
    for n in args.workers:
        for b in args.local_steps:
            # One real run per (N, B): the simulator's wall rate (independent of the timing model).
            cfg = TrainConfig(algo="a2c", env="CartPole-v1", strategy="dpsgd", runtime="async_sim", workers=n,
                              local_steps=b, master_batch=1, num_envs=args.num_envs, rollout_len=args.rollout_len,
                              total_steps=args.events * b * int(step_time), seeds=(args.seed,), progress=False,
                              tensorboard=False, eval_episodes=0)
            result = train_async.train(cfg, compute_time=compute, comm_time=comm_time("shared", args.comm, n),
                                       chunk_events=max(1, args.events // 8))
            # Best of the (8) chunks: the machine is shared, the least disturbed chunk is the simulator's speed.
            wall_rate = max(r["sps"] for r in result.records)
            for model in MODELS:
                message = comm_time(model, args.comm, n)
                # The simulated rate depends on the schedule only (the same call as the run makes).
                sched = async_sim.schedule(n, b, 1, args.events, compute, comm_time=message, seed=args.seed)
                env_steps = args.events * b * step_time
                sim_time = float(sched.events.time[-1])
                if model == "shared":  # the run above used this model: its accounting must agree
                    assert result.accounting["sim_time"] == sim_time
                rows.append({
                    "model": model, "num_workers": n, "local_steps": b, "num_envs": args.num_envs,
                    "rollout_len": args.rollout_len, "local_step_time": step_time, "message_time": message,
                    "env_steps_per_sim_time": env_steps / sim_time,
                    "analytic_env_steps_per_sim_time": analytic_rate(n, b, step_time, message),
                    "env_steps_per_wall_second": wall_rate,
                    "master_updates_per_sim_time": len(sched.updates.time) / sim_time,
                    "comm_rounds_per_1k_env_steps": 1000.0 * (args.events + int(sched.events.pulls.sum())) / env_steps,
                    "mean_staleness": float(sched.updates.staleness.mean()),
                })
                r = rows[-1]
                print(f"  {model:7s} N={n} B={b}: {r['env_steps_per_sim_time']:.3f} env steps/unit "
                      f"(analytic {r['analytic_env_steps_per_sim_time']:.3f}), {wall_rate:,.0f} env steps/s wall, "
                      f"staleness {r['mean_staleness']:.2f}", flush=True)

    path = args.out / "data_rate.csv"
    outputs.write_csv(path, rows)
    print_table(rows)
    plot(rows, args)
    print(f"wrote {path} and {args.plot} in {time.perf_counter() - start:.0f} s")


def print_table(rows) -> None:
    print("\n| model | N | B | env steps / unit (sim) | analytic | env steps / wall s | comm rounds / 1k steps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['num_workers']} | {r['local_steps']} | {r['env_steps_per_sim_time']:.3f} | "
              f"{r['analytic_env_steps_per_sim_time']:.3f} | {r['env_steps_per_wall_second']:,.0f} | "
              f"{r['comm_rounds_per_1k_env_steps']:.2f} |")


def plot(rows, args) -> None:
    plt = outputs.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, model in zip(axes[:2], MODELS):
        for n in args.workers:
            mine = [r for r in rows if r["model"] == model and r["num_workers"] == n]
            bs = [r["local_steps"] for r in mine]
            line, = ax.plot(bs, [r["env_steps_per_sim_time"] for r in mine], "o-", label=f"N = {n}")
            ax.plot(bs, [r["analytic_env_steps_per_sim_time"] for r in mine], ":", color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.local_steps, [str(b) for b in args.local_steps])
        ax.set_xlabel("B (local updates per exchange)")
        ax.set_ylabel("env steps per simulated unit (all actors)")
        title = {"latency": f"fixed message time {args.comm:g}",
                 "shared": f"shared master link: message time {args.comm:g}·N"}[model]
        ax.set_title(title)
        ax.legend(title="dotted: analytic")
    ax = axes[2]
    for n in args.workers:
        mine = [r for r in rows if r["model"] == MODELS[0] and r["num_workers"] == n]
        ax.plot([r["local_steps"] for r in mine], [r["env_steps_per_wall_second"] for r in mine], "o-",
                label=f"N = {n}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.local_steps, [str(b) for b in args.local_steps])
    ax.set_xlabel("B (local updates per exchange)")
    ax.set_ylabel("env steps per wall second")
    ax.set_title("simulator throughput (one CPU process)")
    ax.legend()
    fig.suptitle(f"HSA2C data-generation rate, A2C on CartPole-v1, local step = n·E = "
                 f"{args.rollout_len}·{args.num_envs} units")
    fig.tight_layout()
    outputs.save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
