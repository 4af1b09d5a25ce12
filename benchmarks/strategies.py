"""Overhead of each jaxdp strategy over its inner optax step, its state memory, and async_sim throughput.

Three tables, printed as markdown:

1. **Per-step time** of every strategy wrapped around ``optax.adam``, relative to ``optax.adam`` alone,
   on two parameter trees: the Nature-DQN CNN (Mnih et al. 2015: conv 32·8×8×4, 64·4×4×32,
   64·3×3×64, dense 3136×512, 512×6; about 1.69 M float32 parameters, built directly as arrays) and a
   small MLP (the digits MLP, 64→64→10, 4.8 k parameters). Each timing is one call of a jitted
   ``lax.scan`` of ``--steps`` optimizer steps (``update`` + ``apply_updates`` with a fixed gradient
   tree), so dispatch is amortised; strategies are timed in interleaved rounds and the median over
   ``--repeats`` rounds is reported, so a slow moment of the shared machine hits every row alike.
   ``allreduce`` is timed under ``jax.vmap`` with one worker (axis size 1), the only layout a single
   CPU device offers; the all-reduce itself is then free, so the row measures the transform's own
   cost, not communication; the row ``adam (vmap, 1 worker)`` shows what the layout alone does, and the
   column "same layout" (on which the verdicts are based) divides by the adam row of the same layout.
   (The two layouts differ because XLA:CPU splits the large elementwise loops of the plain layout over
   the cores but not those with a leading axis of 1; on a busy 2-core machine the unsplit one can be
   the faster.)
2. **State memory** of each strategy in units of the parameter size (bytes of the optimizer state
   pytree / bytes of the parameters; ``adam`` alone is 2).
3. **async_sim throughput**: simulated master updates per second of
   :func:`jaxdp.runtime.async_sim.run` on the digits MLP with N = 8 workers, B = 4 local steps,
   mini-batches of 32, for M = 1 (asynchronous) and M = N; compile time excluded, reported apart.

Targets (overhead over the inner step, CNN tree): <= 1.10× for ``allreduce`` and ``local_steps``;
<= 1.25× for ``delayed`` with max delay 8. The verdict is printed as measured.

Run: ``python benchmarks/strategies.py`` (a couple of minutes on 2 cores) or ``--quick``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdp
from jaxdp.cli_args import OneLineParser, positive_int
from jaxdp.runtime import async_sim
from jaxdp.workloads import digits
from jaxdp.provenance import cpu_model

AXIS = "workers"


# ------------------------------------------------------------------------------------------- trees


def nature_cnn_params(key: jax.Array, num_actions: int = 6) -> dict:
    """The Nature-DQN CNN's parameters (HWIO kernels), normal-initialised, float32."""
    shapes = {
        "conv1": ((8, 8, 4, 32), (32,)),
        "conv2": ((4, 4, 32, 64), (64,)),
        "conv3": ((3, 3, 64, 64), (64,)),
        "dense": ((3136, 512), (512,)),
        "head": ((512, num_actions), (num_actions,)),
    }
    keys = jax.random.split(key, len(shapes))
    return {
        name: {"w": 0.01 * jax.random.normal(k, w_shape), "b": jnp.zeros(b_shape)}
        for k, (name, (w_shape, b_shape)) in zip(keys, shapes.items())
    }


def mlp_params(key: jax.Array) -> dict:
    return digits.init_mlp(key, hidden=(64,))


def num_params(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def tree_bytes(tree) -> int:
    """Bytes of a pytree of arrays or ShapeDtypeStructs (a PRNG key counts as its raw uint32 data)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        dtype = leaf.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            itemsize = 8  # threefry: two uint32 words
        else:
            itemsize = np.dtype(dtype).itemsize
        total += int(np.prod(leaf.shape)) * itemsize
    return total


# ------------------------------------------------------------------------------------------- strategies


def strategies() -> dict[str, tuple[Callable[[], optax.GradientTransformation], bool]]:
    """name -> (make the optimizer, run under vmap with a worker axis of size 1)."""
    adam = lambda: optax.adam(1e-3)  # noqa: E731
    return {
        "adam (inner alone)": (adam, False),
        "adam (vmap, 1 worker)": (adam, True),  # the layout allreduce needs, without allreduce
        "allreduce + adam (vmap, 1 worker)": (lambda: optax.chain(jaxdp.allreduce(AXIS), adam()), True),
        "local_steps(adam, sgd(1), B=4)": (lambda: jaxdp.local_steps(adam(), optax.sgd(1.0), 4), False),
        "delayed(adam, fixed 8)": (lambda: jaxdp.delayed(adam(), jaxdp.delays.fixed(8)), False),
        "delayed(adam, uniform max 8)": (lambda: jaxdp.delayed(adam(), jaxdp.delays.uniform(8)), False),
        "hogwild(adam, 4 threads)": (lambda: jaxdp.hogwild(adam(), 4), False),
        "delayed(adam, fixed 8) + DC-ASGD": (
            lambda: jaxdp.delayed(adam(), jaxdp.delays.fixed(8), compensation=0.04),
            False,
        ),
    }


TARGETS = {
    "allreduce + adam (vmap, 1 worker)": 1.10,
    "local_steps(adam, sgd(1), B=4)": 1.10,
    "delayed(adam, fixed 8)": 1.25,
    "delayed(adam, uniform max 8)": 1.25,
}


def make_timed_fn(optimizer: optax.GradientTransformation, steps: int, vmapped: bool):
    """A jitted ``(params, state, grads) -> (params, state)`` running ``steps`` optimizer steps.

    Params and state are donated and threaded from call to call, as a training loop does (jaxdp's loop donates
    its carry): without donation every call would also copy the whole optimizer state, which for ``delayed``
    is (max_delay + 1) x params and would be charged to the strategy.
    """

    def many_steps(params, state, grads):
        def body(carry, _):
            params, state = carry
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(body, (params, state), None, length=steps)
        return params, state

    if vmapped:
        many_steps = jax.vmap(many_steps, axis_name=AXIS, axis_size=1)
    return jax.jit(many_steps, donate_argnums=(0, 1))


def time_strategies(params, steps: int, repeats: int) -> dict[str, dict]:
    """Per-step times (median over interleaved rounds) and state sizes of every strategy on ``params``."""
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    prepared = {}
    for name, (make, vmapped) in strategies().items():
        optimizer = make()
        fn = make_timed_fn(optimizer, steps, vmapped)
        own = jax.tree.map(jnp.copy, params)  # each strategy gets its own copy: the timed call donates it
        if vmapped:
            batch = lambda t: jax.tree.map(lambda x: x[None], t)  # noqa: E731
            args = (batch(own), jax.vmap(optimizer.init)(batch(own)), batch(grads))
        else:
            args = (own, optimizer.init(own), grads)
        compile_start = time.perf_counter()
        p, st = jax.block_until_ready(fn(*args))  # compile + warm up
        args = (p, st, args[2])
        compile_s = time.perf_counter() - compile_start
        state_bytes = tree_bytes(jax.eval_shape(optimizer.init, params))
        prepared[name] = (fn, args, compile_s, state_bytes)

    samples: dict[str, list[float]] = {name: [] for name in prepared}
    for _ in range(repeats):
        for name, (fn, args, compile_s, state_bytes) in list(prepared.items()):
            start = time.perf_counter()
            p, st = jax.block_until_ready(fn(*args))
            samples[name].append((time.perf_counter() - start) / steps)
            prepared[name] = (fn, (p, st, args[2]), compile_s, state_bytes)  # donated: thread the new carry

    return {
        name: {
            "step_s": statistics.median(samples[name]),
            "spread": (min(samples[name]), max(samples[name])),
            "compile_s": prepared[name][2],
            "state_bytes": prepared[name][3],
        }
        for name in prepared
    }


# ------------------------------------------------------------------------------------------- async_sim


def async_sim_throughput(num_updates: int, repeats: int) -> list[dict]:
    data = digits.load(seed=0)
    params = digits.init_mlp(jax.random.PRNGKey(0), hidden=(64,))

    def local_step(worker_state, p, key):
        x, y = digits.sample_batch(key, data.x_train, data.y_train, 32)
        return worker_state, jax.grad(digits.loss)(p, x, y), {}

    inner, outer = optax.sgd(0.05), optax.sgd(1.0)
    rows = []
    for master_batch in (1, 8):
        start = time.perf_counter()
        sched = async_sim.schedule(8, 4, master_batch, num_updates, async_sim.exponential(1.0), seed=0)
        schedule_s = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(async_sim.run(sched, params, local_step, inner, outer).params)
        first_s = time.perf_counter() - start
        runs = []
        for _ in range(repeats):  # same objects: the compiled scan is reused
            start = time.perf_counter()
            jax.block_until_ready(async_sim.run(sched, params, local_step, inner, outer).params)
            runs.append(time.perf_counter() - start)
        run_s = statistics.median(runs)
        events = len(sched.events.worker)
        rows.append({
            "master_batch": master_batch, "updates": num_updates, "events": events,
            "schedule_s": schedule_s, "compile_s": first_s - run_s, "run_s": run_s,
            "updates_per_s": num_updates / run_s, "local_steps_per_s": events * 4 / run_s,
            "schedule_events_per_s": events / schedule_s,
        })
    return rows


# ------------------------------------------------------------------------------------------- report


def machine() -> str:
    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"| machine | {cpu}, {cores} cores available, JAX backend {jax.default_backend()} |\n"
        f"| python | {platform.python_version()} |\n| jax | {jax.__version__} |\n| optax | {optax.__version__} |"
    )


def report_times(tree_name: str, params, results: dict[str, dict]) -> list[tuple[str, str, float, float, bool]]:
    base = results["adam (inner alone)"]["step_s"]
    base_vmapped = results["adam (vmap, 1 worker)"]["step_s"]
    vmapped = {name: v for name, (_, v) in strategies().items()}
    print(f"\n### Per-step time, {tree_name} ({num_params(params):,} parameters)\n")
    print("| strategy | µs / step (median) | min–max µs | × adam | × adam, same layout | target | verdict |")
    print("|---|---|---|---|---|---|---|")
    verdicts = []
    for name, r in results.items():
        ratio = r["step_s"] / (base_vmapped if vmapped[name] else base)  # the transform's own cost
        target = TARGETS.get(name)
        met = target is not None and ratio <= target
        verdict = "—" if target is None else ("met" if met else "not met")
        lo, hi = r["spread"]
        print(f"| {name} | {r['step_s'] * 1e6:.1f} | {lo * 1e6:.1f}–{hi * 1e6:.1f} | {r['step_s'] / base:.2f} | "
              f"{ratio:.2f} | {'—' if target is None else f'<= {target:.2f}'} | {verdict} |")
        if target is not None:
            verdicts.append((tree_name, name, ratio, target, met))
    return verdicts


def report_memory(trees: dict[str, dict], results: dict[str, dict[str, dict]]) -> None:
    print("\n### Optimizer state memory, in units of the parameter size\n")
    names = list(next(iter(results.values())))
    print("| strategy | " + " | ".join(trees) + " |")
    print("|---|" + "---|" * len(trees))
    for name in names:
        cells = [f"{results[t][name]['state_bytes'] / tree_bytes(trees[t]):.2f}" for t in trees]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=50, help="optimizer steps per timed lax.scan")
    parser.add_argument("--repeats", type=positive_int, default=9, help="interleaved timing rounds (median taken)")
    parser.add_argument("--trees", nargs="+", choices=["cnn", "mlp"], default=["cnn", "mlp"])
    parser.add_argument("--async-updates", type=positive_int, default=2000, help="master updates per async_sim run")
    parser.add_argument("--skip-async", action="store_true", help="skip the async_sim throughput table")
    parser.add_argument("--quick", action="store_true", help="fewer steps, rounds and updates: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.async_updates = 20, 3, 300

    start = time.perf_counter()
    print("## jaxdp strategies benchmark\n\n| | |\n|---|---|")
    print(machine())
    print(f"| settings | {args.steps} steps per timed scan, median of {args.repeats} interleaved rounds |")

    builders = {"cnn": ("Nature-DQN CNN", nature_cnn_params), "mlp": ("digits MLP 64-64-10", mlp_params)}
    trees, results, verdicts = {}, {}, []
    for tree_id in args.trees:
        tree_name, build = builders[tree_id]
        params = build(jax.random.PRNGKey(0))
        trees[tree_name] = params
        results[tree_name] = time_strategies(params, args.steps, args.repeats)
        verdicts += report_times(tree_name, params, results[tree_name])
    report_memory(trees, results)

    print("\n### Targets\n")
    print("| tree | strategy | × adam, same layout | target | verdict |\n|---|---|---|---|---|")
    for tree_name, name, ratio, target, met in verdicts:
        print(f"| {tree_name} | {name} | {ratio:.2f} | <= {target:.2f} | {'met' if met else 'NOT met'} |")

    if not args.skip_async:
        rows = async_sim_throughput(args.async_updates, repeats=3)
        print("\n### async_sim: digits MLP, N = 8 workers, B = 4 local steps, batch 32, exponential(1) times\n")
        print("| M | master updates | arrival events | schedule (s) | compile (s) | run (s) | "
              "master updates / s | local steps / s | schedule events / s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['master_batch']} | {r['updates']} | {r['events']} | {r['schedule_s']:.2f} | "
                  f"{r['compile_s']:.2f} | {r['run_s']:.3f} | {r['updates_per_s']:,.0f} | "
                  f"{r['local_steps_per_s']:,.0f} | {r['schedule_events_per_s']:,.0f} |")
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
