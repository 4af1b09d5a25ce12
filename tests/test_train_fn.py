"""make_train_fn: the whole run of one seed as a pure function, vmapped over seeds and hyperparameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp import delays
from jaxdp import train as train_lib
from jaxdp.config import TrainConfig, validate
from jaxdp.train import Hyperparams


def _episode_returns(out, *index):
    finished = np.asarray(out.episodes.finished)[index]
    returns = np.asarray(out.episodes.returns)[index]
    return returns[finished]


def test_vmap_over_keys_equals_separate_runs():
    """Lane k of a vmapped sweep is the same run as a lanes=1 program whose pool starts at lane k's env seed."""
    cfg = validate(TrainConfig(algo="a2c", total_steps=16 * 8 * 30, num_envs=16))
    keys = jnp.stack([jax.random.PRNGKey(0), jax.random.PRNGKey(1)])
    train, _ = train_lib.make_train_fn(cfg, lanes=2)
    swept = jax.jit(jax.vmap(train))(keys)
    for k in range(2):
        # A single-seed run whose pool seeds are lane k's (seed + k·E, see make_xla) and whose key is keys[k].
        single_cfg = validate(TrainConfig(algo="a2c", total_steps=cfg.total_steps, num_envs=16, seeds=(k,)))
        single, _ = train_lib.make_train_fn(single_cfg, lanes=1)
        alone = jax.jit(single)(keys[k])
        np.testing.assert_array_equal(_episode_returns(swept, k), _episode_returns(alone))
        for a, b in zip(jax.tree.leaves(swept.lanes.params), jax.tree.leaves(alone.lanes.params)):
            np.testing.assert_allclose(np.asarray(a)[k], np.asarray(b), rtol=1e-5, atol=1e-6)


def test_vmap_over_learning_rates_and_keys_is_one_program():
    """A (learning rate x seed) grid is one compiled program; each cell trains with its own learning rate."""
    cfg = validate(TrainConfig(algo="a2c", total_steps=16 * 8 * 20, num_envs=16))
    keys = jnp.stack([jax.random.PRNGKey(0), jax.random.PRNGKey(1)])
    lrs = Hyperparams(learning_rate=jnp.array([0.0, 3e-3]))
    train, _ = train_lib.make_train_fn(cfg, lanes=4)
    over_keys = jax.vmap(train, in_axes=(0, None))
    grid = jax.jit(jax.vmap(over_keys, in_axes=(None, Hyperparams(learning_rate=0))))(keys, lrs)
    leaves = jax.tree.leaves(grid.lanes.params)
    init_cfg = validate(TrainConfig(algo="a2c", total_steps=cfg.total_steps, num_envs=16))
    trainer = train_lib.make_train(init_cfg)
    initial = jax.tree.leaves(trainer.init(keys[:1]).params)
    for leaf, first in zip(leaves, initial):
        # lr = 0 leaves the parameters where they started (worker 0 of seed 0) ...
        np.testing.assert_array_equal(np.asarray(leaf)[0, 0, 0], np.asarray(first)[0, 0])
    # ... and lr > 0 moves them.
    moved = sum(float(np.abs(np.asarray(a)[1, 0, 0] - np.asarray(b)[0, 0]).sum()) for a, b in zip(leaves, initial))
    assert moved > 1e-3
    assert np.asarray(grid.episodes.finished).shape[:2] == (2, 2)


def _assert_lane_is_run(swept, k, alone, *, atol):
    """Lane k of a sweep played the same episodes as ``alone`` and ended at the same parameters."""
    np.testing.assert_array_equal(_episode_returns(swept, k), _episode_returns(alone))
    assert _episode_returns(alone).size > 0
    for a, b in zip(jax.tree.leaves(swept.lanes.params), jax.tree.leaves(alone.lanes.params)):
        np.testing.assert_allclose(np.asarray(a)[k], np.asarray(b), rtol=1e-5, atol=atol)


def test_vmap_over_epsilon_schedules_equals_runs_configured_with_them():
    """DQN's ε schedule as arrays: each lane follows its own schedule, and is the run whose config holds it."""
    base = dict(algo="dqn", total_steps=4 * 2000, num_envs=4, learning_starts=400)
    cfg = validate(TrainConfig(**base))
    ends, fractions = [0.05, 0.3], [0.5, 0.2]
    hp = Hyperparams(eps_end=jnp.array(ends), eps_fraction=jnp.array(fractions))
    train, _ = train_lib.make_train_fn(cfg, lanes=2)
    key = jax.random.PRNGKey(0)
    swept = jax.jit(jax.vmap(train, in_axes=(None, Hyperparams(eps_end=0, eps_fraction=0))))(key, hp)
    # The schedule, by hand: iteration i (after the random play) acts at env step (warmup + i) * steps per iteration.
    warmup = cfg.learning_starts // cfg.steps_per_iteration
    env_steps = (warmup + np.arange(swept.metrics["epsilon"].shape[1])) * cfg.steps_per_iteration
    for k, (end, fraction) in enumerate(zip(ends, fractions)):
        frac = np.clip(env_steps / (fraction * cfg.total_steps), 0.0, 1.0)
        np.testing.assert_allclose(np.asarray(swept.metrics["epsilon"])[k, :, 0],
                                   cfg.eps_start + frac * (end - cfg.eps_start), rtol=1e-5)
        # Lane k plays the envs of a single-seed run with seed k (env_seed), here with the same key.
        single, _ = train_lib.make_train_fn(validate(TrainConfig(**base, seeds=(k,), eps_end=end,
                                                                 eps_fraction=fraction)))
        _assert_lane_is_run(swept, k, jax.jit(single)(key), atol=1e-6)


def test_vmap_over_delays_equals_runs_configured_with_them():
    """Stale-gradient delays as arrays, up to --max-delay: delay 0 is the inner optimizer (--strategy single), a
    delay d is --delay fixed --max-delay d, and a swept DelayDistribution is the same distribution configured."""
    base = dict(algo="a2c", total_steps=16 * 8 * 30, num_envs=16)
    cfg = validate(TrainConfig(**base, strategy="async", max_delay=3))
    key = jax.random.PRNGKey(0)

    train, _ = train_lib.make_train_fn(cfg, lanes=2)
    swept = jax.jit(jax.vmap(train, in_axes=(None, Hyperparams(delay=0))))(key, Hyperparams(delay=jnp.array([0, 3])))
    for k, flags in enumerate([dict(strategy="single"), dict(strategy="async", delay="fixed", max_delay=3)]):
        single, _ = train_lib.make_train_fn(validate(TrainConfig(**base, seeds=(k,), **flags)))
        _assert_lane_is_run(swept, k, jax.jit(single)(key), atol=1e-6)

    train, _ = train_lib.make_train_fn(cfg, lanes=2)
    probs = jnp.stack([delays.uniform(3).probs, jax.nn.one_hot(2, 4)])
    swept = jax.jit(jax.vmap(train, in_axes=(None, Hyperparams(delay=delays.DelayDistribution(0)))))(
        key, Hyperparams(delay=delays.DelayDistribution(probs)))
    for k, flags in enumerate([dict(delay="uniform", max_delay=3), dict(delay="fixed", max_delay=2)]):
        single, _ = train_lib.make_train_fn(validate(TrainConfig(**base, seeds=(k,), strategy="async", **flags)))
        _assert_lane_is_run(swept, k, jax.jit(single)(key), atol=1e-6)
    # The lag is real: delayed runs differ from the undelayed one.
    assert not np.array_equal(_episode_returns(swept, 1), _episode_returns(swept, 0))


def test_vmap_over_discounts_and_loss_weights_equals_runs_configured_with_them():
    """A2C's gamma, ent_coef and vf_coef as arrays: each lane is the run whose config holds its values."""
    base = dict(algo="a2c", total_steps=16 * 8 * 40, num_envs=16)
    values = dict(gamma=[0.99, 0.9], ent_coef=[0.01, 0.1], vf_coef=[0.5, 0.25])
    hp = Hyperparams(**{k: jnp.array(v) for k, v in values.items()})
    train, _ = train_lib.make_train_fn(validate(TrainConfig(**base)), lanes=2)
    key = jax.random.PRNGKey(0)
    swept = jax.jit(jax.vmap(train, in_axes=(None, Hyperparams(gamma=0, ent_coef=0, vf_coef=0))))(key, hp)
    for k in range(2):
        single, _ = train_lib.make_train_fn(
            validate(TrainConfig(**base, seeds=(k,), **{n: v[k] for n, v in values.items()})))
        _assert_lane_is_run(swept, k, jax.jit(single)(key), atol=1e-5)


def test_a_typed_key_sweeps_like_a_raw_key():
    """jax.random.key(s) and PRNGKey(s) are the same key: a hyperparameter sweep gives the same run with either."""
    cfg = validate(TrainConfig(algo="a2c", total_steps=16 * 8 * 4, num_envs=16))
    hp = Hyperparams(learning_rate=jnp.array([1e-3, 3e-3]))
    outs = []
    for key in (jax.random.PRNGKey(0), jax.random.key(0)):
        train, _ = train_lib.make_train_fn(cfg, lanes=2)
        outs.append(jax.jit(jax.vmap(train, in_axes=(None, Hyperparams(learning_rate=0))))(key, hp))
    for a, b in zip(jax.tree.leaves(outs[0].lanes.params), jax.tree.leaves(outs[1].lanes.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("algo, strategy, hparams, error, match", [
    ("a2c", "single", Hyperparams(eps_end=0.1), ValueError, "eps_end is DQN's"),
    ("dqn", "single", Hyperparams(eps_fraction=jnp.nan), ValueError, r"eps_fraction must be in \[0, 1\]"),
    ("dqn", "single", Hyperparams(eps_start=1.5), ValueError, r"eps_start must be in \[0, 1\]"),
    ("a2c", "single", Hyperparams(learning_rate=-1e-3), ValueError, "learning_rate must be in"),
    ("a2c", "single", Hyperparams(learning_rate=jnp.ones(3)), ValueError, "one number per train call"),
    ("a2c", "single", Hyperparams(delay=1), ValueError, "--strategy single has none"),
    ("a2c", "async", Hyperparams(delay=5), ValueError, r"delay must be in \[0, 3\]"),
    ("a2c", "async", Hyperparams(delay=1.0), ValueError, "must be an int"),
    ("a2c", "async", Hyperparams(delay=delays.uniform(5)), ValueError, r"shape \(max_delay \+ 1,\) = \(4,\)"),
    ("a2c", "single", 3e-3, TypeError, "must be a jaxdp.train.Hyperparams"),
    ("a2c", "single", Hyperparams(gamma=0.0), ValueError, r"gamma must be in \(0, 1\]"),
    ("a2c", "single", Hyperparams(gamma=1.5), ValueError, r"gamma must be in \(0, 1\]"),
    ("dqn", "single", Hyperparams(ent_coef=0.1), ValueError, "--algo dqn has none"),
    ("a2c", "single", Hyperparams(vf_coef=-1.0), ValueError, "vf_coef must be in"),
], ids=["eps-not-dqn", "eps-fraction-nan", "eps-start-1.5", "lr-negative", "lr-not-scalar", "delay-not-async",
        "delay-above-max", "delay-float", "delay-probs-shape", "bare-number", "gamma-0", "gamma-1.5",
        "ent-coef-dqn", "vf-coef-negative"])
def test_bad_hyperparameters_raise_one_clear_error(algo, strategy, hparams, error, match):
    cfg = validate(TrainConfig(algo=algo, strategy=strategy, max_delay=3, total_steps=16 * 8 * 4, num_envs=16,
                               learning_starts=0))
    train, _ = train_lib.make_train_fn(cfg)
    with pytest.raises(error, match=match):
        train(jax.random.PRNGKey(0), hparams)


def test_a_config_with_a_sweep_grid_is_refused():
    """make_train_fn trains one run per call: its sweeps are vmaps over Hyperparams, not ``cfg.sweep``."""
    cfg = validate(TrainConfig(algo="a2c", total_steps=16 * 8 * 4, num_envs=16, sweep=(("lr", (1e-3, 2e-3)),)))
    with pytest.raises(ValueError, match="vmap over Hyperparams"):
        train_lib.make_train_fn(cfg)


def test_a_cnn_torso_on_vector_observations_is_refused_before_any_trace():
    """The Python API meets the CLI's check: one ConfigError naming --torso, not a shape error inside the trace."""
    from jaxdp.config import ConfigError

    cfg = validate(TrainConfig(algo="a2c", torso="nature", total_steps=16 * 8 * 4, num_envs=16))
    with pytest.raises(ConfigError, match=r"--torso nature is a CNN over frames .* shape \(4,\)"):
        train_lib.make_train_fn(cfg)
