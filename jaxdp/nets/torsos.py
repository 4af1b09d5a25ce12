"""Feature extractors ("torsos"): the Nature DQN CNN, the A3C CNN and an MLP (Flax linen).

Every torso maps a batch of observations ``(*batch, *obs_shape)`` to features ``(*batch, F)``:

* uint8 inputs are frames: they are cast to float32 and scaled by 1/255 inside the network, so
  replay buffers can keep the compact uint8 frames;
* the CNNs take envpool's channels-first frames ``(*batch, 4, 84, 84)`` and move the channels last
  (Flax convolutions are NHWC); pass ``channels_first=False`` for NHWC inputs;
* ``layer_norm=True`` inserts a LayerNorm (over the feature / channel axis) after every hidden layer,
  before its ReLU (as in PQN, Gallici et al. 2024); it adds ``scale`` and ``bias`` parameters;
* weights use orthogonal initialisation with gain sqrt(2) and zero biases (as CleanRL / PureJaxRL).

Shapes, with VALID padding: Nature CNN 84 → 20 → 9 → 7, flatten 7·7·64 = 3136 → 512;
A3C CNN 84 → 20 → 9, flatten 9·9·32 = 2592 → 256.

References:
  Mnih et al. 2015, "Human-level control through deep reinforcement learning" (Nature CNN).
  Mnih et al. 2013, "Playing Atari with Deep Reinforcement Learning" (the A3C/“small” CNN).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdp.nets.initializers import orthogonal

_HIDDEN_INIT = orthogonal(np.sqrt(2.0))
_ZEROS = nn.initializers.zeros


def preprocess(obs: jax.Array) -> jax.Array:
    """float32 observations; uint8 frames are scaled into [0, 1]."""
    obs = jnp.asarray(obs)
    if obs.dtype == jnp.uint8:
        return obs.astype(jnp.float32) / 255.0
    return obs.astype(jnp.float32)


def _hidden(x: jax.Array, layer_norm: bool) -> jax.Array:
    if layer_norm:
        x = nn.LayerNorm()(x)
    return nn.relu(x)


def _conv_stack(
    x: jax.Array,
    layers: Sequence[tuple[int, int, int]],
    channels_first: bool,
    layer_norm: bool,
    frame_ndim: int = 3,
) -> jax.Array:
    """Convolutions ``(features, kernel, stride)`` + ReLU, then flattened over the frame axes."""
    if x.ndim < frame_ndim:
        raise ValueError(f"CNN torso: observations must be frames (C, H, W), got shape {x.shape}")
    frame_shape = x.shape[-3:]
    x = preprocess(x)
    if channels_first:
        x = jnp.moveaxis(x, -3, -1)
    for features, kernel, stride in layers:
        # A VALID convolution of a frame smaller than its kernel has no output pixels, and the Dense after the
        # flatten then sees 0 features: the network outputs its biases and every gradient is zero, silently (a
        # channels-last frame read as channels-first does this: 84x84x4 becomes an 84x4 image of 84 channels).
        if min(x.shape[-3:-1]) < kernel:
            layout = "(C, H, W)" if channels_first else "(H, W, C)"
            raise ValueError(
                f"CNN torso: frames of shape {frame_shape} read as {layout} are too small: {x.shape[-3]}x"
                f"{x.shape[-2]} pixels reach a {kernel}x{kernel} convolution"
                + ("; channels-last frames need channels_first=False" if channels_first else ""))
        x = nn.Conv(
            features,
            (kernel, kernel),
            strides=(stride, stride),
            padding="VALID",
            kernel_init=_HIDDEN_INIT,
            bias_init=_ZEROS,
        )(x)
        x = _hidden(x, layer_norm)
    return x.reshape((*x.shape[:-3], -1))


class NatureCNN(nn.Module):
    """Nature DQN torso: 32·8×8/4, 64·4×4/2, 64·3×3/1, fc 512, ReLU.

    Attributes:
      layer_norm: LayerNorm after every hidden layer.
      channels_first: inputs are ``(..., C, H, W)`` (envpool); False for ``(..., H, W, C)``.

    Example:
      >>> net = NatureCNN()
      >>> params = net.init(jax.random.key(0), jnp.zeros((1, 4, 84, 84), jnp.uint8))
      >>> net.apply(params, jnp.zeros((2, 4, 84, 84), jnp.uint8)).shape
      (2, 512)
    """

    layer_norm: bool = False
    channels_first: bool = True

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        x = _conv_stack(obs, ((32, 8, 4), (64, 4, 2), (64, 3, 1)), self.channels_first, self.layer_norm)
        x = nn.Dense(512, kernel_init=_HIDDEN_INIT, bias_init=_ZEROS)(x)
        return _hidden(x, self.layer_norm)


class A3CCNN(nn.Module):
    """A3C (Mnih 2013) torso: 16·8×8/4, 32·4×4/2, fc 256, ReLU.

    Attributes:
      layer_norm: LayerNorm after every hidden layer.
      channels_first: inputs are ``(..., C, H, W)`` (envpool); False for ``(..., H, W, C)``.

    Example:
      >>> net = A3CCNN()
      >>> params = net.init(jax.random.key(0), jnp.zeros((1, 4, 84, 84), jnp.uint8))
      >>> net.apply(params, jnp.zeros((3, 4, 84, 84), jnp.uint8)).shape
      (3, 256)
    """

    layer_norm: bool = False
    channels_first: bool = True

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        x = _conv_stack(obs, ((16, 8, 4), (32, 4, 2)), self.channels_first, self.layer_norm)
        x = nn.Dense(256, kernel_init=_HIDDEN_INIT, bias_init=_ZEROS)(x)
        return _hidden(x, self.layer_norm)


class MLP(nn.Module):
    """Fully connected torso: one ReLU layer per entry of ``hidden_sizes``.

    Observations ``(*batch, *obs_shape)`` are flattened over ``obs_ndim`` trailing axes first.

    Attributes:
      hidden_sizes: the widths of the hidden layers, e.g. ``(64, 64)``.
      layer_norm: LayerNorm after every hidden layer.
      obs_ndim: the number of trailing observation axes (1 for vectors such as CartPole's).

    Example:
      >>> net = MLP((64, 64))
      >>> params = net.init(jax.random.key(0), jnp.zeros((1, 4)))
      >>> net.apply(params, jnp.zeros((5, 4))).shape
      (5, 64)
    """

    hidden_sizes: Sequence[int] = (64, 64)
    layer_norm: bool = False
    obs_ndim: int = 1

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        x = preprocess(obs)
        if self.obs_ndim != 1:
            if x.ndim < self.obs_ndim:
                raise ValueError(f"MLP: observations need {self.obs_ndim} axes, got shape {x.shape}")
            x = x.reshape((*x.shape[: x.ndim - self.obs_ndim], -1))
        for width in self.hidden_sizes:
            x = nn.Dense(width, kernel_init=_HIDDEN_INIT, bias_init=_ZEROS)(x)
            x = _hidden(x, self.layer_norm)
        return x


TORSOS = ("nature", "a3c", "mlp")


def make_torso(
    name: str,
    *,
    hidden_sizes: Sequence[int] = (64, 64),
    layer_norm: bool = False,
    obs_ndim: int = 1,
    channels_first: bool = True,
) -> nn.Module:
    """Returns the torso called ``name``: ``"nature"``, ``"a3c"`` or ``"mlp"``.

    Args:
      name: which torso.
      hidden_sizes: MLP only: hidden widths (each > 0).
      layer_norm: LayerNorm after every hidden layer.
      obs_ndim: MLP only: trailing observation axes to flatten.
      channels_first: CNNs only: inputs are ``(..., C, H, W)``.

    Raises:
      ValueError: unknown name or bad hidden sizes.

    Example:
      >>> make_torso("mlp", hidden_sizes=(32,)).hidden_sizes
      (32,)
    """
    if name == "nature":
        return NatureCNN(layer_norm=layer_norm, channels_first=channels_first)
    if name == "a3c":
        return A3CCNN(layer_norm=layer_norm, channels_first=channels_first)
    if name == "mlp":
        sizes = tuple(hidden_sizes)
        bad = [w for w in sizes if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1]
        if not sizes or bad:
            raise ValueError(f"make_torso: hidden_sizes must be positive ints, got {hidden_sizes!r}")
        if obs_ndim < 1:
            raise ValueError(f"make_torso: obs_ndim must be >= 1, got {obs_ndim}")
        return MLP(hidden_sizes=tuple(int(w) for w in sizes), layer_norm=layer_norm, obs_ndim=obs_ndim)
    raise ValueError(f"make_torso: name must be one of {TORSOS}, got {name!r}")
