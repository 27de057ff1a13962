"""The secondary's session lock: ``<root>/.georep/lock``, one primary session per root.

The lock is an ``fcntl.flock`` on an open fd held for the life of the secondary host
process, so the kernel releases it when the holder dies, however it dies.  The file
also holds a small JSON record (who holds it, since when, and a heartbeat the holder
rewrites every few seconds) so a refusal can name the holder.

Taking over a lock whose holder is alive (``sync --force``, or a heartbeat older than
the secondary's timeout: a stuck holder) cannot break the holder's flock.  Instead the
new holder writes its record to a fresh file, locks it and renames it over ``lock``;
the old holder compares the record at ``lock`` with its own on each heartbeat and exits
when it is no longer the owner.  Every acquisition re-checks that the file it locked is
still the one named ``lock``, so two contenders never both believe they hold it.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from fsops.constants import META_DIR

__all__ = ["LockInfo", "Locked", "SessionLock"]

log = logging.getLogger("georep.secondary.lock")

LOCK_NAME = b"lock"
#: O_NONBLOCK: a FIFO planted at the name must not hang the open.
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: How long a reconnecting session waits for its own previous host process to exit.
SAME_SESSION_GRACE = 15.0
_MAX_RECORD = 64 << 10


@dataclass(slots=True)
class LockInfo:
    """The JSON record kept in the lock file."""

    session: str
    host: str
    primary: str
    pid: int
    since: float
    heartbeat: float
    token: str = field(default_factory=lambda: secrets.token_hex(8))

    def describe(self) -> str:
        """``session S from host H (primary /p) since 2026-...``."""
        since = datetime.datetime.fromtimestamp(self.since, datetime.UTC)
        return (f"session {self.session} from host {self.host or '?'} "
                f"(primary {self.primary or '?'}) since {since:%Y-%m-%d %H:%M:%S} UTC")


class Locked(Exception):
    """The root is locked by another live session; ``info`` is the holder's record."""

    def __init__(self, root: str, info: LockInfo | None) -> None:
        self.root, self.info = root, info
        who = info.describe() if info else "another process (no readable record)"
        hint = "" if info is None else (
            f"; its host process is pid {info.pid}, heartbeat "
            f"{max(0.0, time.time() - info.heartbeat):.0f} s ago; pass --force to take it "
            "over if that session is dead")
        super().__init__(f"secondary {root} is locked by {who}{hint}")


def _read_record(fd: int) -> LockInfo | None:
    try:
        raw = os.pread(fd, _MAX_RECORD, 0)
        d = json.loads(raw.decode("utf-8"))
        return LockInfo(**{k: d[k] for k in LockInfo.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_record(fd: int, info: LockInfo) -> None:
    data = json.dumps(asdict(info), sort_keys=True).encode() + b"\n"
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def _meta_dir(root_fd: int) -> int:
    try:
        os.mkdir(META_DIR, 0o700, dir_fd=root_fd)
    except FileExistsError:
        pass
    return os.open(META_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                   dir_fd=root_fd)


class SessionLock:
    """Holds the lock of one secondary root; see the module docstring."""

    def __init__(self, root_fd: int, shown_root: str, info: LockInfo) -> None:
        self.shown_root = shown_root
        self.info = info
        self.meta_fd = _meta_dir(root_fd)
        self.fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquisition ---------------------------------------------------------------------

    def acquire(self, *, force: bool = False, stale_after: float = 120.0,
                grace: float = SAME_SESSION_GRACE) -> LockInfo | None:
        """Take the lock; returns the record of a holder that was taken over, or None.

        Raises :class:`Locked` when a live holder of another session keeps it.  The same
        session waits up to ``grace`` seconds for its previous host process to exit (a
        reconnect after the connection dropped).
        """
        deadline = time.monotonic() + grace
        while True:
            fd = os.open(LOCK_NAME, _OPEN_FLAGS | os.O_RDWR | os.O_CREAT, 0o600,
                         dir_fd=self.meta_fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                # Never ours (ours are single-link regular files): a hardlink planted here
                # could point outside the root.  Drop the name, never write through it.
                os.close(fd)
                os.unlink(LOCK_NAME, dir_fd=self.meta_fd)
                log.warning("replaced a .georep/lock that was not a plain file")
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(fd)
                os.close(fd)
                stale = holder is not None and time.time() - holder.heartbeat > stale_after
                if force or stale:
                    if self._take_over():
                        return holder
                    continue
                if (holder is not None and holder.session == self.info.session
                        and time.monotonic() < deadline):
                    time.sleep(0.2)  # poll: the kernel releases it when that process exits
                    continue
                raise Locked(self.shown_root, holder)
            if not self._is_current(fd):
                os.close(fd)  # replaced by a takeover between our open and our flock
                continue
            _write_record(fd, self.info)
            self.fd = fd
            return None

    def _is_current(self, fd: int) -> bool:
        try:
            st = os.stat(LOCK_NAME, dir_fd=self.meta_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _take_over(self) -> bool:
        tmp = b"lock.new-%d-%s" % (os.getpid(), self.info.token.encode())
        fd = os.open(tmp, _OPEN_FLAGS | os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600,
                     dir_fd=self.meta_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_record(fd, self.info)
            os.rename(tmp, LOCK_NAME, src_dir_fd=self.meta_fd, dst_dir_fd=self.meta_fd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp, dir_fd=self.meta_fd)
            except OSError:
                pass
            raise
        if not self._is_current(fd):
            os.close(fd)  # another contender renamed after us: try again from the start
            return False
        self.fd = fd
        return True

    # -- holding -------------------------------------------------------------------------

    def owner(self) -> LockInfo | None:
        """The record currently at ``.georep/lock`` (None when unreadable)."""
        try:
            fd = os.open(LOCK_NAME, _OPEN_FLAGS | os.O_RDONLY, dir_fd=self.meta_fd)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                return None
            return _read_record(fd)
        finally:
            os.close(fd)

    def beat(self) -> bool:
        """Refresh the heartbeat; False when another session took the lock over."""
        if self.fd is None:
            return False
        current = self.owner()
        if current is None or current.token != self.info.token:
            return False
        self.info.heartbeat = time.time()
        try:
            _write_record(self.fd, self.info)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
        return True

    def start_heartbeat(self, interval: float, on_lost: Callable[[LockInfo | None], None]
                        ) -> None:
        """Beat every ``interval`` seconds in a daemon thread; ``on_lost(new_owner)`` once
        the lock was taken over (it is expected to end the process)."""
        def loop() -> None:
            while not self._stop.wait(interval):
                if not self.beat():
                    on_lost(self.owner())
                    return

        self._thread = threading.Thread(target=loop, name="lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop beating and drop the lock (the record stays; it is only informative)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        os.close(self.meta_fd)
