"""Tests of jaxdp.agents.replay: bit-exact frame-stack rebuild on real envpool Atari streams, n-step
targets against a reference, uniform sampling (chi-square), wrap-around, jit/vmap, memory formula."""

import envpool
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxdp.agents import replay

STACK = 4
jit_add = jax.jit(replay.add)
jit_sample = jax.jit(replay.sample, static_argnames=("batch_size", "n_step"))


def atari_stream(task: str, num_envs: int, num_steps: int, seed: int, **kwargs) -> dict:
    """Runs envpool with random actions and records what a training loop would add, step by step.

    first[t] marks obs[t] as the first observation of an episode: the reset observation and the one
    returned by the (fake, auto-reset) step after a done. A done at step t returns the final observation
    obs[t + 1]; step t + 1 ignores its action and returns the first observation obs[t + 2].
    """
    env = envpool.make(task, env_type="gymnasium", num_envs=num_envs, seed=seed, **kwargs)
    rng = np.random.default_rng(seed)
    obs, info = env.reset()
    history = {"obs": [obs], "action": [], "reward": [], "terminated": [], "truncated": [],
               "elapsed_step": [info["elapsed_step"]]}
    num_actions = env.action_space.n
    for _ in range(num_steps):
        action = rng.integers(0, num_actions, size=num_envs).astype(np.int32)
        obs, reward, terminated, truncated, info = env.step(action)
        history["elapsed_step"].append(info["elapsed_step"])
        history["obs"].append(obs)
        history["action"].append(action)
        history["reward"].append(reward.astype(np.float32))
        history["terminated"].append(terminated)
        history["truncated"].append(truncated)
    out = {k: np.stack(v) for k, v in history.items()}
    done = out["terminated"] | out["truncated"]
    out["first"] = np.concatenate([np.ones((1, num_envs), bool), np.zeros((1, num_envs), bool), done[:-1]])
    return out


def reference_transition(stream: dict, index: int, env: int, n_step: int, gamma: float):
    """The n-step transition starting at step `index` of env `env`, computed step by step."""
    total, steps = 0.0, n_step
    for j in range(n_step):
        total += gamma**j * float(stream["reward"][index + j, env])
        if stream["terminated"][index + j, env] or stream["truncated"][index + j, env]:
            steps = j + 1
            break
    discount = gamma**steps * (1.0 - float(stream["terminated"][index + steps - 1, env]))
    valid = not stream["first"][index + 1, env]
    return total, discount, index + steps, valid


def check_buffer_against_stream(buf, stream, num_added: int, n_step: int, gamma: float, gather_fn):
    """Every sampleable (position, env) of `buf` after `num_added` adds equals the recorded stream."""
    slots, num_envs = buf.action.shape
    stack = buf.frame_lags.shape[0]
    count = min(num_added, slots)
    assert int(buf.count) == count
    positions = np.arange(stack - 1, count - n_step)
    assert positions.size > 0
    checked, fakes = 0, 0
    for env in range(num_envs):
        batch = gather_fn(buf, jnp.asarray(positions), jnp.full(positions.shape, env), n_step, gamma)
        batch = jax.tree.map(np.asarray, batch)
        for row, position in enumerate(positions):
            index = num_added - count + position  # which add wrote this position
            reward, discount, next_index, valid = reference_transition(stream, index, env, n_step, gamma)
            np.testing.assert_array_equal(batch.obs[row], stream["obs"][index, env])
            np.testing.assert_array_equal(batch.next_obs[row], stream["obs"][next_index, env])
            assert batch.action[row] == stream["action"][index, env]
            np.testing.assert_allclose(batch.reward[row], reward, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(batch.discount[row], discount, rtol=1e-6)
            assert bool(batch.valid[row]) == valid
            checked += 1
            fakes += not valid
    return checked, fakes


@pytest.mark.parametrize(
    "task, kwargs",
    [
        # Short episodes: many real resets, whose stacks envpool fills with copies of the first frame.
        ("Pong-v5", dict(max_episode_steps=20)),
        # Episodic life: the reset after a lost life continues the old stack; truncation resets fully.
        ("Breakout-v5", dict(episodic_life=True, max_episode_steps=60)),
    ],
)
@pytest.mark.parametrize("n_step", [1, 3])
def test_frame_stack_rebuild_is_bit_exact_on_real_atari(task, kwargs, n_step):
    num_envs, slots, num_steps, gamma = 2, 40, 150, 0.9
    stream = atari_stream(task, num_envs, num_steps, seed=3, **kwargs)
    assert stream["obs"].shape[2:] == (STACK, 84, 84) and stream["obs"].dtype == np.uint8
    done = stream["terminated"] | stream["truncated"]
    assert done.sum() >= 4, "the stream must contain several episode ends"
    if "episodic_life" not in kwargs:
        # Without episodic life, `first` is exactly envpool's own episode start (elapsed_step == 0).
        np.testing.assert_array_equal(stream["first"], stream["elapsed_step"] == 0)
    else:
        # The stream does contain resets whose stack continues the previous one (see the module docstring).
        continued = [
            (t, e)
            for t, e in zip(*np.nonzero(stream["first"][1:]))
            if np.array_equal(stream["obs"][t + 1, e, :-1], stream["obs"][t, e, 1:])
        ]
        assert continued

    buf = replay.init(slots * num_envs, num_envs, (STACK, 84, 84), jnp.uint8, frame_stack=STACK)
    add = jit_add
    gather = jax.jit(replay.gather, static_argnames="n_step")
    checked, fakes = 0, 0
    for t in range(num_steps):
        buf = add(
            buf,
            stream["obs"][t],
            stream["action"][t],
            stream["reward"][t],
            stream["terminated"][t],
            stream["truncated"][t],
            stream["first"][t],
        )
        num_added = t + 1
        # Before the first wrap, exactly full, and after several wraps at different cursor offsets.
        if num_added in (25, slots, 2 * slots + 7, 3 * slots - 1, num_steps):
            counts = check_buffer_against_stream(buf, stream, num_added, n_step, gamma, gather)
            checked, fakes = checked + counts[0], fakes + counts[1]
    assert checked > 200 and fakes > 0
    assert int(buf.cursor) == num_steps % slots


def synthetic_stream(num_envs: int, num_steps: int, seed: int) -> dict:
    """A vector-obs stream with envpool's auto-reset pattern: after a done, a fake step (reward 0)."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(num_steps + 1, num_envs, 3)).astype(np.float32)
    reward = rng.normal(size=(num_steps, num_envs)).astype(np.float32)
    terminated = np.zeros((num_steps, num_envs), bool)
    truncated = np.zeros((num_steps, num_envs), bool)
    first = np.zeros((num_steps + 1, num_envs), bool)
    first[0] = True
    for env in range(num_envs):
        t = 0
        while t < num_steps:
            t += rng.integers(1, 6)  # episode length
            if t >= num_steps:
                break
            (terminated if rng.random() < 0.5 else truncated)[t, env] = True
            if t + 1 < num_steps:
                reward[t + 1, env] = 0.0  # the fake auto-reset step
            first[min(t + 2, num_steps), env] = True
            t += 2
    action = rng.integers(0, 4, size=(num_steps, num_envs)).astype(np.int32)
    return dict(obs=obs, reward=reward, terminated=terminated, truncated=truncated, first=first, action=action)


@pytest.mark.parametrize("n_step", [1, 2, 5])
def test_nstep_targets_match_reference_with_wraparound(n_step):
    num_envs, slots, num_steps, gamma = 3, 16, 41, 0.9
    stream = synthetic_stream(num_envs, num_steps, seed=n_step)
    buf = replay.init(slots * num_envs, num_envs, (3,), jnp.float32)
    add = jit_add
    gather = jax.jit(replay.gather, static_argnames="n_step")
    for t in range(num_steps):
        buf = add(buf, *(stream[k][t] for k in ("obs", "action", "reward", "terminated", "truncated", "first")))
        if t + 1 in (10, slots, num_steps):
            check_buffer_against_stream(buf, stream, t + 1, n_step, gamma, gather)


def test_hand_computed_nstep_transition():
    # One env, steps: r = 1, 2, 4 with truncation at step 1, then fake step, then a new episode.
    buf = replay.init(8, 1, (1,), jnp.float32)
    steps = [  # obs, action, reward, terminated, truncated, first
        (10.0, 0, 1.0, False, False, True),
        (11.0, 1, 2.0, False, True, False),  # time limit
        (12.0, 2, 0.0, False, False, False),  # obs 12 = final obs; this step is the fake auto-reset step
        (20.0, 3, 4.0, True, False, True),  # new episode, terminates at once
        (21.0, 0, 0.0, False, False, False),  # fake
        (30.0, 0, 0.0, False, False, True),
    ]
    for o, a, r, te, tr, f in steps:
        buf = jit_add(buf, jnp.array([[o]]), jnp.array([a]), jnp.array([r]), jnp.array([te]), jnp.array([tr]),
                         jnp.array([f]))
    batch = replay.gather(buf, jnp.arange(4), jnp.zeros(4, int), n_step=3, gamma=0.5)
    # position 0: 1 + 0.5*2, truncated after 2 steps -> bootstrap from obs 12 with 0.5^2.
    # position 1: 2, truncated -> bootstrap from obs 12 with 0.5.  position 2: fake.
    # position 3: 4, terminated -> discount 0, next obs 21 (the final observation).
    np.testing.assert_allclose(batch.reward, [2.0, 2.0, 0.0 + 0.5 * 4.0, 4.0])
    np.testing.assert_allclose(batch.discount, [0.25, 0.5, 0.0, 0.0])
    np.testing.assert_array_equal(batch.next_obs[:, 0], [12.0, 12.0, 21.0, 21.0])
    np.testing.assert_array_equal(batch.valid, [True, True, False, True])
    np.testing.assert_array_equal(batch.action, [0, 1, 2, 3])


def test_sampling_is_uniform_over_sampleable_transitions():
    num_envs, slots, num_steps, n_step, stack = 3, 50, 137, 2, 4
    buf = replay.init(slots * num_envs, num_envs, (stack, 2, 2), jnp.uint8, frame_stack=stack)
    for t in range(num_steps):
        obs = jnp.full((num_envs, stack, 2, 2), t % 256, jnp.uint8)
        ids = t * num_envs + jnp.arange(num_envs, dtype=jnp.int32)  # a unique id per stored step
        buf = jit_add(buf, obs, ids, jnp.zeros(num_envs), jnp.zeros(num_envs, bool), jnp.zeros(num_envs, bool),
                         jnp.zeros(num_envs, bool))
    batch = jit_sample(buf, jax.random.key(0), batch_size=27_000, n_step=n_step)
    # Sampleable: positions stack-1 .. slots-1-n_step of the newest `slots` adds, in every env.
    first_index = num_steps - slots
    expected = {
        (first_index + p) * num_envs + e for p in range(stack - 1, slots - n_step) for e in range(num_envs)
    }
    assert int(replay.num_sampleable(buf, n_step)) == len(expected)
    ids, counts = np.unique(np.asarray(batch.action), return_counts=True)
    assert set(ids.tolist()) == expected  # nothing outside, every cell hit
    assert batch.valid.all()
    _, p_value = stats.chisquare(counts)
    assert p_value > 1e-3, p_value


def test_empty_and_warming_up_buffer():
    buf = replay.init(20, 2, (4, 3, 3), jnp.uint8, frame_stack=4)
    assert int(replay.size(buf)) == 0 and not bool(replay.can_sample(buf, 0))
    assert not jit_sample(buf, jax.random.key(0), 5).valid.any()
    zeros = jnp.zeros(2, bool)
    for t in range(4):  # count 4: positions 3 .. 4-1-1 -> none yet
        buf = jit_add(buf, jnp.full((2, 4, 3, 3), t, jnp.uint8), jnp.zeros(2, jnp.int32), jnp.zeros(2), zeros,
                         zeros, zeros)
    assert not bool(replay.can_sample(buf, 0))
    buf = jit_add(buf, jnp.full((2, 4, 3, 3), 4, jnp.uint8), jnp.zeros(2, jnp.int32), jnp.zeros(2), zeros,
                     zeros, zeros)
    assert bool(replay.can_sample(buf, 10)) and not bool(replay.can_sample(buf, 11))
    assert int(replay.size(buf)) == 10
    assert jit_sample(buf, jax.random.key(0), 5).valid.all()


def fill_and_sample(key, gamma):
    """Adds a random stream inside lax.scan and samples: the whole life of a buffer in one program."""
    num_envs, stack = 2, 4
    buf = replay.init(2 * 12, num_envs, (stack, 3, 3), jnp.uint8, frame_stack=stack)

    def step(buf, key):
        k_obs, k_r, k_done = jax.random.split(key, 3)
        obs = jax.random.randint(k_obs, (num_envs, stack, 3, 3), 0, 255).astype(jnp.uint8)
        done = jax.random.bernoulli(k_done, 0.2, (num_envs,))
        buf = replay.add(buf, obs, jnp.zeros(num_envs, jnp.int32), jax.random.normal(k_r, (num_envs,)), done,
                         jnp.zeros(num_envs, bool), jnp.zeros(num_envs, bool))
        return buf, None

    key_fill, key_sample = jax.random.split(key)
    buf, _ = jax.lax.scan(step, buf, jax.random.split(key_fill, 30))
    return replay.sample(buf, key_sample, batch_size=8, n_step=3, gamma=gamma)


def test_jit_and_vmap_over_whole_buffers():
    keys = jax.random.split(jax.random.key(1), 3)
    gammas = jnp.array([0.9, 0.95, 0.99])
    batched = jax.jit(jax.vmap(fill_and_sample))(keys, gammas)
    for i in range(3):
        single = jax.jit(fill_and_sample)(keys[i], gammas[i])
        jax.tree.map(lambda b, s: np.testing.assert_allclose(b[i], s, rtol=1e-6), batched, single)
    assert batched.obs.shape == (3, 8, 4, 3, 3) and batched.obs.dtype == jnp.uint8


def test_memory_formula():
    # The formula is exactly what init allocates ...
    for capacity, num_envs, obs_shape, stack, dtype in [
        (100, 4, (4, 84, 84), 4, jnp.uint8),
        (37, 2, (4,), 1, jnp.float32),
        (64, 8, (2, 5, 7), 2, jnp.uint8),
    ]:
        buf = replay.init(capacity, num_envs, obs_shape, dtype, frame_stack=stack)
        allocated = sum(x.nbytes for x in jax.tree.leaves(buf))
        assert replay.bytes_required(capacity, obs_shape, stack, dtype, num_envs) == allocated
    # ... and one million Atari transitions fit in 8 GB (full stacks would take 28 GB).
    atari = replay.bytes_required(1_000_000, (4, 84, 84), frame_stack=4, obs_dtype=np.uint8, num_envs=8)
    assert atari == 1_000_000 * (84 * 84 + 12) + 8 + 16
    assert atari <= 8e9


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(capacity=10, num_envs=0, obs_shape=(4,)), "num_envs"),
        (dict(capacity=3, num_envs=4, obs_shape=(4,)), "capacity"),
        (dict(capacity=100, num_envs=1, obs_shape=(3, 84, 84), frame_stack=4), "obs_shape"),
        (dict(capacity=100, num_envs=1, obs_shape=(4,), frame_stack=0), "frame_stack"),
        (dict(capacity=8, num_envs=2, obs_shape=(4, 2), frame_stack=4), "capacity // num_envs"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        replay.init(**kwargs)


def test_sample_rejects_too_long_n_step():
    buf = replay.init(10, 1, (2,), jnp.float32)
    with pytest.raises(ValueError, match="n_step"):
        replay.sample(buf, jax.random.key(0), 4, n_step=10)
