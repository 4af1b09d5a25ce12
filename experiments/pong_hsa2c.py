"""Pong-v5: HSA2C vs A2C learning curves for a short CPU budget.

Question: with the same number of actor environments and the same env-step budget, how do HSA2C (N workers,
B local updates, an asynchronous master; paper seeds/002, Alg. 8/9) and plain A2C (one learner) compare, in
return against env steps, against simulated time and against this machine's wall time?

Setup (stated, all overridable by flags):

* Environment: envpool ``Pong-v5`` with the standard DQN preprocessing (84×84 grey, 4-frame stacks, action
  repeat 4, 30 no-ops, episodic life for learning; returns are of the real game, -21..21).
* Network: the A3C CNN of Mnih et al. 2013 (16·8×8/4, 32·4×4/2, fc 256), as in the paper's HSA2C; policy and value
  heads. A2C loss: n-step returns (n = 5), entropy bonus 0.01, value coefficient 0.5, rewards clipped to their
  sign for the loss, gradients clipped to norm 0.5, RMSProp (lr 7e-4, decay 0.99, eps 1e-5).
* A2C: one learner with ``--envs`` environments (``jaxdp.train_async`` with N = 1, B = 1, M = 1: the master
  applies every gradient at once, which is A2C).
* HSA2C: N = ``--workers`` workers with ``--envs / N`` environments each (the same actors in total), B =
  ``--local-steps`` local RMSProp steps, update vectors averaged over M = ``--master-batch`` arrivals and
  applied with η_g = ``--global-lr``.
* Simulated time: a local step lasts n·E_worker units (one unit = one env step of one env, log-normal jitter
  σ = 0.25), each one-way message ``--comm`` units. A2C's local step covers all its envs, so its time per update
  is N times a HSA2C worker's.
* On a CPU this is far from solving Pong (that takes ~10M steps); the curves show throughput and the first
  learning. Both runs use the same seed and env-step budget.

Writes ``experiments/results/pong_hsa2c.csv`` (one row per log point of each run) and ``docs/img/pong_hsa2c.png``;
prints a summary table. Run: ``python experiments/pong_hsa2c.py`` (about 2 × ``--total-steps`` / throughput:
~10 minutes on 2 cores with the defaults; ``--quick`` for a smoke run into a temporary folder).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jaxdp.cli_args import OneLineParser, integer, non_negative_float, positive_float

import outputs  # experiments/outputs.py: where results go


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="Pong-v5", help="an envpool Atari id")
    parser.add_argument("--total-steps", type=integer, default=100_000, help="agent steps per run (all envs)")
    parser.add_argument("--envs", type=integer, default=16, help="actor envs in total (A2C: all; HSA2C: / N each)")
    parser.add_argument("--workers", type=integer, default=4, help="HSA2C workers N")
    parser.add_argument("--local-steps", type=integer, default=4, help="HSA2C local updates B")
    parser.add_argument("--master-batch", type=integer, default=2, help="HSA2C master batch M")
    parser.add_argument("--global-lr", type=positive_float, default=1.0, help="HSA2C η_g on the mean Δ")
    parser.add_argument("--lr", type=positive_float, default=7e-4, help="RMSProp learning rate")
    parser.add_argument("--rollout-len", type=integer, default=5, help="n-step rollout length")
    parser.add_argument("--comm", type=non_negative_float, default=20.0, help="one-way message time in units")
    parser.add_argument("--seed", type=integer, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="a few thousand steps: a smoke run; options given beside it win")
    outputs.add_arguments(parser, "pong_hsa2c")
    args = outputs.parse_quick(parser, argv, dict(total_steps=4_000))
    for name in ("total_steps", "envs", "workers", "local_steps", "master_batch", "rollout_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.envs % args.workers:
        parser.error(f"--envs {args.envs} must be a multiple of --workers {args.workers}")
    if args.master_batch > args.workers:
        parser.error(f"--master-batch {args.master_batch} must be <= --workers {args.workers}")
    from jaxdp.envs import make_spec  # the static spec: no pool, no JAX

    try:
        atari = make_spec(args.env, 1).is_atari
    except ValueError as error:
        parser.error(str(error))
    if not atari:  # the A3C CNN reads Atari frames
        parser.error(f"--env {args.env!r} is not an envpool Atari id (Pong-v5, Breakout-v5, ...)")
    outputs.resolve(args, "pong_hsa2c", parser)  # after the checks: a bad command line leaves no folder behind
    return args


def configs(args):
    from jaxdp.config import TrainConfig

    common = dict(algo="a2c", env=args.env, runtime="async_sim", torso="a3c", optimizer="rmsprop", lr=args.lr,
                  rollout_len=args.rollout_len, total_steps=args.total_steps, seeds=(args.seed,), progress=False,
                  tensorboard=False, eval_episodes=0)
    a2c = TrainConfig(strategy="async", workers=1, num_envs=args.envs, **common)
    hsa2c = TrainConfig(strategy="dpsgd", workers=args.workers, num_envs=args.envs // args.workers,
                        local_steps=args.local_steps, master_batch=args.master_batch, global_lr=args.global_lr,
                        **common)
    return {"A2C": a2c, "HSA2C": hsa2c}


def main(argv=None) -> None:
    args = parse_args(argv)
    from jaxdp import train_async
    from jaxdp.runtime import async_sim

    start = time.perf_counter()
    rows, summaries = [], []
    for name, cfg in configs(args).items():
        step_time = float(cfg.rollout * cfg.envs_per_worker)
        t0 = time.perf_counter()
        result = train_async.train(cfg, compute_time=async_sim.lognormal(step_time, 0.25), comm_time=args.comm)
        acc = result.accounting
        for r in result.records:
            rows.append({"run": name, "step": r["step"], "episodic_return": r["episodic_return"],
                         "episodes": r["episodes"], "sim_time": r["sim_time"], "wall_seconds": r["wall_seconds"],
                         "sps": r["sps"], "master_updates": r["master_updates"], "entropy": r.get("entropy")})
        returns = [x for _, x, _ in result.episodes]
        summaries.append({
            "run": name, "workers": cfg.workers, "envs_per_worker": cfg.envs_per_worker,
            "local_steps": acc["local_steps"], "master_batch": acc["master_batch"],
            "episodes": len(returns), "final_return": float(np.mean(returns[-max(1, len(returns) // 10):]))
            if returns else float("nan"),
            "env_steps_per_wall_second": acc["env_steps_per_wall_second"],
            "env_steps_per_sim_time": acc["env_steps_per_sim_time"], "master_updates": acc["master_updates"],
            "comm_rounds": acc["comm_rounds"], "bytes_sent": acc["bytes_sent"],
            "compile_seconds": result.compile_seconds, "seconds": time.perf_counter() - t0,
        })
        s = summaries[-1]
        print(f"  {name}: {s['episodes']} episodes, final return {s['final_return']:.2f}, "
              f"{s['env_steps_per_wall_second']:,.0f} env steps/s, {s['seconds']:.0f} s", flush=True)

    path = args.out / "pong_hsa2c.csv"
    outputs.write_csv(path, rows)
    print("\n| run | N × E | B | M | episodes | final return | env steps / wall s | env steps / sim unit | "
          "master updates | comm rounds | MB sent |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summaries:
        print(f"| {s['run']} | {s['workers']} × {s['envs_per_worker']} | {s['local_steps']} | {s['master_batch']} | "
              f"{s['episodes']} | {s['final_return']:.2f} | {s['env_steps_per_wall_second']:,.0f} | "
              f"{s['env_steps_per_sim_time']:.2f} | {s['master_updates']} | {s['comm_rounds']} | "
              f"{s['bytes_sent'] / 1e6:,.0f} |")
    plot(rows, args)
    print(f"wrote {path} and {args.plot} in {time.perf_counter() - start:.0f} s")


def _smooth(steps, returns, episodes):
    """Episode-weighted running mean over the last 5 log points that saw episodes."""
    xs, ys, window = [], [], []
    for s, r, e in zip(steps, returns, episodes):
        if r is None or e == 0:
            continue
        window = (window + [(r, e)])[-5:]
        xs.append(s)
        ys.append(sum(a * b for a, b in window) / sum(b for _, b in window))
    return xs, ys


def plot(rows, args) -> None:
    plt = outputs.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in ("A2C", "HSA2C"):
        mine = [r for r in rows if r["run"] == name]
        for ax, key in zip(axes, ("step", "sim_time", "wall_seconds")):
            xs, ys = _smooth([r[key] for r in mine], [r["episodic_return"] for r in mine],
                             [r["episodes"] for r in mine])
            ax.plot(xs, ys, label=name)
    for ax, label in zip(axes, ("env steps", "simulated time (units)", "wall seconds (this machine, one process)")):
        ax.set_xlabel(label)
        ax.set_ylabel("episodic return (running mean)")
        ax.legend()
    fig.suptitle(f"{args.env}: HSA2C (N = {args.workers}, B = {args.local_steps}, M = {args.master_batch}) vs A2C, "
                 f"{args.envs} actor envs in total, {args.total_steps:,} env steps, CPU")
    fig.tight_layout()
    outputs.save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
