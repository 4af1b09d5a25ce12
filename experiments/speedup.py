"""Speed-up of asynchronous DPSGD with the number of workers, in iterations (the paper's Fig. 1).

Question: with N workers pushing update vectors to an asynchronous master (M = 1), how much less
simulated time does it take to reach a fixed training loss than with one worker? Linear speed-up means
time(1) / time(N) = N; the paper's Corollary 1 promises it while the staleness stays small next to the
number of iterations. Target here: speed-up >= 0.75·N at N = 8.

Setup (stated, all overridable by flags):

* Problem: the digits MLP (64 → 64 tanh → 10, ``jaxdp.workloads.digits``), mini-batches of 16 drawn with
  replacement; "training loss" = mean cross-entropy on the whole training split (1348 examples).
* DPSGD: master batch M = 1 (every arriving Δ is applied at once: asynchronous), B = 4 local SGD steps per
  push, ``reply="on_update"`` (= Downpour-style answer to each push), one thread per worker (P = 1).
  Worker: ``inner = optax.sgd(η)``; master: ``outer = optax.sgd(1.0)`` on the sum of the M Δ's. Since
  Δ = anchor − local already carries η, this realises the synthetic sequence θ ← θ − η Σ_m Σ_b g, i.e.
  equal local and global learning rates η in the paper's sense (applying η twice would give η²).
* Learning rate: Corollary 1, ``jaxdp.dpsgd_learning_rate(K, local_steps=B, master_batch=1,
  smoothness=L, gradient_variance=σ², initial_gap=f(θ_0))`` = sqrt(f(θ_0) / (L σ² K B)), with K = 1000
  master updates (the budget every run gets), L = the largest Hessian eigenvalue of the training loss at
  θ_0 (power iteration), σ² = E‖g_batch − ∇f‖² at θ_0 (512 batches), f* taken as 0 (cross-entropy ≥ 0).
  With M = 1 the rule does not depend on N, so every N uses the same η and the same budget: the only thing
  that changes with N is parallelism and the staleness it brings.
* Time: compute times exponential with mean 1 per local step, no communication cost; the unit of time is
  one local step of one worker. The training loss is evaluated every 2 master updates and the crossing
  time of the target is interpolated linearly between evaluations. speed-up(N) = mean over seeds of
  time(1) / mean over seeds of time(N).
* Randomness: seed s fixes both the schedule (compute times) and the mini-batches; the batch of event i is
  drawn from ``fold_in(PRNGKey(s), i)`` whatever N is (common random numbers), so the comparison between
  N isolates parallelism and staleness from sampling luck.

Result with the defaults (3 seeds): speed-up 1.98 / 4.02 / 7.93 at N = 2 / 4 / 8, with mean staleness
N − 1 master updates; the number of master updates to the target does not grow with N, i.e. at this η
staleness costs nothing. It does once η or N is large (2 seeds, ``--workers 1 8 32``): at ``--lr-scale 8``
(η ≈ 0.11) N = 8 is still linear (8.4) but N = 32 (staleness ≈ 30) needs 5× more master updates than
N = 1 and reaches only 6.2; at ``--lr-scale 32`` (η ≈ 0.44) N = 8 needs 4× more updates (speed-up 1.9)
and N = 32 gets 1.35 -- the condition of Corollary 1 that K be large next to the delays, seen from the
other side: staleness × η must stay small.

Writes ``experiments/results/speedup.csv`` (one row per N), ``experiments/results/speedup_runs.csv`` (one
row per N and seed) and ``docs/img/speedup.png``; prints the table. Run:
``python experiments/speedup.py`` (under a minute on 2 cores; ``--quick`` for a smoke run that writes to a
temporary folder).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import jaxdp
from jaxdp.cli_args import OneLineParser, integer, positive_float
from jaxdp.runtime import async_sim
from jaxdp.workloads import digits

import outputs  # experiments/outputs.py: where results go


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=integer, nargs="+", default=[1, 2, 4, 8], help="values of N")
    parser.add_argument("--seeds", type=integer, default=3, help="seeds averaged per N")
    parser.add_argument("--local-steps", type=integer, default=4, help="B, local steps per push")
    parser.add_argument("--batch-size", type=integer, default=16, help="examples per local step")
    parser.add_argument("--budget", type=integer, default=1000, help="K, master updates per run (also in the lr rule)")
    parser.add_argument("--target-loss", type=positive_float, default=0.1, help="training loss that defines 'reached'")
    parser.add_argument("--eval-every", type=integer, default=2, help="master updates between loss evaluations")
    parser.add_argument("--hidden", type=integer, default=64, help="hidden width of the MLP")
    parser.add_argument("--lr-scale", type=positive_float, default=1.0,
                        help="multiply the Corollary-1 rate (to see where staleness starts to hurt)")
    parser.add_argument("--quick", action="store_true",
                        help="N in {1, 4}, 1 seed, K = 400: a smoke run; options given beside it win")
    outputs.add_arguments(parser, "speedup")
    args = outputs.parse_quick(parser, argv, dict(workers=[1, 4], seeds=1, budget=400, target_loss=0.2))
    for name in ("seeds", "local_steps", "batch_size", "budget", "eval_every", "hidden"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.workers) < 1:
        parser.error(f"--workers must all be >= 1, got {args.workers}")
    if 1 not in args.workers:
        parser.error("--workers must include 1 (the baseline of the speed-up)")
    outputs.resolve(args, "speedup", parser)  # after the checks: a bad command line leaves no folder behind
    return args


def estimate_constants(data: digits.Dataset, params, batch_size: int) -> tuple[float, float, float]:
    """(f(θ_0), L, σ²) at θ_0: the loss, the top Hessian eigenvalue and the mini-batch gradient variance."""
    full_loss = lambda p: digits.loss(p, data.x_train, data.y_train)  # noqa: E731
    flat, unravel = ravel_pytree(params)
    grad = jax.grad(full_loss)

    @jax.jit
    def hessian_vector(v):
        return ravel_pytree(jax.jvp(grad, (params,), (unravel(v),))[1])[0]

    v = jax.random.normal(jax.random.PRNGKey(1), flat.shape)
    v = v / jnp.linalg.norm(v)
    for _ in range(50):
        hv = hessian_vector(v)
        v = hv / jnp.linalg.norm(hv)
    smoothness = float(jnp.vdot(v, hessian_vector(v)))

    full_grad = ravel_pytree(grad(params))[0]

    def batch_grad(key):
        x, y = digits.sample_batch(key, data.x_train, data.y_train, batch_size)
        return ravel_pytree(jax.grad(digits.loss)(params, x, y))[0]

    grads = jax.vmap(batch_grad)(jax.random.split(jax.random.PRNGKey(2), 512))
    variance = float(jnp.mean(jnp.sum((grads - full_grad) ** 2, axis=-1)))
    return float(full_loss(params)), smoothness, variance


def crossing_time(times: np.ndarray, losses: np.ndarray, target: float) -> float:
    """First time the loss curve reaches ``target`` (linear interpolation), NaN if it never does."""
    below = np.flatnonzero(losses <= target)
    if below.size == 0:
        return float("nan")
    i = below[0]
    if i == 0:
        return float(times[0])
    t0, t1, l0, l1 = times[i - 1], times[i], losses[i - 1], losses[i]
    return float(t0 + (l0 - target) / (l0 - l1) * (t1 - t0))


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    data = digits.load(seed=0)
    params = digits.init_mlp(jax.random.PRNGKey(0), hidden=(args.hidden,))
    gap, smoothness, variance = estimate_constants(data, params, args.batch_size)
    lr = jaxdp.dpsgd_learning_rate(
        args.budget, local_steps=args.local_steps, master_batch=1,
        smoothness=smoothness, gradient_variance=variance, initial_gap=gap,
    ) * args.lr_scale
    print(f"constants at θ_0: f(θ_0) − f* = {gap:.3f}, L = {smoothness:.3f}, σ² (batch {args.batch_size}) = "
          f"{variance:.3f}; K = {args.budget}, B = {args.local_steps}, M = 1, P = 1 → η = {lr:.4f}"
          + (f" (rule × {args.lr_scale})" if args.lr_scale != 1.0 else ""))

    # Built once: run() caches its compilation on these objects, so seeds reuse it (one compile per N).
    def local_step(worker_state, p, key):
        x, y = digits.sample_batch(key, data.x_train, data.y_train, args.batch_size)
        return worker_state, jax.grad(digits.loss)(p, x, y), {}

    def train_loss(p):
        return digits.loss(p, data.x_train, data.y_train)

    inner, outer = optax.sgd(lr), optax.sgd(1.0)

    runs, curves = [], {}
    for n in args.workers:
        for seed in range(args.seeds):
            sched = async_sim.schedule(
                n, args.local_steps, 1, args.budget, async_sim.exponential(1.0), seed=seed
            )
            result = async_sim.run(
                sched, params, local_step, inner, outer, aggregate="sum", seed=seed,
                eval_fn=train_loss, eval_every=args.eval_every,
            )
            losses = np.asarray(result.metrics["eval"])
            times = result.metrics["eval_time"]
            t_target = crossing_time(times, losses, args.target_loss)
            reached = np.flatnonzero(losses <= args.target_loss)
            updates = int(result.metrics["eval_update"][reached[0]]) if reached.size else -1
            staleness = sched.updates.staleness.ravel()
            runs.append({
                "num_workers": n, "seed": seed, "lr": lr, "time_to_target": t_target,
                "updates_to_target": updates, "final_loss": float(losses[-1]),
                "mean_staleness": float(staleness.mean()), "max_staleness": int(staleness.max()),
            })
            if seed == 0:
                curves[n] = (times, losses)
            print(f"  N={n} seed={seed}: time to loss {args.target_loss} = {t_target:8.1f} "
                  f"({updates} updates), mean staleness {staleness.mean():.2f}, final loss {losses[-1]:.4f}")

    summary = []
    base = np.mean([r["time_to_target"] for r in runs if r["num_workers"] == 1])
    for n in args.workers:
        mine = [r for r in runs if r["num_workers"] == n]
        t = np.array([r["time_to_target"] for r in mine])
        summary.append({
            "num_workers": n, "lr": lr, "local_steps": args.local_steps, "master_batch": 1,
            "target_loss": args.target_loss, "seeds": args.seeds,
            "mean_time_to_target": float(t.mean()), "std_time_to_target": float(t.std()),
            "mean_updates_to_target": float(np.mean([r["updates_to_target"] for r in mine])),
            "mean_staleness": float(np.mean([r["mean_staleness"] for r in mine])),
            "speedup": float(base / t.mean()), "ideal": n, "efficiency": float(base / t.mean() / n),
        })

    outputs.write_csv(args.out / "speedup.csv", summary)
    outputs.write_csv(args.out / "speedup_runs.csv", runs)

    print(f"\n| N | time to loss {args.target_loss} (mean ± std) | master updates | mean staleness | speed-up | "
          f"efficiency |\n|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['num_workers']} | {s['mean_time_to_target']:.1f} ± {s['std_time_to_target']:.1f} | "
              f"{s['mean_updates_to_target']:.0f} | {s['mean_staleness']:.2f} | {s['speedup']:.2f} | "
              f"{s['efficiency']:.2f} |")
    largest = summary[-1]
    met = largest["speedup"] >= 0.75 * largest["num_workers"]
    print(f"\ntarget speed-up >= 0.75·N at N = {largest['num_workers']}: "
          f"{largest['speedup']:.2f} vs {0.75 * largest['num_workers']:.2f} -> {'met' if met else 'NOT met'}")

    plot(summary, curves, args)
    print(f"wrote {args.out / 'speedup.csv'}, {args.out / 'speedup_runs.csv'}, {args.plot} "
          f"in {time.perf_counter() - start:.0f} s")


def plot(summary, curves, args) -> None:
    plt = outputs.pyplot()
    fig, (ax_speed, ax_curve) = plt.subplots(1, 2, figsize=(10, 4))
    ns = np.array([s["num_workers"] for s in summary])
    ax_speed.plot(ns, ns, "k--", label="ideal (linear)")
    ax_speed.plot(ns, 0.75 * ns, ":", color="grey", label="0.75·N")
    ax_speed.plot(ns, [s["speedup"] for s in summary], "o-", label="async DPSGD (M=1)")
    ax_speed.set_xlabel("workers N")
    ax_speed.set_ylabel("speed-up  time(1) / time(N)")
    ax_speed.set_title(f"time to training loss {args.target_loss}, B={args.local_steps}")
    ax_speed.set_xticks(ns)
    ax_speed.legend()
    ax_speed.grid(alpha=0.3)
    for n, (times, losses) in curves.items():
        ax_curve.plot(times, losses, label=f"N={n}")
    ax_curve.axhline(args.target_loss, color="k", ls=":", lw=1)
    ax_curve.set_yscale("log")
    ax_curve.set_xscale("log")
    ax_curve.set_xlabel("simulated time (local steps of one worker)")
    ax_curve.set_ylabel("training loss")
    ax_curve.set_title("learning curves (seed 0)")
    ax_curve.legend()
    ax_curve.grid(alpha=0.3)
    fig.tight_layout()
    outputs.save_figure(fig, args.plot, dpi=120)


if __name__ == "__main__":
    main()
