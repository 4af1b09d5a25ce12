"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest


@pytest.fixture
def disk_full_after_one_save(monkeypatch) -> Callable[[Path], list[int]]:
    """``install(logdir)`` makes ``jaxdp.loop.save_checkpoint`` (every single-process loop's) save once, then fail as
    orbax fails on a full disk: a half-written ``.orbax-checkpoint-tmp`` folder left in ``logdir/checkpoints`` and
    a ValueError carrying the system's text (from tensorstore). It returns the list of the steps asked to be saved;
    ``monkeypatch.undo()`` gives the disk its room back."""
    from jaxdp import loop

    def install(logdir: Path) -> list[int]:
        real_save, saves = loop.save_checkpoint, []

        def save_until_the_disk_is_full(manager, step, state, host_state):
            saves.append(step)
            if len(saves) == 1:
                return real_save(manager, step, state, host_state)
            unfinished = logdir / "checkpoints" / f"{step}.orbax-checkpoint-tmp" / "lanes.orbax-checkpoint-tmp"
            unfinished.mkdir(parents=True)
            (unfinished / "part").write_bytes(b"x" * 100)
            raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "params" in OCDBT database at local file '
                             f'"{unfinished}": Failed to write 188 bytes to file 21: No space left on device '
                             f"[os_error_code='28']")

        monkeypatch.setattr(loop, "save_checkpoint", save_until_the_disk_is_full)
        return saves

    return install
