"""The session config keys exclude, ignore-deletes, sync-xattrs, sync-acls and
secondary-timeout, end to end with real processes: ``sync --once`` (native and rsync
engines) and a named session run by the node (hybrid crawl, then live changes).

Each test fails if its key stops working: excluded names reaching the secondary or
deleted there, a primary delete propagated under ignore-deletes, a primary xattr (or
ACL) copied or a secondary one removed when they are not replicated, the secondary
host not honouring the configured idle timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.helpers import georep, sync_once, wait_for
from tests.e2e.test_operator import Op, active, checkpoint_completed, op  # noqa: F401
from tests.support.sshd import REMOTE_COMMAND, SshServer

pytestmark = pytest.mark.timeout(300)

BIG = 300 * 1024  # above the inline limit: goes through the data path (and engines)


def _xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _acl(path: Path) -> str:
    out = subprocess.run(["getfacl", "-cpE", str(path)], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return "\n".join(ln for ln in out.splitlines() if ln.startswith("user:") and ln[5] != ":")


def _names(root: Path) -> set[str]:
    out = set()
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".georep" or rel.startswith(".georep/"):
            continue
        for n in dirs + files:
            p = n if rel == "." else f"{rel}/{n}"
            if p != ".georep":
                out.add(p)
    return out


@pytest.mark.parametrize("engine", ["native", "rsync"])
def test_sync_once_exclude_ignore_deletes_and_no_xattrs(tmp_path: Path, engine: str) -> None:
    p, s = tmp_path / "p", tmp_path / "s"
    (p / "keep" / "logs").mkdir(parents=True)
    (p / "cache" / "deep").mkdir(parents=True)
    (p / "small.txt").write_text("small\n")
    (p / "big.bin").write_bytes(os.urandom(BIG))
    (p / "gone.txt").write_text("deleted later\n")
    (p / "old-name").write_text("renamed later\n")
    (p / "scratch.tmp").write_text("never replicated\n")
    (p / "keep" / "k.tmp").write_text("never replicated\n")
    (p / "keep" / "logs" / "l").write_text("never replicated\n")
    (p / "keep" / "ok").write_text("replicated\n")
    (p / "cache" / "deep" / "c").write_text("never replicated\n")
    for f in ("small.txt", "big.bin"):
        os.setxattr(p / f, "user.primary", b"p")
    # What the secondary holds under excluded names must stay.
    (s / "cache").mkdir(parents=True)
    (s / "cache" / "mine").write_text("the secondary's own\n")
    (s / "local.tmp").write_text("the secondary's own\n")
    args = ["--engine", engine, "--exclude", "*.tmp", "--exclude", "cache/",
            "--exclude", "keep/logs", "--ignore-deletes", "--no-xattrs"]

    out = sync_once(p, s, *args)
    # Large-file bytes are counted (status's bytes/s): all of a new file...
    assert out["counters"]["data_bytes"] == BIG
    assert _names(s) == {"small.txt", "big.bin", "gone.txt", "old-name", "keep", "keep/ok",
                         "cache", "cache/mine", "local.tmp"}
    for f in ("small.txt", "big.bin"):
        assert (s / f).read_bytes() == (p / f).read_bytes()
        assert _xattr(s / f, "user.primary") is None  # not copied
        os.setxattr(s / f, "user.secondary", b"s")

    # Changes: a delete, a rename, new content and xattrs, a new excluded file.
    (p / "gone.txt").unlink()
    os.rename(p / "old-name", p / "new-name")
    (p / "small.txt").write_text("changed\n")
    with open(p / "big.bin", "r+b") as f:
        f.seek(BIG // 2)
        f.write(b"x" * 1000)
    for f in ("small.txt", "big.bin"):
        os.setxattr(p / f, "user.primary", b"p2")
    (p / "keep" / "logs" / "l2").write_text("never replicated\n")
    (p / "another.tmp").write_text("never replicated\n")
    out = sync_once(p, s, *args)
    assert out["ok"]
    # ...and, natively, only the changed block of a changed one (engines: the file).
    moved = out["counters"]["data_bytes"]
    assert (0 < moved < BIG) if engine == "native" else moved == BIG
    assert _names(s) == {"small.txt", "big.bin", "gone.txt", "new-name", "keep", "keep/ok",
                         "cache", "cache/mine", "local.tmp"}
    assert (s / "gone.txt").read_text() == "deleted later\n"  # ignore-deletes
    assert (s / "new-name").read_text() == "renamed later\n"  # a rename is still a rename
    for f in ("small.txt", "big.bin"):
        assert (s / f).read_bytes() == (p / f).read_bytes()
        assert _xattr(s / f, "user.primary") is None
        assert _xattr(s / f, "user.secondary") == b"s"  # left alone
        assert (s / f).stat().st_mtime_ns == (p / f).stat().st_mtime_ns

    # Nothing changed: nothing moves, not even meta (the comparison uses the same scope).
    out = sync_once(p, s, *args)
    c = out["counters"]
    assert sum(c.get(k, 0) for k in ("created", "deleted", "meta", "data_files")) == 0, c

    # Without the options the secondary follows the primary again: excluded names and
    # deleted files go, xattrs are copied and the secondary's own are removed.
    sync_once(p, s, "--engine", engine)
    assert _names(s) == _names(p)
    assert _xattr(s / "big.bin", "user.primary") == b"p2"
    assert _xattr(s / "big.bin", "user.secondary") is None


def test_sync_once_acls_apart_from_xattrs(tmp_path: Path) -> None:
    p, s = tmp_path / "p", tmp_path / "s"
    p.mkdir()
    f = p / "f"
    f.write_text("acl\n")
    os.setxattr(f, "user.primary", b"p")
    subprocess.run(["setfacl", "-m", "u:daemon:r", str(f)], check=True, timeout=30)
    sync_once(p, s, "--no-acls")
    assert _xattr(s / "f", "user.primary") == b"p"  # xattrs still replicated
    assert _acl(s / "f") == ""  # the ACL is not
    subprocess.run(["setfacl", "-m", "u:bin:rw", str(s / "f")], check=True, timeout=30)
    os.setxattr(f, "user.primary", b"p2")
    sync_once(p, s, "--no-acls")
    assert _xattr(s / "f", "user.primary") == b"p2"
    assert _acl(s / "f") == "user:bin:rw-"  # the secondary's own ACL is left alone
    # ACLs only: the primary's ACL replaces the secondary's; user xattrs are left alone.
    os.setxattr(s / "f", "user.secondary", b"s")
    sync_once(p, s, "--no-xattrs")
    assert _acl(s / "f") == "user:daemon:r--"
    assert _xattr(s / "f", "user.secondary") == b"s"
    assert _xattr(s / "f", "user.primary") == b"p2"  # left from before, not removed


def _secondary_pid(o: Op, name: str) -> int | None:
    b = o.bricks(name)
    res = b[0]["resources"] if b else None
    sec = res.get("secondary") if res else None
    return sec["pid"] if sec else None


def test_session_keys_live(op: Op, tmp_path: Path) -> None:  # noqa: F811
    p, s = tmp_path / "p", tmp_path / "s"
    (p / "skip" / "sub").mkdir(parents=True)
    (p / "d").mkdir()
    (p / "a.txt").write_text("a\n")
    (p / "d" / "del-me").write_text("deleted while live\n")
    (p / "d" / "ren-me").write_text("renamed while live\n")
    (p / "x.tmp").write_text("never\n")
    (p / "skip" / "sub" / "f").write_text("never\n")
    os.setxattr(p / "a.txt", "user.primary", b"p")
    s.mkdir()
    (s / "skip").mkdir()
    (s / "skip" / "kept").write_text("the secondary's own\n")
    op("create", "k", p, s, "--config", "exclude=*.tmp,skip", "--config",
       "ignore-deletes=yes", "--config", "sync-xattrs=false", "--config",
       "secondary-timeout=4")
    assert "not yet used" not in op("config", "k").stdout
    op("start", "k")
    wait_for(lambda: active(op, "k"), 90, "the first crawl")
    assert _names(s) == {"a.txt", "d", "d/del-me", "d/ren-me", "skip", "skip/kept"}
    assert _xattr(s / "a.txt", "user.primary") is None
    os.setxattr(s / "a.txt", "user.secondary", b"s")

    # Changes while live.
    (p / "y.tmp").write_text("never\n")
    (p / "skip" / "sub" / "g").write_text("never\n")
    (p / "newdir").mkdir()
    (p / "newdir" / "z.tmp").write_text("never\n")
    (p / "newdir" / "n").write_text("new\n")
    (p / "newdir" / "skip").mkdir()
    (p / "newdir" / "skip" / "h").write_text("never\n")
    (p / "d" / "del-me").unlink()
    os.rename(p / "d" / "ren-me", p / "d" / "renamed")
    (p / "a.txt").write_text("a2\n")
    os.setxattr(p / "a.txt", "user.primary", b"p2")
    checkpoint_completed(op, "k")
    assert _names(s) == {"a.txt", "d", "d/del-me", "d/renamed", "skip", "skip/kept",
                         "newdir", "newdir/n"}
    assert (s / "a.txt").read_text() == "a2\n"
    assert _xattr(s / "a.txt", "user.primary") is None
    assert _xattr(s / "a.txt", "user.secondary") == b"s"

    # secondary-timeout=4: the worker pings often enough (every second) that an idle
    # session keeps its secondary host...
    pid = _secondary_pid(op, "k")
    assert pid is not None
    host = psutil.Process(pid)
    t0 = time.monotonic()
    wait_for(lambda: time.monotonic() - t0 > 10 or not host.is_running(), 30,
             "two and a half idle timeouts, or the host's exit")
    assert host.is_running() and _secondary_pid(op, "k") == pid
    # ...and the host exits after 4 s without a request (the worker is frozen).
    worker = op.bricks("k")[0]["pid"]
    os.kill(worker, signal.SIGSTOP)
    try:
        wait_for(lambda: not host.is_running() or host.status() == psutil.STATUS_ZOMBIE,
                 30, "the secondary host to exit on its idle timeout")
    finally:
        os.kill(worker, signal.SIGCONT)
    wait_for(lambda: "no request from the primary for 4 s" in op.log("k"), 60,
             "the host's reason in the session log")
    # The worker reconnects and goes on.
    (p / "after").write_text("after the timeout\n")
    checkpoint_completed(op, "k")
    assert (s / "after").read_text() == "after the timeout\n"
    assert (s / "d" / "del-me").exists() and not (s / "y.tmp").exists()


def test_exclude_added_to_a_running_session(op: Op, tmp_path: Path) -> None:  # noqa: F811
    """A directory replicated before it was excluded: changes inside it are neither
    replayed from the journal (History Crawl) nor followed live, and its copy stays."""
    p, s = tmp_path / "p", tmp_path / "s"
    (p / "cache").mkdir(parents=True)
    (p / "cache" / "old").write_text("replicated before the exclude\n")
    (p / "other").write_text("o\n")
    op("create", "x", p, s)
    op("start", "x")
    wait_for(lambda: active(op, "x"), 90, "the first crawl")
    checkpoint_completed(op, "x")
    assert (s / "cache" / "old").exists()
    op("stop", "x")
    op("config", "x", "exclude", "cache/,*.tmp")
    (p / "cache" / "while-stopped").write_text("never\n")
    (p / "cache" / "old").write_text("changed, never replicated\n")
    (p / "stopped.tmp").write_text("never\n")
    (p / "other").write_text("o2\n")
    before = op.log("x").count("crawl=History Crawl")
    op("start", "x")
    wait_for(lambda: op.log("x").count("crawl=History Crawl") > before, 60,
             "crawl=History Crawl in the log")
    (p / "cache" / "live").write_text("never\n")
    (p / "cache" / "sub").mkdir()
    (p / "cache" / "sub" / "f").write_text("never\n")
    (p / "live.tmp").write_text("never\n")
    (p / "new").write_text("n\n")
    checkpoint_completed(op, "x")
    assert _names(s) == {"cache", "cache/old", "other", "new"}
    assert (s / "cache" / "old").read_text() == "replicated before the exclude\n"
    assert (s / "other").read_text() == "o2\n" and (s / "new").read_text() == "n\n"


def test_over_ssh_with_a_restricted_key(sshd: SshServer, tmp_path: Path) -> None:
    """The host's settings travel in the hello, so a forced command (restricted key) that
    ignores the client's argv still applies them."""
    p, s = tmp_path / "p", tmp_path / "allowed"
    p.mkdir()
    (p / "f").write_text("f\n")
    (p / "x.tmp").write_text("never\n")
    os.setxattr(p / "f", "user.primary", b"p")
    key = tmp_path / "keys" / "georep_ed25519"
    proc = georep("ssh-key", "--key", key, "--generate", "--root", s,
                  "--remote-command", REMOTE_COMMAND)
    assert proc.returncode == 0, proc.stderr
    sshd.restricted_keys.write_text(proc.stdout.strip() + "\n")
    try:
        spec = f"{sshd.user}@{sshd.host}:{s}"
        common = ["--ssh-command", sshd.ssh_command(key), "--remote-command", REMOTE_COMMAND,
                  "--exclude", "*.tmp", "--no-xattrs", "--secondary-timeout", "3"]
        proc = georep("sync", p, spec, "--once", *common)
        assert proc.returncode == 0, proc.stderr
        assert _names(s) == {"f"}
        assert _xattr(s / "f", "user.primary") is None
    finally:
        sshd.restricted_keys.write_text("")
