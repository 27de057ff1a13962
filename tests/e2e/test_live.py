"""Continuous replication end to end: ``georep-node sync P S`` without ``--once``.

Real processes only: the sync worker, the detached recorder daemon it starts and the
secondary host, with a workload running in its own process.  Every wait polls with a
deadline (``compare_trees`` for convergence, the session log for crawl modes); the only
sleeps pick a random moment for a signal.  At teardown every process whose command line
names the test's directory is killed.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.helpers import GEOREP, REPO, wait_for
from tests.support.compare import compare_trees
from tests.support.treegen import make_tree

HISTORY, HYBRID, CHANGELOG = "crawl=History Crawl", "crawl=Hybrid Crawl", "crawl=Changelog Crawl"
#: How long the secondary may take to equal the primary once the primary stops changing.
CONVERGE_S = 120.0  # a deadline, not a timing assertion: shared machines are slow at times


def differences(p: Path, s: Path) -> list[str]:
    try:
        return compare_trees(p, s)
    except OSError as e:  # a name vanished under the comparison: the sync is still busy
        return [f"comparison raced: {e}"]


def converge(p: Path, s: Path, timeout: float = CONVERGE_S) -> float:
    """Wait until the secondary equals the primary; seconds taken."""
    last: list[str] = []

    def same() -> bool:
        nonlocal last
        last = differences(p, s)
        return not last

    try:
        t0 = time.monotonic()
        wait_for(same, timeout, "the secondary to converge", interval=0.1)
        return time.monotonic() - t0
    except AssertionError as e:
        raise AssertionError(f"{e}; {len(last)} difference(s), first: {last[:10]}") from None


class Live:
    """One continuous session: a primary, a secondary, a state dir and its processes."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.p = base / "primary"
        self.s = base / "secondary"
        self.state = base / "state"
        self.s.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    # -- the sync worker --------------------------------------------------------------------

    def start(self, *, bounded_queue: bool = False) -> int:
        """Start ``sync`` (continuous); returns the session log's size before it (an offset).

        ``bounded_queue``: the recorder it starts keeps fanotify's default 16,384-event
        queue (georep asks for an unlimited one), so that a test can overflow it.
        """
        assert self.proc is None or self.proc.poll() is not None
        offset = self.log_size()
        self.runs += 1
        env = dict(os.environ, GEOREP_STATE_DIR=str(self.state), PYTHONPATH=str(REPO))
        if bounded_queue:
            env["GEOREP_RECORDER_BOUNDED_QUEUE"] = "1"
        with open(self.base / f"sync-{self.runs}.err", "wb") as err:
            self.proc = subprocess.Popen([*GEOREP, "sync", str(self.p), str(self.s)],
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         env=env)
        return offset

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"sync did not exit within {timeout} s of signal {sig}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- the session's files ----------------------------------------------------------------

    def session_dir(self) -> Path | None:
        sessions = self.state / "sessions"
        found = sorted(sessions.iterdir()) if sessions.is_dir() else []
        return found[0] if found else None

    def log_path(self) -> Path | None:
        d = self.session_dir()
        return d / "georep.log" if d else None

    def log_size(self) -> int:
        p = self.log_path()
        return p.stat().st_size if p and p.exists() else 0

    def log(self, offset: int = 0) -> str:
        p = self.log_path()
        if not p or not p.exists():
            return ""
        with open(p, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def wait_log(self, text: str, offset: int = 0, timeout: float = 60) -> None:
        def seen() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"sync exited {self.proc.returncode} before logging "
                                     f"{text!r}:\n{self.stderr()}")
            return text in self.log(offset)
        wait_for(seen, timeout, f"{text!r} in the session log")

    def stderr(self) -> str:
        return (self.base / f"sync-{self.runs}.err").read_text(errors="replace")[-4000:]

    def recorder(self) -> psutil.Process:
        """The recorder daemon of this session."""
        found = [p for p in self.processes() if "recorder" in p.info["cmdline"]]
        assert len(found) == 1, f"recorder processes: {found}"
        return found[0]

    def recorder_or_none(self) -> psutil.Process | None:
        """The recorder daemon of this session, if one runs now."""
        found = [p for p in self.processes() if "recorder" in p.info["cmdline"]]
        return found[0] if len(found) == 1 else None

    def processes(self) -> list[psutil.Process]:
        """Every process whose command line names this test's directory."""
        key = str(self.base)
        out = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.pid == os.getpid():
                continue
            cmd = p.info["cmdline"] or []
            if any(key in c for c in cmd):
                out.append(p)
        return out

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        procs = self.processes()
        for p in procs:
            try:
                p.resume()  # a SIGSTOPped recorder must see its SIGKILL
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)


def workload(root: Path, ops: int, seed: int, rate: float | None = None
             ) -> subprocess.Popen[bytes]:
    # The workload makes holes too (truncate up, writes past the end): small sparse files
    # take the data path, which keeps holes, and compare_trees checks sparseness.
    argv = [sys.executable, "-m", "tests.support.workload", str(root), "--ops", str(ops),
            "--seed", str(seed)]
    if rate:
        argv += ["--rate", str(rate)]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(wl: subprocess.Popen[bytes], timeout: float = 120) -> None:
    _out, err = wl.communicate(timeout=timeout)
    assert wl.returncode == 0, f"workload failed:\n{err.decode(errors='replace')}"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    lv = Live(tmp_path)
    make_tree(lv.p, seed=7, entries=400, big_sparse=False, big_files_mib=1, big_dir_files=60)
    try:
        yield lv
    finally:
        lv.cleanup()


def started(lv: Live, *, bounded_queue: bool = False) -> None:
    """Start the first sync and wait until the initial hybrid crawl is done."""
    offset = lv.start(bounded_queue=bounded_queue)
    lv.wait_log(HYBRID, offset)
    lv.wait_log(CHANGELOG, offset)
    converge(lv.p, lv.s)


def restarted(lv: Live, offset: int, expect: str) -> str:
    """After a restart: converge, then check the crawl the restart chose; returns the log."""
    converge(lv.p, lv.s)
    lv.wait_log(CHANGELOG, offset)
    text = lv.log(offset)
    assert expect in text, text
    if expect == HISTORY:
        assert HYBRID not in text, text
    assert lv.alive(), lv.stderr()
    return text


def test_follows_a_workload(live: Live) -> None:
    started(live)
    # state root, sessions/ and the session's dir (journal, control socket) are private
    for d in (live.state, live.state / "sessions", *(live.state / "sessions").iterdir()):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    wl = workload(live.p, ops=2500, seed=11, rate=500)
    finish(wl)
    took = converge(live.p, live.s)
    assert took < CONVERGE_S
    assert live.stop() == 0, live.stderr()
    # The clean stop made it durable and the next start resumes from the journal.
    offset = live.start()
    restarted(live, offset, HISTORY)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_worker_stopped_mid_workload_resumes_from_history(live: Live, sig: int) -> None:
    rng = random.Random(sig)
    started(live)
    rec = live.recorder()
    wl = workload(live.p, ops=1500, seed=21 + sig, rate=500)
    time.sleep(rng.uniform(0.3, 2.5))  # a random moment in the workload, not a sync point
    rc = live.stop(sig)
    if sig == signal.SIGTERM:
        assert rc == 0, live.stderr()
    finish(wl)
    finish(workload(live.p, ops=400, seed=31 + sig))  # more while the worker is down
    assert rec.is_running(), "the recorder must outlive its worker"
    offset = live.start()
    restarted(live, offset, HISTORY)
    assert live.recorder().pid == rec.pid


def test_recorder_killed_while_down_forces_hybrid(live: Live) -> None:
    started(live)
    finish(workload(live.p, ops=300, seed=41))
    converge(live.p, live.s)
    assert live.stop() == 0, live.stderr()
    rec = live.recorder()
    rec.kill()
    rec.wait(timeout=10)
    finish(workload(live.p, ops=500, seed=42))  # unrecorded changes
    offset = live.start()
    restarted(live, offset, HYBRID)


def test_recorder_killed_while_running_is_restarted(live: Live) -> None:
    """Replication never waits silently on a journal nobody writes."""
    started(live)
    offset = live.log_size()
    old = live.recorder()
    old.kill()
    old.wait(timeout=10)
    finish(workload(live.p, ops=300, seed=45))  # partly unrecorded: the recorder is down
    # the worker's heartbeat (every 10 s) notices, starts a recorder again, and the gap
    # (its START) makes the worker walk the tree
    wait_for(lambda: any(p.pid != old.pid for p in [live.recorder_or_none()] if p), 60,
             "a new recorder")
    live.wait_log(HYBRID, offset)
    converge(live.p, live.s)
    (live.p / "after-restart").write_bytes(b"seen")  # recorded by the new recorder
    converge(live.p, live.s)
    assert live.stop() == 0, live.stderr()


def test_queue_overflow_forces_hybrid(live: Live) -> None:
    started(live, bounded_queue=True)
    assert live.stop() == 0, live.stderr()
    rec = live.recorder()
    rec.suspend()
    try:
        flood = live.p / "flood"
        flood.mkdir()
        for i in range(21000):  # more events than the kernel queue holds (16384)
            (flood / f"f{i}").touch()
        finish(workload(live.p, ops=300, seed=51))
    finally:
        rec.resume()
    offset = live.start()
    text = restarted(live, offset, HYBRID)
    assert "journal gap" in text or text.index(HYBRID) < text.index(CHANGELOG), text


@pytest.mark.parametrize("down", [False, True], ids=["running", "while-down"])
def test_change_through_a_removed_hardlink_reaches_the_other_name(live: Live,
                                                                  down: bool) -> None:
    """A file changed through one link that is then removed lives on under its other
    name, in another directory: the change must still arrive there.  The journal names
    only the removed link; the record's file handle finds the survivor."""
    keep = live.p / "linked-keep"
    via = live.p / "linked-via"
    keep.mkdir()
    via.mkdir()
    (keep / "survivor").write_bytes(b"old content\n")
    started(live)
    if down:
        assert live.stop() == 0, live.stderr()
    os.link(keep / "survivor", via / "temp-link")
    converge_or_down = None if down else converge(live.p, live.s)
    del converge_or_down
    with open(via / "temp-link", "r+b") as f:
        f.write(b"NEW content, longer than before\n")
    os.chmod(via / "temp-link", 0o600)
    os.unlink(via / "temp-link")
    if down:
        offset = live.start()
        restarted(live, offset, HISTORY)
    else:
        converge(live.p, live.s)
    assert (live.s / "linked-keep" / "survivor").read_bytes() == \
        b"NEW content, longer than before\n"
    assert stat.S_IMODE(os.stat(live.s / "linked-keep" / "survivor").st_mode) == 0o600
