"""Reads back what a run wrote to TensorBoard: each scalar tag's steps, from the event files' records (TFRecord
framing: length, its CRC, the serialized ``Event``, its CRC), so a test can check the curves, not only that a file
exists."""

from __future__ import annotations

import struct
from pathlib import Path

from tensorboardX.proto import event_pb2


def scalar_steps(tb_dir: Path) -> dict[str, list[int]]:
    """``{tag: [step, ...]}`` of every scalar in the event files under ``tb_dir``, in file order."""
    steps: dict[str, list[int]] = {}
    for path in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(int(event.step))
    return steps
