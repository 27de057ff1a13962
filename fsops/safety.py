"""Safety stop: never mistake an unmounted or emptied primary for a mass delete.

Checked at the start of every ``sync --once`` pass and of every live round (and every
few seconds while idle).  The primary root halts the session when it

- vanished (ENOENT, or any error stat-ing it: EIO, ENOTCONN of a dead FUSE mount),
- is no longer a directory (changed type),
- is on another device than at the first sync (``root_dev`` recorded in the session's
  ``state.json``: an unmounted disk leaves the mount point on the parent filesystem),
- was replaced since the worker opened it (continuous mode: another inode at the path),
- is empty while the secondary root is not (an empty mount point, a bind mount over it).

The empty case counts what would be deleted: the secondary answers ``count`` with a
recursive walk (symlinks not followed, ``.georep`` excluded; at most 10 million).
``allow_empty`` (``sync --allow-empty-primary``, session key ``allow_empty_primary``)
confirms that the change is wanted; the device recorded is then updated.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from typing import Any

from fsops.constants import META_DIR

STATE_FILE = "state.json"
CONFIRM = "run with --allow-empty-primary to confirm"


class SafetyStop(Exception):
    """The primary root looks unmounted, emptied or replaced: nothing is done."""


def load_state(state_dir: str | None) -> dict[str, Any]:
    """The session's ``state.json`` ({} when absent or unreadable)."""
    if not state_dir:
        return {}
    try:
        with open(os.path.join(state_dir, STATE_FILE), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_state(state_dir: str, state: dict[str, Any]) -> None:
    """Rewrite ``state.json`` atomically (other keys are kept by the caller)."""
    path = os.path.join(state_dir, STATE_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def primary_is_empty(path: str | bytes) -> bool:
    """True when the directory holds nothing but georep's own ``.georep``."""
    with os.scandir(path) as it:
        for de in it:
            if os.fsencode(de.name) != META_DIR:
                return False
    return True


def check_root(path: str, *, state_dir: str | None = None, root_fd: int | None = None,
               allow_empty: bool = False) -> os.stat_result:
    """The checks that need only the primary (no emptiness check); returns its stat."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SafetyStop(f"primary root {path} has vanished (ENOENT); looks unmounted or "
                         "removed; nothing is synced until it is back")
    except OSError as e:
        raise SafetyStop(f"primary root {path} cannot be read ({e.strerror}); looks "
                         "unmounted; nothing is synced until it is back")
    if not stat.S_ISDIR(st.st_mode):
        raise SafetyStop(f"primary root {path} is no longer a directory (changed type); "
                         "nothing is synced until it is back")
    if root_fd is not None:
        fst = os.fstat(root_fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise SafetyStop(f"primary root {path} was replaced (another directory, or "
                             "a mount, at its path) while the worker ran")
    recorded = load_state(state_dir).get("root_dev")
    if isinstance(recorded, int) and recorded != st.st_dev and not allow_empty:
        raise SafetyStop(f"primary root {path} is on another device than at the first sync "
                         f"(st_dev {recorded} -> {st.st_dev}); looks unmounted or replaced; "
                         f"refusing to sync ({CONFIRM})")
    return st


def check_primary(path: str, *, secondary_root_entries: Callable[[], int],
                  secondary_count: Callable[[], tuple[int, bool]],
                  state_dir: str | None = None, root_fd: int | None = None,
                  allow_empty: bool = False) -> None:
    """Raise :class:`SafetyStop` when syncing ``path`` now could delete the secondary.

    ``secondary_root_entries()``: entries in the secondary root's listing (asked only
    when the primary root is empty); ``secondary_count()``: (recursive count, complete).
    Records the root's device in ``state.json`` at the first sync.
    """
    st = check_root(path, state_dir=state_dir, root_fd=root_fd, allow_empty=allow_empty)
    if not allow_empty and primary_is_empty(path) and secondary_root_entries() > 0:
        n, complete = secondary_count()
        count = f"{n:,}" if complete else f"at least {n:,}"
        raise SafetyStop(f"primary root {path} looks unmounted or emptied; refusing to "
                         f"delete {count} entries on the secondary (counted recursively; "
                         f"{CONFIRM})")
    if state_dir:
        state = load_state(state_dir)
        if state.get("root_dev") != st.st_dev:
            state["root_dev"] = st.st_dev
            try:
                save_state(state_dir, state)
            except OSError:
                pass  # no device check next time; the emptiness check still holds
