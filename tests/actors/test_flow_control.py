"""Flow control between the Crawler and the secondary (actors/batcher.Credits).

The worker's memory is bounded by what is in flight, so these tests count it: credits
are ops and inline bytes, they are held from the Crawler's hand-over until the batch's
reply, and a whole sync of a tree many times larger than the budget never holds more
than the budget (or one directory larger than it, alone).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest

from actors.batcher import Batcher, Credits, cost
from actors.ledger import Ledger
from actors.supervisor import Supervisor, SyncOptions
from tests.support.compare import compare_trees
from tests.transport.test_channel import Pipes, hello_reply
from transport import serve

WAIT = 10.0

pytestmark = pytest.mark.timeout(300)


# -- the budget itself ------------------------------------------------------------------------


def test_credits_block_over_the_budget_and_come_back_on_release() -> None:
    c = Credits(max_ops=100, max_bytes=1000)
    assert c.acquire(60, 400, timeout=0)
    assert not c.acquire(50, 0, timeout=0)       # 110 ops > 100
    assert not c.acquire(1, 700, timeout=0)      # 1100 bytes > 1000
    assert c.acquire(40, 600, timeout=0)         # exactly the budget
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(c.acquire(30, 0, timeout=WAIT)))
    waiter.start()
    c.release(60, 400)
    waiter.join(WAIT)
    assert got == [True]
    assert (c.ops, c.bytes) == (70, 600)
    assert (c.peak_ops, c.peak_bytes) == (100, 1000)


def test_a_cost_larger_than_the_budget_goes_alone() -> None:
    c = Credits(max_ops=100)
    assert c.acquire(5, timeout=0)
    assert not c.acquire(5000, timeout=0)        # waits until nothing else is held
    c.release(5)
    assert c.acquire(5000, timeout=0)            # one huge directory, by itself
    assert not c.acquire(1, timeout=0)           # and nothing beside it
    c.release(5000)
    assert c.peak_ops == 5000


def test_releasing_more_than_was_taken_is_a_bug() -> None:
    c = Credits(max_ops=10)
    c.acquire(3)
    with pytest.raises(RuntimeError):
        c.release(4)


def test_cost_counts_ops_jobs_and_inline_bytes() -> None:
    ops = [{"op": "ensure", "data": b"x" * 100}, {"op": "ensure", "data": b""}, {"op": "meta"}]
    assert cost(ops, []) == (3, 100)
    assert cost([], []) == (1, 0)                # an add with nothing still counts


# -- the Batcher holds them until the secondary answers -------------------------------------


class HeldSecondary:
    """A test secondary on real pipes that answers ``ops`` only when released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.batches: list[int] = []

    def __call__(self, method: str, args: dict[str, Any], payload: bytes | None) -> Any:
        if method == "hello":
            return hello_reply()
        if method == "ops":
            self.batches.append(len(args["ops"]))
            assert self.release.wait(WAIT)
            return [{"s": "kept"} for _ in args["ops"]]
        raise AssertionError(f"unexpected {method}")


@pytest.fixture
def held() -> Iterator[tuple[HeldSecondary, Any]]:
    """A channel to a secondary that holds every ``ops`` reply until ``release`` is set."""
    pipes = Pipes()
    sec = HeldSecondary()
    pipes.run_server(lambda: serve(pipes.server_in, pipes.server_out, sec))
    chan = pipes.channel(name="held")
    chan.handshake(WAIT)
    try:
        yield sec, chan
    finally:
        sec.release.set()
        chan.close()


def test_batcher_gives_credits_back_only_when_the_batch_is_answered(
        held: tuple[HeldSecondary, Any]) -> None:
    sec, chan = held
    credits = Credits(max_ops=100)
    ledger = Ledger(None)
    batcher = Batcher.start(chan, ledger, [], credits, max_ops=50).proxy()
    try:
        ops = [{"op": "meta", "gfid": i.to_bytes(16, "big"), "meta": {}} for i in range(1, 61)]
        credit = cost(ops, [])
        assert credits.acquire(*credit, timeout=0)
        batcher.add(ops, [b"f%d" % i for i in range(60)], [], None, credit).get(timeout=WAIT)
        batcher.flush().get(timeout=WAIT)
        # Sent, not answered: still held, and a second directory of 60 ops must wait.
        assert credits.ops == 60
        assert not credits.acquire(60, timeout=0)
        sec.release.set()
        assert credits.acquire(60, timeout=WAIT)
        assert ledger.counters.get("meta") == 60  # accounted before the credits came back
    finally:
        sec.release.set()
        batcher.actor_ref.stop()


def test_a_stopped_batcher_returns_what_it_held(held: tuple[HeldSecondary, Any]) -> None:
    sec, chan = held
    credits = Credits(max_ops=100)
    ref = Batcher.start(chan, Ledger(None), [], credits, max_ops=1000)
    try:
        ops = [{"op": "meta", "gfid": b"\x01" * 16, "meta": {}}]
        assert credits.acquire(1, timeout=0)
        # The Batcher sends at once while nothing of its own is in flight: this batch is
        # sent and held by the secondary ...
        ref.proxy().add(ops, [b"x"], [], None, (1, 0)).get(timeout=WAIT)
        assert credits.ops == 1
        # ... so the next add waits in the Batcher for a fuller batch.
        assert credits.acquire(2, timeout=0)
        ref.proxy().add(ops * 2, [b"y", b"z"], [], None, (2, 0)).get(timeout=WAIT)
        assert credits.ops == 3
        ref.stop()
        assert credits.ops == 1                   # queued: given back, a Crawler goes on
        sec.release.set()                         # sent: given back once answered
        deadline = time.monotonic() + WAIT
        while credits.ops and time.monotonic() < deadline:
            time.sleep(0.01)
        assert credits.ops == 0
    finally:
        sec.release.set()


# -- a whole sync stays under the budget ----------------------------------------------------


def _tree(root: Path, dirs: int, files: int, huge: int = 0) -> int:
    """``dirs`` directories of ``files`` small files (and one of ``huge``): entries made."""
    n = 0
    for d in range(dirs):
        sub = root / f"d{d:03d}"
        sub.mkdir(parents=True)
        n += 1
        for f in range(files):
            (sub / f"f{f:04d}").write_bytes(b"x" * (f % 7))
            n += 1
    if huge:
        big = root / "huge"
        big.mkdir()
        n += 1
        for f in range(huge):
            os.close(os.open(big / f"h{f:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
            n += 1
    return n


def _sync(tmp_path: Path, primary: Path, budget: int) -> dict[str, int]:
    opts = SyncOptions(primary=str(primary), secondary=str(tmp_path / "secondary"),
                       state_dir=str(tmp_path / "state"), timeout=120,
                       max_ops_in_flight=budget)
    sup = Supervisor.start(opts)
    try:
        summary = sup.proxy().run_once().get(timeout=240)
    finally:
        sup.stop()
        pykka.ActorRegistry.stop_all(block=True, timeout=30)
    assert summary.ok, [f.line() for f in summary.failures]
    assert compare_trees(primary, tmp_path / "secondary") == []
    return summary.counters


def test_ops_in_flight_stay_under_the_budget_whatever_the_tree_size(tmp_path: Path) -> None:
    primary = tmp_path / "primary"
    entries = _tree(primary, dirs=40, files=120)
    c = _sync(tmp_path, primary, budget=300)
    assert c["created"] == entries >= 15 * 300
    # Held credits were counted (the crawl went through them) and never passed the budget,
    # although the tree is 16 times larger and each directory is 121 ops.
    assert 0 < c["peak_ops_in_flight"] <= 300


def test_one_huge_directory_goes_alone(tmp_path: Path) -> None:
    primary = tmp_path / "primary"
    entries = _tree(primary, dirs=10, files=50, huge=3000)
    c = _sync(tmp_path, primary, budget=300)
    assert c["created"] == entries
    # The 3,000-entry directory is one add of 3,000 ensures + its meta + nothing beside it:
    # the bound is max(budget, largest directory), not the budget times anything.
    assert 300 < c["peak_ops_in_flight"] <= 3000 + 2
