"""The operator surface, driven as a user would: create, start, status, checkpoint, pause,
resume, stop, delete; the node supervisor restarting a killed worker; local and ssh
secondaries.  Real processes (node, workers, recorders, secondary hosts, sshd)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from actors.session import KEYS
from actors.status import BRICK_FIELDS
from tests.e2e.helpers import wait_for
from tests.support.compare import compare_trees
from tests.support.sshd import REMOTE_COMMAND, SshServer, spare_port
from tests.support.treegen import make_tree

REPO = Path(__file__).resolve().parents[2]
GEOREP = [sys.executable, str(REPO / "bin" / "georep-node")]
COMMANDS = ("create", "start", "stop", "pause", "resume", "delete", "status", "config",
            "checkpoint", "failures", "node")

pytestmark = pytest.mark.timeout(300)


class Op:
    """``georep-node`` with an isolated state root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = dict(os.environ, GEOREP_STATE_DIR=str(root))

    def __call__(self, *args: str | os.PathLike[str], expect: int | None = 0,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*GEOREP, *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, env=self.env)
        if expect is not None:
            assert proc.returncode == expect, (
                f"georep-node {' '.join(map(str, args))}: exit {proc.returncode}\n"
                f"{proc.stdout}\n{proc.stderr}")
        return proc

    def status(self, name: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self("status", name, "--json").stdout)
        return doc

    def bricks(self, name: str) -> list[dict[str, Any]]:
        return [b for s in self.status(name)["sessions"] for b in s["bricks"]]

    def log(self, name: str) -> str:
        try:
            return (self.root / "sessions" / name / "georep.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def ours(root: Path) -> list[psutil.Process]:
    """Every process of this state root: node and workers (--state-dir), recorders (--state)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "georep-node" in cmd and str(root) in cmd:
            out.append(p)
    return out


@pytest.fixture
def op(tmp_path: Path) -> Iterator[Op]:
    root = tmp_path / "state"
    o = Op(root)
    yield o
    for name in os.listdir(root / "sessions") if (root / "sessions").is_dir() else []:
        o("stop", name, "--with-recorders", expect=None)
    left = ours(root)
    for p in left:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _gone, alive = psutil.wait_procs(left, timeout=20)
    for p in alive:
        p.kill()
    assert not alive, f"processes left running: {[p.pid for p in alive]}"


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())
    except OSError:
        return None


def active(op: Op, name: str) -> list[dict[str, Any]] | None:
    bricks = op.bricks(name)
    if bricks and all(b["status"] == "Active" and b["crawl"] == "Changelog Crawl"
                      for b in bricks):
        return bricks
    return None


def checkpoint_completed(op: Op, name: str, timeout: float = 90) -> dict[str, Any]:
    op("checkpoint", name, "now")

    def done() -> dict[str, Any] | None:
        s = op.status(name)["sessions"][0]
        cp = s["checkpoint"]
        return cp if cp and cp["completed"] else None

    cp: dict[str, Any] = wait_for(done, timeout, "the checkpoint to complete")
    assert cp["completion_time"] >= cp["time"]
    return cp


def lifecycle(op: Op, tmp_path: Path, secondary_spec: str, secondary: Path,
              *config: str) -> None:
    primary = tmp_path / "primary"
    make_tree(primary, entries=400, big_sparse=False, big_dir_files=50)
    extra = [a for c in config for a in ("--config", c)]
    op("create", "s1", primary, secondary_spec, *extra)
    out = op("start", "s1").stdout
    assert "started" in out
    bricks = op.bricks("s1")
    assert bricks[0]["status"] in ("Initializing", "Active")
    wait_for(lambda: active(op, "s1"), 90, "the first crawl")

    # changes while live
    (primary / "new-dir").mkdir()
    for i in range(20):
        (primary / "new-dir" / f"f{i}").write_bytes(os.urandom(100 + i * 1000))
    os.rename(primary / "new-dir" / "f0", primary / "renamed")
    checkpoint_completed(op, "s1")
    assert compare_trees(primary, secondary) == []

    # live psutil figures
    b = op.bricks("s1")[0]
    res = b["resources"]
    assert psutil.pid_exists(res["worker"]["pid"]) and res["worker"]["rss"] > 0
    assert res["worker"]["pid"] == b["pid"]
    assert res["secondary"] is not None and psutil.pid_exists(res["secondary"]["pid"])
    assert res["node"] is not None and res["node"]["rss"] > 0
    assert set(BRICK_FIELDS) <= set(b)

    # delete refused while running
    assert "stop it first" in op("delete", "s1", expect=2).stderr

    # stop, then start again: resumes from the journal
    op("stop", "s1")
    assert all(b["status"] == "Stopped" and b["pid"] is None for b in op.bricks("s1"))
    op("stop", "s1")  # idempotent
    (primary / "while-stopped").write_text("written while stopped\n")
    before = op.log("s1").count("crawl=History Crawl")
    op("start", "s1")
    wait_for(lambda: op.log("s1").count("crawl=History Crawl") > before, 60,
             "crawl=History Crawl in the log")
    checkpoint_completed(op, "s1")
    assert compare_trees(primary, secondary) == []

    op("stop", "s1", "--with-recorders")
    wait_for(lambda: not ours(op.root), 30, "every process to exit")
    op("delete", "s1", "--reset-sync-time")
    assert not (op.root / "sessions" / "s1").exists()
    names = os.listxattr(primary)
    assert not [n for n in names if ".s1." in n], names


def test_local_session_lifecycle(op: Op, tmp_path: Path) -> None:
    secondary = tmp_path / "secondary"
    lifecycle(op, tmp_path, str(secondary), secondary, "sync-jobs=3", "log-level=INFO")


def test_ssh_session_lifecycle(op: Op, tmp_path: Path, sshd: SshServer) -> None:
    secondary = tmp_path / "secondary"
    lifecycle(op, tmp_path, f"{sshd.user}@{sshd.host}:{secondary}", secondary,
              f"ssh-command={sshd.ssh_command()}", f"remote-command={REMOTE_COMMAND}")


def test_killed_worker_is_restarted(op: Op, tmp_path: Path) -> None:
    primary, secondary = tmp_path / "p", tmp_path / "s"
    make_tree(primary, entries=50, big_sparse=False, big_dir_files=10)
    op("create", "k", primary, secondary)
    op("start", "k")
    first = wait_for(lambda: active(op, "k"), 60, "Active")[0]["pid"]
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: [b for b in op.bricks("k") if b["status"] == "Faulty"
                      and "SIGKILL" in (b["faulty_reason"] or "")], 10,
             "status Faulty with the reason")
    again = wait_for(lambda: active(op, "k"), 60, "Active again")[0]
    assert again["pid"] != first and psutil.pid_exists(again["pid"])
    assert "worker restarted" in (op.root / "node.log").read_text()
    (primary / "after-restart").write_text("x")
    checkpoint_completed(op, "k")
    assert compare_trees(primary, secondary) == []


def test_pause_and_resume(op: Op, tmp_path: Path) -> None:
    primary, secondary = tmp_path / "p", tmp_path / "s"
    make_tree(primary, entries=50, big_sparse=False, big_dir_files=10)
    port = spare_port()
    op("create", "pz", primary, secondary, "--config", f"metrics-port={port}")
    op("start", "pz")
    pid = wait_for(lambda: active(op, "pz"), 60, "Active")[0]["pid"]
    metrics = wait_for(lambda: _get(f"http://127.0.0.1:{port}/metrics"), 30, "metrics")
    assert 'georep_up{session="pz"' in metrics and "georep_stime_seconds" in metrics
    assert "paused" in op("pause", "pz").stdout
    assert [b["status"] for b in op.bricks("pz")] == ["Paused"]
    (primary / "during-pause").write_text("held back\n")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # absence over a window: this wait is the assertion
        assert not (secondary / "during-pause").exists()
        time.sleep(0.1)
    assert psutil.Process(pid).status() != psutil.STATUS_STOPPED  # not SIGSTOPped
    op("resume", "pz")
    wait_for(lambda: (secondary / "during-pause").exists(), 30, "the file after resume")
    b = op.bricks("pz")[0]
    assert b["status"] == "Active" and b["pid"] == pid  # same worker, same connection


def test_several_bricks(op: Op, tmp_path: Path) -> None:
    a, b, secondary = tmp_path / "a", tmp_path / "b", tmp_path / "replica"
    make_tree(a, entries=60, big_sparse=False, big_dir_files=10)
    make_tree(b, entries=60, big_sparse=False, big_dir_files=10)
    secondary.mkdir()
    op("create", "m", a, b, secondary)
    op("start", "m")
    bricks = wait_for(lambda: active(op, "m"), 60, "both bricks Active")
    assert len(bricks) == 2 and len({x["pid"] for x in bricks}) == 2
    (a / "late-a").write_text("a")
    (b / "late-b").write_text("b")
    checkpoint_completed(op, "m")
    assert compare_trees(a, secondary / "a") == []
    assert compare_trees(b, secondary / "b") == []
    states = {x["brick_id"] for x in bricks}
    assert states == set(os.listdir(op.root / "sessions" / "m" / "bricks"))


def test_config_and_failures_commands(op: Op, tmp_path: Path) -> None:
    primary = tmp_path / "p"
    primary.mkdir()
    assert "unknown config key" in op("create", "c", primary, tmp_path / "s",
                                      "--config", "no-such=1", expect=2).stderr
    assert "invalid value" in op("create", "c", primary, tmp_path / "s",
                                 "--config", "sync-jobs=zero", expect=2).stderr
    op("create", "c", primary, tmp_path / "s", "--config", "sync-jobs=4")
    assert "already exists" in op("create", "c", primary, tmp_path / "s", expect=2).stderr
    assert op("config", "c", "sync-jobs").stdout.strip() == "4"
    assert op("config", "c", "timeout").stdout.strip() == "600"
    op("config", "c", "timeout", "30")
    assert op("config", "c", "timeout").stdout.strip() == "30"
    assert "invalid value" in op("config", "c", "log-level", "LOUD", expect=2).stderr
    op("config", "c", "--reset", "timeout")
    assert op("config", "c", "timeout").stdout.strip() == "600"
    listing = op("config", "c").stdout
    for key in KEYS:
        assert re.search(rf"^{re.escape(key)}=", listing, re.M), key
    assert json.loads(op("failures", "c", "--json").stdout)["failures"] == []
    op("checkpoint", "c", "2030-01-02 03:04:05")
    assert "not completed" in op("checkpoint", "c").stdout
    assert "invalid checkpoint" in op("checkpoint", "c", "tomorrow", expect=2).stderr
    doc = op.status("c")
    assert doc["version"] == 1 and doc["node"]["running"] is False
    s = doc["sessions"][0]
    assert s["state"] == "Stopped" and s["checkpoint"]["completed"] is False
    assert "no session named" in op("start", "nope", expect=2).stderr
    op("delete", "c")


def test_help_and_docs() -> None:
    for cmd in COMMANDS:
        proc = subprocess.run([*GEOREP, cmd, "--help"], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and "usage:" in proc.stdout, cmd
    readme = (REPO / "README.md").read_text()
    for cmd in COMMANDS:
        assert f"georep-node {cmd}" in readme, cmd
    config_doc = (REPO / "docs" / "config.md").read_text()
    for key, k in KEYS.items():
        row = [ln for ln in config_doc.splitlines() if ln.startswith(f"| `{key}`")]
        assert row, key
        assert f"`{k.default}`" in row[0] or (not k.default and "(empty)" in row[0]), key
        if not k.used:
            assert "accepted, not yet used" in row[0], key
    status_doc = (REPO / "docs" / "status.md").read_text()
    for f in BRICK_FIELDS:
        assert f"`{f}`" in status_doc, f
    assert (REPO / "contrib" / "georep-node.service").read_text().count(
        "ExecStart=/usr/local/bin/georep-node node --foreground") == 1
