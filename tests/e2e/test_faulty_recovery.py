"""Continuous mode, Faulty and back, driven through the operator CLI with real processes
(node supervisor, workers, recorders, secondary hosts): a worker that crashes, and a
secondary that becomes unusable, show Faulty with a reason naming the cause, and the
session recovers by itself and converges once the cause is gone (docs/recovery.md).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import psutil
import pytest

from actors.status import collect
from tests.e2e import test_operator
from tests.e2e.helpers import wait_for
from tests.e2e.test_operator import Op, active, checkpoint_completed
from tests.support.compare import compare_trees
from tests.support.treegen import make_tree

pytestmark = pytest.mark.timeout(300)

op = test_operator.op  # the fixture: an isolated state root, every process stopped after


def bricks_now(op: Op, name: str) -> list[dict[str, Any]]:
    """The bricks as ``status --json`` shows them, read in-process (the same function):
    fast enough to see a Faulty that lasts one backoff second."""
    return [b for s in collect(str(op.root)) if s["name"] == name for b in s["bricks"]]


def faulty(op: Op, name: str, needle: str) -> str | None:
    for b in bricks_now(op, name):
        if b["status"] == "Faulty" and needle in (b["faulty_reason"] or ""):
            return str(b["faulty_reason"])
    return None


def test_worker_crash_at_a_fault_point_is_faulty_then_restarted(op: Op, tmp_path: Path) -> None:
    """The worker dies (status 137) at ``before_mark`` of its first crawl: nothing was
    marked; the node shows Faulty with the fault's line, restarts it, and it converges."""
    primary, secondary = tmp_path / "p", tmp_path / "s"
    make_tree(primary, entries=300, big_sparse=False, big_dir_files=50)
    marker = tmp_path / "fault-fired"
    op.env["GEOREP_FAULTS"] = f"before_mark:once={marker}"  # inherited by node and workers
    op("create", "fc", primary, secondary)
    op("start", "fc")
    reason = wait_for(lambda: faulty(op, "fc", "fault point before_mark"), 60,
                      "status Faulty with the crash's reason", interval=0.02)
    assert reason.startswith("worker exited with status 137: "), reason
    assert marker.exists()
    bricks = wait_for(lambda: active(op, "fc"), 90, "the restarted worker Active")
    assert bricks[0]["faulty_reason"] is None
    # Seen by the operator's command too, and in the node's log.
    assert [b["status"] for b in op.bricks("fc")] == ["Active"]
    node_log = (op.root / "node.log").read_text()
    assert "worker died session=fc" in node_log and "worker restarted session=fc" in node_log
    (primary / "after-restart").write_bytes(os.urandom(5000))
    checkpoint_completed(op, "fc")
    assert compare_trees(primary, secondary) == []


def test_secondary_disk_gone_is_faulty_until_it_is_back(op: Op, tmp_path: Path) -> None:
    """The secondary's disk goes away (the directory holding its root disappears, and its
    host dies with it): Faulty with a reason naming the root, restarts with backoff while
    it is missing, and by itself Active and converged once it is back, changes made
    meanwhile included."""
    primary, disk = tmp_path / "p", tmp_path / "disk"
    secondary, away = disk / "replica", tmp_path / "disk-away"
    make_tree(primary, entries=300, big_sparse=False, big_dir_files=50)
    disk.mkdir()
    op("create", "sg", primary, secondary)
    op("start", "sg")
    b = wait_for(lambda: active(op, "sg"), 90, "Active")[0]
    checkpoint_completed(op, "sg")
    host = b["resources"]["secondary"]["pid"]
    assert host and psutil.pid_exists(host)
    os.rename(disk, away)
    psutil.Process(host).kill()
    # First the dropped connection (the worker notices while idle), then the missing root:
    # reconnecting fails, the worker exits and the node restarts it with backoff.
    lost = wait_for(lambda: faulty(op, "sg", "lost"), 60, "Faulty: connection lost",
                    interval=0.05)
    assert f"connection to {secondary} lost" in lost, lost
    reason = wait_for(lambda: faulty(op, "sg", "does not exist"), 90,
                      "status Faulty naming the missing secondary root", interval=0.05)
    assert f"secondary root {secondary} does not exist" in reason, reason
    (primary / "while-faulty").mkdir()
    (primary / "while-faulty" / "f").write_bytes(os.urandom(200_000))
    os.rename(primary / "while-faulty" / "f", primary / "while-faulty" / "g")
    # Still Faulty while the root is missing: the node keeps restarting the worker.
    wait_for(lambda: [w for w in _node_workers(op) if w["restarts"] >= 2], 120,
             "a second restart while the root is missing")
    assert faulty(op, "sg", "does not exist") or faulty(op, "sg", "not running") or \
        [x["status"] for x in bricks_now(op, "sg")] == ["Initializing"]
    assert not disk.exists()  # nothing recreated it behind the admin's back
    os.rename(away, disk)
    wait_for(lambda: active(op, "sg"), 120, "Active again once the root is back")
    checkpoint_completed(op, "sg", timeout=120)
    assert compare_trees(primary, secondary) == []
    assert all(x["faulty_reason"] is None for x in op.bricks("sg"))
    assert "crawl=History Crawl" in op.log("sg")  # the same replica: resumed from the marks


def test_secondary_root_recreated_empty_is_walked_again(op: Op, tmp_path: Path) -> None:
    """The secondary root is removed and its host dies; the reconnect creates the root
    again, empty.  The marks describe the old replica: replaying the journal from them
    would leave it nearly empty for good (and checkpoints complete).  The worker must see
    the empty root and walk the tree (Hybrid Crawl) instead."""
    primary, secondary = tmp_path / "p", tmp_path / "s"
    make_tree(primary, entries=300, big_sparse=False, big_dir_files=50)
    op("create", "se", primary, secondary)
    op("start", "se")
    b = wait_for(lambda: active(op, "se"), 90, "Active")[0]
    checkpoint_completed(op, "se")
    shutil.rmtree(secondary)
    psutil.Process(b["resources"]["secondary"]["pid"]).kill()
    wait_for(lambda: "is empty but the primary's is not" in op.log("se"), 90,
             "the worker to see the empty secondary root")
    (primary / "late").write_bytes(b"after the root was recreated")
    checkpoint_completed(op, "se", timeout=120)
    assert compare_trees(primary, secondary) == []


def _node_workers(op: Op) -> list[dict[str, Any]]:
    from actors.node import NodeError, request

    try:
        return list(request(str(op.root), {"op": "workers"}, timeout=10)["workers"])
    except NodeError:
        return []
