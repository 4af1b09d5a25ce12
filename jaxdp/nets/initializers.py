"""Weight initialisers that stay safe under ``jax.vmap`` on CPU.

:func:`orthogonal` is flax's orthogonal initialiser whose batching rule draws the matrices one key at a time
(``lax.map``) instead of as one batched QR. jaxlib 0.10 on CPU splits LAPACK's batched ``geqrf`` over the thread
pool that runs it, and two such calls at once (two layers of a Nature CNN, vmapped over seeds) wait for each other
forever. On a 2-core machine, ``jax.vmap(net.init)`` of a Nature CNN over two keys never returned, and neither did
``jaxdp train --env Pong-v5 --seeds 0 1`` (every try). Seed sweeps, ``make_train_fn`` vmapped over keys, and a
user's own ``jax.vmap`` all initialise through here. The values are flax's, bit for bit. Like any ``custom_vmap``
function it is not differentiable (an initialiser is not differentiated).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def orthogonal(scale: float = 1.0) -> Initializer:
    """``nn.initializers.orthogonal(scale)``, vmapped as a loop over the keys (see the module docstring)."""
    base = nn.initializers.orthogonal(scale)

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        @jax.custom_batching.custom_vmap
        def one(k):
            return base(k, shape, dtype)

        @one.def_vmap
        def one_key_at_a_time(axis_size: int, in_batched: list[bool], k):
            del axis_size, in_batched  # the key is the only argument, so it is the batched one
            # ``one`` again inside the loop: an outer vmap batches the loop body, and this rule then loops again.
            return jax.lax.map(one, k), True

        return one(key)

    return init
