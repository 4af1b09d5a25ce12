"""jaxdp.atomic: a file is replaced whole or not at all, and a failed write leaves nothing behind."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp import atomic
from jaxdp.runtime import _mpi_protocol as protocol


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_replace_file_writes_then_renames(tmp_path):
    target = tmp_path / "out" / "a.txt"  # the parent folder is created
    seen = []

    def write(temporary):
        seen.append(temporary)
        assert not target.exists()  # the target appears only once the write is complete
        with open(temporary, "w") as f:
            f.write("new")

    atomic.replace_file(target, write)
    assert target.read_text() == "new"
    assert os.path.dirname(seen[0]) == str(target.parent)  # same folder: os.replace is a rename, not a copy
    assert _listing(target.parent) == ["a.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def write(temporary):
        with open(temporary, "w") as f:
            f.write("half")
        raise KeyboardInterrupt  # a BaseException too: Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic.replace_file(target, write)
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["summary.json"]


def test_write_json_converts_numpy_and_jax_values(tmp_path):
    path = tmp_path / "s.json"
    atomic.write_json(path, {"a": np.float32(1.5), "b": np.arange(3), "c": jnp.array([1.0, 2.0]),
                             "d": np.int64(7), "e": np.bool_(True)})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": [1.0, 2.0], "d": 7, "e": True}


def test_unserialisable_json_leaves_the_old_file(tmp_path):
    path = tmp_path / "s.json"
    atomic.write_json(path, {"x": 1})
    with pytest.raises(ValueError):
        atomic.write_json(path, _circular())  # json refuses a circular reference
    assert json.loads(path.read_text()) == {"x": 1}
    assert _listing(tmp_path) == ["s.json"]


def _circular() -> dict:
    d: dict = {}
    d["d"] = d
    return d


def test_save_npz_keeps_the_exact_name(tmp_path):
    path = tmp_path / "checkpoint.npz"
    atomic.save_npz(path, {"w": np.arange(4.0)})
    with np.load(path) as stored:
        np.testing.assert_array_equal(stored["w"], np.arange(4.0))
    assert _listing(tmp_path) == ["checkpoint.npz"]  # np.savez given a bare name would have added ".npz"


def test_truncate_json_lines_rewrites_atomically(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (10, 20, 30)) + '{"step": 4')  # torn last line
    assert protocol.truncate_json_lines(str(path), 20) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]
    assert _listing(tmp_path) == ["metrics.jsonl"]


def test_a_replaced_file_has_the_permissions_open_would_give(tmp_path):
    """Not mkstemp's private 0o600: a new file gets 0o666 less the umask, a replaced one keeps its own mode."""
    old_mask = os.umask(0o027)
    try:
        atomic.write_json(tmp_path / "new.json", {"a": 1})
        assert os.stat(tmp_path / "new.json").st_mode & 0o777 == 0o640
        os.umask(0o022)
        atomic.save_npz(tmp_path / "new.npz", {"x": np.zeros(2)})
        assert os.stat(tmp_path / "new.npz").st_mode & 0o777 == 0o644
        (tmp_path / "kept.json").write_text("{}")
        os.chmod(tmp_path / "kept.json", 0o604)
        atomic.write_json(tmp_path / "kept.json", {"b": 2})
        assert os.stat(tmp_path / "kept.json").st_mode & 0o777 == 0o604
        assert json.loads((tmp_path / "kept.json").read_text()) == {"b": 2}
    finally:
        os.umask(old_mask)
