"""Where each primary directory is: gfid -> (parent gfid, name), kept on disk.

The live crawl re-checks directories named by gfid in journal records; this map turns a
gfid into a path beneath the brick root.  It is filled by every crawl and kept current
from rename records.  An entry is only a hint: the opened directory's gfid is checked,
and a miss is handled by the caller (re-check later, or fall back to a hybrid crawl),
never silently ignored.  SQLite keeps memory flat whatever the number of directories.
"""

from __future__ import annotations

import os
import sqlite3
import threading

from fsops.constants import ROOT_GFID

#: A chain longer than this is a cycle in stale data, not a real tree (PATH_MAX / 2).
MAX_DEPTH = 2048


class DirMap:
    """Persistent map of directory gfids to their parent gfid and name."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS dirs ("
                             "gfid BLOB PRIMARY KEY, pgfid BLOB NOT NULL, name BLOB NOT NULL)"
                             " WITHOUT ROWID")
        self._pending: list[tuple[bytes, bytes, bytes]] = []

    def close(self) -> None:
        """Write what is pending and close the database."""
        self.flush()
        with self._lock:
            self._db.close()

    def set(self, gfid: bytes, pgfid: bytes, name: bytes) -> None:
        """Record (buffered) that directory ``gfid`` is ``name`` in ``pgfid``."""
        self._pending.append((gfid, pgfid, name))
        if len(self._pending) >= 1000:
            self.flush()

    def flush(self) -> None:
        """Write buffered updates in one transaction."""
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO dirs VALUES (?, ?, ?)", rows)
            self._db.execute("COMMIT")

    def remove(self, gfid: bytes) -> None:
        """Forget a directory."""
        self.flush()
        with self._lock:
            self._db.execute("DELETE FROM dirs WHERE gfid = ?", (gfid,))

    def get(self, gfid: bytes) -> tuple[bytes, bytes] | None:
        """(parent gfid, name) of ``gfid``, or None."""
        self.flush()
        with self._lock:
            row = self._db.execute("SELECT pgfid, name FROM dirs WHERE gfid = ?",
                                   (gfid,)).fetchone()
        return None if row is None else (bytes(row[0]), bytes(row[1]))

    def relpath(self, gfid: bytes) -> bytes | None:
        """Path of directory ``gfid`` relative to the brick root (b"" for the root), or None."""
        parts: list[bytes] = []
        cur = gfid
        for _ in range(MAX_DEPTH):
            if cur == ROOT_GFID:
                return b"/".join(reversed(parts))
            loc = self.get(cur)
            if loc is None:
                return None
            cur, name = loc
            parts.append(name)
        return None

    def __len__(self) -> int:
        self.flush()
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM dirs").fetchone()[0])


def default_state_root() -> str:
    """``$GEOREP_STATE_DIR``, else /var/lib/georep as root, else ~/.local/state/georep."""
    env = os.environ.get("GEOREP_STATE_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/georep"
    return os.path.join(os.path.expanduser("~"), ".local", "state", "georep")


def make_private_dirs(path: str) -> None:
    """Create ``path`` and every missing parent with mode 0700 (``os.makedirs`` gives
    the parents the default mode); existing directories are left as they are."""
    missing: list[str] = []
    cur = os.path.abspath(path)
    while not os.path.isdir(cur):
        missing.append(cur)
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
