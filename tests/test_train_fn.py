"""make_train_fn: the whole run of one seed as a pure function, vmapped over seeds and hyperparameters."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxdp import train as train_lib
from jaxdp.config import TrainConfig, validate


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
    lrs = jnp.array([0.0, 3e-3])
    train, _ = train_lib.make_train_fn(cfg, lanes=4)
    grid = jax.jit(jax.vmap(jax.vmap(train, in_axes=(0, None)), in_axes=(None, 0)))(keys, lrs)
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
