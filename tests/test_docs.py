"""The Python examples of README.md and docs/*.md run as written: a researcher's first copy-paste must work.

Each ```python block is executed in a fresh namespace; the RL examples' ``total_steps=300_000`` is cut to a few
iterations (the API is what is under test, not the learning, which tests/test_train_fn.py covers). Then the names
each example leaves behind are checked for what its text promises.
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = pathlib.Path(__file__).parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# 32 A2C iterations of 128 steps instead of 2,344; DQN: 2k learning steps after its 10k of random play.
SHORTER = {"total_steps=300_000": "total_steps=4_096", "total_steps=50_000": "total_steps=12_000"}


def python_blocks() -> list[tuple[str, str]]:
    blocks = []
    for path in DOCUMENTS:
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S)):
            blocks.append((f"{path.relative_to(ROOT)}#{i}", code))
    return blocks


BLOCKS = python_blocks()


def check_optax_chain(ns: dict) -> None:
    """The strategies block: every ``tx`` it builds is an optax transform; the last (delayed) one updates."""
    tx = ns["tx"]
    assert isinstance(tx, optax.GradientTransformation)
    params = jnp.zeros(3)
    state = tx.init(params)
    for _ in range(10):  # past the delay buffer's warm-up: the stale gradients start to arrive
        updates, state = tx.update(jnp.ones(3), state, params)
        params = optax.apply_updates(params, updates)
    assert bool(jnp.all(params < 0))


def check_sweeps(ns: dict) -> None:
    """The make_train_fn block: the last sweep is 5 delays, each a lane with its own finite parameters."""
    params = jax.tree.leaves(ns["out"].lanes.params)
    assert params and all(p.shape[:2] == (5, 1) for p in params)  # [delays, workers, ...]
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in params)
    assert not np.array_equal(np.asarray(params[0][0]), np.asarray(params[0][4]))  # delays 0 and 4 differ


def check_async_sim(ns: dict) -> None:
    """The simulator block: a learning curve against simulated time that learns."""
    accuracy, times = np.asarray(ns["out"].metrics["eval"]), np.asarray(ns["out"].metrics["eval_time"])
    assert len(accuracy) == len(times) >= 5 and np.all(np.diff(times) > 0)
    assert accuracy[-1] > accuracy[0] + 0.3, accuracy


def check_own_optimizer(ns: dict) -> None:
    """The own-optimizer block: loop.run trained with the given chain and wrote the run's files."""
    summary, logdir = ns["summary"], pathlib.Path(ns["cfg"].logdir)
    assert summary["total_steps"] == 12_000 and np.isfinite(summary["final_return"])
    assert (logdir / "summary.json").exists() and (logdir / "metrics.jsonl").exists()


CHECKS = {"jaxdp.delayed(": check_optax_chain, "make_train_fn(": check_sweeps, "async_sim.run(": check_async_sim,
          "loop.run(cfg, inner=": check_own_optimizer}


def test_every_example_has_a_check():
    assert len(BLOCKS) >= 3
    for name, code in BLOCKS:
        assert sum(marker in code for marker in CHECKS) == 1, f"{name}: add its check to tests/test_docs.py"


@pytest.mark.parametrize("name, code", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_example_runs(name, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example's runs/ folder lands here, not in the checkout
    for long, short in SHORTER.items():
        code = code.replace(long, short)
    namespace: dict = {}
    exec(compile(code, name, "exec"), namespace)
    check = next(check for marker, check in CHECKS.items() if marker in code)
    check(namespace)
