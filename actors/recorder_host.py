"""The recorder daemon: ``georep-node recorder --primary P --state DIR``.

It runs apart from the sync worker so that a worker stopped, killed or restarted leaves
no hole in the journal: the next worker finds continuous history and replays it
(History Crawl) instead of re-walking the tree.  One recorder per state directory (the
journal's own lock makes a second one fail).  It ignores the I/O of the processes
listed in ``DIR/workers`` (a worker writes gfid xattrs and marks on the primary), and
exits by itself after ``--linger`` seconds with no worker heartbeat, writing STOP, so
that a forgotten session leaves nothing running.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil

from fsops.dirmap import make_private_dirs
from fsops.journal import JournalError, JournalWriter
from fsops.recorder import Recorder, RecorderError

log = logging.getLogger("georep.recorder")

WORKERS_FILE = "workers"
READY_FILE = "recorder.ready"


def journal_dir(state: str) -> str:
    """Where the session's journal lives."""
    return os.path.join(state, "journal")


def register_worker(state: str) -> None:
    """Tell the recorder that this process's I/O on the primary is georep's own."""
    path = os.path.join(state, WORKERS_FILE)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def add_worker_pid(state: str, pid: int) -> None:
    """Also ignore ``pid``'s I/O: a local secondary host writing on the same filesystem.

    The fanotify mark covers the whole filesystem; dropping that host's events by pid
    (checked first, before any path is resolved) keeps its writes out of the queue work.
    """
    path = os.path.join(state, WORKERS_FILE)
    pids = _read_workers(path) | {os.getpid(), pid}
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("".join(f"{p}\n" for p in sorted(pids)))
    os.replace(tmp, path)


class Heartbeat:
    """Heartbeats from a thread, so a long hybrid crawl does not let the recorder linger out.

    It also watches the recorder: one that died (crashed, killed) is started again, and
    the START it writes shows the follower the gap (a Hybrid Crawl follows): replication
    never waits silently on a journal that nobody writes.
    """

    def __init__(self, state: str, primary: str | None = None, linger: float = 600.0,
                 interval: float = 10.0) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(state, primary, linger, interval),
                                        name="georep-heartbeat", daemon=True)
        self._thread.start()

    def _run(self, state: str, primary: str | None, linger: float, interval: float) -> None:
        ready = os.path.join(state, READY_FILE)
        while not self._stop.wait(interval):
            try:
                heartbeat(state)
                if primary is not None and not _alive(ready):
                    log.warning("the change recorder is not running: starting it again")
                    ensure_recorder(primary, state, linger=linger)
            except (OSError, RecorderError) as e:
                log.warning("recorder heartbeat failed: %s", e)

    def stop(self) -> None:
        """End the heartbeats."""
        self._stop.set()
        self._thread.join(timeout=5)


def heartbeat(state: str) -> None:
    """Keep the recorder alive (it lingers only so long without a heartbeat)."""
    path = os.path.join(state, WORKERS_FILE)
    try:
        os.utime(path)
    except FileNotFoundError:
        register_worker(state)


def _read_workers(path: str) -> set[int]:
    try:
        with open(path) as f:
            return {int(x) for x in f.read().split() if x.isdigit()}
    except FileNotFoundError:
        return set()


def run_recorder(primary: str, state: str, linger: float) -> int:
    """Record until SIGTERM/SIGINT or until no worker heartbeat for ``linger`` seconds."""
    make_private_dirs(state)
    try:
        writer = JournalWriter(journal_dir(state), root=os.fsencode(os.path.abspath(primary)))
    except JournalError as e:
        print(f"georep-node recorder: {e}", file=sys.stderr)
        return 2
    workers_path = os.path.join(state, WORKERS_FILE)
    exclude: set[int] = {os.getpid(), *_read_workers(workers_path)}
    rec = Recorder(os.fsencode(os.path.abspath(primary)), writer, exclude_pids=exclude)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        rec.start()
    except (RecorderError, OSError) as e:
        writer.close()
        print(f"georep-node recorder: cannot record {primary!r}: {e}", file=sys.stderr)
        return 2
    ready = os.path.join(state, READY_FILE)
    with open(ready, "w") as f:
        f.write(f"{os.getpid()} {rec.backend_name}\n")
    log.info("recording primary=%s backend=%s", primary, rec.backend_name)
    last_mtime = 0.0
    rc = 0
    try:
        while not stop.wait(0.2):
            if rec.error is not None:
                log.error("recorder failed: %s", rec.error)
                rc = 1
                break
            try:
                mtime = os.stat(workers_path).st_mtime
            except FileNotFoundError:
                mtime = 0.0
            if mtime != last_mtime:
                last_mtime = mtime
                exclude.update(_read_workers(workers_path))
            beat = mtime or os.stat(ready).st_mtime
            if linger > 0 and time.time() - beat > linger:
                log.info("no worker for %.0f s: stopping", linger)
                break
    finally:
        try:
            os.unlink(ready)
        except FileNotFoundError:
            pass
        try:
            rec.stop()
        finally:
            writer.close()
    return rc


def ensure_recorder(primary: str, state: str, *, linger: float, timeout: float = 30.0) -> bool:
    """Start the recorder daemon for this session unless one runs; True if it was running.

    The daemon is detached (its own session) so it outlives the worker.
    """
    make_private_dirs(state)
    register_worker(state)
    ready = os.path.join(state, READY_FILE)
    if _alive(ready):
        return True
    try:
        os.unlink(ready)
    except FileNotFoundError:
        pass
    from transport.endpoint import georep_argv

    argv = [*georep_argv(), "recorder", "--primary", primary, "--state", state,
            "--linger", str(linger)]
    logf = open(os.path.join(state, "recorder.log"), "ab")  # noqa: SIM115 (child keeps it)
    # setsid -f forks once more: the daemon is not our child, so when it dies init reaps
    # it (a child of ours would linger as a zombie, which looks alive to kill(pid, 0)).
    launcher = ["setsid", "-f"] if shutil.which("setsid") else []
    starter = subprocess.Popen([*launcher, *argv], stdin=subprocess.DEVNULL, stdout=logf,
                               stderr=logf, start_new_session=True, close_fds=True)
    logf.close()
    if launcher:
        starter.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _alive(ready):
            return False
        time.sleep(0.05)
    raise RecorderError(f"the recorder did not start within {timeout:.0f} s "
                        f"(see {os.path.join(state, 'recorder.log')})")


def _alive(ready: str) -> bool:
    try:
        with open(ready) as f:
            pid = int(f.read().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
