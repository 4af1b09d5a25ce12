"""A small supervised workload: an MLP on scikit-learn's bundled 8×8 digits (no download).

1797 images of 64 pixels, 10 classes. The features are standardised with the training split's
statistics; the MLP has tanh hidden layers, so the loss is non-convex (the setting of the DPSGD
paper) while one CPU core trains it to > 90 % test accuracy in a few hundred steps. Used by the
strategy tests, the runtimes, the benchmarks and the examples.

Everything is a pure function of explicit PRNG keys; parameters are a plain dict pytree
``{"layers": [{"w": [in, out], "b": [out]}, ...]}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

NUM_FEATURES = 64
NUM_CLASSES = 10

Params = dict


class Dataset(NamedTuple):
    """Train and test splits: float32 features ``[n, 64]`` and int32 labels ``[n]``."""

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array


def load(seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """Load, shuffle, split and standardise the digits.

    Args:
      seed: seeds the shuffle that decides the split (NumPy, host side).
      test_fraction: the fraction of the 1797 examples held out, in (0, 1).

    Returns:
      A :class:`Dataset`; features standardised with the training mean and standard deviation
      (constant pixels are left at 0), float32; labels int32.

    Example:
      >>> data = load()
      >>> data.x_train.shape, data.x_test.shape
      ((1348, 64), (449, 64))
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits.load: test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits  # local: scikit-learn is slow to import

    digits = load_digits()
    features = np.asarray(digits.data, np.float64)
    labels = np.asarray(digits.target, np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    num_test = int(round(test_fraction * len(labels)))
    test, train = order[:num_test], order[num_test:]
    mean = features[train].mean(axis=0)
    std = features[train].std(axis=0)
    std = np.where(std > 0, std, 1.0)  # pixels that are always 0 in the corners
    standardise = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    return Dataset(
        x_train=jnp.asarray(standardise(features[train])),
        y_train=jnp.asarray(labels[train]),
        x_test=jnp.asarray(standardise(features[test])),
        y_test=jnp.asarray(labels[test]),
    )


def init_mlp(
    key: jax.Array, hidden: Sequence[int] = (64,), num_classes: int = NUM_CLASSES, *, num_features: int = NUM_FEATURES
) -> Params:
    """Initialise an MLP: LeCun-normal weights (variance 1/fan_in, right for tanh), zero biases.

    Args:
      key: PRNG key.
      hidden: widths of the tanh hidden layers (may be empty: softmax regression).
      num_classes: output logits.
      num_features: input width (64 for the digits).

    Returns:
      ``{"layers": [{"w": [in, out], "b": [out]}, ...]}``, float32.

    Example:
      >>> params = init_mlp(jax.random.key(0))
      >>> [layer["w"].shape for layer in params["layers"]]
      [(64, 64), (64, 10)]
    """
    widths = [num_features, *hidden, num_classes]
    if any(int(w) < 1 for w in widths):
        raise ValueError(f"digits.init_mlp: hidden, num_classes and num_features must be >= 1, got {widths}")
    keys = jax.random.split(key, len(widths) - 1)
    layers = [
        {
            "w": jax.random.normal(k, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in),
            "b": jnp.zeros((fan_out,), jnp.float32),
        }
        for k, fan_in, fan_out in zip(keys, widths[:-1], widths[1:])
    ]
    return {"layers": layers}


def logits(params: Params, x: jax.Array) -> jax.Array:
    """The MLP's logits ``[n, num_classes]`` for features ``x`` ``[n, num_features]``."""
    *hidden, last = params["layers"]
    for layer in hidden:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ last["w"] + last["b"]


def loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of the MLP on ``(x [n, f], y [n])``: a scalar."""
    chex.assert_rank(x, 2)
    chex.assert_rank(y, 1)
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def accuracy(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of ``x`` whose arg-max logit is the label ``y``: a scalar in [0, 1]."""
    return jnp.mean(jnp.argmax(logits(params, x), axis=-1) == y)


def sample_batch(key: jax.Array, x: jax.Array, y: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """A mini-batch of ``batch_size`` examples drawn uniformly with replacement (i.i.d., as SGD assumes).

    Returns:
      ``(x [batch_size, ...], y [batch_size])``.
    """
    chex.assert_equal_shape_prefix((x, y), 1)
    index = jax.random.randint(key, (batch_size,), 0, y.shape[0])
    return x[index], y[index]


def worker_batches(
    key: jax.Array, dataset: Dataset, num_workers: int, batch_size: int
) -> tuple[jax.Array, jax.Array]:
    """One training mini-batch per worker, from independent keys.

    Returns:
      ``(x [num_workers, batch_size, 64], y [num_workers, batch_size])``.
    """
    keys = jax.random.split(key, num_workers)
    return jax.vmap(sample_batch, in_axes=(0, None, None, None))(keys, dataset.x_train, dataset.y_train, batch_size)
