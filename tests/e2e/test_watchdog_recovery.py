"""The Supervisor's watchdog, end to end: an actor stuck on one message is found, the
pipeline is rebuilt from the marks (History Crawl), the reason is logged once with the
stuck actor's stack, status shows it meanwhile, and the replica converges.

The primary side (Supervisor and its actors) runs in this process, so that the test can
set a short ``busy_limit`` and read the worker's live status; the secondary host and the
recorder daemon are real processes.  The stuck actor is real too: the ``mid_data`` fault
point armed with ``hang`` blocks a Syncer inside its ``sync`` message (docs/faults.md).
"""

from __future__ import annotations

import contextlib
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
from actors.supervisor import Summary, Supervisor, SyncOptions
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
def marker(tmp_path: Path) -> Iterator[Path]:
    """The ``once`` marker of the fault a test arms in this process only (``faults.reset``:
    the children are not armed); disarms and ends the test's processes afterwards."""
    try:
        yield tmp_path / "fault-fired"
    finally:
        faults.reset("")
        for p in psutil.process_iter(["cmdline"]):  # the recorder and the secondary host
            if str(tmp_path) in " ".join(p.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    p.kill()


class Run:
    """A continuous run of the Supervisor in this process, synced once and marked."""

    def __init__(self, tmp_path: Path) -> None:
        self.primary, self.secondary = tmp_path / "p", tmp_path / "s"
        (self.primary / "dir").mkdir(parents=True)
        for i in range(30):  # small files only: inline, no data transfer, no fault yet
            (self.primary / "dir" / f"f{i}").write_bytes(os.urandom(100 + i))
        self.secondary.mkdir()
        opts = SyncOptions(primary=str(self.primary), secondary=str(self.secondary),
                           session="wd", state_dir=str(tmp_path / "state"),
                           busy_limit=BUSY_LIMIT, timeout=120)
        self.status = LiveStatus()
        self.stop = threading.Event()
        self.sup = Supervisor.start(opts)
        self.future = self.sup.proxy().run_live(self.stop, self.status)
        wait_for(lambda: not _differences(self.primary, self.secondary)
                 and self.status.crawl == "Changelog Crawl", 120, "the first crawl")
        root_fd = os.open(self.primary, os.O_RDONLY | os.O_DIRECTORY)
        try:
            wait_for(lambda: marks.read_mark(root_fd, "wd", "entry_stime"), 30, "entry_stime")
        finally:
            os.close(root_fd)

    def converged(self) -> None:
        wait_for(lambda: not _differences(self.primary, self.secondary), 120,
                 "the secondary to converge after the restart")
        wait_for(lambda: self.status.faulty_reason is None, 30, "the reason to clear")
        assert self.status.state() == "Active"

    def finish(self) -> Summary:
        self.stop.set()
        try:
            summary: Summary = self.future.get(timeout=120)
        finally:
            self.sup.stop()
        return summary


def restart_logs(caplog: pytest.LogCaptureFixture, before: int) -> tuple[list[str], list[str]]:
    """(the ERROR lines, the crawl= lines) logged since record ``before``."""
    records = caplog.records[before:]
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    # The crawl modes of the new pipeline: those logged after the restart (the first
    # crawl's lines may land after ``before`` on a loaded machine).
    restart = next((i for i, r in enumerate(records)
                    if r.getMessage().startswith("restarting the pipeline: ")), -1)
    modes = [r.getMessage() for r in records[restart + 1:]
             if r.getMessage().startswith("crawl=")]
    return errors, modes


def assert_resumed_from_the_marks(modes: list[str]) -> None:
    # The new pipeline resumed from the marks (History Crawl), not from a tree walk.
    assert modes and modes[0].startswith("crawl=History Crawl"), modes
    assert not [m for m in modes if m.startswith("crawl=Hybrid Crawl")], modes


def test_stuck_actor_restarts_the_pipeline_from_the_marks(
        tmp_path: Path, marker: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    faults.reset(f"mid_data:hang={HANG:g}:once={marker}")
    run = Run(tmp_path)
    try:
        assert not marker.exists()
        before = len(caplog.records)
        # A file large enough for the data path: its Syncer hangs after the first write.
        write_elsewhere(run.primary / "dir" / "big", 3 << 20)
        wait_for(marker.exists, 60, "the hang fault to fire")
        reason = wait_for(lambda: run.status.status == "Faulty" and run.status.faulty_reason,
                          30, "status Faulty with the watchdog's reason")
        assert "actor Syncer is stuck: busy with sync for" in reason, reason
        assert f"(limit {BUSY_LIMIT:g} s)" in reason
        write_elsewhere(run.primary / "dir" / "after", 1000)  # while the Syncer is stuck
        run.converged()
    finally:
        summary = run.finish()
    assert summary.counters["pipeline_restarts"] == 1
    # The stuck Syncer kept its driver waiting: left behind, not waited for.
    assert summary.counters["drivers_left_behind"] == 1
    errors, modes = restart_logs(caplog, before)
    restarting = [m for m in errors if m.startswith("restarting the pipeline: ")]
    assert len(restarting) == 1, errors  # the reason, once
    assert "actor Syncer is stuck" in restarting[0]
    # ... with the stuck thread's stack, which shows where it is stuck.
    assert "stack of the stuck Syncer:" in restarting[0]
    assert "in fault" in restarting[0] and "time.sleep" in restarting[0], restarting[0]
    assert not [m for m in errors if "is stuck" in m and m not in restarting]
    assert_resumed_from_the_marks(modes)


def test_failed_round_restarts_the_pipeline_from_the_marks(
        tmp_path: Path, marker: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An exception out of a round with the connection up (``before_mark:raise``, armed
    once the first marks are written: the idle mark meets it) restarts the pipeline the
    same way: reason logged once with its traceback, Faulty meanwhile, History Crawl."""
    caplog.set_level(logging.INFO)
    run = Run(tmp_path)
    try:
        before = len(caplog.records)
        faults.reset(f"before_mark:raise:once={marker}")
        wait_for(marker.exists, 60, "the fault to fire")
        reason = wait_for(lambda: run.status.faulty_reason, 30, "the Supervisor's reason")
        assert reason == "an actor failed: FaultInjected: fault point before_mark", reason
        write_elsewhere(run.primary / "dir" / "after", 1000)
        run.converged()
    finally:
        summary = run.finish()
    assert summary.counters["pipeline_restarts"] == 1
    assert "drivers_left_behind" not in summary.counters  # nothing stuck: it ended at once
    errors, modes = restart_logs(caplog, before)
    restarting = [r for r in caplog.records[before:]
                  if r.getMessage().startswith("restarting the pipeline: ")]
    assert len(restarting) == 1, errors
    assert restarting[0].exc_info is not None  # with the traceback of the failure
    assert "FaultInjected" in caplog.text
    assert_resumed_from_the_marks(modes)
