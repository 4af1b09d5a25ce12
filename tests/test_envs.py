"""Tests of jaxdp.envs against envpool 1.2.5 itself (real pools, no stubs).

What is checked, and against what:
* ids: validate_env_id is fast and creates nothing (pool constructors are patched to explode);
* host API: spec shapes/dtypes, action validation happens before anything is sent (a run with
  rejected calls interleaved equals a clean run), determinism and envpool's ``seed + i`` seeding;
* ``first``: equals envpool's own ``elapsed_step == 0`` on full resets, carries reward 0, and the
  action sent at that step is ignored (changing it changes nothing), also after a lost life;
* XLA API: bit-identical to the host API inside ``lax.scan`` (CartPole, Pong), lanes under ``vmap``
  equal separate pools, nested vmap 2×2, clear errors for wrong lanes / shapes / dtypes;
* asynchronous host mode: every env's trajectory equals a synchronous one-env pool with its seed;
* episode statistics: a Breakout game with episodic life reports the sum over all 5 lives and the
  full length, equal to a reference built from a raw envpool pool's own counters; Pong games end
  with one side at 21 points.
"""

from __future__ import annotations

import time

import envpool
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp import envs
from jaxdp.envs import Step

FIELDS = Step._fields
# the raw envpool reference pools trigger gymnasium's harmless float64-bounds warning
pytestmark = pytest.mark.filterwarnings("ignore:.*precision lowered by casting:UserWarning")


def rollout_host(env: envs.HostEnv, actions: np.ndarray) -> Step:
    """Steps through ``actions`` (T, E); returns the stacked Steps (T, E, ...)."""
    steps = [env.step(a) for a in actions]
    return Step(*(np.stack([getattr(s, f) for s in steps]) for f in FIELDS))


def rollout_xla(xla_env: envs.XlaEnv, actions) -> Step:
    def body(handle, a):
        return xla_env.step(handle, a)

    return jax.jit(lambda h, a: jax.lax.scan(body, h, a)[1])(xla_env.handle, jnp.asarray(actions))


def assert_steps_equal(a: Step, b: Step) -> None:
    for field in FIELDS:
        np.testing.assert_array_equal(
            np.asarray(getattr(a, field)), np.asarray(getattr(b, field)), err_msg=field
        )


def random_actions(num_actions: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_actions, shape).astype(np.int32)


# -- ids and specs ---------------------------------------------------------------------------------


def test_validate_env_id_is_fast_and_creates_no_pool(monkeypatch):
    envs.validate_env_id("CartPole-v1")  # the first call pays the imports; time the rest

    def explode(*args, **kwargs):
        raise AssertionError("validate_env_id created an environment")

    monkeypatch.setattr(envpool.registration.EnvRegistry, "make", explode)
    monkeypatch.setattr(gymnasium, "make", explode)
    monkeypatch.setattr(gymnasium, "make_vec", explode)
    start = time.perf_counter()
    for good in ("Pong-v5", "Breakout-v5", "CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Taxi-v4"):
        envs.validate_env_id(good)
    with pytest.raises(ValueError, match=r"^unknown --env 'Foo-v9': not an envpool or gymnasium id"):
        envs.validate_env_id("Foo-v9")
    with pytest.raises(ValueError, match="discrete"):
        envs.validate_env_id("Pendulum-v1")
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("gym_id,envpool_id", [("PongNoFrameskip-v4", "Pong-v5"), ("ALE/Breakout-v5", "Breakout-v5"),
                                                 ("SpaceInvadersDeterministic-v4", "SpaceInvaders-v5")])
def test_an_atari_id_spelled_the_gym_way_names_envpools(gym_id, envpool_id):
    """CleanRL's and SB3's Atari ids are not envpool's: the one line names the envpool game, not a near spelling."""
    with pytest.raises(ValueError, match=rf"^unknown --env '{gym_id}': .* \(did you mean '{envpool_id}'\?\)$"):
        envs.validate_env_id(gym_id)


@pytest.mark.parametrize("typed,named", [
    ("cartpole-v1", "'CartPole-v1'"),  # was "'CartPole-v1', 'CartPole-v1', 'CartPole-v0'": both registries, twice
    ("pong-v5", "'Pong-v5'"),  # was "'Pong-v5', 'Boxing-v5', 'UpNDown-v5'"
    ("CartPole-v2", "'CartPole-v1', 'CartPole-v0', 'phys2d/CartPole-v1'"),  # near spellings, each once
])
def test_an_unknown_id_names_each_near_id_once_and_the_one_that_differs_only_in_case_alone(typed, named):
    with pytest.raises(ValueError, match=rf"^unknown --env '{typed}': .* \(did you mean {named}\?\)$"):
        envs.validate_env_id(typed)


@pytest.mark.parametrize("env_id,reason", [
    ("KuhnPoker-v1", "is a game of 2 players; jaxdp's agents play single-player games"),
    ("Game2048-v1", "its observation is several arrays (board, action_mask); jaxdp's networks read one array"),
    ("VizdoomCustom-v1", "envpool cannot make it here (File"),  # needs a scenario file: envpool's RuntimeError
])
def test_an_envpool_game_jaxdp_cannot_play_is_refused_by_its_static_spec(env_id, reason):
    """envpool 1.2.5 registers 1,651 ids: board games for two players (the XLA interface refuses them), dict
    observations (MiniGrid, Jumanji, DMC, robotics) and families that need more than the wheel (Procgen: Qt 5).
    Each is one ValueError from the id, as a continuous action space is, before any pool exists; make_spec, which
    the training code calls, says the same."""
    for check in (envs.validate_env_id, lambda e: envs.make_spec(e, 2)):
        with pytest.raises(ValueError) as raised:
            check(env_id)
        assert str(raised.value).startswith(f"--env '{env_id}'") and reason in str(raised.value)


def test_make_spec_atari_and_classic_control():
    pong = envs.make_spec("Pong-v5", 8)
    assert pong == envs.EnvSpec("Pong-v5", 8, (4, 84, 84), np.dtype(np.uint8), 6, True, 27000)
    cart = envs.make_spec("CartPole-v1", 3)
    assert cart == envs.EnvSpec("CartPole-v1", 3, (4,), np.dtype(np.float32), 2, False, 500)
    assert envs.make_spec("Breakout-v5", 1).num_actions == 4
    assert envs.backend_of("Taxi-v4") == "gymnasium" and envs.backend_of("Acrobot-v1") == "envpool"
    with pytest.raises(ValueError, match="num_envs"):
        envs.make_spec("CartPole-v1", 0)


def test_integer_state_observations_arrive_one_hot():
    """FrozenLake, Taxi, CliffWalking observe one integer state: every env API delivers it one-hot (float32), so
    the MLP torsos, replay buffers and agents serve them unchanged, and the XLA and host APIs still agree."""
    frozen = envs.make_spec("FrozenLake-v1", 3)
    assert (frozen.obs_shape, frozen.obs_dtype, frozen.obs_states, frozen.max_episode_steps) == (
        (16,), np.dtype(np.float32), 16, 100)
    assert envs.make_spec("CliffWalking-v0", 1).max_episode_steps is None  # envpool writes INT32_MAX: no limit
    assert envs.make_spec("CartPole-v1", 1).obs_states == 0
    states = np.array([[0, 15], [3, 7]], np.int32)
    for given in (states, jnp.asarray(states)):
        encoded = envs.one_hot_observations(frozen, given)
        assert type(encoded) is type(given) and encoded.dtype == np.float32
        np.testing.assert_array_equal(encoded, jax.nn.one_hot(states, 16))
    xla_env = envs.make_xla("Taxi-v3", 4, seed=3)
    with envs.HostEnv("Taxi-v3", 4, seed=3) as host:
        np.testing.assert_array_equal(np.asarray(xla_env.initial_obs), host.reset())
        actions = random_actions(6, (300, 4), seed=1)
        expected = rollout_host(host, actions)
    assert_steps_equal(rollout_xla(xla_env, actions), expected)
    assert expected.obs.shape == (300, 4, 500) and expected.obs.dtype == np.float32
    np.testing.assert_array_equal(expected.obs.sum(-1), 1.0)
    assert expected.first.any()  # episodes ended and reset inside the run


@pytest.mark.parametrize("env_id", ["Pong-v5", "CartPole-v1"])
def test_host_obs_shapes_and_dtypes(env_id):
    with envs.HostEnv(env_id, 3, seed=0) as env:
        spec = env.spec
        obs = env.reset()
        assert obs.shape == (3, *spec.obs_shape) and obs.dtype == spec.obs_dtype
        step = env.step(np.zeros(3, np.int32))
        assert step.obs.shape == (3, *spec.obs_shape) and step.obs.dtype == spec.obs_dtype
        assert step.reward.dtype == np.float32 and step.reward.shape == (3,)
        for flag in ("terminated", "truncated", "game_over", "first"):
            assert getattr(step, flag).dtype == np.bool_ and getattr(step, flag).shape == (3,)


# -- host API ----------------------------------------------------------------------------------------


def test_host_actions_validated_before_stepping():
    actions = random_actions(2, (40, 3), seed=1)
    with envs.HostEnv("CartPole-v1", 3, seed=7) as clean:
        clean.reset()
        expected = rollout_host(clean, actions)
    with envs.HostEnv("CartPole-v1", 3, seed=7) as env:
        env.reset()
        steps = []
        for t, a in enumerate(actions):
            if t % 5 == 0:  # every rejected call must leave the pool untouched
                with pytest.raises(ValueError, match="integers"):
                    env.step(a.astype(np.float64))
                with pytest.raises(ValueError, match="integers"):
                    env.step(a.astype(bool))
                with pytest.raises(ValueError, match=r"shape \(3,\)"):
                    env.step(a[:2])
                with pytest.raises(ValueError, match=r"shape \(3,\)"):
                    env.step(a[:, None])
                with pytest.raises(ValueError, match=r"in \[0, 2\)"):
                    env.step(np.array([0, 2, 1]))
                with pytest.raises(ValueError, match=r"in \[0, 2\)"):
                    env.step(np.array([-1, 0, 1]))
            # other integer dtypes are converted
            steps.append(env.step(a.astype([np.int64, np.uint8, np.int16, np.int32][t % 4])))
        got = Step(*(np.stack([getattr(s, f) for s in steps]) for f in FIELDS))
    assert_steps_equal(got, expected)


def test_host_deterministic_from_seed_and_seeded_per_env():
    actions = random_actions(6, (60, 2), seed=2)
    runs = []
    for seed, acts in ((11, actions), (11, actions), (12, actions[:, ::-1])):
        with envs.HostEnv("Pong-v5", 2, seed=seed) as env:
            runs.append((env.reset(), rollout_host(env, np.ascontiguousarray(acts))))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert_steps_equal(runs[0][1], runs[1][1])
    # envpool seeds env i with seed + i: env 1 of seed 11 is env 0 of seed 12 (same actions)
    np.testing.assert_array_equal(runs[0][1].obs[:, 1], runs[2][1].obs[:, 0])
    np.testing.assert_array_equal(runs[0][1].reward[:, 1], runs[2][1].reward[:, 0])
    assert not np.array_equal(runs[0][1].obs[:, 0], runs[2][1].obs[:, 1])  # seeds 11 and 13 differ

    cart_actions = random_actions(2, (80, 3), seed=3)
    with envs.HostEnv("CartPole-v1", 3, seed=20) as env:
        env.reset()
        pooled = rollout_host(env, cart_actions)
    for i in range(3):
        with envs.HostEnv("CartPole-v1", 1, seed=20 + i) as single:
            single.reset()
            alone = rollout_host(single, cart_actions[:, i : i + 1])
        assert_steps_equal(Step(*(x[:, i : i + 1] for x in pooled)), alone)


# -- first / auto-reset -------------------------------------------------------------------------------


def _run_with_reset_actions(env_id: str, seed: int, steps: int, shift: int, **kwargs) -> Step:
    """A random policy whose action at auto-reset steps is shifted by ``shift``."""
    with envs.HostEnv(env_id, 2, seed=seed, **kwargs) as env:
        env.reset()
        n = env.spec.num_actions
        actions = random_actions(n, (steps, 2), seed=seed)
        pending = np.zeros(2, bool)
        out = []
        for a in actions:
            out.append(env.step(np.where(pending, (a + shift) % n, a)))
            pending = out[-1].terminated | out[-1].truncated
    return Step(*(np.stack([getattr(s, f) for s in out]) for f in FIELDS))


def test_first_marks_auto_reset_with_reward_zero_and_ignored_action_cartpole():
    seed, steps = 5, 300
    run = _run_with_reset_actions("CartPole-v1", seed, steps, shift=0)
    # reference: envpool's own step counter restarts at 0 exactly at the auto-reset steps
    raw = envpool.make_gymnasium("CartPole-v1", num_envs=2, seed=seed)
    raw.reset()
    actions = random_actions(2, (steps, 2), seed=seed)
    elapsed = np.stack([raw.step(a)[4]["elapsed_step"] for a in actions])
    np.testing.assert_array_equal(run.first, elapsed == 0)
    assert run.first.sum() >= 10
    np.testing.assert_array_equal(run.first[1:], (run.terminated | run.truncated)[:-1])
    assert not run.first[0].any()
    assert (run.reward[run.first] == 0).all() and (run.reward[~run.first] == 1).all()
    # the action sent at an auto-reset step is ignored: a different one changes nothing
    assert_steps_equal(_run_with_reset_actions("CartPole-v1", seed, steps, shift=1), run)


def test_first_after_lost_life_breakout():
    run = _run_with_reset_actions("Breakout-v5", 3, 400, shift=1, episodic_life=True)
    life_lost = run.terminated & ~run.game_over
    assert life_lost.sum() >= 4
    np.testing.assert_array_equal(run.first[1:], (run.terminated | run.truncated)[:-1])
    assert (run.reward[run.first] == 0).all()
    assert_steps_equal(_run_with_reset_actions("Breakout-v5", 3, 400, shift=2, episodic_life=True), run)


# -- XLA API ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id,num_envs,steps", [("CartPole-v1", 4, 300), ("Pong-v5", 2, 200)])
def test_xla_scan_equals_host(env_id, num_envs, steps):
    xla_env = envs.make_xla(env_id, num_envs, seed=9)
    with envs.HostEnv(env_id, num_envs, seed=9) as host:
        np.testing.assert_array_equal(np.asarray(xla_env.initial_obs), host.reset())
        actions = random_actions(host.spec.num_actions, (steps, num_envs), seed=4)
        expected = rollout_host(host, actions)
    assert xla_env.spec == host.spec
    got = rollout_xla(xla_env, actions)
    assert_steps_equal(got, expected)
    if env_id == "CartPole-v1":
        assert expected.first.any()  # auto-resets happened inside the scan


def _lane_rollout(xla_env: envs.XlaEnv):
    def run(key, actions):
        obs0 = xla_env.initial_observation(key)

        def body(handle, a):
            return xla_env.step(handle, a)

        return obs0, jax.lax.scan(body, xla_env.handle, actions)[1]

    return run


def _host_lane(env_id: str, seed: int, actions: np.ndarray) -> tuple[np.ndarray, Step]:
    with envs.HostEnv(env_id, actions.shape[1], seed=seed) as env:
        return env.reset(), rollout_host(env, actions)


def test_xla_vmap_over_lanes_equals_separate_pools():
    num_envs, steps, lane_seeds = 2, 120, [100, 7, 42]
    xla_env = envs.make_xla("CartPole-v1", num_envs, seed=lane_seeds, lanes=3)
    assert xla_env.initial_obs.shape == (3, num_envs, 4)
    actions = random_actions(2, (3, steps, num_envs), seed=5)
    keys = jax.random.split(jax.random.key(0), 3)
    obs0, got = jax.jit(jax.vmap(_lane_rollout(xla_env)))(keys, jnp.asarray(actions))
    assert got.obs.shape == (3, steps, num_envs, 4)
    for lane, seed in enumerate(lane_seeds):
        host_obs0, expected = _host_lane("CartPole-v1", seed, actions[lane])
        np.testing.assert_array_equal(np.asarray(obs0[lane]), host_obs0)
        assert_steps_equal(Step(*(x[lane] for x in got)), expected)


def test_xla_lanes_atari_int_seed():
    # int seed: lane l is the pool seeded with seed + l * num_envs
    xla_env = envs.make_xla("Pong-v5", 1, seed=30, lanes=2)
    actions = random_actions(6, (2, 80, 1), seed=6)
    keys = jax.random.split(jax.random.key(1), 2)
    obs0, got = jax.jit(jax.vmap(_lane_rollout(xla_env)))(keys, jnp.asarray(actions))
    for lane in range(2):
        host_obs0, expected = _host_lane("Pong-v5", 30 + lane, actions[lane])
        np.testing.assert_array_equal(np.asarray(obs0[lane]), host_obs0)
        assert_steps_equal(Step(*(x[lane] for x in got)), expected)


def test_xla_nested_vmap_two_by_two():
    num_envs, steps = 3, 60
    xla_env = envs.make_xla("CartPole-v1", num_envs, seed=200, lanes=4)
    actions = random_actions(2, (2, 2, steps, num_envs), seed=7)
    keys = jax.random.split(jax.random.key(2), 4).reshape(2, 2)
    obs0, got = jax.jit(jax.vmap(jax.vmap(_lane_rollout(xla_env))))(keys, jnp.asarray(actions))
    assert got.reward.shape == (2, 2, steps, num_envs)
    for outer in range(2):
        for inner in range(2):
            lane = 2 * outer + inner  # row-major over (outer, inner)
            host_obs0, expected = _host_lane("CartPole-v1", 200 + lane * num_envs, actions[outer, inner])
            np.testing.assert_array_equal(np.asarray(obs0[outer, inner]), host_obs0)
            assert_steps_equal(Step(*(x[outer, inner] for x in got)), expected)


def test_xla_static_errors_and_nothing_runs():
    xla_env = envs.make_xla("CartPole-v1", 2, seed=50, lanes=3)

    def rewards(handle, a):
        return xla_env.step(handle, a)[1].reward

    keys = jax.random.split(jax.random.key(0), 3)
    with pytest.raises(ValueError, match="pool holds lanes=3"):
        jax.jit(rewards)(xla_env.handle, jnp.zeros(2, jnp.int32))  # unbatched
    with pytest.raises(ValueError, match="called for 2 lane"):
        jax.jit(jax.vmap(rewards, in_axes=(None, 0)))(xla_env.handle, jnp.zeros((2, 2), jnp.int32))
    with pytest.raises(ValueError, match="called for 4 lane"):
        jax.jit(jax.vmap(jax.vmap(rewards, in_axes=(None, 0)), in_axes=(None, 0)))(
            xla_env.handle, jnp.zeros((2, 2, 2), jnp.int32)
        )
    with pytest.raises(ValueError, match="integers"):
        jax.jit(jax.vmap(rewards, in_axes=(None, 0)))(xla_env.handle, jnp.zeros((3, 2), jnp.float32))
    with pytest.raises(ValueError, match=r"shape \(2,\) per lane"):
        jax.jit(jax.vmap(rewards, in_axes=(None, 0)))(xla_env.handle, jnp.zeros((3, 3), jnp.int32))
    with pytest.raises(ValueError, match="pool holds lanes=3"):
        jax.vmap(xla_env.initial_observation)(keys[:2])
    # none of the above reached the pool: it still matches fresh host pools
    actions = random_actions(2, (3, 30, 2), seed=8)
    obs0, got = jax.jit(jax.vmap(_lane_rollout(xla_env)))(keys, jnp.asarray(actions.astype(np.uint8)))
    for lane in range(3):
        _, expected = _host_lane("CartPole-v1", 50 + 2 * lane, actions[lane])
        assert_steps_equal(Step(*(x[lane] for x in got)), expected)


# -- asynchronous host mode ----------------------------------------------------------------------------


def test_async_send_recv_matches_per_env_sync_pools():
    num_envs, batch, seed, per_env_steps = 4, 2, 60, 40
    policy = random_actions(2, (num_envs, per_env_steps + 1), seed=9)  # action k of env i
    with envs.HostEnv("CartPole-v1", num_envs, seed=seed, batch_size=batch) as env:
        assert env.is_async
        with pytest.raises(ValueError, match="async_reset"):
            env.reset()
        env.async_reset()
        counts = np.zeros(num_envs, int)
        seen: list[list[Step]] = [[] for _ in range(num_envs)]
        while counts.min() <= per_env_steps:
            step, ids = env.recv()
            assert ids.shape == (batch,)
            for j, i in enumerate(ids):
                seen[i].append(Step(*(x[j] for x in step)))
            with pytest.raises(ValueError, match="env_ids"):
                env.send(policy[ids, 0], np.array([ids[0], ids[0]]))
            with pytest.raises(ValueError, match=r"in \[0, 2\)"):
                env.send(np.array([5, 0]), ids)
            env.send(policy[ids, np.minimum(counts[ids], per_env_steps)], ids)
            counts[ids] += 1
    for i in range(num_envs):
        received = seen[i]
        assert received[0].first and received[0].reward == 0  # the reset observation
        with envs.HostEnv("CartPole-v1", 1, seed=seed + i) as single:
            obs0 = single.reset()
            np.testing.assert_array_equal(received[0].obs, obs0[0])
            expected = rollout_host(single, policy[i, : len(received) - 1, None])
        got = Step(*(np.stack([getattr(s, f) for s in received[1:]]) for f in FIELDS))
        assert_steps_equal(got, Step(*(x[:, 0] for x in expected)))


# -- episode statistics ---------------------------------------------------------------------------------


def _raw_breakout(seed: int, episodic_life: bool):
    """An envpool pool configured by hand (not through jaxdp) as the reference."""
    return envpool.make_gymnasium(
        "Breakout-v5",
        num_envs=2,
        seed=seed,
        episodic_life=episodic_life,
        reward_clip=False,
        repeat_action_probability=0.0,
        noop_max=30,
        frame_skip=4,
        stack_num=4,
    )


def _games_from_raw(raw, actions):
    """Per env, (return, length, lives lost) of every finished game, from envpool's own counters."""
    raw.reset()
    games = [[], []]
    ret, lost = np.zeros(2), np.zeros(2, int)
    for a in actions:
        _, reward, terminated, truncated, info = raw.step(a)
        ret += reward
        lost += terminated
        over = info["terminated"].astype(bool) | truncated
        for i in np.flatnonzero(over):
            games[i].append((ret[i], int(info["elapsed_step"][i]), lost[i]))
            ret[i], lost[i] = 0.0, 0
    return games


def _games_from_stats(env: envs.HostEnv, actions):
    env.reset()
    stats = envs.episode_stats_init(2)
    update = jax.jit(envs.episode_stats_update)
    games, steps = [[], []], []
    for a in actions:
        step = env.step(a)
        steps.append(step)
        stats, finished, returns, lengths = update(stats, step)
        for i in np.flatnonzero(np.asarray(finished)):
            games[i].append((float(returns[i]), int(lengths[i])))
    return games, Step(*(np.stack([getattr(s, f) for s in steps]) for f in FIELDS))


def test_episode_stats_breakout_sum_over_all_lives():
    seed, steps = 1, 700
    # FIRE-heavy random play so that points are scored in several lives
    actions = np.where(random_actions(3, (steps, 2), seed=10) == 0, 1, random_actions(4, (steps, 2), seed=11))
    actions = actions.astype(np.int32)
    reference = _games_from_raw(_raw_breakout(seed, episodic_life=True), actions)
    with envs.HostEnv("Breakout-v5", 2, seed=seed, episodic_life=True) as env:
        games, run = _games_from_stats(env, actions)
    assert sum(len(g) for g in games) >= 2
    most_lives_scoring = 0
    for i in range(2):
        assert [(r, n) for r, n, _ in reference[i]] == games[i]
        assert all(lost == 5 for _, _, lost in reference[i])  # every game spans all 5 lives
        # the game return is the sum over its lives, and more than one life scored
        over = np.flatnonzero(run.game_over[:, i])
        start = 0
        for end, (ret, length) in zip(over, games[i]):
            segment = slice(start, end + 1)
            life_ends = np.flatnonzero(run.terminated[segment, i])
            per_life = np.split(run.reward[segment, i], life_ends[:-1] + 1)
            assert len(per_life) == 5
            assert ret == pytest.approx(sum(float(p.sum()) for p in per_life))
            most_lives_scoring = max(most_lives_scoring, sum(int(p.sum() > 0) for p in per_life))
            assert length == int((~run.first[segment, i]).sum())
            start = end + 1
    assert most_lives_scoring >= 2  # the test has power: some game scored in several lives


def test_episode_stats_breakout_episodic_life_off():
    seed, steps = 1, 700
    actions = np.where(random_actions(3, (steps, 2), seed=10) == 0, 1, random_actions(4, (steps, 2), seed=11))
    actions = actions.astype(np.int32)
    reference = _games_from_raw(_raw_breakout(seed, episodic_life=False), actions)
    with envs.HostEnv("Breakout-v5", 2, seed=seed, episodic_life=False) as env:
        games, run_off = _games_from_stats(env, actions)
    with envs.HostEnv("Breakout-v5", 2, seed=seed, episodic_life=True) as env:
        _, run_on = _games_from_stats(env, actions)
    assert sum(len(g) for g in games) >= 2
    for i in range(2):
        assert [(r, n) for r, n, _ in reference[i]] == games[i]
        # without episodic life, only the end of the game terminates
        ended = run_off.terminated[:, i] | run_off.truncated[:, i]
        np.testing.assert_array_equal(ended, run_off.game_over[:, i])
        # same seed and actions: identical until the first lost life, after which the episodic-life
        # reset (no-ops + FIRE) makes the runs diverge
        first_loss = int(np.flatnonzero(run_on.terminated[:, i])[0])
        np.testing.assert_array_equal(run_on.obs[: first_loss + 1, i], run_off.obs[: first_loss + 1, i])
        np.testing.assert_array_equal(run_on.reward[: first_loss + 1, i], run_off.reward[: first_loss + 1, i])


def test_episode_stats_pong_games_inside_scan():
    steps = 1200
    xla_env = envs.make_xla("Pong-v5", 2, seed=3)
    actions = random_actions(6, (steps, 2), seed=12)

    def body(carry, a):
        handle, stats = carry
        handle, step = xla_env.step(handle, a)
        stats, finished, returns, lengths = envs.episode_stats_update(stats, step)
        return (handle, stats), (step.reward, finished, returns, lengths)

    run = jax.jit(lambda h, a: jax.lax.scan(body, (h, envs.episode_stats_init(2)), a)[1])
    rewards, finished, returns, lengths = (np.asarray(x) for x in run(xla_env.handle, jnp.asarray(actions)))
    assert finished.sum() >= 1
    for i in range(2):
        start = 0
        for end in np.flatnonzero(finished[:, i]):
            game = rewards[start : end + 1, i]
            points_for, points_against = int((game > 0).sum()), int((game < 0).sum())
            assert max(points_for, points_against) == 21  # a Pong game ends at 21 points
            assert returns[end, i] == points_for - points_against
            assert lengths[end, i] == end + 1 - start - (1 if start > 0 else 0)  # minus the reset step
            start = end + 1
    assert (returns[~finished] == 0).all() and (lengths[~finished] == 0).all()


def test_episode_stats_async_env_ids():
    stats = envs.episode_stats_init(3)
    step = Step(
        obs=None,
        reward=np.array([2.0, 5.0], np.float32),
        terminated=np.array([False, True]),
        truncated=np.array([False, False]),
        game_over=np.array([False, True]),
        first=np.array([False, False]),
    )
    stats, finished, returns, lengths = envs.episode_stats_update(stats, step, env_ids=np.array([2, 0]))
    np.testing.assert_array_equal(stats.returns, [0.0, 0.0, 2.0])
    np.testing.assert_array_equal(stats.lengths, [0, 0, 1])
    np.testing.assert_array_equal(finished, [False, True])
    np.testing.assert_array_equal(returns, [0.0, 5.0])
    np.testing.assert_array_equal(lengths, [0, 1])
    reset_step = step._replace(reward=np.array([0.0, 0.0], np.float32), first=np.array([True, True]),
                               terminated=np.array([False, False]), game_over=np.array([False, False]))
    stats, *_ = envs.episode_stats_update(stats, reset_step, env_ids=np.array([0, 2]))
    np.testing.assert_array_equal(stats.lengths, [0, 0, 1])  # reset steps do not count


# -- gymnasium fallback --------------------------------------------------------------------------------


def test_gymnasium_fallback_host_semantics():
    with envs.HostEnv("Taxi-v4", 2, seed=0) as taxi:
        assert taxi.backend == "gymnasium"
        obs = taxi.reset()
        # One integer state per env, delivered one-hot (as from envpool): the state gymnasium itself reports.
        raw = gymnasium.make_vec("Taxi-v4", num_envs=2, vectorization_mode="sync").reset(seed=0)[0]
        assert obs.shape == (2, 500) and obs.dtype == np.float32 and taxi.spec.num_actions == 6
        np.testing.assert_array_equal(obs.argmax(-1), raw)
        np.testing.assert_array_equal(obs.sum(-1), 1.0)
        taxi.step(np.array([0, 1]))
    with pytest.raises(ValueError, match="gymnasium id"):
        envs.make_xla("Taxi-v4", 2)
    with pytest.raises(ValueError, match="asynchronous"):
        envs.HostEnv("Taxi-v4", 2, batch_size=1)
    actions = random_actions(2, (200, 2), seed=13)
    runs = []
    for _ in range(2):
        with envs.HostEnv("CartPole-v1", 2, seed=4, backend="gymnasium") as env:
            assert env.backend == "gymnasium"
            env.reset()
            runs.append(rollout_host(env, actions))
    assert_steps_equal(runs[0], runs[1])
    run = runs[0]
    assert run.first.any()
    np.testing.assert_array_equal(run.first[1:], (run.terminated | run.truncated)[:-1])
    assert (run.reward[run.first] == 0).all()
