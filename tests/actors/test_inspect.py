"""Actor introspection (actors/inspect.py) and the control socket (actors/control.py)."""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest

from actors.control import (
    ControlClient,
    ControlError,
    ControlServer,
    Restarts,
    RoundStop,
    is_paused,
    set_paused,
)
from actors.inspect import RECENT, Inspectable, find_actors, snapshot_actors
from actors.shell import Shell, ShellError, resolve_socket, table


class Worker(Inspectable, pykka.ThreadingActor):
    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.gate = gate

    def work(self, n: int) -> int:
        return n * 2

    def block(self, entered: threading.Event) -> None:
        entered.set()
        assert self.gate is not None
        self.gate.wait(10)

    def fail(self) -> None:
        raise ValueError("bad input")

    def inspect_extra(self) -> dict[str, Any]:
        return {"gate": self.gate is not None}


@pytest.fixture(autouse=True)
def _stop_actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all(block=True, timeout=10)


def row(name: str, **kw: Any) -> dict[str, Any]:
    rows = [r for r in snapshot_actors(**kw) if r["name"] == name]
    assert len(rows) == 1, snapshot_actors()
    return rows[0]


def test_counts_recent_messages_and_extras() -> None:
    w = Worker.start().proxy()
    for i in range(RECENT + 5):
        assert w.work(i).get(timeout=5) == 2 * i
    r = row("Worker", detail=True)
    assert r["state"] == "idle" and r["mailbox"] == 0 and r["in_hand"] is None
    assert r["handled"] == RECENT + 5
    assert r["counts"] == {"work": RECENT + 5}
    assert len(r["recent"]) == RECENT
    assert all(m["method"] == "work" and m["seconds"] >= 0 for m in r["recent"])
    assert r["extra"] == {"gate": False}
    assert r["last_error"] is None


def test_last_error_is_kept() -> None:
    w = Worker.start().proxy()
    with pytest.raises(ValueError):
        w.fail().get(timeout=5)
    r = row("Worker", detail=True)
    assert r["last_error"]["type"] == "ValueError"
    assert r["last_error"]["message"] == "bad input"
    assert r["recent"][-1]["failed"] is True


def test_snapshot_of_a_busy_actor_does_not_wait_for_it() -> None:
    gate, entered = threading.Event(), threading.Event()
    w = Worker.start(gate).proxy()
    w.block.defer(entered)
    assert entered.wait(5)
    for i in range(3):
        w.work.defer(i)
    try:
        r = row("Worker")  # answers while the actor is stuck in block()
        assert r["state"] == "busy" and r["in_hand"] == "block"
        assert r["in_hand_age"] >= 0
        assert r["mailbox"] == 3
    finally:
        gate.set()


def test_several_actors_of_a_class_are_numbered() -> None:
    Worker.start()
    Worker.start()
    names = sorted(r["name"] for r in snapshot_actors())
    assert names == ["Worker#1", "Worker#2"]
    assert len(find_actors("Worker")) == 2
    assert len(find_actors("worker#2")) == 1


def test_pipeline_actors_are_inspectable() -> None:
    from actors.batcher import Batcher
    from actors.crawler import Crawler
    from actors.remote import RemoteProxy
    from actors.secondary_host import EntryApplier, Lister
    from actors.supervisor import Supervisor
    from actors.syncer import Syncer

    for cls in (Supervisor, Crawler, Batcher, Syncer, RemoteProxy, EntryApplier, Lister):
        assert issubclass(cls, Inspectable), cls


def test_round_stop_follows_the_stop_and_restart_requests() -> None:
    stop, restarts = threading.Event(), Restarts()
    rs = RoundStop(stop, restarts)
    assert not rs.is_set() and not rs.wait(0.05)
    gen = restarts.request("pipeline")
    assert rs.is_set()
    assert restarts.take() == "pipeline" and not rs.is_set()
    restarts.started()
    assert restarts.wait_beyond(gen, 1)
    restarts.request("connection")
    restarts.request("pipeline")  # the wider scope wins
    assert restarts.take() == "connection"
    stop.set()
    assert rs.wait(5)


def test_pause_file(tmp_path: Path) -> None:
    assert not is_paused(str(tmp_path))
    set_paused(str(tmp_path), True)
    assert (tmp_path / "paused").exists() and is_paused(str(tmp_path))
    set_paused(str(tmp_path), False)
    set_paused(str(tmp_path), False)
    assert not is_paused(str(tmp_path))


# -- the control socket -----------------------------------------------------------------------

@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    def handler(method: str, args: dict[str, Any]) -> Any:
        if method == "actors":
            return {"session": "s", "worker": snapshot_actors(), "secondary_actors": None,
                    "secondary_error": "not connected"}
        if method in ("restart", "actor"):
            raise ControlError(f"cannot {method} {args['name']!r}")
        return {"method": method, "args": args}

    # A deep directory: the socket path is longer than sockaddr_un holds.
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    srv = ControlServer(str(deep / "control.sock"), handler)
    srv.start()
    yield srv
    srv.close()


def test_control_socket_mode_and_requests(server: ControlServer) -> None:
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    Worker.start()
    c = ControlClient(server.path)
    try:
        r = c.call("actors")
        assert [a["name"] for a in r["worker"]] == ["Worker"]
        assert c.call("pause") == {"method": "pause", "args": {}}
        with pytest.raises(ControlError, match="unknown request 'shutdown'"):
            c.call("shutdown")
        with pytest.raises(ControlError, match="unknown field"):
            c.call("pause", {"now": True})
        with pytest.raises(ControlError, match="missing field 'name'"):
            c.call("actor")
        with pytest.raises(ControlError, match="cannot restart 'X'"):
            c.call("restart", {"name": "X"})
        assert c.call("batches")["method"] == "batches"  # the connection survived errors
    finally:
        c.close()


def test_second_server_on_a_live_socket_is_refused(server: ControlServer) -> None:
    other = ControlServer(server.path, lambda m, a: None)
    with pytest.raises(OSError, match="another worker"):
        other.start()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # a worker that died leaves its socket file behind, nobody listening
    dead.close()
    assert os.path.exists(path)
    second = ControlServer(path, lambda m, a: "second")
    second.start()
    try:
        c = ControlClient(path)
        assert c.call("batches") == "second"
        c.close()
    finally:
        second.close()
    assert not os.path.exists(path)


def test_shell_formats_and_resolves(server: ControlServer) -> None:
    Worker.start()
    sh = Shell(server.path)
    try:
        out = sh.run("actors")
        assert out is not None
        assert "MAILBOX" in out and "Worker" in out
        assert "secondary: unavailable (not connected)" in out
        assert sh.run("quit") is None
        with pytest.raises(ShellError, match="usage: actor NAME"):
            sh.run("actor")
        with pytest.raises(ShellError, match="unknown command"):
            sh.run("frobnicate")
    finally:
        sh.close()
    assert resolve_socket(None, server.path) == server.path
    assert resolve_socket(None, os.path.dirname(server.path)) == server.path


def test_socket_by_session_name(tmp_path: Path) -> None:
    root = tmp_path / "state"
    for name in ("one", "two"):
        (root / "sessions" / name / "bricks" / "b1").mkdir(parents=True)
    srv = ControlServer(str(root / "sessions" / "one" / "bricks" / "b1" / "control.sock"),
                        lambda m, a: None)
    srv.start()
    try:
        assert resolve_socket("one", None, str(root)) == srv.path
        assert resolve_socket(None, None, str(root)) == srv.path  # the only one running
        with pytest.raises(ShellError, match="no running session named 'two'"):
            resolve_socket("two", None, str(root))
    finally:
        srv.close()
    with pytest.raises(ShellError, match="no running session under"):
        resolve_socket(None, None, str(root))


def test_table_aligns_columns() -> None:
    out = table(("A", "LONGER"), [("xxxx", 1), (None, 2.5)])
    lines = out.splitlines()
    assert lines[0] == "A     LONGER"
    assert lines[1] == "xxxx  1"
    assert lines[2] == "-     2.500"


def test_shell_reads_plain_lines_without_a_tty(server: ControlServer,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from actors.shell import run_shell

    Worker.start()
    monkeypatch.setattr("sys.stdin", io.StringIO("actors\nnonsense\nquit\nactors\n"))
    assert run_shell(None, socket_path=server.path) == 0
    out = capsys.readouterr().out
    assert out.count("MAILBOX") == 1  # nothing after quit
    assert "error: unknown command 'nonsense'" in out
    assert run_shell(None, socket_path=server.path, command="actor Nobody") == 1
    assert run_shell(None, socket_path=server.path + ".nope", command="actors") == 2
