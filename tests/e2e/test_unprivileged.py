"""Unprivileged operation: the real ``georep-node`` run as an ordinary user.

The module creates the system user ``georep-test`` once (when missing) and runs every
georep command, the tree generator and the change mix as that user through ``runuser``.
Owners other than that user, device nodes, ``trusted.*`` xattrs and fanotify need root:
the tree has none of them (treegen skips them when not root), so ``compare_trees``
(which runs as root here and sees everything) checks uid/gid meaningfully.

The test's Python must be reachable by the user.  When the interpreter lives under a
directory the user cannot traverse (``/root/.pyenv`` with ``/root`` 0700), its prefix is
bind-mounted read-only on a temporary directory for the module's duration (unmounted at
teardown): nothing is copied and no permission is changed.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.helpers import REPO
from tests.support.compare import compare_trees

USER = "georep-test"
DEADLINE_S = 60.0

pytestmark = pytest.mark.timeout(600)


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120, **kw)


@dataclass
class AsUser:
    """Runs commands as :data:`USER` with a Python it can reach."""

    uid: int
    gid: int
    home: str
    python: str
    env: dict[str, str]
    repo: str
    base: Path
    mounts: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def argv(self, *args: str | os.PathLike[str]) -> list[str]:
        envs = [f"{k}={v}" for k, v in self.env.items()]
        return ["runuser", "-u", USER, "--", "env", *envs, self.python, *map(str, args)]

    def run(self, *args: str | os.PathLike[str], timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, cwd=self.base)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n"
                                 f"{proc.stderr}")
        return proc

    def georep(self, *args: str | os.PathLike[str], timeout: float = 600,
               check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.run(f"{self.repo}/bin/georep-node", *args, timeout=timeout, check=check)

    def sync_once(self, p: Path, s: Path) -> dict[str, Any]:
        proc = self.georep("sync", p, s, "--once", "--json")
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        out: dict[str, Any] = json.loads(proc.stdout)
        return out

    def py(self, code: str, *args: str) -> str:
        return self.run("-c", code, *args).stdout

    def popen(self, *args: str | os.PathLike[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as f:
            p = subprocess.Popen(self.argv(*args), stdin=subprocess.DEVNULL, stdout=f,
                                 stderr=f, cwd=self.base, start_new_session=True)
        self.procs.append(p)
        return p

    def user_processes(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["uids"]):
            uids = p.info["uids"]
            if uids is not None and uids.real == self.uid:
                out.append(p)
        return out

    def kill_all(self) -> None:
        """Kill every process running as the test user (all were started by this module)."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        procs = self.user_processes()
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)


def _ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    r = _run(["useradd", "--system", "--create-home", "--shell", "/usr/sbin/nologin", USER])
    if r.returncode != 0:
        pytest.skip(f"useradd {USER} failed: {r.stderr.strip()}")
    return pwd.getpwnam(USER)


def _probe(python: str, env: dict[str, str]) -> str | None:
    """None when ``python`` runs as the user and imports georep's dependencies and code."""
    envs = [f"{k}={v}" for k, v in env.items()]
    r = _run(["runuser", "-u", USER, "--", "env", *envs, python, "-c",
              "import pykka, msgpack, actors.cli, fsops.gfid"], cwd="/")
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]


def _bind(src: str, mounts: list[str]) -> str:
    dst = tempfile.mkdtemp(prefix="georep-unpriv-mnt-")
    os.chmod(dst, 0o755)
    r = _run(["mount", "--bind", src, dst])
    if r.returncode != 0:
        os.rmdir(dst)
        raise OSError(f"mount --bind {src}: {r.stderr.strip()}")
    mounts.append(dst)
    _run(["mount", "-o", "remount,bind,ro", dst])
    return dst


@pytest.fixture(scope="module")
def user() -> Iterator[AsUser]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the module creates the user georep-test and runs as it")
    for tool in ("useradd", "runuser"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: cannot create or switch to {USER}")
    pw = _ensure_user()
    mounts: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="georep-unpriv-"))
    os.chmod(base, 0o755)
    os.chown(base, pw.pw_uid, pw.pw_gid)
    au: AsUser | None = None
    try:
        repo = str(REPO)
        env = {"HOME": pw.pw_dir, "PYTHONPATH": repo, "LANG": "C.UTF-8"}
        python = sys.executable
        why = _probe(python, env)
        if why is not None:
            # Typically /root/.pyenv/... behind /root (0700): bind-mount the prefix.
            exe = os.path.realpath(sys.executable)
            prefix = os.path.realpath(sys.prefix)
            if not exe.startswith(prefix + "/"):
                pytest.skip(f"python {exe} is unreachable by {USER} ({why}) and is not "
                            f"under its prefix {prefix}")
            try:
                mnt = _bind(prefix, mounts)
            except OSError as e:
                pytest.skip(f"python {exe} is unreachable by {USER} ({why}) and {e}")
            python = mnt + exe[len(prefix):]
            env["LD_LIBRARY_PATH"] = mnt + "/lib"
            why = _probe(python, env)
        if why is not None and _probe(python, dict(env, PYTHONPATH="/nonexistent")):
            try:
                repo = _bind(repo, mounts)
            except OSError as e:
                pytest.skip(f"the repository {REPO} is unreachable by {USER}: {e}")
            env["PYTHONPATH"] = repo
            why = _probe(python, env)
        if why is not None:
            pytest.skip(f"no Python reachable by {USER} imports georep: {why}")
        au = AsUser(pw.pw_uid, pw.pw_gid, pw.pw_dir, python, env, repo, base, mounts)
        yield au
    finally:
        if au is not None:
            au.kill_all()
        shutil.rmtree(base, ignore_errors=True)
        for m in reversed(mounts):
            _run(["umount", m])
            try:
                os.rmdir(m)
            except OSError:
                pass


@pytest.fixture(scope="module")
def world(user: AsUser) -> dict[str, Any]:
    p, s = user.base / "primary", user.base / "secondary"
    out = user.run("-m", "tests.support.treegen", p, "--entries", "3000", "--small",
                   "--big-dir-files", "300", "--seed", "5").stdout
    tree = json.loads(out)
    first = user.sync_once(p, s)
    return {"p": p, "s": s, "tree": tree, "first": first}


def test_tree_is_owned_by_the_user(user: AsUser, world: dict[str, Any]) -> None:
    t = world["tree"]
    for kind in ("fifos", "hardlink_groups", "symlinks_dangling", "acl_entries",
                 "xattr_entries", "setuid", "setgid", "non_utf8_names"):
        assert t[kind] > 0, kind
    assert t["chardevs"] == 0 and t["non_root_owned"] == 0
    for dirpath, dirnames, filenames in os.walk(os.fsencode(world["p"])):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            assert (st.st_uid, st.st_gid) == (user.uid, user.gid), os.path.join(dirpath, n)


def test_first_sync_converges(user: AsUser, world: dict[str, Any]) -> None:
    first = world["first"]
    assert first["ok"] and not first["failures"], first["failures"]
    assert compare_trees(world["p"], world["s"]) == []
    assert os.stat(world["s"] / "chg" / "swap_a").st_uid == user.uid


def test_gfids_live_in_user_namespace(world: dict[str, Any]) -> None:
    for rel in ("chg/swap_a", "large", "modes/m0444"):
        p = os.getxattr(world["p"] / rel, b"user.georep.gfid")
        s = os.getxattr(world["s"] / rel, b"user.georep.gfid")
        assert len(p) == 24 and p[:16] == s
        with pytest.raises(OSError):
            os.getxattr(world["p"] / rel, b"trusted.georep.gfid")
    # the read-only file got its gfid without its mode changing
    assert stat.S_IMODE(os.stat(world["p"] / "modes" / "m0444").st_mode) == 0o444
    marks = [n for n in os.listxattr(world["p"]) if n.startswith("user.georep.")]
    assert any(n.endswith(".stime") for n in marks), marks


def test_change_mix_converges(user: AsUser, world: dict[str, Any]) -> None:
    user.run("-m", "tests.support.treegen", world["p"], "--apply-changes", "--seed", "3")
    second = user.sync_once(world["p"], world["s"])
    assert second["ok"], second["failures"]
    assert compare_trees(world["p"], world["s"]) == []
    assert second["counters"].get("renamed", 0) >= 1
    third = user.sync_once(world["p"], world["s"])
    c = third["counters"]
    for k in ("created", "linked", "renamed", "deleted", "adopted", "meta", "kept"):
        assert c.get(k, 0) == 0, (k, c)
    assert third["transfer"]["bytes_sent"] == 0


_REUSE = r"""
import os, sys
d = sys.argv[1]
old = os.path.join(d, "s")
ino = os.lstat(old).st_ino
os.unlink(old)
made = []
for i in range(64):
    n = os.path.join(d, "n%d" % i)
    os.symlink("other-target-%d" % i, n)
    made.append(n)
    if os.lstat(n).st_ino == ino:
        for m in made[:-1]:
            os.unlink(m)
        print(n)
        break
"""


def test_symlink_replaced_on_a_reused_inode(user: AsUser) -> None:
    p, s = user.base / "reuse-p", user.base / "reuse-s"
    user.py("import os, sys; d = sys.argv[1]; os.mkdir(d); os.symlink('first', d + '/s');"
            "os.symlink('moved', d + '/m'); os.mkfifo(d + '/f')", str(p))
    assert user.sync_once(p, s)["ok"]
    renamed = user.base / "reuse-p" / "m2"
    user.py("import os, sys; os.rename(sys.argv[1] + '/m', sys.argv[1] + '/m2')", str(p))
    again = user.sync_once(p, s)
    # a renamed symlink is the same object: linked under its new name, not re-created
    assert again["counters"].get("created", 0) == 0, again["counters"]
    assert os.readlink(s / "m2") == "moved" and renamed.is_symlink()
    new = user.py(_REUSE, str(p)).strip()
    if not new:
        pytest.skip("the filesystem did not reuse the freed inode within 64 creations")
    out = user.sync_once(p, s)
    assert out["ok"], out["failures"]
    assert compare_trees(p, s) == []
    assert os.readlink(s / os.path.basename(new)).startswith("other-target-")


def test_a_directory_the_secondary_cannot_read_is_a_failure(user: AsUser) -> None:
    """A secondary directory its (unprivileged) host may not read: its ops are failures
    named in the summary (exit 1, no traceback), the rest of the tree still syncs, and
    once it is readable again the next run converges."""
    p, s = user.base / "nolist-p", user.base / "nolist-s"
    user.py("import os, sys\nfor d in ('a', 'b'):\n    os.makedirs(f'{sys.argv[1]}/{d}')\n"
            "    open(f'{sys.argv[1]}/{d}/f', 'w').write(d)", str(p))
    assert user.sync_once(p, s)["ok"]
    user.py("import sys\nfor d in ('a', 'b'):\n    open(f'{sys.argv[1]}/{d}/g', 'w').write(d)",
            str(p))
    os.chmod(s / "a", 0)  # root does it: its owner, the user, may no longer read it
    try:
        proc = user.georep("sync", p, s, "--once", "--json")
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        failures = json.loads(proc.stdout)["failures"]
        # The root's listing still answers (the unreadable entry without its identity);
        # the ops on 'a' fail one by one, and nothing of it was evicted or replaced.
        assert any("'a'" in f and "Permission denied" in f for f in failures), failures
        assert all("'b" not in f for f in failures), failures
        assert (s / "a" / "f").read_text() == "a"  # root reads it: still in place
        assert (s / "b" / "g").exists(), (proc.stdout, proc.stderr)
        assert (s / "b" / "g").read_text() == "b"
    finally:
        os.chmod(s / "a", 0o755)
    assert user.sync_once(p, s)["ok"]
    assert compare_trees(p, s) == []


_DEVICE = r"""
import errno, os, sys, uuid
from fsops.constants import ROOT_GFID
from fsops.secondary import SecondaryFS
fs = SecondaryFS(os.fsencode(sys.argv[1]), create=True)
ops = [{"op": "ensure", "pgfid": ROOT_GFID, "name": b"null", "gfid": uuid.uuid4().bytes,
        "type": "c", "rdev": os.makedev(1, 3), "meta": {"mode": 0o666}},
       {"op": "ensure", "pgfid": ROOT_GFID, "name": b"fifo", "gfid": uuid.uuid4().bytes,
        "type": "p", "meta": {"mode": 0o640}}]
res = fs.apply_ops(ops)
assert res[0]["s"] == "error" and res[0]["errno"] == errno.EPERM, res
assert "root" in res[0]["message"], res
assert res[1]["s"] == "created", res
print(res[0]["message"])
"""


def test_device_ensure_is_a_per_op_error(user: AsUser) -> None:
    msg = user.py(_DEVICE, str(user.base / "dev-s"))
    assert "device nodes need root" in msg


def test_continuous_sync_uses_inotify(user: AsUser, world: dict[str, Any]) -> None:
    p, s = user.base / "live-p", user.base / "live-s"
    state = user.base / "state"
    user.py("import os, sys; os.makedirs(sys.argv[1] + '/d'); "
            "open(sys.argv[1] + '/d/a', 'w').write('a')", str(p))
    user.env["GEOREP_STATE_DIR"] = str(state)
    try:
        proc = user.popen(f"{user.repo}/bin/georep-node", "sync", p, s,
                          log=user.base / "live.err")
    finally:
        del user.env["GEOREP_STATE_DIR"]

    def log() -> str:
        return "".join(f.read_text(errors="replace")
                       for f in state.glob("sessions/*/georep.log"))

    def wait(cond: Any, what: str) -> None:
        end = time.monotonic() + DEADLINE_S
        while not cond():
            if proc.poll() is not None:
                raise AssertionError(f"sync exited {proc.returncode} before {what}:\n"
                                     f"{(user.base / 'live.err').read_text()[-3000:]}")
            if time.monotonic() > end:
                raise AssertionError(f"no {what} within {DEADLINE_S} s; log:\n{log()[-3000:]}")
            time.sleep(0.1)

    wait(lambda: "crawl=Changelog Crawl" in log(), "changelog crawl")
    wait(lambda: (s / "d" / "a").exists(), "initial copy")
    user.py("import os, sys; os.symlink('a', sys.argv[1] + '/d/l');"
            "open(sys.argv[1] + '/d/new', 'w').write('fresh')", str(p))
    wait(lambda: (s / "d" / "new").exists() and (s / "d" / "new").read_text() == "fresh"
         and (s / "d" / "l").is_symlink(), "new file and symlink on the secondary")
    assert "crawl=" in log()
    logs = "".join(f.read_text(errors="replace") for f in state.rglob("*.log"))
    assert "backend=inotify" in logs, logs[-3000:]
    assert state.stat().st_uid == user.uid
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
