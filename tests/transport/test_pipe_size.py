"""The channel's pipes are widened (F_SETPIPE_SZ): 1 MiB data writes in one go."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from transport.channel import PIPE_SIZE, widen_pipe


def _max() -> int:
    with open("/proc/sys/fs/pipe-max-size") as f:
        return int(f.read())


def test_a_pipe_is_widened_up_to_the_system_limit() -> None:
    r, w = os.pipe()
    try:
        widen_pipe(r)
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == min(PIPE_SIZE, _max())
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == min(PIPE_SIZE, _max())  # same pipe
    finally:
        os.close(r)
        os.close(w)


def test_not_a_pipe_is_left_alone(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    try:
        widen_pipe(fd)  # no error, nothing to do
    finally:
        os.close(fd)
