"""Output files replaced atomically: written under a temporary name beside the target, then renamed into place.

``os.replace`` within one folder is atomic on POSIX, so a reader (or a run resumed after a crash) sees the old
file or the new one, never a half-written one. A writer that raises removes its temporary file; a process killed
mid-write leaves one hidden ``.<name>.*.tmp`` beside the target, which nothing reads. Every summary, checkpoint,
CSV and PNG jaxdp writes goes through :func:`replace_file`. The file gets the permissions ``open`` would give it
(the target's own when it exists, else 0o666 less the umask), not the temporary file's private 0o600: results
are shared with a group or read by a web server as often as not.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from typing import Any, Callable

import numpy as np


def replace_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Replaces ``path`` with what ``write(temporary_path)`` writes, atomically; creates the parent folder.

    ``write`` gets a path without ``path``'s suffix: writers that pick a format by suffix (``savefig``,
    ``np.savez``) must be told the format or given an open file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(temporary)
        os.chmod(temporary, _mode_for(path))
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _mode_for(path: str) -> int:
    """The permissions a plain ``open(path, "w")`` leaves: the existing file's, else 0o666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        pass
    try:  # Linux reports the umask without changing it
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, and set it back at once
        os.umask(mask)
    return 0o666 & ~mask


def json_value(x: Any):
    """JSON for the numpy and JAX values that summaries hold (scalars, arrays); anything else as its str."""
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray) or hasattr(x, "__array__"):
        return np.asarray(x).tolist()
    return str(x)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    """``obj`` as indented JSON at ``path``, atomically (numpy / JAX scalars and arrays become numbers and lists)."""
    text = json.dumps(obj, indent=indent, default=json_value)

    def write(temporary: str) -> None:
        with open(temporary, "w") as f:
            f.write(text)

    replace_file(path, write)


def write_lines(path: str | os.PathLike, lines: list[str]) -> None:
    """``lines`` (each ending in a newline) as the whole of ``path``, atomically."""

    def write(temporary: str) -> None:
        with open(temporary, "w") as f:
            f.writelines(lines)

    replace_file(path, write)


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` as an ``.npz`` at ``path``, atomically."""

    def write(temporary: str) -> None:
        with open(temporary, "wb") as f:  # an open file: np.savez would append ".npz" to a bare name
            np.savez(f, **arrays)

    replace_file(path, write)


__all__ = ["json_value", "replace_file", "save_npz", "write_json", "write_lines"]
