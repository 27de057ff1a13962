"""Supervision and crash recovery (issue 5): nothing lost, nothing silent, no mass delete.

Real processes, real files, nothing mocked: the ``georep-node sync --once`` process or
its secondary host is SIGKILLed at random moments while the test changes the tree;
the secondary runs out of space on a loop-mounted ext4; the primary root is hidden
by an empty bind mount; a primary file cannot be read (the test-only ``read_eio``
fault point); fault points kill the process at the moments that matter.

``GEOREP_TRIALS=20`` raises the number of kill trials (and the tree to 20,000
entries) for a manual run; the default keeps this file's non-slow run short.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.helpers import REPO, wait_for
from tests.support.compare import compare_trees
from tests.support.sshd import REMOTE_COMMAND, SshServer, ssh_connection_child
from tests.support.treegen import make_tree

GEOREP = [sys.executable, str(REPO / "bin" / "georep-node")]
TRIALS = int(os.environ.get("GEOREP_TRIALS", "3"))
ENTRIES = 20_000 if TRIALS >= 20 else 2_000
MIB = 1 << 20

pytestmark = pytest.mark.timeout(900)


def env_for(state: Path, faults: str | None = None) -> dict[str, str]:
    env = dict(os.environ, GEOREP_STATE_DIR=str(state))
    env.pop("GEOREP_FAULTS", None)
    if faults:
        env["GEOREP_FAULTS"] = faults
    return env


def run_sync(primary: Path, secondary: Path, state: Path, *extra: str,
             faults: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GEOREP, "sync", str(primary), str(secondary), "--once", "--json",
                           *extra], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env_for(state, faults))


def start_sync(primary: Path, secondary: str, state: Path,
               *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*GEOREP, "sync", str(primary), secondary, "--once", "--json",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL, env=env_for(state))


def converge(primary: Path, secondary: Path, state: Path) -> dict[str, Any]:
    proc = run_sync(primary, secondary, state)
    assert proc.returncode == 0, proc.stderr
    summary: dict[str, Any] = json.loads(proc.stdout)
    assert summary["ok"]
    assert compare_trees(primary, secondary) == []
    return summary


def stime(primary: Path) -> int | None:
    for n in os.listxattr(primary):
        if ".georep." in n and n.endswith(".stime"):
            sec, nsec = int.from_bytes(os.getxattr(primary, n)[:8], "big"), \
                int.from_bytes(os.getxattr(primary, n)[8:16], "big")
            return sec * 1_000_000_000 + nsec
    return None


def ledger(state: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for f in state.glob("sessions/*/failures.json"):
        rows += json.loads(f.read_text())["failures"]
    return rows


def change_some(root: Path, rng: random.Random, tag: str) -> None:
    """A few creates, a rename and a delete under ``root/changes``."""
    d = root / "changes"
    d.mkdir(exist_ok=True)
    for i in range(5):
        (d / f"{tag}-{i}").write_bytes(os.urandom(rng.randrange(1, 200_000)))
    names = sorted(p.name for p in d.iterdir())
    if len(names) > 3:
        os.rename(d / names[0], d / f"renamed-{tag}")
        os.unlink(d / names[1])


@contextlib.contextmanager
def busy_writer(root: Path) -> Iterator[None]:
    """Changes the tree (under ``root/live``) while a sync runs."""
    stop = threading.Event()
    live = root / "live"
    live.mkdir(exist_ok=True)

    def loop() -> None:
        i = 0
        while not stop.wait(0.02):
            (live / f"f{i % 50}").write_bytes(os.urandom(1000 + i))
            if i % 7 == 0 and (live / f"f{(i + 3) % 50}").exists():
                os.unlink(live / f"f{(i + 3) % 50}")
            i += 1

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(10)


def _stacks(pid: int) -> str:
    """Thread stacks of a hung process, for the failure report (py-spy when installed)."""
    if not shutil.which("py-spy"):
        return "(py-spy not installed: no stacks)"
    return subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True,
                          text=True, timeout=60).stdout


@dataclass
class Trial:
    """One kill trial's figures (printed with ``-s``)."""

    n: int
    delay: float
    killed: bool = False
    exit: int | None = None
    reconnects: int | None = None  # from the run's JSON summary (None: no summary)
    mark_past_changes: bool = False
    diffs: int | None = None  # differences when the mark says the changes are on the secondary
    why: str = ""  # the last line on stderr of a run that failed

    def line(self) -> str:
        return (f"trial {self.n}: delay {self.delay:.2f}s killed={self.killed} "
                f"exit={self.exit} reconnects={self.reconnects} "
                f"mark_past_changes={self.mark_past_changes} diffs={self.diffs}"
                + (f" ({self.why})" if self.why else ""))


def kill_trials(tmp_path: Path, pick_victim: Any, secondary_spec: str | None = None,
                extra: tuple[str, ...] = (),
                ready: Callable[[Path], bool] | None = None) -> list[Trial]:
    """SIGKILL ``pick_victim(proc)`` at random moments of ``TRIALS`` runs; returns the trials.

    ``secondary_spec`` is the secondary as given to ``sync`` (default: the local path
    ``tmp_path/s``; an ssh spec must name that same directory).  With ``ready``, the
    moment is drawn from when ``ready(secondary)`` first holds (the run is connected)
    instead of from the start of the process.
    """
    primary, secondary, state = tmp_path / "p", tmp_path / "s", tmp_path / "state"
    make_tree(primary, seed=11, entries=ENTRIES, big_sparse=False,
              big_dir_files=min(1000, ENTRIES // 4))
    rng = random.Random(int(os.environ.get("GEOREP_TRIAL_SEED", "5")))
    trials: list[Trial] = []
    # The kill lands within the time the last uninterrupted run took (the first run is a
    # full sync; later ones are incremental and short): a delay past the end of the run
    # would kill nothing and test nothing.
    run_time = max(1.0, ENTRIES / 2000)
    kills, needed = 0, max(1, TRIALS // 3)
    # A run that ended before its kill still counts as a trial (it must converge too), but
    # runs keep getting faster; when too few kills landed, more trials follow (each with a
    # shorter window, as run_time is the last uninterrupted run's), up to 3x TRIALS.
    n = -1
    while len(trials) < TRIALS or (kills < needed and len(trials) < 3 * TRIALS):
        n += 1
        change_some(primary, rng, f"t{n}")
        changed = time.time_ns()
        time.sleep(0.01)
        with busy_writer(primary):
            proc = start_sync(primary, secondary_spec or str(secondary), state, *extra)
            if ready is not None:
                wait_for(lambda p=proc: p.poll() is not None or ready(secondary), 60,  # type: ignore[misc]
                         "the run to connect", interval=0.01)
            started = time.monotonic()
            # From the start of the process, a kill in the first 50 ms finds nothing
            # started; from a connected run, any moment is a moment of the run.
            t = Trial(n, rng.uniform(0.0 if ready else 0.05, 0.6 * run_time))
            deadline = time.monotonic() + t.delay
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
            if proc.poll() is None:
                victim = pick_victim(proc)
                if victim is not None:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        victim.send_signal(signal.SIGKILL)
                        t.killed = True
            try:
                out, err = proc.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                stacks = _stacks(proc.pid)
                proc.kill()
                proc.communicate()
                raise AssertionError(f"trial {n}: sync hung after the kill\n{stacks}")
            if t.killed:
                kills += 1
            else:
                run_time = max(0.3, time.monotonic() - started)
        t.exit = proc.returncode
        if t.exit:
            t.why = (err.strip().splitlines() or [""])[-1][:300]
        with contextlib.suppress(ValueError):
            t.reconnects = int(json.loads(out)["counters"].get("reconnects", 0))
        mark = stime(primary)
        t.mark_past_changes = bool(mark and mark > changed)
        trials.append(t)
        if t.mark_past_changes:
            # Acknowledged (a mark later than the changes): all of it is on the secondary.
            diffs = compare_trees(primary, secondary, check_root=False,
                                  ignore_root_names=(b".georep", b"live"))
            t.diffs = len(diffs)
            assert diffs == [], (t.line(), diffs[:10], err[-2000:])
    converge(primary, secondary, state)
    print("\n" + "\n".join(t.line() for t in trials))
    # Trials must really kill something mid-run, or this test proves nothing (run times
    # vary, so a kill may still come late; a third of the trials, and at least one).
    assert kills >= needed, f"only {kills} of {len(trials)} trials killed a process"
    return trials


def test_sigkill_of_sync_once_at_random_moments(tmp_path: Path) -> None:
    trials = kill_trials(tmp_path, lambda proc: psutil.Process(proc.pid))
    assert len(trials) >= TRIALS


def _secondary_host(proc: subprocess.Popen[str]) -> psutil.Process | None:
    try:
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "secondary" in child.cmdline():
                    return child
    except psutil.NoSuchProcess:
        pass
    return None


def test_sigkill_of_secondary_host_at_random_moments(tmp_path: Path) -> None:
    """The secondary host dies mid-run; the moment is drawn from when the host holds the
    session lock (before that there is no host to kill)."""
    trials = kill_trials(tmp_path, _secondary_host, ready=_NewHost())
    assert len(trials) >= TRIALS


def _ssh_client(proc: subprocess.Popen[str]) -> psutil.Process | None:
    """The sync's ``ssh`` child; waits for it while the sync starts up (at most 10 s)."""
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        child = ssh_connection_child(proc.pid)
        if child is not None:
            return child
        time.sleep(0.01)
    return None


class _NewHost:
    """``ready`` for kill_trials: the secondary's session lock names a new, live host."""

    def __init__(self) -> None:
        self.last: int | None = None

    def __call__(self, secondary: Path) -> bool:
        try:
            pid = int(json.loads((secondary / ".georep" / "lock").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return False
        if pid == self.last or not psutil.pid_exists(pid):
            return False
        self.last = pid
        return True


def test_sigkill_of_ssh_at_random_moments(tmp_path: Path, sshd: SshServer) -> None:
    """The ssh client dies mid-run (after the handshake, the moment drawn within the last
    uninterrupted run's time): the sync reconnects by itself and converges."""
    spec = f"{sshd.user}@{sshd.host}:{tmp_path / 's'}"
    trials = kill_trials(tmp_path, _ssh_client, spec,
                         ("--ssh-command", sshd.ssh_command(), "--remote-command", REMOTE_COMMAND),
                         ready=_NewHost())
    assert len(trials) >= TRIALS
    for t in trials:
        if t.exit == 2 and t.killed and "before the handshake" in t.why:
            # Killed before the first handshake: a connection that never came up is an
            # error (exit 2, one line), not a retry; the next trial's run finishes the work.
            assert not t.mark_past_changes, t.line()
            continue
        # A dead ssh is a dropped connection: the run reconnects and finishes by itself
        # (exit 0, marks past the changes, nothing missing), a kill counted as a reconnect;
        # a kill after the run's last request is not noticed (0 reconnects).
        assert t.exit == 0 and t.mark_past_changes and t.diffs == 0, t.line()
        assert t.reconnects in ((0, 1) if t.killed else (0,)), t.line()
    assert sum(t.reconnects or 0 for t in trials) >= max(1, TRIALS // 3)


@pytest.mark.parametrize("point", ["after_entry_ops", "before_mark", "mid_data"])
def test_fault_points_kill_and_a_rerun_converges(tmp_path: Path, point: str) -> None:
    primary, secondary, state = tmp_path / "p", tmp_path / "s", tmp_path / "state"
    make_tree(primary, seed=3, entries=600, big_sparse=False, big_dir_files=100)
    proc = run_sync(primary, secondary, state, faults=point)
    assert proc.returncode == 137, proc.stderr
    assert f"fault point {point}" in proc.stderr
    assert stime(primary) is None  # killed before any mark: nothing acknowledged
    converge(primary, secondary, state)


# -- secondary disk full ----------------------------------------------------------------------


def _mount_loop(image: Path, mnt: Path) -> None:
    m = subprocess.run(["mount", "-o", "loop,errors=continue", str(image), str(mnt)],
                       capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"loop devices unavailable: {m.stderr.strip()}")


def _umount(mnt: Path) -> None:
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB ext4 loop mount (skipped where loop devices or mount are unavailable);
    ``errors=continue``, so an error the file system finds does not turn it read-only."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root and mkfs.ext4 for a loop-mounted ext4 image")
    image, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 * MIB)
    mk = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if mk.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {mk.stderr.strip()}")
    _mount_loop(image, mnt)
    try:
        yield mnt
    finally:
        _umount(mnt)


def test_secondary_disk_full(tmp_path: Path, small_disk: Path) -> None:
    primary, state = tmp_path / "p", tmp_path / "state"
    secondary = small_disk / "replica"
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\1" * (36 * MIB))
    primary.mkdir()
    for i in range(8):
        (primary / f"big{i}.bin").write_bytes(os.urandom(4 * MIB))
    for i in range(50):
        (primary / f"small{i}").write_bytes(os.urandom(10_000))
    proc = run_sync(primary, secondary, state)
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["failures"]
    assert any("No space left" in line or "errno 28" in line for line in summary["failures"])
    assert "could not be synced" in proc.stderr.splitlines()[-1]
    assert stime(primary) is None  # no mark passes a failure
    assert any(r["errno"] == 28 for r in ledger(state))
    # No half-written file is taken for synced: what is complete on the secondary has
    # the primary's times; a partial file does not.
    for p in secondary.glob("big*.bin"):
        src = primary / p.name
        if p.stat().st_mtime_ns == src.stat().st_mtime_ns:
            assert p.read_bytes() == src.read_bytes(), p.name
    filler.unlink()
    converge(primary, secondary, state)
    assert ledger(state) == []


# -- a secondary directory the file system cannot read ----------------------------------------


def test_secondary_directory_corrupted_on_disk(tmp_path: Path, small_disk: Path) -> None:
    """A secondary directory whose block is corrupt on disk (ext4 refuses to read it,
    EBADMSG or EUCLEAN), while its inode is fine: the Crawler records "secondary cannot
    list it" as a failure of that directory (exit 1, one line, no traceback), the rest of
    the tree syncs, nothing is marked, the failure waits in the ledger, and once fsck has
    repaired the file system the next run re-links the lost names by gfid and converges.
    """
    if not (shutil.which("debugfs") and shutil.which("e2fsck")):
        pytest.skip("needs debugfs and e2fsck (e2fsprogs)")
    primary, state = tmp_path / "p", tmp_path / "state"
    secondary = small_disk / "replica"
    image = tmp_path / "disk.img"
    for d in ("a", "b"):
        (primary / d).mkdir(parents=True)
        for i in range(3):
            (primary / d / f"f{i}").write_bytes(f"{d}{i}".encode() * 100)
    converge(primary, secondary, state)
    before = stime(primary)
    # Fill the first block of the secondary's directory 'a' with 0xff, unmounted.
    _umount(small_disk)
    zap = subprocess.run(["debugfs", "-w", "-R", "zap_block -f /replica/a -p 255 0",
                          str(image)], capture_output=True, text=True)
    assert zap.returncode == 0, zap.stderr
    _mount_loop(image, small_disk)
    try:
        os.listdir(secondary / "a")
    except OSError:
        pass  # the kernel refuses the directory (EBADMSG: its block fails its checksum)
    else:
        pytest.skip("this ext4 (no metadata_csum?) reads the zapped block without an error")
    for d in ("a", "b"):
        (primary / d / "new").write_bytes(d.encode())

    proc = run_sync(primary, secondary, state)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    failures = json.loads(proc.stdout)["failures"]
    assert any("'a'" in f and "secondary cannot list it" in f for f in failures), failures
    assert all("'b" not in f for f in failures), failures
    last = proc.stderr.strip().splitlines()[-1]
    assert "could not be synced" in last and "secondary cannot list it" in last, last
    assert (secondary / "b" / "new").read_bytes() == b"b"  # the rest of the tree synced
    assert stime(primary) == before  # no mark passes a failure
    assert any("secondary cannot list it" in r.get("message", "") for r in ledger(state)), \
        ledger(state)

    # The admin repairs the file system; the next run finds 'a' emptied by fsck (its
    # files' inodes live on through georep's gfid index) and puts every name back.
    _umount(small_disk)
    subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, text=True)
    _mount_loop(image, small_disk)
    summary = converge(primary, secondary, state)
    assert summary["counters"].get("failures_cleared", 0) >= 1, summary["counters"]
    assert ledger(state) == []
    assert stime(primary) is not None and stime(primary) != before


# -- primary root replaced by an empty directory -----------------------------------------------


def test_empty_bind_mount_over_primary_stops_the_sync(tmp_path: Path) -> None:
    primary, secondary, state = tmp_path / "p", tmp_path / "s", tmp_path / "state"
    empty = tmp_path / "empty"
    empty.mkdir()
    make_tree(primary, seed=4, entries=800, big_sparse=False, big_dir_files=100)
    converge(primary, secondary, state)
    before = sorted(p.relative_to(secondary) for p in secondary.rglob("*"))
    m = subprocess.run(["mount", "--bind", str(empty), str(primary)], capture_output=True,
                       text=True)
    if m.returncode != 0:
        pytest.skip(f"bind mount unavailable: {m.stderr.strip()}")
    try:
        proc = run_sync(primary, secondary, state)
        assert proc.returncode == 2, proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(f"georep-node sync: primary root {primary} looks unmounted "
                               "or emptied; refusing to delete "), line
        assert "--allow-empty-primary" in line
        n = int(line.split("refusing to delete ")[1].split()[0].replace(",", ""))
        assert n == len([p for p in before if p.parts[0] != ".georep"])
        assert sorted(p.relative_to(secondary) for p in secondary.rglob("*")) == before
    finally:
        subprocess.run(["umount", str(primary)], capture_output=True)
    converge(primary, secondary, state)


# -- unreadable primary file ------------------------------------------------------------------


def test_unreadable_file_is_in_the_ledger_retried_and_cleared(tmp_path: Path) -> None:
    primary, secondary, state = tmp_path / "p", tmp_path / "s", tmp_path / "state"
    (primary / "dir").mkdir(parents=True)
    (primary / "dir" / "bad-small").write_bytes(b"x" * 1000)
    (primary / "dir" / "bad-large").write_bytes(os.urandom(3 * MIB))
    (primary / "dir" / "good").write_bytes(b"fine")
    proc = run_sync(primary, secondary, state, faults="read_eio:bad-")
    assert proc.returncode == 1, proc.stderr
    failures = json.loads(proc.stdout)["failures"]
    assert len(failures) == 2 and all("errno 5" in f for f in failures), failures
    assert (secondary / "dir" / "good").read_bytes() == b"fine"
    rows = {r["path"]: r for r in ledger(state)}
    assert set(rows) == {"dir/bad-small", "dir/bad-large"}
    for r in rows.values():
        assert r["errno"] == 5 and r["attempts"] >= 2  # the retry pass tried again
        assert r["gfid"] and r["first_seen"] <= r["last_seen"] <= r["next_retry"]
    # Still unreadable in a later run: the ledger keeps the item's history.
    proc = run_sync(primary, secondary, state, faults="read_eio:bad-large")
    assert proc.returncode == 1
    rows2 = {r["path"]: r for r in ledger(state)}
    assert set(rows2) == {"dir/bad-large"}
    assert rows2["dir/bad-large"]["attempts"] > rows["dir/bad-large"]["attempts"]
    assert rows2["dir/bad-large"]["first_seen"] == rows["dir/bad-large"]["first_seen"]
    converge(primary, secondary, state)
    assert ledger(state) == []
