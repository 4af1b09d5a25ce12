"""What a GPU machine can do with envpool before any benchmark runs: one table, in a few seconds.

jaxdp's fused loop steps envpool inside the compiled program through envpool's XLA custom call. On a CPU that call
is bit-identical to the host API (tests/test_envs.py). On a GPU backend the call needs envpool's CUDA target, which
a wheel may or may not hold. This probe answers, for Pong-v5 and CartPole-v1 on the default backend:

* whether the pool's XLA functions carry a GPU target (``capsules[1]``),
* whether a jitted ``lax.scan`` of 64 steps runs there, and
* whether it is bit-identical to the host API with the same seed and actions.

Run it on the GPU machine through ``benchmarks/gpu/run.sh``; ``python benchmarks/gpu/probe.py`` runs it anywhere.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdp import envs as envs_lib

STEPS = 64


def gpu_target(env_id: str) -> str:
    import envpool

    pool = envpool.make_gymnasium(env_id, num_envs=2, batch_size=2)
    targets = {name: capsules[1] is not None for name, (_, _, capsules) in pool._xla()}
    return ", ".join(f"{name}: {'yes' if has else 'no'}" for name, has in targets.items())


def scan_vs_host(env_id: str, num_envs: int = 4) -> str:
    actions = np.random.default_rng(0).integers(0, envs_lib.make_spec(env_id, num_envs).num_actions,
                                                (STEPS, num_envs)).astype(np.int32)
    env = envs_lib.make_xla(env_id, num_envs, seed=3)

    def body(handle, a):
        handle, out = env.step(handle, a)
        return handle, (out.obs, out.reward)

    t0 = time.perf_counter()
    _, (obs, reward) = jax.jit(lambda h, acts: jax.lax.scan(body, h, acts))(env.handle, jnp.asarray(actions))
    obs, reward = np.asarray(obs), np.asarray(reward)
    seconds = time.perf_counter() - t0
    host = envs_lib.make_host(env_id, num_envs, seed=3)
    host.reset()
    same = True
    for t in range(STEPS):
        out = host.step(actions[t])
        same &= bool(np.array_equal(np.asarray(out.obs), obs[t]) and np.array_equal(np.asarray(out.reward),
                                                                                   reward[t]))
    return f"ran ({seconds:.1f} s with compile); {'bit-identical to' if same else 'DIFFERS from'} the host API"


def main() -> None:
    print(f"jax {jax.__version__}, default backend {jax.default_backend()}, devices {jax.devices()}\n")
    print("| env | XLA functions with a GPU target | jitted scan of 64 steps on the default backend |")
    print("|---|---|---|")
    for env_id in ("Pong-v5", "CartPole-v1"):
        cells = []
        for probe in (gpu_target, scan_vs_host):
            try:
                cells.append(probe(env_id))
            except Exception as error:  # the answer is the error: report it in one line and go on
                cells.append(f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
        print(f"| {env_id} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
