"""Flax (linen) networks for the agents: torsos and heads, pure ``init`` / ``apply``.

* torsos: :class:`NatureCNN` (Mnih 2015), :class:`A3CCNN` (Mnih 2013), :class:`MLP`, built by name
  with :func:`make_torso` (``"nature"``, ``"a3c"``, ``"mlp"``), optional LayerNorm;
* heads: :class:`QNetwork` (action values) and :class:`ActorCritic` (policy logits + value);
* :func:`microbatched`: an ``apply`` that runs a large batch as several small ones (faster convolutions on CPU);
* :func:`orthogonal`: flax's orthogonal initialiser, safe to ``jax.vmap`` over keys on CPU (see its module).

uint8 frames are scaled by 1/255 inside the torso and envpool's channels-first Atari frames are
transposed there, so observations go in exactly as the environments return them.
This package knows nothing of environments, agents or distribution.
"""

from jaxdp.nets.heads import ActorCritic, QNetwork, make_actor_critic, make_q_network
from jaxdp.nets.initializers import orthogonal
from jaxdp.nets.microbatch import microbatched
from jaxdp.nets.torsos import MLP, TORSOS, A3CCNN, NatureCNN, make_torso, preprocess

__all__ = [
    "A3CCNN",
    "MLP",
    "TORSOS",
    "ActorCritic",
    "NatureCNN",
    "QNetwork",
    "make_actor_critic",
    "make_q_network",
    "make_torso",
    "microbatched",
    "orthogonal",
    "preprocess",
]
