"""Tests of jaxdp.nets: shapes, parameter counts (hand-computed), uint8 scaling, layout, LayerNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp import nets

FRAMES = jnp.zeros((1, 4, 84, 84), jnp.uint8)


def count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def shapes(net, obs):
    """The parameter tree as shapes only: no initialisation is computed (fast on a busy CPU)."""
    return jax.eval_shape(net.init, jax.random.key(0), obs)


def init(net, obs):
    return jax.jit(net.init)(jax.random.key(0), obs)


def conv(kernel: int, c_in: int, c_out: int) -> int:
    return kernel * kernel * c_in * c_out + c_out


def dense(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def test_nature_q_network_param_count_on_pong():
    net = nets.make_q_network("nature", 6)
    params = shapes(net, FRAMES)
    # Mnih 2015: 84 -> 20 -> 9 -> 7 with VALID padding, 7*7*64 = 3136 features into fc 512
    expected = conv(8, 4, 32) + conv(4, 32, 64) + conv(3, 64, 64) + dense(3136, 512) + dense(512, 6)
    assert count(params) == expected == 1_687_206
    q = jax.eval_shape(net.apply, params, jnp.zeros((5, 4, 84, 84), jnp.uint8))
    assert q.shape == (5, 6) and q.dtype == jnp.float32


def test_a3c_actor_critic_shapes_and_count():
    net = nets.make_actor_critic("a3c", 4)
    params = shapes(net, FRAMES)
    expected = conv(8, 4, 16) + conv(4, 16, 32) + dense(9 * 9 * 32, 256) + dense(256, 4) + dense(256, 1)
    assert count(params) == expected
    apply = lambda obs: jax.eval_shape(net.apply, params, obs)  # noqa: E731
    logits, value = apply(jnp.zeros((2, 3, 4, 84, 84), jnp.uint8))  # any batch shape
    assert logits.shape == (2, 3, 4) and value.shape == (2, 3)
    logits, value = apply(FRAMES[0])  # unbatched
    assert logits.shape == (4,) and value.shape == ()


def test_mlp_shapes_count_and_heads():
    torso = nets.make_torso("mlp", hidden_sizes=(64, 32))
    q_net = nets.QNetwork(torso, 2)
    params = shapes(q_net, jnp.zeros((1, 4)))
    assert count(params) == dense(4, 64) + dense(64, 32) + dense(32, 2)
    assert jax.eval_shape(q_net.apply, params, jnp.ones((7, 4))).shape == (7, 2)
    ac = nets.ActorCritic(torso, 3)
    params = shapes(ac, jnp.zeros((1, 4)))
    logits, value = jax.eval_shape(ac.apply, params, jnp.ones((7, 4)))
    assert logits.shape == (7, 3) and value.shape == (7,)
    flat = nets.make_torso("mlp", hidden_sizes=(8,), obs_ndim=2)
    out = jax.eval_shape(flat.apply, shapes(flat, jnp.zeros((1, 3, 5))), jnp.zeros((6, 3, 5)))
    assert out.shape == (6, 8)


@pytest.mark.parametrize("name", ["nature", "a3c"])
def test_uint8_frames_scaled_and_channels_first(name):
    torso = nets.make_torso(name)
    nhwc = nets.make_torso(name, channels_first=False)

    # Any parameters will do for these identities; Gaussian ones skip the (slow on CPU) QR of the
    # orthogonal initialiser.
    shaped = shapes(torso, FRAMES)
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32), shaped)

    @jax.jit  # one compilation for the three applications
    def outputs(frames):
        return (
            torso.apply(params, frames),
            torso.apply(params, frames.astype(jnp.float32) / 255.0),
            nhwc.apply(params, jnp.moveaxis(frames, 1, -1)),
        )

    frames = jnp.asarray(rng.integers(0, 256, (3, 4, 84, 84), dtype=np.uint8))
    from_uint8, from_float, from_nhwc = outputs(frames)
    assert float(jnp.abs(from_uint8).max()) > 0
    # uint8 frames are the same as float frames scaled by 1/255
    np.testing.assert_allclose(from_uint8, from_float, rtol=1e-5, atol=1e-6)
    # channels-first input is the channels-last network applied to the transposed frames
    np.testing.assert_allclose(from_uint8, from_nhwc, rtol=1e-5, atol=1e-6)


def test_layer_norm_flag_changes_param_tree():
    for name, obs in (("nature", FRAMES), ("a3c", FRAMES), ("mlp", jnp.zeros((1, 4)))):
        plain = shapes(nets.make_q_network(name, 3), obs)
        normed = shapes(nets.make_q_network(name, 3, layer_norm=True), obs)
        ln = {k: v for k, v in normed["params"]["torso"].items() if k.startswith("LayerNorm")}
        hidden = [k for k in plain["params"]["torso"] if k.startswith(("Conv", "Dense"))]
        assert len(ln) == len(hidden)  # one LayerNorm per hidden layer
        extra = sum(int(v["scale"].shape[0] + v["bias"].shape[0]) for v in ln.values())
        assert count(normed) == count(plain) + extra
        assert "LayerNorm_0" not in plain["params"]["torso"]


def test_separate_critic_reads_a_torso_of_its_own():
    obs = jax.random.normal(jax.random.key(1), (5, 6))
    shared = nets.make_actor_critic("mlp", 3, hidden_sizes=(16, 8))
    separate = nets.make_actor_critic("mlp", 3, hidden_sizes=(16, 8), separate_critic=True)
    p_shared, p_sep = init(shared, obs), init(separate, obs)
    # The shared tree is unchanged (old checkpoints restore); the separate one adds a copy of the torso.
    assert sorted(p_shared["params"]) == ["policy", "torso", "value"]
    assert sorted(p_sep["params"]) == ["critic_torso", "policy", "torso", "value"]
    torso_count = count(p_shared["params"]["torso"])
    assert count(p_sep["params"]["critic_torso"]) == torso_count == dense(6, 16) + dense(16, 8)
    assert count(p_sep) == count(p_shared) + torso_count
    # Initialised independently: not a copy of the policy's torso.
    assert not np.allclose(p_sep["params"]["critic_torso"]["Dense_0"]["kernel"],
                           p_sep["params"]["torso"]["Dense_0"]["kernel"])

    def grads_of(output):
        return jax.grad(lambda p: jnp.sum(separate.apply(p, obs)[output] ** 2))(p_sep)["params"]

    # The value's loss moves only the critic's torso and head, the policy's only its own: no shared features.
    value_grads, policy_grads = grads_of(1), grads_of(0)
    for name in ("torso", "policy"):
        assert all(not g.any() for g in jax.tree.leaves(value_grads[name])), name
    for name in ("critic_torso", "value"):
        assert all(not g.any() for g in jax.tree.leaves(policy_grads[name])), name
    assert all(g.any() for g in jax.tree.leaves(value_grads["critic_torso"]))
    # Under a shared torso the value's gradient reaches the policy's features.
    shared_value_grads = jax.grad(lambda p: jnp.sum(shared.apply(p, obs)[1] ** 2))(p_shared)["params"]
    assert all(g.any() for g in jax.tree.leaves(shared_value_grads["torso"]))
    with pytest.raises(ValueError, match="separate_critic must be a bool"):
        nets.make_actor_critic("mlp", 3, separate_critic="yes")


def test_initialisation_scales():
    net = nets.make_actor_critic("mlp", 4, hidden_sizes=(64,))
    params = init(net, jnp.zeros((1, 8)))["params"]
    # orthogonal columns scaled by the gain: W^T W = gain^2 I for a tall kernel
    for name, gain in (("policy", 0.01), ("value", 1.0)):
        kernel = params[name]["kernel"]
        np.testing.assert_allclose(kernel.T @ kernel, gain**2 * np.eye(kernel.shape[1]), atol=1e-6)
        assert not params[name]["bias"].any()
    hidden = params["torso"]["Dense_0"]["kernel"]  # (8, 64): wide, so W W^T = 2 I
    np.testing.assert_allclose(hidden @ hidden.T, 2.0 * np.eye(8), atol=1e-5)


def test_make_torso_validates_arguments():
    with pytest.raises(ValueError, match="name must be one of"):
        nets.make_torso("resnet")
    with pytest.raises(ValueError, match="hidden_sizes"):
        nets.make_torso("mlp", hidden_sizes=(64, 0))
    with pytest.raises(ValueError, match="num_actions"):
        nets.make_q_network("mlp", 0)
    torso = nets.make_torso("nature")
    with pytest.raises(ValueError, match="frames"):
        torso.init(jax.random.key(0), jnp.zeros((84, 84)))


@pytest.mark.parametrize("name", ["nature", "a3c"])
def test_frames_too_small_for_the_convolutions_are_refused(name):
    """A channels-last frame read as channels-first is an 84x4 image: the first VALID convolution has no output,
    and the network used to output its biases with all-zero gradients, silently. Now it is refused by name."""
    with pytest.raises(ValueError, match=r"84x4 pixels reach a 8x8 convolution; channels-last frames need "
                                         r"channels_first=False"):
        shapes(nets.make_torso(name), jnp.zeros((1, 84, 84, 4), jnp.uint8))
    # Small but valid frames pass, down to the smallest each stack takes (Nature: 8/4 -> 4/2 -> 3/1 needs 36).
    smallest = {"nature": 36, "a3c": 20}[name]
    shapes(nets.make_torso(name), jnp.zeros((1, 4, smallest, smallest), jnp.uint8))
    with pytest.raises(ValueError, match=r"too small: \d+x\d+ pixels reach a \d+x\d+ convolution(\n|$)"):
        shapes(nets.make_torso(name, channels_first=False), jnp.zeros((1, smallest - 1, smallest - 1, 4), jnp.uint8))


def test_microbatched_apply_equals_one_batch_in_outputs_and_gradients():
    # The A2C loss path on CPU: an actor-critic on Atari frames applied in slices (128 rows at size 32 in training;
    # here 10 rows at size 4: uneven slices 4 + 3 + 3 -- no row lost or repeated).
    net = nets.make_actor_critic("a3c", 6)
    obs = jax.random.randint(jax.random.key(1), (10, 4, 84, 84), 0, 256).astype(jnp.uint8)
    params = init(net, obs[:1])
    sliced = nets.microbatched(net.apply, 4)
    logits, value = net.apply(params, obs)
    logits_mb, value_mb = jax.jit(sliced)(params, obs)
    np.testing.assert_allclose(logits_mb, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value_mb, value, rtol=1e-5, atol=1e-6)

    weights = jnp.arange(10.0)  # a loss that tells rows apart, so a permutation would show

    def loss(apply, p):
        lg, v = apply(p, obs)
        return jnp.sum(weights * (v + jax.nn.logsumexp(lg, axis=-1)))

    g = jax.grad(lambda p: loss(net.apply, p))(params)
    g_mb = jax.jit(jax.grad(lambda p: loss(sliced, p)))(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_mb)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_microbatched_small_batches_pass_through_and_bad_size_is_refused():
    calls = []

    def apply(p, x):
        calls.append(x.shape[0])
        return x * p

    np.testing.assert_array_equal(nets.microbatched(apply, 8)(2.0, jnp.arange(5.0)), 2.0 * jnp.arange(5.0))
    assert calls == [5]
    calls.clear()
    np.testing.assert_array_equal(nets.microbatched(apply, 32)(1.0, jnp.arange(128.0)), jnp.arange(128.0))
    assert calls == [32, 32, 32, 32]
    with pytest.raises(ValueError, match="size must be >= 1"):
        nets.microbatched(apply, 0)


def test_orthogonal_init_vmapped_is_flax_s_draw_per_key_without_a_batched_qr():
    """jax.vmap(net.init) over keys hung on CPU (jaxlib 0.10's batched LAPACK QR deadlocks its thread pool; the
    Nature CNN's two large QRs at once, every try). jaxdp's orthogonal initialiser loops over the keys instead:
    the vmapped (and doubly vmapped) draws equal flax's, key by key, and no batched QR is in the program. In a
    subprocess, so that a hang fails this test instead of the session."""
    import subprocess
    import sys

    from flax import linen as nn

    from jaxdp.nets.initializers import orthogonal

    keys = jax.random.split(jax.random.key(3), 4)
    draw = orthogonal(2.0)
    batched = jax.jit(jax.vmap(lambda k: draw(k, (64, 16))))(keys)
    nested = jax.jit(jax.vmap(jax.vmap(lambda k: draw(k, (64, 16)))))(keys.reshape(2, 2))
    for i, key in enumerate(keys):
        expected = nn.initializers.orthogonal(2.0)(key, (64, 16))
        np.testing.assert_array_equal(batched[i], expected)
        np.testing.assert_array_equal(nested.reshape(4, 64, 16)[i], expected)
    # The QR in the vmapped program is unbatched (flax's own, vmapped, is one call with num_batch_dims = "1").
    qr_calls = [line for line in jax.jit(jax.vmap(lambda k: draw(k, (64, 16)))).lower(keys).as_text().splitlines()
                if "geqrf" in line]
    assert qr_calls and all('num_batch_dims = "0"' in line for line in qr_calls), qr_calls
    flax_vmapped = jax.jit(jax.vmap(lambda k: nn.initializers.orthogonal(2.0)(k, (64, 16)))).lower(keys).as_text()
    assert any('num_batch_dims = "1"' in line for line in flax_vmapped.splitlines() if "geqrf" in line)
    script = """
import jax, jax.numpy as jnp
from jaxdp import nets
net = nets.make_actor_critic("nature", 6)
params = jax.jit(jax.vmap(lambda k: net.init(k, jnp.zeros((2, 4, 84, 84), jnp.uint8))))(
    jax.random.split(jax.random.key(0), 2))
jax.block_until_ready(params)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
