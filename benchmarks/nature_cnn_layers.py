"""Where the Nature-CNN DQN update's time goes on this backend, and what rewriting its costliest part gives.

On CPU the DQN learner, not envpool, bounds Atari training (see ``rl_throughput.py``), so this prints, as
markdown tables with the machine and versions:

1. each layer's forward pass, weight gradient and input gradient at batch 32, with GFLOP/s, beside a plain
   512×3136×512 matmul (what the backend's matmul reaches);
2. three equivalent forms of the first convolution's weight gradient (8×8 stride 4 on 84×84×4), each checked
   against ``lax.conv``'s own to 1e-5 relative: space-to-depth (a 2×2 stride-1 convolution on 21×21×64),
   an explicit im2col matmul, and four shifted-slice matmuls over the space-to-depth frames.

Every timing is the best of 5 rounds of ``--calls`` jitted calls. Run: ``python benchmarks/nature_cnn_layers.py``
(about a minute on 2 cores).
"""

from __future__ import annotations

import platform
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdp.cli_args import OneLineParser, positive_int
from jaxdp.provenance import cpu_model

BATCH = 32
_NHWC = ("NHWC", "HWIO", "NHWC")
# (name, input height = width, input channels, features, kernel, stride) of the Nature CNN's convolutions.
LAYERS = (("conv1 8×8/4", 84, 4, 32, 8, 4), ("conv2 4×4/2", 20, 32, 64, 4, 2), ("conv3 3×3/1", 9, 64, 64, 3, 1))


def best_ms(fn: Callable, *args, calls: int) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        rounds.append((time.perf_counter() - start) / calls)
    return 1e3 * min(rounds)


def conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    return lax.conv_general_dilated(x, w, (stride, stride), "VALID", dimension_numbers=_NHWC)


def space_to_depth(x: jax.Array, s: int) -> jax.Array:
    """(B, H, W, C) → (B, H/s, W/s, s·s·C): each s×s block of pixels becomes one pixel's channels."""
    b, h, w, c = x.shape
    return x.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // s, w // s, s * s * c)


def kernel_to_depth(w: jax.Array, s: int) -> jax.Array:
    """(k, k, C, F) → (k/s, k/s, s·s·C, F), matching :func:`space_to_depth`."""
    k, _, c, f = w.shape
    return w.reshape(k // s, s, k // s, s, c, f).transpose(0, 2, 1, 3, 4, 5).reshape(k // s, k // s, s * s * c, f)


def kernel_from_depth(w: jax.Array, s: int) -> jax.Array:
    """The inverse of :func:`kernel_to_depth`."""
    kp, _, sc, f = w.shape
    c = sc // (s * s)
    return w.reshape(kp, kp, s, s, c, f).transpose(0, 2, 1, 3, 4, 5).reshape(kp * s, kp * s, c, f)


def weight_grad_lax(x, g, w, s):
    return jax.vjp(lambda w: conv(x, w, s), w)[1](g)[0]


def weight_grad_space_to_depth(x, g, w, s):
    return jax.vjp(lambda w: conv(space_to_depth(x, s), kernel_to_depth(w, s), 1), w)[1](g)[0]


def weight_grad_im2col(x, g, w, s):
    k = w.shape[0] // s
    y = space_to_depth(x, s)
    oh, ow = g.shape[1], g.shape[2]
    cols = jnp.concatenate([y[:, i:i + oh, j:j + ow, :] for i in range(k) for j in range(k)], axis=-1)
    grad = cols.reshape(-1, cols.shape[-1]).T @ g.reshape(-1, g.shape[-1])
    return kernel_from_depth(grad.reshape(k, k, -1, g.shape[-1]), s)


def weight_grad_slices(x, g, w, s):
    k = w.shape[0] // s
    y = space_to_depth(x, s)
    oh, ow = g.shape[1], g.shape[2]
    flat_g = g.reshape(-1, g.shape[-1])
    rows = [jnp.stack([y[:, p:p + oh, q:q + ow, :].reshape(-1, y.shape[-1]).T @ flat_g for q in range(k)])
            for p in range(k)]
    return kernel_from_depth(jnp.stack(rows), s)


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=positive_int, default=20, help="jitted calls per timing round")
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    print(f"machine: {cpu_model()}, {jax.device_count()} {jax.default_backend()} device(s); python "
          f"{platform.python_version()}, jax {jax.__version__}; batch {BATCH}, best of 5 × {args.calls} calls\n")
    print("| layer | forward ms | weight grad ms | input grad ms | forward GFLOP/s | weight grad GFLOP/s |")
    print("|---|---|---|---|---|---|")
    inputs = {}
    for name, size, channels, features, k, s in LAYERS:
        x = jnp.asarray(rng.random((BATCH, size, size, channels), np.float32))
        w = jnp.asarray(rng.standard_normal((k, k, channels, features), np.float32))
        g = conv(x, w, s)
        inputs[name] = (x, g, w, s)
        gflop = 2 * g.size * k * k * channels / 1e9
        fwd = best_ms(lambda x, w: conv(x, w, s), x, w, calls=args.calls)
        dw = best_ms(lambda x, g: weight_grad_lax(x, g, w, s), x, g, calls=args.calls)
        dx = best_ms(lambda w, g: jax.vjp(lambda x_: conv(x_, w, s), x)[1](g)[0], w, g, calls=args.calls)
        print(f"| {name} | {fwd:.2f} | {dw:.2f} | {dx:.2f} | {gflop / fwd * 1e3:.0f} | {gflop / dw * 1e3:.0f} |")
    a = jnp.asarray(rng.random((512, 3136), np.float32))
    b = jnp.asarray(rng.random((3136, 512), np.float32))
    mm = best_ms(lambda a, b: a @ b, a, b, calls=args.calls)
    print(f"| matmul 512×3136×512 | {mm:.2f} | | | {2 * 512 * 3136 * 512 / 1e9 / mm * 1e3:.0f} | |")

    print("\n| conv1 weight gradient as | ms | max relative error vs lax.conv |")
    print("|---|---|---|")
    x, g, w, s = inputs[LAYERS[0][0]]
    reference = weight_grad_lax(x, g, w, s)
    forms = (("lax.conv (XLA's own)", weight_grad_lax), ("space-to-depth 2×2/1 conv", weight_grad_space_to_depth),
             ("im2col matmul", weight_grad_im2col), ("4 shifted-slice matmuls", weight_grad_slices))
    for label, fn in forms:
        error = float(jnp.abs(fn(x, g, w, s) - reference).max() / jnp.abs(reference).max())
        assert error < 1e-5, f"{label}: not the same gradient (relative error {error:.1e})"
        print(f"| {label} | {best_ms(lambda x, g: fn(x, g, w, s), x, g, calls=args.calls):.2f} | {error:.1e} |")


if __name__ == "__main__":
    main()
