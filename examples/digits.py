"""Train the digits MLP with each strategy and print the test accuracy.

    python examples/digits.py

* single      -- one worker, SGD, batch 16.
* allreduce   -- 4 simulated workers (vmap runtime), batch 16 each, gradients averaged every step.
* delayed     -- one parameter server applying each gradient 0..4 steps late (asynchronous SGD).
* local_steps -- 4 workers, 5 local SGD steps, then model averaging (DPSGD / local SGD).

Every run is one jitted ``lax.scan`` over 300 steps, reproducible from its seed.
"""

import time

import jax
import optax

import jaxdp
from jaxdp.runtime import vmap as vmap_runtime
from jaxdp.workloads import digits

STEPS = 300
BATCH = 16
NUM_WORKERS = 4
LEARNING_RATE = 0.1


def train_single(data, optimizer, key):
    """One worker; returns the final parameters."""

    def step(carry, step_key):
        params, state = carry
        x, y = digits.sample_batch(step_key, data.x_train, data.y_train, BATCH)
        updates, state = optimizer.update(jax.grad(digits.loss)(params, x, y), state, params)
        return (optax.apply_updates(params, updates), state), None

    params = digits.init_mlp(jax.random.key(0))
    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, STEPS))
    return params


def train_workers(data, optimizer, key):
    """NUM_WORKERS workers on the vmap runtime; returns worker 0's final parameters."""

    def worker_step(params, state, step_key):
        x, y = digits.sample_batch(step_key, data.x_train, data.y_train, BATCH)
        updates, state = optimizer.update(jax.grad(digits.loss)(params, x, y), state, params)
        return optax.apply_updates(params, updates), state

    all_workers_step = vmap_runtime.map_workers(worker_step, NUM_WORKERS)

    def step(carry, step_key):
        return all_workers_step(*carry, jax.random.split(step_key, NUM_WORKERS)), None

    params = digits.init_mlp(jax.random.key(0))
    carry = (vmap_runtime.replicate(params, NUM_WORKERS), vmap_runtime.replicate(optimizer.init(params), NUM_WORKERS))
    (params, _), _ = jax.lax.scan(step, carry, jax.random.split(key, STEPS))
    return jax.tree.map(lambda leaf: leaf[0], params)


def main() -> None:
    data = digits.load(seed=0)
    runs = {
        "single": (train_single, optax.sgd(LEARNING_RATE)),
        "allreduce": (train_workers, optax.chain(jaxdp.allreduce("workers"), optax.sgd(LEARNING_RATE))),
        "delayed": (train_single, jaxdp.delayed(optax.sgd(LEARNING_RATE), jaxdp.delays.uniform(4), seed=0)),
        "local_steps": (
            train_workers,
            jaxdp.local_steps(optax.sgd(LEARNING_RATE), optax.sgd(1.0), sync_every=5, axis_name="workers"),
        ),
    }
    print(f"digits MLP, {STEPS} steps, batch {BATCH} per worker")
    for name, (train, optimizer) in runs.items():
        start = time.perf_counter()
        params = jax.jit(lambda key: train(data, optimizer, key))(jax.random.key(1))
        accuracy = float(digits.accuracy(params, data.x_test, data.y_test))
        print(f"  {name:<12} test accuracy {accuracy:.3f}   ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
