"""XLA environment API: envpool stepped from inside ``jit`` / ``lax.scan`` / ``vmap``.

:func:`make_xla` creates an envpool pool, resets it on the host, and wraps envpool's XLA custom
call (``pool.xla()``) into a pure-looking ``step(handle, actions) -> (handle, Step)``. The handle
threads the pool's identity through the program so that XLA keeps the steps in order; the C++
pool behind it is mutable state, so an :class:`XlaEnv` is good for **one** run: a second call of the
same compiled function continues the same episodes rather than replaying them (make a new
:class:`XlaEnv` with the same seed to replay). Steps are bit-identical to :class:`~jaxdp.envs.HostEnv`
for the same seed and actions, and :class:`~jaxdp.envs.Step` has the same semantics (see
:mod:`jaxdp.envs.host`: next-step auto-reset marked by ``first``, episodic life, ``game_over``).

**Lanes (seed sweeps, simulated workers).** The pool holds ``lanes × num_envs`` envs. ``step`` and
:attr:`XlaEnv.initial_observation` are ``jax.custom_batching.custom_vmap`` functions: under
``jax.vmap`` with axis size ``S`` their rule flattens the batched arguments ``(S, E) -> (S·E,)``,
calls the function again (so that an enclosing ``vmap`` applies its own rule), and reshapes the
results back to ``(S, E, ...)``. Nested vmaps therefore compose (seeds × workers × envs =
``S·N·E``); the innermost call checks that the total equals what the pool holds. Lane ``l`` (the
row-major index over the nested vmap axes, outer axis first) owns envs ``[l·E, (l+1)·E)``.
Seeds: with an int ``seed``, env ``k`` of the pool gets ``seed + k``, so lane ``l`` behaves exactly
like a separate ``lanes=1`` pool made with ``seed + l·num_envs``; with a sequence of per-lane seeds,
lane ``l`` behaves like a separate pool made with ``seeds[l]``.

The PRNG key given to ``initial_observation`` carries only the lane axis: envpool seeds its envs at
construction, so the key's value is not used. Vmap it together with the lanes (e.g. the keys of a
seed sweep).

**Validation is static.** Shapes are known at trace time, so a wrong actions shape or a
non-integer dtype raises ValueError before anything runs; other integer dtypes are converted to
int32. Values cannot be checked on traced data: they are clipped into ``[0, num_actions)`` so that
no action can index past a game's action set in C++ (the host API raises instead).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.extend.core import Primitive
from jax.interpreters import mlir

from jaxdp.envs import spec as spec_lib
from jaxdp.envs.spec import EnvSpec, Step


class XlaHandle(NamedTuple):
    """The state threaded through :attr:`XlaEnv.step`.

    Attributes:
      pool: uint8 bytes identifying the envpool pool; each step consumes and returns it, which
        orders the steps. Never batched.
      pending_reset: bool ``(num_envs,)``: that env's previous step was done, so its next step is an
        auto-reset (reported as ``Step.first``). Batched like the actions under ``vmap``.
    """

    pool: jax.Array
    pending_reset: jax.Array


class XlaEnv(NamedTuple):
    """A pool of envpool environments usable inside ``jit``, ``lax.scan`` and ``vmap``.

    Attributes:
      spec: the :class:`EnvSpec` of one lane (``spec.num_envs`` envs).
      lanes: how many independent lanes of ``spec.num_envs`` envs the pool holds.
      handle: the :class:`XlaHandle` after the reset (``pending_reset`` of one lane).
      initial_obs: the observations of that reset: ``(num_envs, *obs_shape)`` when ``lanes == 1``,
        else ``(lanes, num_envs, *obs_shape)``.
      step: ``step(handle, actions) -> (handle, Step)``; actions int ``(num_envs,)`` per lane.
      initial_observation: ``initial_observation(key) -> obs (num_envs, *obs_shape)`` per lane; vmap
        it over the lanes' keys to get each lane's ``initial_obs``.
    """

    spec: EnvSpec
    lanes: int
    handle: XlaHandle
    initial_obs: jax.Array
    step: Callable[[XlaHandle, jax.Array], tuple[XlaHandle, Step]]
    initial_observation: Callable[[jax.Array], jax.Array]


# ``custom_vmap`` traces its function at the shapes it is called with *before* knowing whether an
# enclosing ``vmap`` will replace that trace by the rule. So the function cannot raise when it sees
# fewer envs than the pool holds (that is the normal case inside a vmap). Instead it emits this
# primitive, which raises the error only if it is ever evaluated or compiled: an unbatched call of a
# pool with lanes > 1, or a vmap over the wrong number of lanes. Under a correct vmap the rule
# discards that trace and the primitive never reaches XLA.
_lanes_error_p = Primitive("jaxdp_envs_lanes_mismatch")
_lanes_error_p.multiple_results = True


def _lanes_error_abstract(*args: Any, message: str, out_avals: tuple) -> list:
    del args, message
    return [jax.core.ShapedArray(shape, dtype) for shape, dtype in out_avals]


def _lanes_error_raise(*args: Any, message: str, out_avals: tuple) -> Any:
    raise ValueError(message)


_lanes_error_p.def_abstract_eval(_lanes_error_abstract)
_lanes_error_p.def_impl(_lanes_error_raise)
mlir.register_lowering(
    _lanes_error_p,
    lambda ctx, *args, message, out_avals: _lanes_error_raise(message=message, out_avals=out_avals),
)


def _lanes_error(message: str, like: Any, *args: Any) -> Any:
    """Values shaped like the pytree ``like`` that raise ``ValueError(message)`` if ever used."""
    leaves, treedef = jax.tree.flatten(like)
    out_avals = tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves)
    outs = _lanes_error_p.bind(*args, message=message, out_avals=out_avals)
    return jax.tree.unflatten(treedef, outs)


def _lane_seeds(seed: int | Sequence[int], lanes: int, num_envs: int) -> list[int]:
    if isinstance(seed, (Sequence, np.ndarray)) and not isinstance(seed, str):
        seeds = list(seed)
        if len(seeds) != lanes:
            raise ValueError(
                f"make_xla: seed must be an int or one seed per lane ({lanes}), got {len(seeds)} seeds"
            )
        return [spec_lib.check_seed(s, num_envs, "make_xla") for s in seeds]
    base = spec_lib.check_seed(seed, lanes * num_envs, "make_xla")
    return [base + lane * num_envs for lane in range(lanes)]


def _lanes_message(count: int, num_envs: int, lanes: int, where: str) -> str:
    return (
        f"{where}: called for {count} lane(s) of {num_envs} envs (the product of the vmap axis sizes "
        f"around it), but the pool holds lanes={lanes}; vmap over exactly {lanes} lane(s) "
        f"(or make the pool with lanes={count})"
    )


def make_xla(
    env_id: str,
    num_envs: int,
    seed: int | Sequence[int] = 0,
    lanes: int = 1,
    *,
    episodic_life: bool = True,
    repeat_action_probability: float = 0.0,
    num_threads: int = 0,
) -> XlaEnv:
    """Creates and resets an envpool pool of ``lanes × num_envs`` envs and returns its XLA API.

    Args:
      env_id: an envpool id with discrete actions (the gymnasium fallback has no XLA API).
      num_envs: envs per lane, >= 1.
      seed: an int (env ``k`` of the pool gets ``seed + k``) or one int per lane (env ``j`` of lane
        ``l`` gets ``seed[l] + j``).
      lanes: independent lanes, >= 1; vmap the training function over exactly this many.
      episodic_life: Atari only: a lost life ends the learning episode.
      repeat_action_probability: Atari sticky actions (0: DQN-standard).
      num_threads: envpool worker threads (0: envpool decides).

    Returns:
      The :class:`XlaEnv`.

    Example:
      >>> env = make_xla("CartPole-v1", num_envs=4, seed=0)
      >>> def body(handle, _):
      ...     handle, step = env.step(handle, jnp.zeros(4, jnp.int32))
      ...     return handle, step.reward
      >>> _, rewards = jax.jit(lambda h: jax.lax.scan(body, h, None, length=10))(env.handle)
      >>> rewards.shape
      (10, 4)
    """
    spec_lib.check_pool_args(
        "make_xla", num_envs, episodic_life, repeat_action_probability, num_threads
    )
    if not spec_lib.is_int(lanes) or lanes < 1:
        raise ValueError(f"make_xla: lanes must be an int >= 1, got {lanes!r}")
    num_envs, lanes = int(num_envs), int(lanes)
    if spec_lib.backend_of(env_id) != "envpool":
        raise ValueError(
            f"make_xla: {env_id!r} is a gymnasium id; the XLA API needs an envpool id (use HostEnv)"
        )
    spec = spec_lib.make_spec(env_id, num_envs, backend="envpool")
    total = lanes * num_envs
    env_seeds = [s + j for s in _lane_seeds(seed, lanes, num_envs) for j in range(num_envs)]

    import envpool

    kwargs = spec_lib.envpool_kwargs(
        spec,
        env_seeds,
        batch_size=total,
        episodic_life=episodic_life,
        repeat_action_probability=repeat_action_probability,
        num_threads=int(num_threads),
    )
    with spec_lib.quiet_spaces():
        pool = envpool.make_gymnasium(env_id, **kwargs)
        pool.observation_space  # built lazily (and cached) by the first recv

    obs, info = pool.reset()
    obs = np.asarray(obs)[np.argsort(np.asarray(info["env_id"]), kind="stable")]
    obs = spec_lib.one_hot_observations(spec, obs)
    pool_handle, _, _, xla_step = pool.xla()

    def check_actions(actions: Any) -> jax.Array:
        """Static checks of the flat actions: integer dtype and shape ``(k·num_envs,)``."""
        dtype = jnp.result_type(actions)
        if dtype == jnp.bool_ or not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"XlaEnv.step: actions must be integers (int32), got dtype {dtype}")
        shape = jnp.shape(actions)
        if len(shape) != 1 or shape[0] == 0 or shape[0] % num_envs:
            raise ValueError(f"XlaEnv.step: actions must have shape ({num_envs},) per lane, got {shape}")
        # Traced values cannot raise; clipping keeps envpool's C++ inside the action set.
        return jnp.clip(jnp.asarray(actions).astype(jnp.int32), 0, spec.num_actions - 1)

    def step_outputs_like(count: int) -> tuple[XlaHandle, Step]:
        z = lambda shape, dtype: jax.ShapeDtypeStruct((count, *shape), dtype)  # noqa: E731
        return XlaHandle(jax.ShapeDtypeStruct(jnp.shape(pool_handle), jnp.uint8), z((), bool)), Step(
            obs=z(spec.obs_shape, spec.obs_dtype),
            reward=z((), jnp.float32),
            terminated=z((), bool),
            truncated=z((), bool),
            game_over=z((), bool),
            first=z((), bool),
        )

    @custom_vmap
    def step(handle: XlaHandle, actions: jax.Array) -> tuple[XlaHandle, Step]:
        actions = check_actions(actions)
        if jnp.shape(handle.pending_reset) != jnp.shape(actions):
            raise ValueError(
                f"XlaEnv.step: handle.pending_reset must have shape ({num_envs},) per lane, "
                f"got {jnp.shape(handle.pending_reset)}"
            )
        count = jnp.shape(actions)[0]
        if count != total:
            message = _lanes_message(count // num_envs, num_envs, lanes, "XlaEnv.step")
            return _lanes_error(message, step_outputs_like(count), handle.pool, actions)
        pool_out, (obs, reward, terminated, truncated, info) = xla_step(handle.pool, actions)
        # Synchronous envpool returns envs in env_id order; sorting makes that a guarantee.
        order = jnp.argsort(info["env_id"], stable=True)
        obs, reward, terminated, truncated = (x[order] for x in (obs, reward, terminated, truncated))
        terminated, truncated = terminated.astype(bool), truncated.astype(bool)
        game_end = info["terminated"][order].astype(bool) if spec.is_atari else terminated
        out = Step(
            obs=spec_lib.one_hot_observations(spec, obs),
            reward=reward.astype(jnp.float32),
            terminated=terminated,
            truncated=truncated,
            game_over=game_end | truncated,
            first=jnp.asarray(handle.pending_reset, bool),
        )
        return XlaHandle(pool_out, terminated | truncated), out

    @step.def_vmap
    def step_rule(axis_size: int, in_batched: Any, handle: XlaHandle, actions: jax.Array) -> Any:
        handle_batched, actions_batched = in_batched
        pool_bytes = handle.pool[0] if handle_batched.pool else handle.pool  # identical rows
        pending = handle.pending_reset
        if not handle_batched.pending_reset:
            pending = jnp.broadcast_to(pending, (axis_size, *jnp.shape(pending)))
        if not actions_batched:
            actions = jnp.broadcast_to(actions, (axis_size, *jnp.shape(actions)))
        if actions.ndim != 2 or pending.shape != actions.shape:
            raise ValueError(
                f"XlaEnv.step: actions must have shape ({num_envs},) per lane, got {actions.shape[1:]}"
            )
        per_member = actions.shape[1]
        new_handle, out = step(
            XlaHandle(pool_bytes, pending.reshape(-1)), actions.reshape(axis_size * per_member)
        )
        unflat = lambda x: x.reshape((axis_size, per_member, *x.shape[1:]))  # noqa: E731
        result = (
            XlaHandle(new_handle.pool, unflat(new_handle.pending_reset)),
            Step(*(unflat(x) for x in out)),
        )
        return result, (XlaHandle(False, True), Step(*([True] * len(Step._fields))))

    all_obs = obs

    @custom_vmap
    def initial_obs_of_lanes(lane_keys: jax.Array) -> jax.Array:
        count = jnp.shape(lane_keys)[0]
        if count != lanes:
            message = _lanes_message(count, num_envs, lanes, "XlaEnv.initial_observation")
            like = jax.ShapeDtypeStruct((count * num_envs, *all_obs.shape[1:]), all_obs.dtype)
            return _lanes_error(message, like)
        return jnp.asarray(all_obs)

    @initial_obs_of_lanes.def_vmap
    def initial_obs_rule(axis_size: int, in_batched: Any, lane_keys: jax.Array) -> Any:
        del in_batched  # the only argument: batched, or the rule would not run
        count = lane_keys.shape[1]
        flat = initial_obs_of_lanes(lane_keys.reshape((axis_size * count, *lane_keys.shape[2:])))
        return flat.reshape((axis_size, count * num_envs, *flat.shape[1:])), True

    def initial_observation(key: jax.Array) -> jax.Array:
        """The reset observations of this lane, ``(num_envs, *obs_shape)``; vmap over lane keys."""
        return initial_obs_of_lanes(jnp.asarray(key)[None])

    initial = jnp.asarray(obs if lanes == 1 else obs.reshape((lanes, num_envs, *obs.shape[1:])))
    handle = XlaHandle(jnp.asarray(pool_handle), jnp.zeros(num_envs, bool))
    return XlaEnv(
        spec=spec,
        lanes=lanes,
        handle=handle,
        initial_obs=initial,
        step=step,
        initial_observation=initial_observation,
    )
