"""Running the real ``georep-node`` command from end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GEOREP = [sys.executable, str(REPO / "bin" / "georep-node")]


def georep(*args: str | os.PathLike[str], timeout: float = 600,
           check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``georep-node ARGS`` as a user would; output captured as text."""
    proc = subprocess.run([*GEOREP, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"georep-node {args} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def sync_once(primary: Path, secondary: Path | str, *extra: str,
              expect: int = 0, timeout: float = 600) -> dict[str, Any]:
    """``georep-node sync P S --once --json``; returns the parsed summary."""
    proc = georep("sync", primary, secondary, "--once", "--json", *extra, timeout=timeout)
    assert proc.returncode == expect, (
        f"exit {proc.returncode} (expected {expect})\nstdout:\n{proc.stdout}\n"
        f"stderr:\n{proc.stderr}")
    summary: dict[str, Any] = json.loads(proc.stdout)
    return summary


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something true, and return that; AssertionError naming
    ``what`` after ``timeout`` seconds.  Tests wait on conditions, never on fixed sleeps."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
