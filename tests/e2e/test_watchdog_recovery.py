"""The Supervisor's watchdog, end to end: an actor stuck on one message is found, the
pipeline is rebuilt from the marks (History Crawl), the reason is logged once with the
stuck actor's stack, status shows it meanwhile, and the replica converges.

The primary side (Supervisor and its actors) runs in this process, so that the test can
set a short ``busy_limit`` and read the worker's live status; the secondary host and the
recorder daemon are real processes.  The stuck actor is real too: the ``mid_data`` fault
point armed with ``hang`` blocks a Syncer inside its ``sync`` message (docs/faults.md).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from actors import faults
from actors.supervisor import Supervisor, SyncOptions
from actors.worker import LiveStatus
from fsops import marks
from tests.e2e.helpers import wait_for
from tests.support.compare import compare_trees

pytestmark = pytest.mark.timeout(300)

BUSY_LIMIT = 2.0
HANG = 20.0  # longer than BUSY_LIMIT + ABORT_GRACE: the driver must be left behind


def write_elsewhere(path: Path, size: int) -> None:
    """Write ``size`` random bytes to ``path`` from another process: the recorder ignores
    the I/O of the worker's own process, which here is this one."""
    subprocess.run([sys.executable, "-c", "import os, sys; open(sys.argv[1], 'wb')"
                    ".write(os.urandom(int(sys.argv[2])))", str(path), str(size)],
                   check=True, timeout=60)


def _differences(p: Path, s: Path) -> list[str]:
    try:
        return compare_trees(p, s)
    except OSError as e:  # a name vanished under the comparison: still busy
        return [f"comparison raced: {e}"]


@pytest.fixture
def armed(tmp_path: Path) -> Iterator[Path]:
    """Arms ``mid_data:hang`` in this process only (children are not armed); disarms."""
    marker = tmp_path / "hang-fired"
    faults.reset(f"mid_data:hang={HANG:g}:once={marker}")
    try:
        yield marker
    finally:
        faults.reset("")
        for p in psutil.process_iter(["cmdline"]):  # the recorder and the secondary host
            if str(tmp_path) in " ".join(p.info["cmdline"] or []):
                p.kill()


def test_stuck_actor_restarts_the_pipeline_from_the_marks(
        tmp_path: Path, armed: Path, caplog: pytest.LogCaptureFixture) -> None:
    primary, secondary = tmp_path / "p", tmp_path / "s"
    (primary / "dir").mkdir(parents=True)
    for i in range(30):  # small files only: inline, no data transfer, so no hang yet
        (primary / "dir" / f"f{i}").write_bytes(os.urandom(100 + i))
    secondary.mkdir()
    opts = SyncOptions(primary=str(primary), secondary=str(secondary), session="wd",
                       state_dir=str(tmp_path / "state"),
                       busy_limit=BUSY_LIMIT, timeout=120)
    status = LiveStatus()
    stop = threading.Event()
    caplog.set_level(logging.INFO)
    sup = Supervisor.start(opts)
    run = sup.proxy().run_live(stop, status)
    try:
        wait_for(lambda: not _differences(primary, secondary)
                 and status.crawl == "Changelog Crawl", 120, "the first crawl")
        root_fd = os.open(primary, os.O_RDONLY | os.O_DIRECTORY)
        try:
            wait_for(lambda: marks.read_mark(root_fd, "wd", "entry_stime"), 30, "entry_stime")
        finally:
            os.close(root_fd)
        assert not armed.exists()
        before = len(caplog.records)

        # A file large enough for the data path: its Syncer hangs after the first write.
        write_elsewhere(primary / "dir" / "big", 3 << 20)
        wait_for(armed.exists, 60, "the hang fault to fire")
        reason = wait_for(lambda: status.status == "Faulty" and status.faulty_reason, 30,
                          "status Faulty with the watchdog's reason")
        assert "actor Syncer is stuck: busy with sync for" in reason, reason
        assert f"(limit {BUSY_LIMIT:g} s)" in reason

        write_elsewhere(primary / "dir" / "after", 1000)  # while the Syncer is stuck
        wait_for(lambda: not _differences(primary, secondary), 120,
                 "the secondary to converge after the restart")
        wait_for(lambda: status.faulty_reason is None, 30, "the reason to clear")
        assert status.state() == "Active"
    finally:
        stop.set()
        summary = run.get(timeout=120)
        sup.stop()
    assert summary.counters["pipeline_restarts"] == 1
    # The stuck Syncer kept its driver waiting: left behind, not waited for.
    assert summary.counters["drivers_left_behind"] == 1

    records = caplog.records[before:]
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    restarting = [m for m in errors if m.startswith("restarting the pipeline: ")]
    assert len(restarting) == 1, errors  # the reason, once
    assert "actor Syncer is stuck" in restarting[0]
    # ... with the stuck thread's stack, which shows where it is stuck.
    assert "stack of the stuck Syncer:" in restarting[0]
    assert "in fault" in restarting[0] and "time.sleep" in restarting[0], restarting[0]
    assert not [m for m in errors if "is stuck" in m and m not in restarting]
    # The new pipeline resumed from the marks (History Crawl), not from a tree walk.
    modes = [r.getMessage() for r in records if r.getMessage().startswith("crawl=")]
    assert modes and modes[0].startswith("crawl=History Crawl"), modes
    assert not [m for m in modes if m.startswith("crawl=Hybrid Crawl")], modes
