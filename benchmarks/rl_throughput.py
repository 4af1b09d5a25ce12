"""Environment steps per second of jaxdp's RL training loop, against what the environments and the learner allow.

Tables, printed as markdown:

1. **Pong-v5, A2C and DQN** (what ``jaxdp train --env Pong-v5`` runs: A2C 16 envs × 8-step rollouts, one update
   of 128 samples per rollout; DQN with the Nature-DQN defaults of ``config.ATARI_DQN_DEFAULTS`` as CleanRL's
   ``dqn_atari.py`` uses them: 4 envs, one update of a 32-sample minibatch every 4 env steps (one vectorised
   step); the replay is capped at ``--dqn-buffer`` transitions here):

   * *env-only*: random actions, no network. ``host``: the :class:`jaxdp.envs.HostEnv` step from Python;
     ``XLA``: :func:`jaxdp.envs.make_xla`'s step inside a jitted ``lax.scan`` -- the path training takes.
   * *actor-only*: what training does besides learning -- the env steps and the acting forward pass (A2C: a
     rollout; DQN: the random-play warmup program, which runs the Q-network too), with the same jitted code.
   * *learner-only*: the same update as training (same network, optimizer, loss, replay sampling) on synthetic
     data, expressed as the env steps per second it could absorb: updates/s × env steps per update
     (A2C: E·n = 128; DQN: 4). One jitted update per call, as training calls it on CPU.
   * *training*: :func:`jaxdp.train.make_train` chunks exactly as ``jaxdp train`` calls them (on CPU with a CNN:
     one unrolled iteration per call -- XLA:CPU runs convolution gradients 10-60x slower inside a loop,
     jax-ml/jax#12868), compile excluded (reported apart: ``lower().compile()`` of the chunk, plus the DQN warmup).
   * *overlap*: the same with ``--pipeline overlap`` (an actor thread acts with parameters one update old while
     the learner updates; :func:`jaxdp.train.make_train`), timed the same way, right after the fused run.
   * *training / min(env XLA, learner)*: the issue's overlap measure; target >= 0.9 (for the fused loop and
     for ``--pipeline overlap``).
   * *cores busy*: process CPU time / wall time during the actor-only, learner-only and training timings.
   * *CPU-work bound*: the rate if the actor's and the learner's CPU work (core-seconds per env step, measured
     above) filled every core with nothing else: ``cores / (actor core-s per step + learner core-s per step)``.
     Where env and learner share the same cores (a CPU-only machine) this, not min(env, learner), is the
     ceiling: hiding the env behind the learner needs idle cores, and the learner alone keeps them busy.
     *training / CPU-work bound* says how close the loop comes to that ceiling.

2. **CartPole-v1** training steps/s of A2C and DQN (defaults). *vs CleanRL* (both tables): with
   ``--cleanrl-json`` (written by ``benchmarks/cleanrl_peer.py``, which runs CleanRL's own scripts on this machine)
   the ratio to CleanRL measured here -- a controlled comparison; without it, to CleanRL's reported throughput
   from other hardware (``dqn.py`` CartPole ~4.4k steps/s; ``dqn_atari.py`` Pong ~85 steps/s; ``ppo_atari.py``
   Pong ~130 steps/s, the closest on-policy reference for A2C), which only says how the loops compare in kind.

3. **Sweeps**: wall time of ``--seeds 0 1 2``, and of ``--lr 1e-3 4e-3 --seeds 0 1``, as one vmapped program vs
   their runs one after another (``jaxdp.loop.run``, CartPole A2C, same steps per run, compile included -- what a
   user waits for).

Each rate is the median over ``--repeats`` timed calls of an already compiled program. The machine is shared:
its load average is printed with the table; rates scale with the idle cores.

Run: ``python benchmarks/rl_throughput.py`` (a few minutes on 2 cores) or ``--quick`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdp import envs as envs_lib
from jaxdp import loop
from jaxdp import train as train_lib
from jaxdp.agents import a2c, dqn, replay as replay_lib
from jaxdp.cli_args import OneLineParser, positive_int
from jaxdp.config import ATARI_DQN_DEFAULTS, ConfigError, TrainConfig, validate
from jaxdp.provenance import cpu_model

CLEANRL_STEPS_PER_SECOND = {  # CleanRL's reported throughput (other hardware; see the module docstring)
    ("dqn", "CartPole-v1"): 4400.0,
    ("dqn", "Pong-v5"): 85.0,
    ("a2c", "Pong-v5"): 130.0,  # PPO (ppo_atari.py): the closest on-policy reference
}
# Keys of benchmarks/cleanrl_peer.py's JSON (CleanRL measured on this machine) for each comparison above.
CLEANRL_PEER_KEYS = {("dqn", "CartPole-v1"): "dqn/CartPole-v1", ("dqn", "Pong-v5"): "dqn/Pong-v5",
                     ("a2c", "Pong-v5"): "ppo/Pong-v5"}


def cleanrl_reference(path: str | None) -> tuple[dict, str]:
    """The CleanRL steps/s to compare with, and where they come from: measured here (``--cleanrl-json``, written
    by benchmarks/cleanrl_peer.py) or CleanRL's reported numbers from other hardware."""
    if path is None:
        return CLEANRL_STEPS_PER_SECOND, "CleanRL's reported numbers (other hardware)"
    with open(path) as f:
        peer = json.load(f)
    measured = {key: peer["steps_per_second"][name] for key, name in CLEANRL_PEER_KEYS.items()
                if name in peer["steps_per_second"]}
    return measured, f"CleanRL 1.2.0 measured on {peer['cpu']} ({peer['cores']} cores) on {peer['date']}"


# ------------------------------------------------------------------------------------------- machine


def machine_table() -> str:
    import envpool
    import flax
    import jaxlib

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    rows = [
        ("CPU", cpu_model()),
        ("cores (os.cpu_count)", str(os.cpu_count())),
        ("load average (1 / 5 / 15 min)", " / ".join(f"{x:.1f}" for x in load)),
        ("JAX devices", ", ".join(f"{d} ({d.device_kind})" for d in jax.devices())),
        ("Python", platform.python_version()),
        ("jax / jaxlib", f"{jax.__version__} / {jaxlib.__version__}"),
        ("flax / optax", f"{flax.__version__} / {optax.__version__}"),
        ("envpool", envpool.__version__),
    ]
    lines = ["| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- timing


def process_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime  # every thread of the process: XLA's, envpool's, Python's


class Timing(NamedTuple):
    seconds: float  # median wall time of one call
    cores: float  # CPU seconds / wall seconds over all timed calls: how many cores the work kept busy


def timed(fn: Callable[[], Any], repeats: int) -> Timing:
    """Wall time of ``fn()`` (which must block until its result is ready), median over ``repeats`` calls."""
    times = []
    cpu0 = process_cpu_seconds()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), (process_cpu_seconds() - cpu0) / sum(times))


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls."""
    return timed(fn, repeats).seconds


class Rate(NamedTuple):
    steps_per_second: float
    cores: float  # cores busy while running (see Timing)

    @property
    def core_seconds_per_step(self) -> float:
        return self.cores / self.steps_per_second


# ------------------------------------------------------------------------------------------- env-only


def host_env_steps_per_second(env_id: str, num_envs: int, steps: int, repeats: int) -> float:
    env = envs_lib.make_host(env_id, num_envs, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    num_actions = env.spec.num_actions

    def run():
        for _ in range(steps):
            env.step(rng.integers(0, num_actions, num_envs, dtype=np.int32))

    run()  # warm the pool's threads
    seconds = median_seconds(run, repeats)
    env.close()
    return steps * num_envs / seconds


def xla_env_steps_per_second(env_id: str, num_envs: int, steps: int, repeats: int) -> float:
    env = envs_lib.make_xla(env_id, num_envs, seed=0)
    num_actions = env.spec.num_actions

    def body(carry, _):
        handle, key = carry
        key, k = jax.random.split(key)
        handle, step = env.step(handle, jax.random.randint(k, (num_envs,), 0, num_actions))
        return (handle, key), step.reward.sum()

    @jax.jit
    def run(handle, key):
        (handle, key), rewards = jax.lax.scan(body, (handle, key), None, length=steps)
        return handle, key, rewards.sum()

    state = [env.handle, jax.random.PRNGKey(0)]

    def call():
        handle, key, total = run(*state)
        total.block_until_ready()
        state[:] = [handle, key]

    call()  # compile
    return steps * num_envs / median_seconds(call, repeats)


# ------------------------------------------------------------------------------------------- learner-only


def updates_per_second(update: Callable, carry: Any, data: Any, updates: int, repeats: int) -> Rate:
    """Rate of ``carry = update(carry, data)``, each update its own jitted call (an update inside ``lax.scan`` is
    much slower on XLA:CPU -- see the module docstring -- so a scanned rate is not what the learner can do).
    ``data`` is an argument, not a closure: a captured array would be baked into the program as a constant."""
    step = jax.jit(update)
    carry = step(carry, data)  # compile
    jax.block_until_ready(carry)

    def run():
        c = carry
        for _ in range(updates):
            c = step(c, data)
        jax.block_until_ready(c)

    t = timed(run, repeats)
    return Rate(updates / t.seconds, t.cores)


def scaled(rate: Rate, steps_per_call: float) -> Rate:
    return Rate(rate.steps_per_second * steps_per_call, rate.cores)


def a2c_learner_steps_per_second(cfg: TrainConfig, updates: int, repeats: int) -> Rate:
    """A2C updates on a synthetic rollout of E·n steps (Pong-shaped uint8 observations), as env steps/s."""
    spec = envs_lib.make_spec(cfg.env, cfg.envs_per_worker)
    network = train_lib.make_network(cfg, spec)
    tx = train_lib.make_optimizer(cfg)
    T, E = cfg.rollout, cfg.envs_per_worker
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    obs = jax.random.randint(keys[0], (T, E, *spec.obs_shape), 0, 256).astype(spec.obs_dtype)
    rollout = a2c.Rollout(
        obs=obs,
        action=jax.random.randint(keys[1], (T, E), 0, spec.num_actions),
        reward=jnp.sign(jax.random.normal(keys[2], (T, E))),
        terminated=jnp.zeros((T, E), bool),
        truncated=jnp.zeros((T, E), bool),
        valid=jnp.ones((T, E), bool),
        value=jax.random.normal(keys[3], (T, E)),
        bootstrap_value=jnp.zeros((E,)),
    )
    params = network.init(jax.random.PRNGKey(1), obs[0])
    opt_state = tx.init(params)
    apply = train_lib.network_apply(cfg, network, spec)  # as training applies it

    def update(carry, rollout):
        p, s = carry
        grads, _ = jax.grad(
            lambda q: a2c.loss(q, apply, rollout, gamma=cfg.gamma, ent_coef=cfg.ent_coef,
                               vf_coef=cfg.vf_coef), has_aux=True)(p)
        upd, s = tx.update(grads, s, p)
        return optax.apply_updates(p, upd), s

    return scaled(updates_per_second(update, (params, opt_state), rollout, updates, repeats), T * E)


def dqn_learner_steps_per_second(cfg: TrainConfig, updates: int, repeats: int) -> Rate:
    """DQN updates (replay sample, loss, optimizer, target refresh) from a full synthetic replay, as env steps/s:
    one update per ``env_steps_per_update`` vectorised steps of E envs."""
    E = cfg.envs_per_worker
    spec = envs_lib.make_spec(cfg.env, E)
    network = train_lib.make_network(cfg, spec)
    tx = train_lib.make_optimizer(cfg)
    frame_stack = spec.obs_shape[0] if spec.is_atari else 1
    capacity = cfg.replay_capacity(spec.is_atari)
    buf = replay_lib.init(capacity, E, spec.obs_shape, spec.obs_dtype, frame_stack=frame_stack)

    def fill(buf, key):
        k_obs, k_act, k_rew = jax.random.split(key, 3)
        obs = jax.random.randint(k_obs, (E, *spec.obs_shape), 0, 256).astype(spec.obs_dtype)
        buf = replay_lib.add(buf, obs, jax.random.randint(k_act, (E,), 0, spec.num_actions),
                             jnp.sign(jax.random.normal(k_rew, (E,))), jnp.zeros(E, bool), jnp.zeros(E, bool),
                             jnp.zeros(E, bool))
        return buf, None

    buf, _ = jax.jit(lambda b, ks: jax.lax.scan(fill, b, ks))(buf, jax.random.split(jax.random.PRNGKey(0),
                                                                                   capacity // E))
    params = network.init(jax.random.PRNGKey(1), jnp.zeros((1, *spec.obs_shape), spec.obs_dtype))
    opt_state = tx.init(params)
    huber = 1.0 if (cfg.loss == "huber" or (cfg.loss == "auto" and spec.is_atari)) else None
    apply = train_lib.network_apply(cfg, network, spec)  # as training applies it
    target_every = max(1, round(cfg.target_update / (cfg.env_steps_per_update * E)))

    def update(carry, buf):
        p, target, s, key, n = carry
        key, k = jax.random.split(key)
        batch = replay_lib.sample(buf, k, cfg.batch_size, n_step=cfg.n_step, gamma=cfg.gamma)
        grads, _ = jax.grad(
            lambda q: dqn.loss(q, target, apply, batch, double=cfg.algo == "double_dqn",
                               huber_delta=huber), has_aux=True)(p)
        upd, s = tx.update(grads, s, p)
        p = optax.apply_updates(p, upd)
        copy = ((n + 1) % target_every) == 0
        target = jax.tree.map(lambda a, b: jnp.where(copy, a, b), p, target)
        return p, target, s, key, n + 1

    init = (params, params, opt_state, jax.random.PRNGKey(2), jnp.int32(0))
    return scaled(updates_per_second(update, init, buf, updates, repeats), cfg.env_steps_per_update * E)


# ------------------------------------------------------------------------------------------- training


def training_steps_per_second(cfg: TrainConfig, iterations: int, repeats: int,
                              chunk_iterations: int | None = None) -> tuple[Rate, float]:
    """(env steps/s of make_train's chunks after compilation, compile seconds of the chunk and DQN warmup).

    ``chunk_iterations=None`` takes make_train's own choice, i.e. what ``jaxdp train`` runs; each timing calls
    the chunk until ``iterations`` iterations are done."""
    trainer = train_lib.make_train(cfg, chunk_iterations=chunk_iterations)
    handle = trainer.initial_handle()
    lanes = trainer.init(train_lib.seed_keys(cfg))
    compile_seconds = 0.0
    if trainer.warmup is not None and trainer.warmup_iterations > 0:
        t0 = time.perf_counter()
        warmup = trainer.warmup.lower(handle, lanes, trainer.warmup_iterations).compile()
        compile_seconds += time.perf_counter() - t0
        handle, lanes, _ = warmup(handle, lanes)
    start = jnp.int32(trainer.warmup_iterations)
    n = trainer.chunk_iterations
    t0 = time.perf_counter()
    if hasattr(trainer.chunk, "lower"):
        chunk = trainer.chunk.lower(handle, lanes, start, n).compile()
        compile_seconds += time.perf_counter() - t0
    else:  # --pipeline overlap: host code around two jitted programs, compiled by their first call
        handle, lanes, _ = trainer.chunk(handle, lanes, start, n)
        jax.block_until_ready(lanes.params)
        compile_seconds += time.perf_counter() - t0
        start += n
        chunk = functools.partial(trainer.chunk, length=n)
    calls = max(1, -(-iterations // n))
    state = [handle, lanes, int(start)]

    def call():
        h, ln, i = state
        for _ in range(calls):
            h, ln, _ = chunk(h, ln, jnp.int32(i))
            i += n
        jax.block_until_ready(ln.params)
        state[:] = [h, ln, i]

    call()  # the first run of a program pays one-off costs (allocation, the pool's threads)
    t = timed(call, repeats)
    steps = calls * n * trainer.env_steps_per_iteration * len(cfg.seeds)
    return Rate(steps / t.seconds, t.cores), compile_seconds


def actor_steps_per_second(cfg: TrainConfig, iterations: int, repeats: int) -> Rate:
    """Env steps/s of training's acting half alone: env steps plus the acting forward pass, no learning.

    A2C: the ``act`` half of training's iteration (:class:`jaxdp.train.LaneFunctions`: one rollout, rewards
    clipped), laid out over the lanes as make_train does, one jitted call per rollout;
    DQN: make_train's warmup program (``env_steps_per_update`` ε-greedy steps per iteration at ε = 1, the
    Q-network still applied), ``iterations`` iterations per call."""
    trainer = train_lib.make_train(cfg, chunk_iterations=1)
    handle, lanes = trainer.initial_handle(), trainer.init(train_lib.seed_keys(cfg))
    steps = iterations * trainer.env_steps_per_iteration * len(cfg.seeds)
    if cfg.is_dqn:
        warmup = trainer.warmup.lower(handle, lanes, iterations).compile()
        state = [handle, lanes]

        def call():
            h, ln, _ = warmup(*state)
            jax.block_until_ready(ln.obs)
            state[:] = [h, ln]
    else:
        fns = train_lib.lane_functions(cfg, trainer.env, trainer.network, train_lib.make_optimizer(cfg))
        axes = envs_lib.XlaHandle(pool=None, pending_reset=0)
        lane_act = train_lib.vmap_lanes(fns.act, (axes, 0, None), (axes, 0, 0, 0),
                                        single=len(cfg.seeds) * cfg.workers == 1)  # as make_train lays lanes out
        step = jax.jit(lambda h, ln: lane_act(h, ln, 0)[:3], donate_argnums=1)
        state = [handle, lanes]

        def call():
            h, ln = state
            for _ in range(iterations):
                h, ln, _ = step(h, ln)
            jax.block_until_ready(ln.obs)
            state[:] = [h, ln]

    call()  # compile, first run
    t = timed(call, repeats)
    return Rate(steps / t.seconds, t.cores)


def sweep_seconds(total_steps: int, seeds: tuple[int, ...], lrs: tuple[float, ...] = ()) -> tuple[float, float]:
    """(wall s of one loop.run of every run of the sweep, wall s of one loop.run per run in turn), CartPole A2C.

    The sweep is ``seeds`` (and, with several ``lrs``, every learning rate with every seed: ``--lr ... --seeds ...``);
    the runs in turn are its runs' own configs (``cfg.run_config(r)``)."""
    with tempfile.TemporaryDirectory() as tmp:
        def run(cfg: TrainConfig) -> float:
            t0 = time.perf_counter()
            loop.run(cfg)
            return time.perf_counter() - t0

        cfg = validate(TrainConfig(algo="a2c", total_steps=total_steps, seeds=seeds,
                                   sweep=(("lr", lrs),) if len(lrs) > 1 else (),
                                   logdir=os.path.join(tmp, "sweep"), progress=False, eval_episodes=0,
                                   tensorboard=False, checkpoint_interval=1e9))
        together = run(cfg)
        apart = sum(run(dataclasses.replace(cfg.run_config(r), logdir=os.path.join(tmp, f"run_{r}")))
                    for r in range(len(cfg.runs)))
    return together, apart


# ------------------------------------------------------------------------------------------- main


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def versus(ours: float, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}× ({fmt(theirs)})" if theirs else "n/a"


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: fewer steps, one repeat (about 2 minutes on 2 idle cores)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed calls per measurement (median reported)")
    parser.add_argument("--dqn-buffer", type=positive_int, default=50_000,
                        help="Pong DQN replay capacity (the default 1M takes 7 GB; capacity does not change speed)")
    parser.add_argument("--skip-pong", action="store_true", help="CartPole and the seed sweep only")
    parser.add_argument("--skip-sweep", action="store_true", help="no sweep timing")
    parser.add_argument("--cleanrl-json", default=None,
                        help="CleanRL measured on this machine (benchmarks/cleanrl_peer.py --json); default: CleanRL's "
                             "reported numbers from other hardware%(default).0s")
    args = parser.parse_args()
    # Every input is checked before the first measurement: a bad one is one line and exit 2, not a traceback
    # minutes into the run.
    try:
        reference, reference_source = cleanrl_reference(args.cleanrl_json)
    except (OSError, ValueError, KeyError, TypeError) as error:
        parser.error(f"--cleanrl-json {args.cleanrl_json!r}: not a file benchmarks/cleanrl_peer.py --json wrote "
                     f"({type(error).__name__}: {error})")
    try:
        pong = {
            "a2c": validate(TrainConfig(algo="a2c", env="Pong-v5", total_steps=10_000_000)),
            # What `jaxdp train --algo dqn --env Pong-v5` runs: the Nature-DQN defaults (CleanRL's dqn_atari).
            "dqn": validate(TrainConfig(algo="dqn", env="Pong-v5", total_steps=10_000_000,
                                        **{**ATARI_DQN_DEFAULTS, "learning_starts": 2_000},
                                        buffer_size=args.dqn_buffer)),
        }
    except ConfigError as error:
        parser.error(f"--dqn-buffer {args.dqn_buffer}: {error}")
    q = args.quick
    repeats = 1 if q else args.repeats

    print("# jaxdp RL throughput\n")
    print(machine_table())
    print(f"\n*vs CleanRL*: {reference_source}; A2C is compared with CleanRL's PPO, the closest on-policy script.\n")

    if not args.skip_pong:
        print("## Pong-v5: env-only, actor-only, learner-only and training env steps/s\n")
        print("| algo | envs | env-only host | env-only XLA | actor-only | learner-only | training | compile s | "
              "training / min(env XLA, learner) | target >= 0.9 | overlap | overlap / min(env XLA, learner) | "
              "cores busy: actor / learner / training / overlap | CPU-work bound | training / CPU-work bound | "
              "vs CleanRL |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        cores = os.cpu_count() or 1
        for algo, cfg in pong.items():
            E = cfg.envs_per_worker
            host = host_env_steps_per_second(cfg.env, E, 50 if q else 200, repeats)
            xla = xla_env_steps_per_second(cfg.env, E, 50 if q else 200, repeats)
            # About a second per timing: A2C iterations are 128 env steps (~0.1 s), DQN iterations 4 (~20 ms).
            if algo == "a2c":
                actor = actor_steps_per_second(cfg, 3 if q else 12, repeats)
                learner = a2c_learner_steps_per_second(cfg, 3 if q else 12, repeats)
                iterations = 3 if q else 12
            else:
                actor = actor_steps_per_second(cfg, 100 if q else 500, repeats)
                learner = dqn_learner_steps_per_second(cfg, 15 if q else 60, repeats)
                iterations = 15 if q else 60
            training, compile_s = training_steps_per_second(cfg, iterations, repeats)
            overlap, _ = training_steps_per_second(dataclasses.replace(cfg, pipeline="overlap"), iterations,
                                                   repeats)
            ratio = training.steps_per_second / min(xla, learner.steps_per_second)
            overlap_ratio = overlap.steps_per_second / min(xla, learner.steps_per_second)
            cpu_bound = cores / (actor.core_seconds_per_step + learner.core_seconds_per_step)
            ref = reference.get((algo, "Pong-v5"))
            print(f"| {algo} | {E} | {fmt(host)} | {fmt(xla)} | {fmt(actor.steps_per_second)} "
                  f"| {fmt(learner.steps_per_second)} | {fmt(training.steps_per_second)} | {compile_s:.1f} "
                  f"| {ratio:.2f} | {'met' if ratio >= 0.9 else 'not met'} "
                  f"| {fmt(overlap.steps_per_second)} | {overlap_ratio:.2f} "
                  f"| {actor.cores:.2f} / {learner.cores:.2f} / {training.cores:.2f} / {overlap.cores:.2f} of {cores} "
                  f"| {fmt(cpu_bound)} "
                  f"| {training.steps_per_second / cpu_bound:.2f} "
                  f"| {versus(training.steps_per_second, ref)} |", flush=True)
        print()

    print("## CartPole-v1: training env steps/s (make_train chunks, compile excluded)\n")
    print("| algo | envs | training | compile s | vs CleanRL |")
    print("|---|---|---|---|---|")
    for algo, chunk in (("a2c", 50 if q else 200), ("dqn", 200 if q else 1000)):
        cfg = validate(TrainConfig(algo=algo, total_steps=1_000_000))
        rate, compile_s = training_steps_per_second(cfg, chunk, repeats, chunk_iterations=chunk)
        training = rate.steps_per_second
        ref = reference.get((algo, "CartPole-v1"))
        print(f"| {algo} | {cfg.envs_per_worker} | {fmt(training)} | {compile_s:.1f} | {versus(training, ref)} |",
              flush=True)
    print()

    if not args.skip_sweep:
        total = 50_000 if q else 200_000
        seeds = (0, 1, 2)
        print(f"## Sweeps: CartPole-v1 A2C, {total:,} steps per run, compile included\n")
        print("| sweep | as one program | its runs one after another | speed-up |")
        print("|---|---|---|---|")
        for name, sweep_seeds, lrs in (("`--seeds 0 1 2`", seeds, ()),
                                       ("`--lr 1e-3 4e-3 --seeds 0 1` (4 runs)", (0, 1), (1e-3, 4e-3))):
            together, apart = sweep_seconds(total, sweep_seeds, lrs)
            print(f"| {name} | {together:.1f} s | {apart:.1f} s | {apart / together:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
