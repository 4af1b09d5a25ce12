"""What a run ran on: the library versions and the machine, written into every ``summary.json`` and printed by
``jaxdp --version``.

A return from a seed sweep means little without them. JAX changes its programs' float rounding between releases,
and so does the CPU: the same commit's sync DQN on CartPole ended seed 0 at 395 on a Zen 5 EPYC where it had
passed 400 on an earlier EPYC (see ``tests/test_strategies_rl.py``).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

# The distributions whose versions decide a run's numbers (the Python package names where they differ).
LIBRARIES = ("jaxdp", "jax", "jaxlib", "flax", "optax", "chex", "numpy", "envpool", "gymnasium", "orbax-checkpoint",
             "mpi4py", "mpi4jax")


def versions() -> dict[str, str | None]:
    """``{distribution: version}`` of :data:`LIBRARIES` as installed (None where one is not), and Python's; read from
    the installed metadata, so nothing is imported."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """The host (OS, CPU model, cores) and, where JAX has started, its backend and devices."""
    found: dict[str, object] = {"os": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count()}
    jax = sys.modules.get("jax")
    if jax is not None:  # a run has started JAX; --version does not start it
        try:
            devices = jax.devices()
        except RuntimeError:  # a backend that is gone (after jax.distributed.shutdown): the host alone
            return found
        found.update(backend=jax.default_backend(), devices=len(devices), device_kind=devices[0].device_kind,
                     processes=jax.process_count())
    return found


def describe() -> dict[str, object]:
    """``{"versions": ..., "machine": ...}``, as ``summary.json`` holds them under ``provenance``."""
    return {"versions": versions(), "machine": machine()}
