"""Channel and server over real pipes: pipelining, errors, handshake failures, backpressure."""

from __future__ import annotations

import errno
import os
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from transport import (
    MAGIC,
    PROTOCOL,
    Channel,
    ConnectionLost,
    HandshakeError,
    NotFound,
    SchemaError,
    ServerConnection,
    encode_frame,
    serve,
    spawn_local,
    write_frame,
)
from transport import channel as channel_module
from transport.channel import discard_prestarted, prestart
from transport.endpoint import local_host_argv
from transport.framing import FrameReader

G1 = b"\x01" * 16
WAIT = 10
REPO = Path(__file__).resolve().parents[2]


def hello_reply(protocol: int = PROTOCOL) -> dict[str, Any]:
    return {"version": "test", "protocol": protocol, "root_dev": 0, "pid": os.getpid(),
            "host": "test"}


class Handler:
    """A tiny secondary: echoes, fails on demand, and can be held to test backpressure."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.seen: list[str] = []

    def __call__(self, method: str, args: dict[str, Any], payload: bytes | None) -> Any:
        self.seen.append(method)
        if method == "hello":
            return hello_reply()
        if method == "stat_gfid":
            return ["f", args["gfid"]]
        if method == "data_write":
            return len(payload or b"")
        if method == "list_dir":
            raise NotFound(f"unknown gfid {args['gfid'].hex()}")
        if method == "data_sigs":
            raise OSError(errno.ENOENT, "No such file or directory")
        if method == "commit":
            raise RuntimeError("applier bug")
        if method == "data_hole":
            assert self.release.wait(WAIT)
        return None


class Pipes:
    """Two os.pipe() pairs: client -> server and server -> client."""

    def __init__(self) -> None:
        c2s_r, c2s_w = os.pipe()
        s2c_r, s2c_w = os.pipe()
        self.server_in: BinaryIO = os.fdopen(c2s_r, "rb", buffering=0)
        self.client_out: BinaryIO = os.fdopen(c2s_w, "wb", buffering=0)
        self.client_in: BinaryIO = os.fdopen(s2c_r, "rb", buffering=0)
        self.server_out: BinaryIO = os.fdopen(s2c_w, "wb", buffering=0)

    def run_server(self, target: Callable[[], Any]) -> Future[Any]:
        """Run ``target`` in a thread; close the server's ends after it, like an exit."""
        done: Future[Any] = Future()

        def main() -> None:
            try:
                done.set_result(target())
            except BaseException as exc:
                done.set_exception(exc)
            finally:
                self.server_out.close()
                self.server_in.close()

        threading.Thread(target=main, daemon=True).start()
        return done

    def channel(self, **kw: Any) -> Channel:
        return Channel(self.client_in, self.client_out, **kw)


@pytest.fixture
def pipes() -> Iterator[Pipes]:
    p = Pipes()
    yield p
    for f in (p.client_in, p.client_out):
        try:
            f.close()
        except OSError:
            pass


@pytest.fixture
def served(pipes: Pipes) -> Iterator[tuple[Channel, Handler, Future[Any], list[str]]]:
    handler = Handler()
    log: list[str] = []
    result = pipes.run_server(lambda: serve(pipes.server_in, pipes.server_out, handler,
                                            on_error_log=log.append))
    chan = pipes.channel(name="test")
    chan.handshake(WAIT)
    yield chan, handler, result, log
    handler.release.set()
    chan.close()


def test_handshake_and_pipelined_calls(served: Any) -> None:
    chan, handler, result, _ = served
    assert chan.peer["protocol"] == PROTOCOL and handler.seen == ["hello"]
    gfids = [i.to_bytes(16, "big") for i in range(2000)]
    futures = [chan.call_async("stat_gfid", {"gfid": g}) for g in gfids]
    assert [f.result(WAIT) for f in futures] == [["f", g] for g in gfids]
    payload = os.urandom(5 << 20)
    assert chan.call("data_write", {"gfid": G1, "offset": 0}, payload, timeout=WAIT) == len(payload)
    stats = chan.stats()
    assert stats["frames_sent"] == stats["frames_received"] == 2002
    assert stats["bytes_sent"] > len(payload) and stats["in_flight"] == 0
    chan.close()
    assert result.result(WAIT) == 0


def test_errors_are_rebuilt(served: Any) -> None:
    chan, _, _, log = served
    with pytest.raises(NotFound, match="unknown gfid 0101"):
        chan.call("list_dir", {"gfid": G1}, timeout=WAIT)
    with pytest.raises(FileNotFoundError) as info:
        chan.call("data_sigs", {"gfid": G1, "offset": 0, "length": 1, "block": 1}, timeout=WAIT)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(RuntimeError, match="applier bug"):
        chan.call("commit", timeout=WAIT)
    assert log == ["georep secondary: commit failed: RuntimeError('applier bug')"]
    assert chan.call("ping", timeout=WAIT) is None  # the connection survives errors


def test_client_validates_before_sending(served: Any) -> None:
    chan, handler, _, _ = served
    with pytest.raises(SchemaError, match="unknown method"):
        chan.call_async("rm_rf", {})
    with pytest.raises(SchemaError, match="op 0"):
        chan.call_async("ops", {"ops": [{"op": "delete", "gfid": G1}]})
    assert chan.stats()["frames_sent"] == 1 and handler.seen == ["hello"]


def test_server_rejects_bad_args_and_continues(pipes: Pipes) -> None:
    log: list[str] = []
    result = pipes.run_server(lambda: serve(pipes.server_in, pipes.server_out, Handler(),
                                            on_error_log=log.append))
    assert pipes.client_in.read(16) == MAGIC
    reader = FrameReader(pipes.client_in)
    bad = {"t": "q", "id": 7, "m": "ops", "a": {"ops": [{"op": "meta", "gfid": b"x"}]}}
    write_frame(pipes.client_out, encode_frame(bad))
    write_frame(pipes.client_out, encode_frame({"t": "q", "id": 8, "m": "ping", "a": {}}))
    first, second = reader.read(), reader.read()
    assert first is not None and second is not None
    assert first[0]["id"] == 7 and first[0]["e"]["type"] == "SchemaError"
    assert "op 0: meta: missing field 'meta'" in first[0]["e"]["message"]
    assert second[0] == {"t": "r", "id": 8, "r": None}
    pipes.client_out.close()
    assert result.result(WAIT) == 0 and log == []


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\n\r\n",
    encode_frame({"t": "q", "id": "one", "m": "ping", "a": {}})[0],
    encode_frame({"t": "q", "id": 1, "m": "ping"})[0],
    b"GR\0\0\0\0\0\x05",
])
def test_server_protocol_error_is_one_line_and_nonzero(pipes: Pipes, garbage: bytes) -> None:
    log: list[str] = []
    result = pipes.run_server(lambda: serve(pipes.server_in, pipes.server_out, Handler(),
                                            on_error_log=log.append))
    pipes.client_out.write(bytes(garbage))
    pipes.client_out.close()
    assert result.result(WAIT) == 2
    assert len(log) == 1 and log[0].startswith("georep secondary: protocol error: ")
    assert "\n" not in log[0]


def fake_secondary(pipes: Pipes, stdout_bytes: bytes, *, then_close: bool = True) -> None:
    pipes.server_out.write(stdout_bytes)
    if then_close:
        pipes.server_out.close()


def test_junk_before_magic(pipes: Pipes) -> None:
    fake_secondary(pipes, b"Welcome to Ubuntu 22.04 LTS\n" + MAGIC, then_close=False)
    with pytest.raises(HandshakeError, match=r"junk on stdout before the handshake: b'Welcome"):
        pipes.channel().handshake(WAIT)


def test_short_junk_then_hang_is_reported_at_once(pipes: Pipes) -> None:
    fake_secondary(pipes, b"hi\n", then_close=False)
    with pytest.raises(HandshakeError, match=r"junk .*b'hi\\n'"):
        pipes.channel().handshake(WAIT)


@pytest.mark.parametrize("sent", [b"", MAGIC[:5]])
def test_eof_before_magic(pipes: Pipes, sent: bytes) -> None:
    fake_secondary(pipes, sent)
    with pytest.raises(HandshakeError, match="secondary exited before the handshake"):
        pipes.channel().handshake(WAIT)


def test_handshake_timeout(pipes: Pipes) -> None:
    with pytest.raises(HandshakeError, match=r"within 0\.2s"):
        pipes.channel().handshake(0.2)


def test_protocol_mismatch(pipes: Pipes) -> None:
    pipes.run_server(lambda: serve(pipes.server_in, pipes.server_out,
                                   lambda m, a, p: hello_reply(protocol=99),
                                   on_error_log=lambda line: None))
    with pytest.raises(HandshakeError, match=f"primary speaks {PROTOCOL}, secondary speaks 99"):
        pipes.channel().handshake(WAIT)


def start_scripted_server(pipes: Pipes, script: Callable[[ServerConnection], None]) -> Future[Any]:
    def main() -> None:
        conn = ServerConnection(pipes.server_in, pipes.server_out)
        conn.announce()
        req = conn.read_request()
        assert req is not None and req.method == "hello"
        conn.send_reply(req.id, hello_reply())
        script(conn)

    return pipes.run_server(main)


def test_connection_lost_fails_pending_futures(pipes: Pipes) -> None:
    def read_three_and_exit(conn: ServerConnection) -> None:
        for _ in range(3):
            assert conn.read_request() is not None

    server = start_scripted_server(pipes, read_three_and_exit)
    closed: Future[str] = Future()
    chan = pipes.channel(on_closed=closed.set_result)
    chan.handshake(WAIT)
    futures = [chan.call_async("ping", {}) for _ in range(3)]
    server.result(WAIT)
    reason = closed.result(WAIT)
    assert "closed the connection" in reason
    for f in futures:
        with pytest.raises(ConnectionLost, match="closed the connection"):
            f.result(WAIT)
    with pytest.raises(ConnectionLost):
        chan.call_async("ping", {})
    assert chan.closed and chan.in_flight == 0


def test_garbage_reply_is_a_lost_connection(pipes: Pipes) -> None:
    def garbage(conn: ServerConnection) -> None:
        assert conn.read_request() is not None
        pipes.server_out.write(b"GRxxxxxxxxxx")
        assert pipes.server_in.read() == b""  # wait for the client to hang up

    pipes_server = start_scripted_server(pipes, garbage)
    closed: Future[str] = Future()
    chan = pipes.channel(on_closed=closed.set_result)
    chan.handshake(WAIT)
    fut = chan.call_async("ping", {})
    with pytest.raises(ConnectionLost, match="protocol error"):
        fut.result(WAIT)
    assert "protocol error" in closed.result(WAIT)
    chan.close()
    pipes_server.result(WAIT)


def test_replies_out_of_order_from_other_threads(pipes: Pipes) -> None:
    def reverse(conn: ServerConnection) -> None:
        reqs = [conn.read_request() for _ in range(50)]
        threads = [threading.Thread(target=conn.send_reply, args=(r.id, r.args["gfid"]))
                   for r in reversed(reqs) if r is not None]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert conn.read_request() is None

    server = start_scripted_server(pipes, reverse)
    chan = pipes.channel()
    chan.handshake(WAIT)
    gfids = [bytes([i]) * 16 for i in range(50)]
    futures = [chan.call_async("stat_gfid", {"gfid": g}) for g in gfids]
    assert [f.result(WAIT) for f in futures] == gfids
    chan.close()
    server.result(WAIT)


def test_unencodable_result_becomes_an_error_reply(pipes: Pipes) -> None:
    result = pipes.run_server(lambda: serve(
        pipes.server_in, pipes.server_out,
        lambda m, a, p: hello_reply() if m == "hello" else {1, 2},
        on_error_log=lambda line: None))
    chan = pipes.channel()
    chan.handshake(WAIT)
    with pytest.raises(Exception, match="cannot encode the reply") as info:
        chan.call("ping", timeout=WAIT)
    assert type(info.value).__name__ == "SecondaryError"
    chan.close()
    assert result.result(WAIT) == 0


def test_max_in_flight_backpressure(pipes: Pipes) -> None:
    handler = Handler()
    result = pipes.run_server(lambda: serve(pipes.server_in, pipes.server_out, handler))
    chan = pipes.channel(max_in_flight=4)
    chan.handshake(WAIT)
    hole = {"gfid": G1, "offset": 0, "length": 1}
    held = [chan.call_async("data_hole", hole) for _ in range(4)]
    assert chan.in_flight == 4
    with pytest.raises(TimeoutError, match="too many requests in flight"):
        chan.call_async("ping", {}, timeout=0.2)
    unblocked: Future[Any] = Future()
    threading.Thread(target=lambda: unblocked.set_result(
        chan.call_async("ping", {}, timeout=WAIT)), daemon=True).start()
    assert not unblocked.done()
    handler.release.set()
    assert [f.result(WAIT) for f in held] == [None] * 4
    assert unblocked.result(WAIT).result(WAIT) is None
    chan.close()
    assert result.result(WAIT) == 0


SERVER_SCRIPT = textwrap.dedent("""
    import os, sys
    from transport import PROTOCOL, claim_stdio, serve

    stdin, stdout = claim_stdio()
    print("stray print goes to stderr")

    def handler(method, args, payload):
        if method == "hello":
            return {"version": "t", "protocol": PROTOCOL, "root_dev": 0, "pid": os.getpid(),
                    "host": "local"}
        sys.stderr.write("handling %s\\n" % method)
        sys.stderr.flush()
        return len(payload or b"")

    sys.exit(serve(stdin, stdout, handler))
""")


def test_real_subprocess_with_stderr_relay() -> None:
    lines: list[bytes] = []
    got_ping = threading.Event()

    def on_stderr(line: bytes) -> None:
        lines.append(line)
        if line == b"handling ping":
            got_ping.set()

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc, chan = spawn_local([sys.executable, "-c", SERVER_SCRIPT], stderr_handler=on_stderr,
                             env=env)
    try:
        peer = chan.handshake(WAIT)
        assert peer["pid"] == proc.pid
        data = os.urandom(3 << 20)
        assert chan.call("data_write", {"gfid": G1, "offset": 0}, data, timeout=WAIT) == len(data)
        assert chan.call("ping", timeout=WAIT) == 0
        assert got_ping.wait(WAIT)
        chan.close()
        assert proc.wait(WAIT) == 0
        assert b"stray print goes to stderr" in lines
        assert b"handling data_write" in lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)


def test_prestarted_process_is_taken_by_the_first_spawn_of_its_argv(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    argv = [sys.executable, "-c", SERVER_SCRIPT]
    prestart(argv)
    early = channel_module._prestarted[tuple(argv)]
    procs = []
    try:
        proc, chan = spawn_local(argv, stderr_handler=lambda _line: None)
        procs.append(proc)
        assert proc is early
        assert chan.handshake(WAIT)["pid"] == early.pid
        assert chan.call("ping", timeout=WAIT) == 0
        # Taken once: the next spawn of that argv (a reconnect) starts a new process.
        again, chan2 = spawn_local(argv, stderr_handler=lambda _line: None)
        procs.append(again)
        assert again.pid != early.pid and chan2.handshake(WAIT)["pid"] == again.pid
        chan.close()
        chan2.close()
        assert proc.wait(WAIT) == 0 and again.wait(WAIT) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(WAIT)
        discard_prestarted()


def test_an_unclaimed_prestarted_host_touches_nothing(tmp_path: Path) -> None:
    """A secondary host started ahead that no connect takes (the sync failed first) exits
    cleanly at discard_prestarted, without having created its root."""
    root = tmp_path / "never"
    prestart(local_host_argv(str(root)))
    proc = channel_module._prestarted[tuple(local_host_argv(str(root)))]
    discard_prestarted()
    assert proc.returncode == 0
    assert not root.exists()
    assert channel_module._prestarted == {}
