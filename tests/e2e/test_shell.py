"""``georep-node shell`` against a real continuous ``sync``: --command and a pty session.

Real processes: the sync worker, its recorder daemon and secondary host, and the shell
itself (through a pseudo-terminal for the interactive part).  Waits poll with deadlines;
at teardown every process whose command line names the test's directory is killed.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import stat
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.helpers import GEOREP, REPO, wait_for
from tests.support.compare import compare_trees

ANSI = re.compile(rb"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-B]|[=>])")


def converged(p: Path, s: Path) -> bool:
    try:
        return compare_trees(p, s) == []
    except OSError:
        return False


class Session:
    """A continuous ``sync P S`` with its state under the test's directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.p, self.s, self.state = base / "primary", base / "secondary", base / "state"
        self.p.mkdir()
        self.s.mkdir()
        (self.p / "first.txt").write_text("first\n")
        (self.p / "dir").mkdir()
        (self.p / "dir" / "inner").write_bytes(b"x" * 100_000)
        self.env = dict(os.environ, GEOREP_STATE_DIR=str(self.state), PYTHONPATH=str(REPO),
                        HOME=str(base))
        self.err = open(base / "sync.err", "wb")  # noqa: SIM115 (closed in cleanup)
        self.proc = subprocess.Popen([*GEOREP, "sync", str(self.p), str(self.s)],
                                     stdin=subprocess.DEVNULL, stdout=self.err,
                                     stderr=self.err, env=self.env)

    def socket(self) -> Path:
        found = sorted((self.state / "sessions").glob("*/control.sock"))
        assert len(found) == 1, found
        return found[0]

    def shell(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*GEOREP, "shell", *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout, stdin=subprocess.DEVNULL)

    def processes(self) -> list[psutil.Process]:
        key = str(self.base)
        return [p for p in psutil.process_iter(["pid", "cmdline"])
                if p.pid != os.getpid() and any(key in c for c in p.info["cmdline"] or [])]

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        procs = self.processes()
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        self.err.close()

    def log(self) -> str:
        return (self.base / "sync.err").read_text(errors="replace")[-3000:]


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    s = Session(tmp_path)
    try:
        def ready() -> bool:
            assert s.proc.poll() is None, f"sync exited {s.proc.returncode}:\n{s.log()}"
            sockets = list((s.state / "sessions").glob("*/control.sock"))
            return bool(sockets) and converged(s.p, s.s)
        wait_for(ready, 60, "the sync to start and converge")
        yield s
    finally:
        s.cleanup()


def test_command_lists_both_sides(session: Session) -> None:
    sock = session.socket()
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    r = session.shell("--socket", str(sock), "--command", "actors")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(line for line in lines if line.startswith("SIDE"))
    assert "MAILBOX" in header and "HANDLED" in header and "IN HAND" in header
    rows = {(line.split()[0], line.split()[1].split("#")[0])
            for line in lines[lines.index(header) + 1:] if line.strip()}
    for name in ("Supervisor", "Crawler", "Batcher", "Syncer", "RemoteProxy"):
        assert ("worker", name) in rows, r.stdout
    for name in ("EntryApplier", "Lister"):
        assert ("secondary", name) in rows, r.stdout
    # Without --socket: the only running session under $GEOREP_STATE_DIR, or by its id.
    assert session.shell("--command", "actors").returncode == 0
    sid = sock.parent.name
    r = session.shell(sid, "--command", "actor Crawler")
    assert r.returncode == 0 and "RECENT" in r.stdout, r.stdout + r.stderr
    for cmd, expect in (("batches", "channel:"), ("failures", "no failures"),
                        ("resources", "recorder")):
        r = session.shell("--command", cmd)
        assert r.returncode == 0 and expect in r.stdout, (cmd, r.stdout, r.stderr)
    r = session.shell("--command", "restart Nobody")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    r = session.shell("--socket", str(session.base / "nowhere.sock"), "--command", "actors")
    assert r.returncode == 2 and "cannot reach" in r.stderr


def test_pause_and_resume(session: Session) -> None:
    r = session.shell("--command", "pause")
    assert r.returncode == 0, r.stderr
    paused_file = session.socket().parent / "paused"
    assert paused_file.exists()
    (session.p / "while-paused").write_text("later\n")
    time.sleep(1.5)  # a window in which a running worker would have copied it
    assert not (session.s / "while-paused").exists()
    assert "PAUSED" in session.shell("--command", "actors").stdout
    assert session.shell("--command", "resume").returncode == 0
    assert not paused_file.exists()
    wait_for(lambda: converged(session.p, session.s), 30, "convergence after resume")


class Pty:
    """The interactive shell on a pseudo-terminal, read with deadlines."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.seen = b""

    def expect(self, pattern: str, timeout: float = 30) -> str:
        """Read until the screen text (escapes removed) after the last match has ``pattern``."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            text = ANSI.sub(b"", self.seen).replace(b"\r", b"").decode(errors="replace")
            m = rx.search(text)
            if m:
                self.seen = self.seen[len(self.seen):]  # what follows is read fresh
                return text[:m.end()]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout} s; got:\n{text[-2000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the shell exited
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"shell exited {self.proc.returncode}:\n{text[-2000:]}")
                self.seen += chunk

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        os.close(self.master)


def test_interactive_shell_restart_converges(session: Session) -> None:
    env = dict(session.env, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    sh = Pty([*GEOREP, "shell", "--socket", str(session.socket())], env)
    try:
        sid = session.socket().parent.name
        prompt = rf"georep:{sid}>"
        sh.expect(prompt)
        sh.send("actors\r")
        out = sh.expect(rf"Lister[\s\S]*{prompt}")  # the prompt after the output
        assert "MAILBOX" in out and "EntryApplier" in out and "Crawler" in out, out
        sh.send("reso")
        sh.expect(r"resources")  # the completion menu, while typing
        sh.send("\t")  # tab completion of the command
        sh.expect(r"urces")  # the renderer writes only what Tab added to "reso"
        sh.send("\r")
        out = sh.expect(rf"recorder[\s\S]*{prompt}")
        assert "PROCESS" in out and "recorder" in out, out
        sh.send("restart Crawler\r")
        out = sh.expect(rf"restarted [\s\S]*{prompt}")
        assert "restarted Crawler, Batcher and Syncers" in out, out
        (session.p / "after-restart").write_text("written after the restart\n")
        (session.p / "dir" / "inner").write_bytes(b"y" * 200_000)
        wait_for(lambda: converged(session.p, session.s), 30, "convergence after restart")
        sh.send("actors\r")
        out = sh.expect(rf"pipeline #\d[\s\S]*Lister[\s\S]*{prompt}")
        assert "pipeline #2" in out, out
        sh.send("quit\r")
        sh.proc.wait(timeout=10)
        assert sh.proc.returncode == 0
    finally:
        sh.close()
    history = (session.base / ".georep_shell_history").read_text()
    assert "restart Crawler" in history and "resources" in history
