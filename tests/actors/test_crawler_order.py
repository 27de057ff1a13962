"""Which directory the Crawler takes next (``Crawler._next``): the topmost of the
prefetch window whose secondary listing is already here, so a listing queued behind a
large one does not hold the walk up; otherwise the top of the stack."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

from actors.crawler import PREFETCH, Crawler, _Todo


def _todo(state: str) -> _Todo:
    """A todo whose listing is "ready", "pending", or not needed ("new")."""
    if state == "new":
        return _Todo(sub=None, listing=None, needs_listing=False)  # type: ignore[arg-type]
    fut: Future[Any] = Future()
    if state == "ready":
        fut.set_result({"entries": []})
    return _Todo(sub=None, listing=fut, needs_listing=True)  # type: ignore[arg-type]


def _take(stack: list[_Todo]) -> _Todo:
    return Crawler._next(SimpleNamespace(stack=stack))  # type: ignore[arg-type]


def test_the_top_goes_first_when_it_is_ready() -> None:
    stack = [_todo("ready"), _todo("ready")]
    top = stack[-1]
    assert _take(stack) is top and len(stack) == 1


def test_a_ready_directory_goes_before_a_pending_top() -> None:
    ready, pending1, pending2 = _todo("ready"), _todo("pending"), _todo("pending")
    stack = [_todo("ready"), ready, pending1, pending2]
    assert _take(stack) is ready  # the topmost ready one, not the deeper one
    assert stack[1:] == [pending1, pending2]


def test_a_new_directory_needs_no_listing() -> None:
    new = _todo("new")
    stack = [new, _todo("pending")]
    assert _take(stack) is new


def test_nothing_ready_takes_the_top() -> None:
    stack = [_todo("pending"), _todo("pending")]
    top = stack[-1]
    assert _take(stack) is top


def test_only_the_prefetch_window_is_searched() -> None:
    # Below the window nothing was asked for yet: taking it would not save a wait, and
    # would turn the walk away from depth-first.
    stack = [_todo("ready"), *(_todo("pending") for _ in range(PREFETCH))]
    top = stack[-1]
    assert _take(stack) is top
    assert len(stack) == PREFETCH
