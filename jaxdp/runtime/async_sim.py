"""A deterministic event-driven simulator of the DPSGD master and workers (paper Alg. 1 and 2).

The paper's asynchronous protocol: N workers each hold an *anchor* (the global parameters θ they last
pulled). A worker runs B local steps of an inner optimizer from its anchor, then pushes the update vector
Δ = anchor − local (global minus local: it points uphill, like a gradient). The master collects Δ's as they
arrive; after every M arrivals (the master batch) it applies one update,
``θ ← θ + outer.update(aggregate(Δ_1..Δ_M))`` -- with ``outer = optax.sgd(η_g)`` and ``aggregate="sum"``
this is exactly Alg. 1's θ ← θ − η_g Σ_m Δ_m -- and workers pull θ again. Because workers are not
synchronised, a Δ may have been computed from an anchor several master versions old: staleness is not
injected, it *emerges* from the order of events, and is recorded.

The simulator runs in two phases so it is both exact and fast:

1. :func:`schedule` (NumPy, host): a discrete-event simulation of *when* things happen. Every worker draws
   the duration of each local step from its compute-time distribution (:func:`constant`,
   :func:`exponential`, :func:`lognormal`, :func:`straggler`); a heap of (arrival time, worker id) orders
   the arrivals, ties broken by worker id. The result, a :class:`Schedule`, records per arrival event the
   worker, the master version its anchor came from, whether a master update follows, the simulated time and
   which workers pull θ right after it; and per master update the staleness of every Δ it applied.
   Staleness = (master version just before the update) − (version the Δ's anchor was pulled at).
2. :func:`run` (JAX): one jitted ``lax.scan`` over the arrival events that does the arithmetic: B local
   steps of ``inner`` for the arriving worker, accumulate Δ, apply ``outer`` when the schedule says so, then
   refresh the anchors of the workers that pull. :func:`make_event_step` exposes the per-event function so
   a caller with host-side state (e.g. environments) can drive events one by one.

When does a worker get fresh parameters (``reply``)?

* ``"on_update"`` (default): the push is answered when the master update that includes the worker's Δ is
  applied; until then the worker waits. M = N with equal compute times is then exactly synchronous SGD,
  and M = 1 is Downpour SGD (every push triggers an update that is answered at once).
* ``"immediate"``: the worker pulls the current θ right after pushing (Alg. 2 read literally) -- it may
  get parameters that do not yet include its own Δ.

Time: one unit is whatever the compute-time distributions are expressed in (the experiments use "mean
duration of one local step of one worker"). ``comm_time`` is a one-way message latency: a push reaches
the master ``comm_time`` after the worker finishes, and a reply reaches the worker ``comm_time`` after the
master sends it. All workers hold θ_0 at time 0.

Determinism: the schedule is a pure function of its arguments (worker w draws its durations from
``np.random.default_rng([seed, w])``); in :func:`run`, local step b of event i gets the key
``fold_in(fold_in(PRNGKey(seed), i), b)``. Same arguments and seed → bitwise-identical run.

The name DPSGD means Distributed-Parallel SGD (Mohamad et al., "Scaling up Stochastic Gradient Descent for
Non-convex Optimisation"), not differentially-private SGD.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdp.runtime import _checks

PyTree = Any
# local_step(worker_state_w, params, key) -> (worker_state_w, grads, metrics)
LocalStep = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree, PyTree]]

_REPLIES = ("on_update", "immediate")
_AGGREGATES = ("mean", "sum")


# ----------------------------------------------------------------------------------------------------------
# Compute-time distributions: the duration of one local step of one worker.
# ----------------------------------------------------------------------------------------------------------


class ConstantTime(NamedTuple):
    """Every local step takes exactly ``time``."""

    time: float


class ExponentialTime(NamedTuple):
    """Local step durations are exponential with mean ``mean`` (memoryless: the classic async model)."""

    mean: float


class LogNormalTime(NamedTuple):
    """Log-normal durations with mean ``mean``; ``sigma`` is the std of the underlying normal."""

    mean: float
    sigma: float


class StragglerTime(NamedTuple):
    """Exponential(``mean``) durations, but with probability ``slow_prob`` a step is ``slowdown`` × slower."""

    mean: float
    slow_prob: float
    slowdown: float


ComputeTime = ConstantTime | ExponentialTime | LogNormalTime | StragglerTime


def _check_positive(caller: str, name: str, value: float) -> float:
    value = float(value)
    if not np.isfinite(value) or value <= 0.0:
        raise ValueError(f"{caller}: {name} must be a positive finite number, got {value}")
    return value


def constant(time: float) -> ConstantTime:
    """Every local step takes ``time`` (> 0) units. Equal constant times make the schedule lock-step.

    Example:
        >>> constant(1.0)
        ConstantTime(time=1.0)
    """
    return ConstantTime(_check_positive("constant", "time", time))


def exponential(mean: float) -> ExponentialTime:
    """Local step durations ~ Exponential with the given ``mean`` (> 0).

    Example:
        >>> exponential(1.0)
        ExponentialTime(mean=1.0)
    """
    return ExponentialTime(_check_positive("exponential", "mean", mean))


def lognormal(mean: float, sigma: float) -> LogNormalTime:
    """Log-normal durations with expectation ``mean`` (> 0) and log-space std ``sigma`` (>= 0).

    The underlying normal has mean log(mean) − sigma²/2, so E[duration] = ``mean`` for every sigma.

    Example:
        >>> lognormal(1.0, 0.5)
        LogNormalTime(mean=1.0, sigma=0.5)
    """
    mean = _check_positive("lognormal", "mean", mean)
    sigma = float(sigma)
    if not np.isfinite(sigma) or sigma < 0.0:
        raise ValueError(f"lognormal: sigma must be a finite number >= 0, got {sigma}")
    return LogNormalTime(mean, sigma)


def straggler(mean: float, slow_prob: float, slowdown: float) -> StragglerTime:
    """A heavy-tailed worker: Exponential(``mean``) steps, each ``slowdown`` × longer with prob. ``slow_prob``.

    ``mean`` is the mean of a *normal* step; the expected step time is
    ``mean · (1 − slow_prob + slow_prob · slowdown)``, so a straggler is slower on average than
    ``exponential(mean)``.

    Args:
        mean: mean duration of a non-straggling step (> 0).
        slow_prob: probability in [0, 1] that a step straggles.
        slowdown: factor >= 1 by which a straggling step is longer.

    Example:
        >>> straggler(1.0, 0.1, 10.0)
        StragglerTime(mean=1.0, slow_prob=0.1, slowdown=10.0)
    """
    mean = _check_positive("straggler", "mean", mean)
    slow_prob, slowdown = float(slow_prob), float(slowdown)
    if not 0.0 <= slow_prob <= 1.0:
        raise ValueError(f"straggler: slow_prob must be in [0, 1], got {slow_prob}")
    if not np.isfinite(slowdown) or slowdown < 1.0:
        raise ValueError(f"straggler: slowdown must be >= 1, got {slowdown}")
    return StragglerTime(mean, slow_prob, slowdown)


def sample_durations(distribution: ComputeTime, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draws ``size`` local-step durations (float64) from ``distribution`` with the NumPy generator ``rng``."""
    if isinstance(distribution, ConstantTime):
        return np.full(size, distribution.time)
    if isinstance(distribution, ExponentialTime):
        return rng.exponential(distribution.mean, size)
    if isinstance(distribution, LogNormalTime):
        mu = np.log(distribution.mean) - 0.5 * distribution.sigma**2
        return rng.lognormal(mu, distribution.sigma, size)
    if isinstance(distribution, StragglerTime):
        base = rng.exponential(distribution.mean, size)
        slow = rng.random(size) < distribution.slow_prob
        return np.where(slow, base * distribution.slowdown, base)
    raise TypeError(
        "compute_time must be made by constant/exponential/lognormal/straggler, "
        f"got {type(distribution).__name__}"
    )


def mean_duration(distribution: ComputeTime) -> float:
    """The expected duration of one local step under ``distribution``."""
    if isinstance(distribution, ConstantTime):
        return distribution.time
    if isinstance(distribution, StragglerTime):
        d = distribution
        return d.mean * (1.0 - d.slow_prob + d.slow_prob * d.slowdown)
    if isinstance(distribution, (ExponentialTime, LogNormalTime)):
        return distribution.mean
    raise TypeError(f"not a compute-time distribution: {type(distribution).__name__}")


# ----------------------------------------------------------------------------------------------------------
# Phase 1: the schedule (NumPy discrete-event simulation).
# ----------------------------------------------------------------------------------------------------------


class ArrivalEvents(NamedTuple):
    """One row per Δ arriving at the master, in arrival order (length E)."""

    worker: np.ndarray  # int32 [E]: who pushed
    anchor_version: np.ndarray  # int32 [E]: master version of the anchor the Δ was computed from
    update_follows: np.ndarray  # bool [E]: this arrival completes a master batch -> one update applied
    time: np.ndarray  # float64 [E]: simulated arrival time
    pulls: np.ndarray  # bool [E, N]: workers that set their anchor to θ right after this event


class MasterUpdates(NamedTuple):
    """One row per master update (length U = num_updates)."""

    staleness: np.ndarray  # int32 [U, M]: version before the update − anchor version, per applied Δ
    workers: np.ndarray  # int32 [U, M]: who pushed each applied Δ, in arrival order
    time: np.ndarray  # float64 [U]: simulated time of the update
    event: np.ndarray  # int32 [U]: index of the arrival event that triggered it


class Schedule(NamedTuple):
    """When everything happens in a DPSGD run; made by :func:`schedule`, consumed by :func:`run`."""

    events: ArrivalEvents
    updates: MasterUpdates
    num_workers: int
    local_steps: int
    master_batch: int
    reply: str


def schedule(
    num_workers: int,
    local_steps: int,
    master_batch: int,
    num_updates: int,
    compute_time: ComputeTime | Sequence[ComputeTime],
    *,
    comm_time: float = 0.0,
    seed: int = 0,
    reply: str = "on_update",
) -> Schedule:
    """Simulates the event order of DPSGD's asynchronous master and workers until ``num_updates`` updates.

    Each worker pulls θ, runs ``local_steps`` (B) local steps whose durations are drawn from its
    compute-time distribution, and pushes Δ, which reaches the master ``comm_time`` later. The master
    applies one update after every ``master_batch`` (M) arrivals. See the module docstring for ``reply``.
    The simulation stops right after the ``num_updates``-th update: the last event triggers it, and Δ's
    still in flight are not recorded.

    Args:
        num_workers: N >= 1.
        local_steps: B >= 1 local steps per push.
        master_batch: M, 1 <= M <= N: arrivals per master update.
        num_updates: number of master updates to simulate (>= 1).
        compute_time: one distribution for all workers, or a sequence of N (one per worker).
        comm_time: one-way message latency >= 0.
        seed: non-negative int; worker w draws from ``np.random.default_rng([seed, w])``.
        reply: ``"on_update"`` or ``"immediate"``.

    Returns:
        A :class:`Schedule`. E = number of arrival events, U = ``num_updates``.

    Example:
        >>> s = schedule(4, 1, 4, 3, constant(1.0))  # synchronous SGD: 4 workers in lock-step
        >>> s.events.worker.tolist(), s.updates.staleness.max().item()
        ([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3], 0)
    """
    caller = "schedule"
    n = _checks.check_int(caller, "num_workers", num_workers, 1)
    b = _checks.check_int(caller, "local_steps", local_steps, 1)
    m = _checks.check_int(caller, "master_batch", master_batch, 1)
    if m > n:
        raise ValueError(f"{caller}: master_batch M={m} > num_workers N={n}")
    u_total = _checks.check_int(caller, "num_updates", num_updates, 1)
    seed = _checks.check_int(caller, "seed", seed, 0)
    comm_time = float(comm_time)
    if not np.isfinite(comm_time) or comm_time < 0.0:
        raise ValueError(f"{caller}: comm_time must be a finite number >= 0, got {comm_time}")
    if reply not in _REPLIES:
        raise ValueError(f"{caller}: reply must be one of {_REPLIES}, got {reply!r}")
    if isinstance(compute_time, (ConstantTime, ExponentialTime, LogNormalTime, StragglerTime)):
        distributions = [compute_time] * n
    elif isinstance(compute_time, Sequence):
        distributions = list(compute_time)
        if len(distributions) != n:
            raise ValueError(
                f"{caller}: compute_time must be one distribution or a list of num_workers={n}, "
                f"got a list of {len(distributions)}"
            )
    else:
        raise TypeError(
            f"{caller}: compute_time must be a distribution (constant/exponential/lognormal/straggler) or a "
            f"list of them, got {type(compute_time).__name__}"
        )
    for w, d in enumerate(distributions):
        if not isinstance(d, (ConstantTime, ExponentialTime, LogNormalTime, StragglerTime)):
            raise TypeError(
                f"{caller}: compute_time[{w}] must be made by constant/exponential/lognormal/straggler, "
                f"got {type(d).__name__}"
            )

    rngs = [np.random.default_rng([seed, w]) for w in range(n)]

    def cycle_time(w: int) -> float:
        # B local steps, then the push travels to the master.
        return float(sample_durations(distributions[w], rngs[w], b).sum()) + comm_time

    version = 0
    anchor_version = np.zeros(n, np.int64)
    queue = [(cycle_time(w), w) for w in range(n)]
    heapq.heapify(queue)
    pending: list[tuple[int, int]] = []  # (worker, anchor version) of Δ's waiting in the accumulator

    ev_worker, ev_anchor, ev_update, ev_time, ev_pulls = [], [], [], [], []
    up_staleness, up_workers, up_time, up_event = [], [], [], []
    while version < u_total:
        t, w = heapq.heappop(queue)
        pending.append((w, int(anchor_version[w])))
        ev_worker.append(w)
        ev_anchor.append(int(anchor_version[w]))
        ev_time.append(t)
        pulls = np.zeros(n, bool)
        update = len(pending) == m
        if update:
            up_staleness.append([version - a for _, a in pending])
            up_workers.append([p for p, _ in pending])
            up_time.append(t)
            up_event.append(len(ev_worker) - 1)
            version += 1
            if reply == "on_update":
                for p, _ in pending:
                    pulls[p] = True
            pending = []
        if reply == "immediate":
            pulls[w] = True
        ev_update.append(update)
        ev_pulls.append(pulls)
        # A puller receives the post-update θ after one reply latency and starts its next cycle.
        for p in np.flatnonzero(pulls):
            anchor_version[p] = version
            heapq.heappush(queue, (t + comm_time + cycle_time(int(p)), int(p)))

    events = ArrivalEvents(
        worker=np.asarray(ev_worker, np.int32),
        anchor_version=np.asarray(ev_anchor, np.int32),
        update_follows=np.asarray(ev_update, bool),
        time=np.asarray(ev_time, np.float64),
        pulls=np.stack(ev_pulls).astype(bool),
    )
    updates = MasterUpdates(
        staleness=np.asarray(up_staleness, np.int32).reshape(u_total, m),
        workers=np.asarray(up_workers, np.int32).reshape(u_total, m),
        time=np.asarray(up_time, np.float64),
        event=np.asarray(up_event, np.int32),
    )
    return Schedule(events, updates, n, b, m, reply)


def staleness_histogram(sched: Schedule) -> np.ndarray:
    """Counts of applied Δ's by staleness: ``hist[s]`` = number with staleness s. Sums to U·M.

    Example:
        >>> staleness_histogram(schedule(2, 1, 1, 4, constant(1.0))).tolist()  # Downpour, 2 workers
        [1, 3]
    """
    return np.bincount(sched.updates.staleness.ravel(), minlength=1)


def pushes_per_worker(sched: Schedule) -> np.ndarray:
    """Number of Δ's each worker pushed (arrival events), shape [N]."""
    return np.bincount(sched.events.worker, minlength=sched.num_workers)


# ----------------------------------------------------------------------------------------------------------
# Phase 2: the arithmetic (one jitted lax.scan over arrival events).
# ----------------------------------------------------------------------------------------------------------


class SimCarry(NamedTuple):
    """Everything the master and the workers hold between events."""

    params: PyTree  # global θ on the master
    outer_state: PyTree  # outer optimizer state (master)
    anchors: PyTree  # [N, ...] θ each worker last pulled
    inner_states: PyTree  # [N, ...] each worker's inner optimizer state (persists across pulls)
    worker_states: PyTree  # [N, ...] user state per worker (e.g. an environment state), or None
    delta_sum: PyTree  # Σ of the Δ's received since the last master update
    delta_count: jax.Array  # int32: how many Δ's are in delta_sum
    num_updates: jax.Array  # int32: master version = updates applied so far


class ArrivalInput(NamedTuple):
    """What the schedule says about one arrival event (or, stacked, about all of them)."""

    worker: jax.Array  # int32 []
    update_follows: jax.Array  # bool []
    pulls: jax.Array  # bool [N]


class SimResult(NamedTuple):
    """Result of :func:`run`."""

    params: PyTree  # final global θ
    outer_state: PyTree
    worker_state: PyTree  # final per-worker user state ([N, ...]) or None
    metrics: dict  # see run()


def init_carry(
    params: PyTree,
    inner: optax.GradientTransformation,
    outer: optax.GradientTransformation,
    num_workers: int,
    worker_state: PyTree = None,
) -> SimCarry:
    """The state at time 0: every worker has pulled θ_0, accumulators empty.

    Each worker's inner state is ``inner.init(params)`` (the same for all; a strategy keeping a PRNG key
    therefore starts every worker from the same key).
    """
    n = _checks.check_int("init_carry", "num_workers", num_workers, 1)
    if worker_state is not None:
        chex.assert_tree_shape_prefix(worker_state, (n,))
    stack = lambda tree: jax.vmap(lambda _: tree)(jnp.arange(n))  # noqa: E731 (broadcast any leaf)
    return SimCarry(
        params=params,
        outer_state=outer.init(params),
        anchors=stack(params),
        inner_states=stack(inner.init(params)),
        worker_states=worker_state,
        delta_sum=jax.tree.map(jnp.zeros_like, params),
        delta_count=jnp.zeros((), jnp.int32),
        num_updates=jnp.zeros((), jnp.int32),
    )


def arrival_inputs(sched: Schedule) -> ArrivalInput:
    """The schedule's per-event instructions as stacked JAX arrays (leading axis E), ready for scanning."""
    return ArrivalInput(
        worker=jnp.asarray(sched.events.worker, jnp.int32),
        update_follows=jnp.asarray(sched.events.update_follows),
        pulls=jnp.asarray(sched.events.pulls),
    )


def event_key(seed: int | jax.Array, event_index: int | jax.Array) -> jax.Array:
    """The PRNG key of arrival event ``event_index``: ``fold_in(PRNGKey(seed), event_index)``."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), event_index)


def worker_round(
    local_step: LocalStep,
    inner: optax.GradientTransformation,
    local_steps: int,
    anchor: PyTree,
    inner_state: PyTree,
    worker_state: PyTree,
    key: jax.Array,
    *,
    unroll: bool = False,
) -> tuple[PyTree, PyTree, PyTree, PyTree]:
    """Alg. 2 for one worker: B local steps of ``inner`` from ``anchor``; returns Δ = anchor − local.

    Local step b uses ``fold_in(key, b)``. The B steps are a ``lax.scan``, or with ``unroll=True`` B copies of
    the step in one program with no loop around them (``lax.scan``'s own ``unroll`` keeps a one-trip while loop).
    Unroll where ``local_step``'s gradient must not run inside a loop: XLA:CPU runs convolution gradients 10-60×
    slower there (jax-ml/jax#12868; an A2C round of a Nature-CNN Pong worker took 865 ms scanned, 63 ms
    unrolled). The arithmetic is the same either way.

    Returns:
        (delta, inner_state, worker_state, metrics), metrics = mean over the B steps of local_step's.
    """

    def one_step(carry, b):
        local, inner_state, worker_state = carry
        worker_state, grads, metrics = local_step(worker_state, local, jax.random.fold_in(key, b))
        updates, inner_state = inner.update(grads, inner_state, local)
        return (optax.apply_updates(local, updates), inner_state, worker_state), metrics

    carry = (anchor, inner_state, worker_state)
    if unroll:
        per_step = []
        for b in range(local_steps):
            carry, metrics = one_step(carry, b)
            per_step.append(metrics)
        metrics = jax.tree.map(lambda *ms: jnp.stack(ms), *per_step)
    else:
        carry, metrics = jax.lax.scan(one_step, carry, jnp.arange(local_steps))
    local, inner_state, worker_state = carry
    delta = jax.tree.map(jnp.subtract, anchor, local)
    return delta, inner_state, worker_state, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)


def master_receive(
    outer: optax.GradientTransformation,
    aggregate: str,
    carry: SimCarry,
    delta: PyTree,
    update_follows: jax.Array,
    pulls: jax.Array,
) -> SimCarry:
    """Alg. 1 for one arrival: add Δ; if ``update_follows``, apply ``outer`` to the mean/sum; then pulls.

    The update is ``θ ← θ + outer.update(agg, outer_state, θ)`` with agg = Σ Δ (``"sum"``) or Σ Δ / count
    (``"mean"``); afterwards every worker with ``pulls[w]`` sets its anchor to the (new) θ.
    """
    delta_sum = jax.tree.map(jnp.add, carry.delta_sum, delta)
    delta_count = carry.delta_count + 1

    def apply_update(operand):
        params, outer_state, delta_sum, delta_count, num_updates = operand
        if aggregate == "mean":
            scale = 1.0 / delta_count.astype(jnp.float32)
            aggregated = jax.tree.map(lambda d: (d * scale).astype(d.dtype), delta_sum)
        else:
            aggregated = delta_sum
        updates, outer_state = outer.update(aggregated, outer_state, params)
        params = optax.apply_updates(params, updates)
        zeros = jax.tree.map(jnp.zeros_like, delta_sum)
        return params, outer_state, zeros, jnp.zeros_like(delta_count), num_updates + 1

    params, outer_state, delta_sum, delta_count, num_updates = jax.lax.cond(
        update_follows,
        apply_update,
        lambda operand: operand,
        (carry.params, carry.outer_state, delta_sum, delta_count, carry.num_updates),
    )

    def refresh(anchor, theta):
        mask = pulls.reshape(pulls.shape + (1,) * theta.ndim)
        return jnp.where(mask, theta[None], anchor)

    anchors = jax.tree.map(refresh, carry.anchors, params)
    return carry._replace(
        params=params,
        outer_state=outer_state,
        anchors=anchors,
        delta_sum=delta_sum,
        delta_count=delta_count,
        num_updates=num_updates,
    )


def _index(tree: PyTree, i: jax.Array) -> PyTree:
    return jax.tree.map(lambda x: x[i], tree)


def _set_index(tree: PyTree, i: jax.Array, value: PyTree) -> PyTree:
    return jax.tree.map(lambda x, v: x.at[i].set(v), tree, value)


def _event_step(
    local_step: LocalStep,
    inner: optax.GradientTransformation,
    outer: optax.GradientTransformation,
    local_steps: int,
    aggregate: str,
    unroll: bool,
    carry: SimCarry,
    arrival: ArrivalInput,
    key: jax.Array,
) -> tuple[SimCarry, PyTree]:
    w = arrival.worker
    delta, inner_state, worker_state, metrics = worker_round(
        local_step,
        inner,
        local_steps,
        _index(carry.anchors, w),
        _index(carry.inner_states, w),
        _index(carry.worker_states, w),
        key,
        unroll=unroll,
    )
    carry = carry._replace(
        inner_states=_set_index(carry.inner_states, w, inner_state),
        worker_states=_set_index(carry.worker_states, w, worker_state),
    )
    carry = master_receive(outer, aggregate, carry, delta, arrival.update_follows, arrival.pulls)
    return carry, metrics


def make_event_step(
    local_step: LocalStep,
    inner: optax.GradientTransformation,
    outer: optax.GradientTransformation,
    *,
    local_steps: int,
    aggregate: str = "mean",
    unroll: bool = False,
) -> Callable[[SimCarry, ArrivalInput, jax.Array], tuple[SimCarry, PyTree]]:
    """The pure function that processes one arrival event; :func:`run` scans it over a schedule.

    ``event_step(carry, arrival, key) -> (carry, metrics)``: the arriving worker runs B local steps from
    its anchor (:func:`worker_round`), the master receives its Δ (:func:`master_receive`). ``metrics`` is
    the mean over the B steps of ``local_step``'s metrics; ``unroll`` as in :func:`worker_round`. Jit it to drive
    events from Python, e.g. with host-side environments::

        step = jax.jit(make_event_step(local_step, inner, outer, local_steps=B))
        carry = init_carry(params, inner, outer, N, worker_state)
        for i, arrival in enumerate(zip(*arrival_inputs(sched))):
            carry, m = step(carry, ArrivalInput(*arrival), event_key(seed, i))
    """
    local_steps = _checks.check_int("make_event_step", "local_steps", local_steps, 1)
    if aggregate not in _AGGREGATES:
        raise ValueError(f"make_event_step: aggregate must be one of {_AGGREGATES}, got {aggregate!r}")
    return functools.partial(_event_step, local_step, inner, outer, local_steps, aggregate, bool(unroll))


@functools.partial(
    jax.jit,
    static_argnames=("local_step", "inner", "outer", "local_steps", "aggregate", "eval_fn", "eval_every"),
)
def _run_events(carry, arrivals, seed_key, *, local_step, inner, outer, local_steps, aggregate, eval_fn,
                eval_every):
    event_step = functools.partial(_event_step, local_step, inner, outer, local_steps, aggregate, False)
    if eval_fn is not None:
        eval_shape = jax.eval_shape(eval_fn, carry.params)
        no_eval = lambda _: jax.tree.map(  # noqa: E731
            lambda s: jnp.full(s.shape, jnp.nan, s.dtype), eval_shape
        )

    def body(carry, xs):
        index, arrival = xs
        carry, metrics = event_step(carry, arrival, jax.random.fold_in(seed_key, index))
        if eval_fn is None:
            return carry, (metrics, None)
        due = arrival.update_follows & (carry.num_updates % eval_every == 0)
        evaluation = jax.lax.cond(due, eval_fn, no_eval, carry.params)
        return carry, (metrics, evaluation)

    num_events = arrivals.worker.shape[0]
    return jax.lax.scan(body, carry, (jnp.arange(num_events), arrivals))


def run(
    sched: Schedule,
    params: PyTree,
    local_step: LocalStep,
    inner: optax.GradientTransformation,
    outer: optax.GradientTransformation,
    *,
    aggregate: str = "mean",
    worker_state: PyTree = None,
    seed: int = 0,
    eval_fn: Callable[[PyTree], jax.Array] | None = None,
    eval_every: int = 1,
) -> SimResult:
    """Replays ``sched`` with real arithmetic: one jitted ``lax.scan`` over its arrival events.

    Per event (worker w): B steps of ``local_step`` + ``inner`` from w's anchor, Δ = anchor − local is
    added to the master's accumulator; when the schedule says a master update follows,
    ``θ ← θ + outer.update(aggregate(Δ's), outer_state, θ)``; then the workers that pull get θ.
    ``outer = optax.sgd(η_g)`` with ``aggregate="sum"`` is Alg. 1 (θ ← θ − η_g Σ Δ_m); ``"mean"`` divides by
    M. Compilation is cached on (local_step, inner, outer, eval_fn) identity: pass the same objects to
    reuse it across seeds.

    Args:
        sched: from :func:`schedule`.
        params: θ_0 (a pytree of arrays).
        local_step: ``local_step(worker_state_w, params, key) -> (worker_state_w, grads, metrics)``, pure
            and jittable; ``metrics`` a pytree of numbers (may be ``{}``).
        inner: worker optimizer (e.g. ``optax.sgd(η_l)``); its state persists on the worker across pulls.
        outer: master optimizer applied to the aggregated Δ (e.g. ``optax.sgd(η_g)``).
        aggregate: ``"mean"`` or ``"sum"`` of the M Δ's of one update.
        worker_state: pytree with leading axis N (one state per worker) or None.
        seed: local step b of event i gets ``fold_in(fold_in(PRNGKey(seed), i), b)``.
        eval_fn: optional ``eval_fn(params) -> pytree of arrays`` evaluated on θ_0 and after every
            ``eval_every``-th master update.
        eval_every: >= 1.

    Returns:
        :class:`SimResult` with ``metrics`` a dict:
          ``"local"``: local_step metrics per event (mean over its B steps), leading axis E;
          if ``eval_fn``: ``"eval"`` (leading axis 1 + U // eval_every, the first on θ_0),
          ``"eval_update"`` (master updates done at each evaluation), ``"eval_time"`` (simulated time).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> def local_step(ws, params, key):  # minimise ½‖θ − 1‖²
        ...     return ws, jax.tree.map(lambda p: p - 1.0, params), {}
        >>> sched = schedule(4, 2, 2, 50, exponential(1.0))
        >>> out = run(sched, jnp.zeros(3), local_step, optax.sgd(0.1), optax.sgd(1.0))
        >>> bool(jnp.allclose(out.params, 1.0, atol=1e-3))
        True
    """
    if not isinstance(sched, Schedule):
        raise TypeError(f"run: sched must be a Schedule from schedule(), got {type(sched).__name__}")
    if aggregate not in _AGGREGATES:
        raise ValueError(f"run: aggregate must be one of {_AGGREGATES}, got {aggregate!r}")
    eval_every = _checks.check_int("run", "eval_every", eval_every, 1)
    seed = _checks.check_int("run", "seed", seed, 0)
    if worker_state is not None:
        chex.assert_tree_shape_prefix(worker_state, (sched.num_workers,))

    carry = init_carry(params, inner, outer, sched.num_workers, worker_state)
    carry, (local_metrics, evaluations) = _run_events(
        carry,
        arrival_inputs(sched),
        jax.random.PRNGKey(seed),
        local_step=local_step,
        inner=inner,
        outer=outer,
        local_steps=sched.local_steps,
        aggregate=aggregate,
        eval_fn=eval_fn,
        eval_every=eval_every,
    )
    metrics: dict = {"local": local_metrics}
    if eval_fn is not None:
        versions = np.cumsum(sched.events.update_follows)
        due = sched.events.update_follows & (versions % eval_every == 0)
        metrics["eval"] = jax.tree.map(
            lambda first, rest: jnp.concatenate([first[None], rest[due]]), eval_fn(params), evaluations
        )
        metrics["eval_update"] = np.concatenate([[0], versions[due]])
        metrics["eval_time"] = np.concatenate([[0.0], sched.events.time[due]])
    return SimResult(carry.params, carry.outer_state, carry.worker_states, metrics)
