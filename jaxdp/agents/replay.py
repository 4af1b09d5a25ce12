"""A device-side experience-replay ring buffer for vectorised environments.

The buffer keeps one ring per environment stream: ``capacity // num_envs`` slots, each slot holding one
step of every env (arrays ``[slots, num_envs, ...]``). A whole step of all envs is written at once by
:func:`add`, so every stream holds the same number of steps and its slots are in chronological order.

What one :func:`add` stores (the step ``t`` of each env)::

    obs_t, action_t, reward_t, terminated_t, truncated_t, first_t

where ``obs_t`` is the observation the action was taken in, ``reward_t / terminated_t / truncated_t``
come from stepping ``action_t``, and ``first_t`` says that ``obs_t`` is the first observation of an
episode (the ``first`` flag that came back *together with* ``obs_t``). The successor ``obs_{t+1}`` is the
next slot of the same stream, so an observation is stored once, never twice.

Auto-reset (envpool): after a step with ``terminated | truncated`` the next step ignores its action and
returns the first observation of a new episode with reward 0. That step ``u`` is a fake transition; it is
recognised by ``first_{u+1}`` and :func:`sample` returns it with ``valid = False``. The real last
transition before it keeps its successor, the final observation, so a truncated episode bootstraps from
it (``discount = γ^k``) and a terminated one does not (``discount = 0``).

Frame stacks: with ``frame_stack = S > 1`` an observation is a stack ``[S, *frame]`` of the last ``S``
frames, oldest first (envpool Atari: ``(4, 84, 84)`` uint8). Consecutive stacks share ``S - 1`` frames, so
only the newest frame of each observation is stored and stacks are rebuilt at sample time. envpool
builds its stacks in exactly two ways (checked on Pong and Breakout): at a real reset it fills the
stack with ``S`` copies of the first frame; otherwise -- also at the reset after a lost life with
``episodic_life=True``, which continues the old stack -- it shifts the stack by one frame. So :func:`add`
records ``stack_start = all frames of obs equal its newest frame``: where it holds, copies of the newest
frame rebuild the stack bit for bit; where it does not, the stack is a shift of the previous one. The
rebuilt observations equal the original ones bit for bit (tested on real Pong and Breakout streams).

Sampling is uniform, with replacement, over the (position, env) pairs whose stack and ``n_step``
successors are all still stored: chronological positions ``S - 1 .. count - 1 - n_step`` of every stream
(the ``S - 1`` oldest steps are left out because their stacks may need frames already overwritten).

Memory: ``slots · E · (frame bytes + 12)`` bytes plus a few scalars, see :func:`bytes_required`; one
million Atari transitions take 7.07 GB instead of 28 GB for full stacks.

Every function is pure and jittable (``batch_size`` and ``n_step`` are static; ``gamma`` may be traced)
and works under ``jax.vmap`` over whole buffers (seed sweeps).

Example:
    >>> import jax, jax.numpy as jnp
    >>> buf = init(capacity=8, num_envs=2, obs_shape=(3,), obs_dtype=jnp.float32)
    >>> for t in range(3):
    ...     buf = add(buf, jnp.full((2, 3), t, jnp.float32), jnp.zeros(2, jnp.int32), jnp.ones(2),
    ...               jnp.zeros(2, bool), jnp.zeros(2, bool), jnp.full(2, t == 0))
    >>> batch = sample(buf, jax.random.key(0), batch_size=4)
    >>> batch.obs.shape, bool(batch.valid.all())
    ((4, 3), True)
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Bytes per slot and env besides the frame: action int32, reward float32, and four bool flags.
_STEP_BYTES = 4 + 4 + 4


class ReplayBuffer(NamedTuple):
    """Ring-buffer state (a pytree). Arrays are ``[slots, num_envs, ...]``, indexed by slot then env.

    Attributes:
        frames: the stored observation part, ``[slots, E, *frame_shape]``: the newest frame of each
            observation when ``frame_stack > 1``, else the whole observation.
        action: ``[slots, E]`` int32.
        reward: ``[slots, E]`` float32.
        terminated: ``[slots, E]`` bool -- the step ended the episode (no bootstrap).
        truncated: ``[slots, E]`` bool -- the step hit a time limit (bootstrap from the final obs).
        first: ``[slots, E]`` bool -- the observation of this slot is the first of an episode.
        stack_start: ``[slots, E]`` bool -- the observation's stack is copies of its newest frame.
        frame_lags: ``[frame_stack]`` int32, ``0 .. S-1``; its length carries ``frame_stack``
            through ``jit`` as a static shape.
        cursor: int32 scalar, the slot the next :func:`add` writes.
        count: int32 scalar, steps stored per stream (at most ``slots``).
    """

    frames: jax.Array
    action: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    first: jax.Array
    stack_start: jax.Array
    frame_lags: jax.Array
    cursor: jax.Array
    count: jax.Array


class Transition(NamedTuple):
    """A sampled batch of (n-step) transitions, each field with leading batch axis ``B``.

    Attributes:
        obs: ``[B, *obs_shape]`` observation the action was taken in (stack rebuilt).
        action: ``[B]`` int32.
        reward: ``[B]`` float32, ``Σ_{j<k} γ^j r_{t+j}``: the discounted sum over the ``k`` steps taken
            (``k = n_step``, or fewer when the episode ends first).
        next_obs: ``[B, *obs_shape]`` the observation ``k`` steps later (the final observation of the
            episode when it ended).
        discount: ``[B]`` float32, ``γ^k · (1 − terminated)`` of the last step taken.
        valid: ``[B]`` bool; False for a fake auto-reset transition, or when nothing can be sampled.
            Losses must weight by it.
    """

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    next_obs: jax.Array
    discount: jax.Array
    valid: jax.Array


def _check_config(capacity: int, num_envs: int, obs_shape: tuple[int, ...], frame_stack: int) -> int:
    if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"replay: num_envs must be an int >= 1, got {num_envs!r}")
    if not isinstance(capacity, (int, np.integer)) or capacity < num_envs:
        raise ValueError(f"replay: capacity must be an int >= num_envs ({num_envs}), got {capacity!r}")
    if not isinstance(frame_stack, (int, np.integer)) or frame_stack < 1:
        raise ValueError(f"replay: frame_stack must be an int >= 1, got {frame_stack!r}")
    if frame_stack > 1 and (len(obs_shape) < 1 or obs_shape[0] != frame_stack):
        raise ValueError(
            f"replay: obs_shape must start with the stack axis of length frame_stack={frame_stack}, "
            f"got {tuple(obs_shape)}"
        )
    slots = capacity // num_envs
    if slots <= frame_stack:
        raise ValueError(
            f"replay: capacity // num_envs must exceed frame_stack={frame_stack}, got {slots} slots per env"
        )
    return slots


def _frame_shape(obs_shape: tuple[int, ...], frame_stack: int) -> tuple[int, ...]:
    return tuple(obs_shape[1:]) if frame_stack > 1 else tuple(obs_shape)


def bytes_required(
    capacity: int, obs_shape: tuple[int, ...], frame_stack: int = 1, obs_dtype=np.uint8, num_envs: int = 1
) -> int:
    """Bytes that :func:`init` allocates for these arguments, computed without allocating.

    ``slots · E · (frame_bytes + 12) + 8 + 4 · frame_stack`` with ``slots = capacity // num_envs`` and
    ``frame_bytes = prod(obs_shape[1:]) · itemsize`` for stacked frames (``prod(obs_shape)`` when
    ``frame_stack == 1``). 1M Atari transitions, ``obs_shape=(4, 84, 84)``, ``frame_stack=4``:
    ``1e6 · (7056 + 12) ≈ 7.07e9`` bytes.

    Example:
        >>> bytes_required(1_000_000, (4, 84, 84), frame_stack=4) / 1e9 < 8
        True
    """
    slots = _check_config(capacity, num_envs, tuple(obs_shape), frame_stack)
    frame_bytes = int(np.prod(_frame_shape(tuple(obs_shape), frame_stack), dtype=np.int64))
    frame_bytes *= np.dtype(obs_dtype).itemsize
    return slots * num_envs * (frame_bytes + _STEP_BYTES) + 4 + 4 + 4 * frame_stack


def init(
    capacity: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype=jnp.uint8, frame_stack: int = 1
) -> ReplayBuffer:
    """An empty buffer of ``capacity // num_envs`` slots per env stream.

    Args:
        capacity: total transitions held (rounded down to a multiple of ``num_envs``).
        num_envs: environments written by each :func:`add`.
        obs_shape: shape of one observation, e.g. ``(4, 84, 84)`` (stack first) or ``(4,)``.
        obs_dtype: dtype of observations (uint8 for Atari).
        frame_stack: ``S > 1`` stores only the newest frame ``obs[S-1]`` and rebuilds stacks at sample
            time; requires ``obs_shape[0] == S``. ``1`` stores whole observations.

    Returns:
        A :class:`ReplayBuffer` of :func:`bytes_required` bytes.
    """
    slots = _check_config(capacity, num_envs, tuple(obs_shape), frame_stack)
    frame_shape = _frame_shape(tuple(obs_shape), frame_stack)
    flags = jnp.zeros((slots, num_envs), bool)
    return ReplayBuffer(
        frames=jnp.zeros((slots, num_envs, *frame_shape), obs_dtype),
        action=jnp.zeros((slots, num_envs), jnp.int32),
        reward=jnp.zeros((slots, num_envs), jnp.float32),
        terminated=flags,
        truncated=flags,
        first=flags,
        stack_start=flags,
        frame_lags=jnp.arange(frame_stack, dtype=jnp.int32),
        cursor=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )


def add(
    buf: ReplayBuffer,
    obs: jax.Array,
    action: jax.Array,
    reward: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    first: jax.Array,
) -> ReplayBuffer:
    """Writes one step of every env, overwriting the oldest step when full.

    Args:
        buf: the buffer.
        obs: ``[E, *obs_shape]`` the observations the actions were taken in.
        action: ``[E]`` actions taken.
        reward: ``[E]`` rewards of that step.
        terminated: ``[E]`` the step ended the episode (for learning; may include a lost life).
        truncated: ``[E]`` the step hit a time limit.
        first: ``[E]`` ``obs`` is the first observation of an episode (true for the initial reset
            observation and for the observation returned by the step after a done).

    Returns:
        The updated buffer.
    """
    slots, num_envs = buf.action.shape
    stack = buf.frame_lags.shape[0]
    frame_shape = buf.frames.shape[2:]
    obs_shape = (stack, *frame_shape) if stack > 1 else frame_shape
    chex.assert_shape(obs, (num_envs, *obs_shape))
    chex.assert_shape([action, reward, terminated, truncated, first], (num_envs,))
    if stack > 1:
        newest = obs[:, stack - 1]
        # True exactly where copies of the newest frame rebuild the stack (envpool's reset fill); a
        # continued stack that happens to be uniform is rebuilt correctly by copies as well.
        stack_start = jnp.all(obs == newest[:, None], axis=tuple(range(1, obs.ndim)))
    else:
        newest = obs
        stack_start = jnp.ones((num_envs,), bool)
    i = buf.cursor
    return ReplayBuffer(
        frames=buf.frames.at[i].set(newest.astype(buf.frames.dtype)),
        action=buf.action.at[i].set(action.astype(jnp.int32)),
        reward=buf.reward.at[i].set(reward.astype(jnp.float32)),
        terminated=buf.terminated.at[i].set(terminated.astype(bool)),
        truncated=buf.truncated.at[i].set(truncated.astype(bool)),
        first=buf.first.at[i].set(first.astype(bool)),
        stack_start=buf.stack_start.at[i].set(stack_start),
        frame_lags=buf.frame_lags,
        cursor=(i + 1) % slots,
        count=jnp.minimum(buf.count + 1, slots),
    )


def size(buf: ReplayBuffer) -> jax.Array:
    """Number of stored steps over all env streams (``count · num_envs``), an int32 scalar."""
    return buf.count * buf.action.shape[1]


def num_sampleable(buf: ReplayBuffer, n_step: int = 1) -> jax.Array:
    """Number of (position, env) pairs :func:`sample` draws from (fake transitions included)."""
    stack = buf.frame_lags.shape[0]
    per_env = jnp.maximum(buf.count - n_step - (stack - 1), 0)
    return per_env * buf.action.shape[1]


def can_sample(buf: ReplayBuffer, min_size: int, n_step: int = 1) -> jax.Array:
    """True when at least ``min_size`` steps are stored and some transition can be sampled.

    ``min_size`` counts steps over all envs (like ``learning_starts``); it may be traced.
    """
    return (size(buf) >= min_size) & (num_sampleable(buf, n_step) > 0)


def _slot(buf: ReplayBuffer, position: jax.Array) -> jax.Array:
    """Slot of a chronological position (0 = oldest stored step)."""
    slots = buf.action.shape[0]
    oldest = (buf.cursor - buf.count) % slots
    return (oldest + position) % slots


def _observation(buf: ReplayBuffer, position: jax.Array, env: jax.Array) -> jax.Array:
    """Rebuilds the observations at ``position[B]`` of streams ``env[B]``."""
    stack = buf.frame_lags.shape[0]
    if stack == 1:
        return buf.frames[_slot(buf, position), env]
    window = position[:, None] - buf.frame_lags  # [B, S], lag 0 = newest
    starts = buf.stack_start[_slot(buf, window), env[:, None]]
    # The most recent stack start within the window: frames older than it are copies of its frame.
    newest_start_lag = jnp.min(jnp.where(starts, buf.frame_lags, stack - 1), axis=1)
    source = jnp.maximum(window, (position - newest_start_lag)[:, None])
    frames = buf.frames[_slot(buf, source), env[:, None]]  # [B, S, *frame], newest first
    return jnp.flip(frames, axis=1)


def gather(
    buf: ReplayBuffer, position: jax.Array, env: jax.Array, n_step: int = 1, gamma: float | jax.Array = 0.99
) -> Transition:
    """The n-step transitions that start at chronological ``position[B]`` of streams ``env[B]``.

    Positions count from the oldest stored step (0) of each stream; :func:`sample` draws them uniformly
    from ``frame_stack - 1 .. count - 1 - n_step``, and only there are all frames and successors stored.

    Args:
        buf: the buffer.
        position: ``[B]`` int chronological positions.
        env: ``[B]`` int env streams.
        n_step: steps summed before bootstrapping (static).
        gamma: discount factor.

    Returns:
        A :class:`Transition` (``valid`` only marks fake auto-reset transitions here).
    """
    chex.assert_rank([position, env], 1)
    position = position.astype(jnp.int32)
    env = env.astype(jnp.int32)
    lags = jnp.arange(n_step, dtype=jnp.int32)
    slots = _slot(buf, position[:, None] + lags)  # [B, n]
    rewards = buf.reward[slots, env[:, None]]
    terminated = buf.terminated[slots, env[:, None]]
    done = terminated | buf.truncated[slots, env[:, None]]
    # A step is taken while no earlier step of the window ended the episode.
    taken = jnp.cumsum(done, axis=1) - done == 0
    gamma = jnp.asarray(gamma, jnp.float32)
    reward = jnp.sum(jnp.where(taken, gamma**lags * rewards, 0.0), axis=1)
    steps = jnp.sum(taken, axis=1).astype(jnp.int32)  # k in 1..n
    last_terminated = jnp.take_along_axis(terminated, (steps - 1)[:, None], axis=1)[:, 0]
    discount = gamma**steps * (1.0 - last_terminated.astype(jnp.float32))
    # A transition whose successor is the first observation of an episode is envpool's auto-reset step.
    valid = ~buf.first[_slot(buf, position + 1), env]
    return Transition(
        obs=_observation(buf, position, env),
        action=buf.action[slots[:, 0], env],
        reward=reward,
        next_obs=_observation(buf, position + steps, env),
        discount=discount,
        valid=valid,
    )


def sample(
    buf: ReplayBuffer, key: jax.Array, batch_size: int, n_step: int = 1, gamma: float | jax.Array = 0.99
) -> Transition:
    """Draws ``batch_size`` n-step transitions uniformly, with replacement.

    Uniform over (position, env) pairs whose frames and ``n_step`` successors are stored (see the module
    docstring). Fake auto-reset transitions are drawn too and come back with ``valid = False``; so does
    the whole batch when nothing can be sampled yet (check :func:`can_sample`).

    Args:
        buf: the buffer.
        key: PRNG key.
        batch_size: transitions drawn (static).
        n_step: steps summed before bootstrapping (static), ``>= 1``.
        gamma: discount factor (may be traced, e.g. swept under vmap).

    Returns:
        A :class:`Transition` with leading axis ``batch_size``.

    Example:
        >>> batch = sample(buf, key, batch_size=32, n_step=3, gamma=0.99)  # doctest: +SKIP
        >>> target = batch.reward + batch.discount * q_next.max(-1)         # doctest: +SKIP
    """
    slots, num_envs = buf.action.shape
    stack = buf.frame_lags.shape[0]
    if not isinstance(n_step, (int, np.integer)) or n_step < 1:
        raise ValueError(f"replay.sample: n_step must be an int >= 1, got {n_step!r}")
    if n_step + stack - 1 >= slots:
        raise ValueError(
            f"replay.sample: n_step must be < slots per env - frame_stack + 1 = {slots - stack + 1}, got {n_step}"
        )
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"replay.sample: batch_size must be an int >= 1, got {batch_size!r}")
    per_env = buf.count - n_step - (stack - 1)
    key_position, key_env = jax.random.split(key)
    position = (stack - 1) + jax.random.randint(key_position, (batch_size,), 0, jnp.maximum(per_env, 1))
    env = jax.random.randint(key_env, (batch_size,), 0, num_envs)
    batch = gather(buf, position, env, n_step, gamma)
    return batch._replace(valid=batch.valid & (per_env > 0))
