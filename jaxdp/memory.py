"""How much memory a run can still allocate: on an accelerator its device's free bytes, on CPU the host's.

A run that asks for more than this (a replay of a billion Atari frames, eight seeds of 7 GB replays on a 24 GB
machine) can only fail after it has started: in the initialisation, when the buffers are allocated and zeroed, or
later where the kernel overcommits memory and kills the process once the pages are touched. (Worked out from the
buffer sizes; such a run was not started on the 24 GB development machine.) ``jaxdp train`` compares what it will
allocate with :func:`available_bytes` before any work (see ``jaxdp.train.check_replay_memory``).

On CPU the host's ``MemAvailable`` (``/proc/meminfo``: free memory plus the page cache the kernel can drop) is the
estimate, bounded by the memory limit of the process's cgroup, v2 or v1, where one is set: SLURM jobs and
containers run under such limits, and a 16 GB job limit on a 256 GB node is what the kernel enforces.
"""

from __future__ import annotations

import os

_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as 2^63 rounded down to a page


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _stat_field(path: str, name: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == name:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_dirs() -> list[tuple[str, str]]:
    """(version, folder) of the memory cgroups that may hold this process's limit, most specific first."""
    found: list[tuple[str, str]] = []
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            found += [("v2", "/sys/fs/cgroup" + path.rstrip("/")), ("v2", "/sys/fs/cgroup")]
        elif "memory" in controllers.split(","):
            found += [("v1", "/sys/fs/cgroup/memory" + path.rstrip("/")), ("v1", "/sys/fs/cgroup/memory")]
    return found


def cgroup_available_bytes() -> int | None:
    """Bytes left under this process's cgroup memory limit (its page cache counted as free), or None: no limit."""
    for version, folder in _cgroup_dirs():
        if version == "v2":
            limit, usage = _read_int(f"{folder}/memory.max"), _read_int(f"{folder}/memory.current")
            cache = _stat_field(f"{folder}/memory.stat", "inactive_file")
        else:
            limit, usage = _read_int(f"{folder}/memory.limit_in_bytes"), _read_int(f"{folder}/memory.usage_in_bytes")
            cache = _stat_field(f"{folder}/memory.stat", "total_inactive_file")
        if limit is not None and usage is not None and limit < _UNLIMITED:
            return max(0, limit - max(0, usage - cache))
    return None


def host_available_bytes() -> int:
    """The host's available memory in bytes: ``MemAvailable``, or where there is no ``/proc`` the physical memory,
    bounded by the cgroup's limit."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limited = cgroup_available_bytes()
    return available if limited is None else min(available, limited)


def available_bytes(device=None) -> tuple[int, str]:
    """``(bytes, where)``: what ``device`` (default: JAX's first) can still allocate, and a phrase naming it for a
    message. An accelerator reports its allocator's limit and use; a CPU device reports nothing, so the host's
    available memory stands for it."""
    import jax

    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return max(0, stats["bytes_limit"] - stats.get("bytes_in_use", 0)), f"free on {device.device_kind}"
    return host_available_bytes(), "available on this host"


def gigabytes(n: int) -> str:
    """``n`` bytes as ``"7.07 GB"``, or ``"14.1 TB"`` from 1000 GB (decimal units, as machine sizes are sold)."""
    return f"{n / 1e12:.3g} TB" if n >= 1e12 else f"{n / 1e9:.3g} GB"
