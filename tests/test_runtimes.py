"""The vmap and devices runtimes compute the same thing; the devices one does not scale gradients.

The devices runtime needs several devices, which on CPU exist only if XLA_FLAGS is set before JAX
is imported. So this module doubles as a script: the ``devices_results`` fixture runs it once in a
subprocess with 4 fake CPU devices (it writes its results to an .npz), and the tests compare them
with the vmap runtime run here, on the one default device.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp.runtime import devices as devices_runtime
from jaxdp.runtime import vmap as vmap_runtime
from jaxdp.workloads import digits

NUM_WORKERS = 4
BATCH = 8
STEPS = 6


def _strategies():
    return {
        "allreduce_sgd": optax.chain(jaxdp.allreduce("workers"), optax.sgd(0.1)),
        "local_steps": jaxdp.local_steps(
            optax.sgd(0.1), optax.sgd(0.7, momentum=0.9), sync_every=2, axis_name="workers"
        ),
    }


def _train(map_workers, optimizer, data):
    """STEPS steps of ``optimizer`` on NUM_WORKERS workers; a Python loop, blocking every step
    (an unblocked shard_map loop over fake CPU devices can hit an XLA rendezvous timeout)."""
    params = digits.init_mlp(jax.random.key(0), hidden=(16,))

    def worker_step(p, s, x, y):
        loss, grads = jax.value_and_grad(digits.loss)(p, x, y)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    step = jax.jit(map_workers(worker_step, NUM_WORKERS))
    p = vmap_runtime.replicate(params, NUM_WORKERS)
    s = vmap_runtime.replicate(optimizer.init(params), NUM_WORKERS)
    for t in range(STEPS):
        x, y = digits.worker_batches(jax.random.key(100 + t), data, NUM_WORKERS, BATCH)
        p, s, losses = jax.block_until_ready(step(p, s, x, y))
    assert losses.shape == (NUM_WORKERS,)
    return p


def _flat(prefix, tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {f"{prefix}{jax.tree_util.keystr(path)}": np.asarray(leaf) for path, leaf in leaves}


def _averaged_gradient(p, x, y):
    """One worker's view of what allreduce hands the optimizer: the mean of the workers' gradients."""
    return jax.lax.pmean(jax.grad(digits.loss)(p, x, y), "workers")


def compute_devices_results(path):
    """Run under 4 fake CPU devices (see the fixture); save everything the tests check."""
    assert jax.device_count() == NUM_WORKERS, jax.devices()
    data = digits.load(seed=0)
    results = {}
    for name, optimizer in _strategies().items():
        results.update(_flat(f"{name}/", _train(devices_runtime.map_workers, optimizer, data)))

    # The factor test: one averaged gradient, parameters laid out per worker (our runtime) ...
    params = digits.init_mlp(jax.random.key(0), hidden=(16,))
    x, y = digits.worker_batches(jax.random.key(7), data, NUM_WORKERS, BATCH)
    per_worker = devices_runtime.map_workers(_averaged_gradient, NUM_WORKERS)
    results.update(_flat("grad_worker_axis/", per_worker(vmap_runtime.replicate(params, NUM_WORKERS), x, y)))
    # ... and the naive layout this runtime avoids: replicated params, P(), under check_vma=True.
    from jax.sharding import PartitionSpec as P

    naive = jax.shard_map(
        lambda p, x, y: _averaged_gradient(p, x[0], y[0]),
        mesh=devices_runtime.make_mesh(NUM_WORKERS),
        in_specs=(P(), P("workers"), P("workers")),
        out_specs=P(),
    )
    results.update(_flat("grad_replicated/", naive(params, x, y)))

    # Validation of the device count, with devices present.
    messages = []
    for call in (
        lambda: devices_runtime.map_workers(lambda v: v, NUM_WORKERS + 1),
        lambda: devices_runtime.map_workers(lambda v: v, 2, devices=jax.devices()),
    ):
        try:
            call()
            messages.append("no error")
        except ValueError as error:
            messages.append(str(error))
    results["messages"] = np.array(messages)
    # where the workers' data lives: one shard per device
    sharded = jax.jit(devices_runtime.map_workers(lambda v: v * 2, NUM_WORKERS))(jnp.arange(4.0))
    results["num_shards"] = np.array(len({shard.device for shard in sharded.addressable_shards}))
    np.savez(path, **results)


@pytest.fixture(scope="module")
def data():
    return digits.load(seed=0)


@pytest.fixture(scope="module")
def devices_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("devices") / "results.npz"
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={NUM_WORKERS}",
        JAX_PLATFORMS="cpu",
        # the script runs from tests/; make the checkout's jaxdp importable however it is installed
        PYTHONPATH=os.pathsep.join([repo_root, *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    completed = subprocess.run(
        [sys.executable, __file__, str(path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    with np.load(path) as results:
        return dict(results)


@pytest.mark.parametrize("name", sorted(_strategies()))
def test_vmap_and_devices_give_the_same_parameters(devices_results, data, name):
    vmap_params = _flat(f"{name}/", _train(vmap_runtime.map_workers, _strategies()[name], data))
    initial = _flat(f"{name}/", vmap_runtime.replicate(digits.init_mlp(jax.random.key(0), hidden=(16,)), NUM_WORKERS))
    assert set(vmap_params) == {k for k in devices_results if k.startswith(f"{name}/")}
    for key, value in vmap_params.items():
        np.testing.assert_allclose(devices_results[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
        assert np.max(np.abs(value - initial[key])) > 1e-4, key  # training moved the parameters


def test_devices_gradients_are_not_multiplied_by_the_device_count(devices_results, data):
    params = digits.init_mlp(jax.random.key(0), hidden=(16,))
    x, y = digits.worker_batches(jax.random.key(7), data, NUM_WORKERS, BATCH)
    # reference: the gradient of the mean loss over the union batch, on one device
    reference = _flat("", jax.grad(digits.loss)(params, x.reshape(NUM_WORKERS * BATCH, -1), y.reshape(-1)))
    for key, value in reference.items():
        ours = devices_results[f"grad_worker_axis/{key}"]
        assert ours.shape == (NUM_WORKERS, *value.shape)
        np.testing.assert_allclose(ours, np.broadcast_to(value, ours.shape), rtol=1e-5, atol=1e-6, err_msg=key)
        # the hazard this layout avoids, measured: replicated params get N × the gradient
        np.testing.assert_allclose(
            devices_results[f"grad_replicated/{key}"], NUM_WORKERS * value, rtol=1e-5, atol=1e-6, err_msg=key
        )


def test_devices_runtime_validates_device_count(devices_results):
    too_many, mismatch = devices_results["messages"]
    assert "num_workers=5" in too_many and "xla_force_host_platform_device_count=5" in too_many
    assert "num_workers=2" in mismatch and "got 4" in mismatch and "xla_force_host_platform_device_count" in mismatch
    assert int(devices_results["num_shards"]) == NUM_WORKERS


def test_devices_runtime_on_one_device_refuses_more_workers():
    with pytest.raises(ValueError, match="XLA_FLAGS=--xla_force_host_platform_device_count=2"):
        devices_runtime.map_workers(lambda v: v, 2)


def test_devices_runtime_with_one_worker_matches_plain_call():
    mapped = devices_runtime.map_workers(lambda v, w: (v * w, jnp.sum(v)), 1)
    product, total = mapped(jnp.array([[1.0, 2.0]]), jnp.array([3.0]))
    np.testing.assert_allclose(product, [[3.0, 6.0]])
    np.testing.assert_allclose(total, [3.0])


def test_replicate_adds_a_leading_worker_axis():
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.float32(1.5)}
    replicated = vmap_runtime.replicate(tree, 3)
    assert replicated["w"].shape == (3, 2, 3) and replicated["b"].shape == (3,)
    np.testing.assert_array_equal(replicated["w"][2], tree["w"])
    with pytest.raises(ValueError, match="num_workers"):
        vmap_runtime.replicate(tree, 0)


def test_vmap_map_workers_runs_collectives_and_checks_the_worker_axis():
    mapped = vmap_runtime.map_workers(lambda v: (jax.lax.pmean(v, "workers"), v), 3)
    mean, same = mapped(jnp.array([1.0, 2.0, 6.0]))
    np.testing.assert_allclose(mean, [3.0, 3.0, 3.0])
    np.testing.assert_allclose(same, [1.0, 2.0, 6.0])
    with pytest.raises(ValueError, match=r"num_workers=3.*shape \(4,\)"):
        mapped(jnp.ones(4))
    with pytest.raises(ValueError, match="leading worker axis"):
        mapped(jnp.float32(1.0))
    with pytest.raises(ValueError, match="num_workers"):
        vmap_runtime.map_workers(lambda v: v, 0)
    custom = vmap_runtime.map_workers(lambda v: jax.lax.psum(v, "hosts"), 2, axis_name="hosts")
    np.testing.assert_allclose(custom(jnp.array([1.0, 2.0])), [3.0, 3.0])


if __name__ == "__main__":
    compute_devices_results(sys.argv[1])
