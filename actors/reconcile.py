"""Decide what makes one secondary directory equal to its primary counterpart.

Pure: no I/O.  Given the primary's entries of a directory and the secondary's listing
of the same directory (by gfid), it returns the ops, in apply order, and the work
that follows (files whose data must move, subdirectories to descend into).  The
secondary applier re-checks every gfid before acting, so a plan computed from a
slightly stale listing is still safe to apply.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fsops.constants import NO_GFID, T_BLK, T_CHR, T_DIR, T_FILE, T_SYMLINK
from fsops.primary import Entry

#: Regular files up to this size travel inline in their ``ensure`` op.
INLINE_MAX = 64 * 1024


class Rules:
    """What a session chooses not to replicate (config keys exclude, ignore-deletes).

    Exclude patterns are fnmatch globs on bytes, case-sensitive, like rsync's rules: a
    pattern without ``/`` matches an entry's name at any depth; a pattern with ``/``
    matches its path relative to the brick root (a leading ``/`` is dropped: paths are
    anchored at the root; ``*`` crosses ``/``); a trailing ``/`` matches directories only.
    An excluded entry is neither replicated nor, on the secondary, deleted; an excluded
    directory is not descended.  With ``ignore_deletes`` a name the primary no longer has
    stays on the secondary, unless the same object took another name in that directory
    (a rename).
    """

    __slots__ = ("_match", "ignore_deletes", "patterns")

    def __init__(self, exclude: Iterable[str | bytes] = (), *,
                 ignore_deletes: bool = False) -> None:
        self.patterns = tuple(os.fsencode(p) for p in exclude if p)
        self.ignore_deletes = ignore_deletes
        # One compiled alternation per (matched against the path?, directories only?):
        # a crawl asks for every entry, so the patterns are not re-matched one by one.
        groups: dict[tuple[bool, bool], list[bytes]] = {}
        for p in self.patterns:
            dir_only = p.endswith(b"/")
            p = p.rstrip(b"/")
            if p:
                groups.setdefault((b"/" in p, dir_only), []).append(p.lstrip(b"/"))
        self._match = {key: re.compile(b"|".join(_glob(p) for p in ps), re.DOTALL).fullmatch
                       for key, ps in groups.items()}

    def __bool__(self) -> bool:
        return bool(self.patterns) or self.ignore_deletes

    def __repr__(self) -> str:
        return f"Rules(exclude={self.patterns!r}, ignore_deletes={self.ignore_deletes})"

    def excluded(self, relpath: bytes, name: bytes, is_dir: bool) -> bool:
        """True when the entry ``name`` at ``relpath`` (relative to the root) is excluded."""
        for (by_path, dir_only), match in self._match.items():
            if (is_dir or not dir_only) and match(relpath if by_path else name):
                return True
        return False

    def path_excluded(self, relpath: bytes, is_dir: bool) -> bool:
        """True when ``relpath`` or one of the directories above it is excluded."""
        if not self.patterns or not relpath:
            return False
        parts = relpath.split(b"/")
        for i in range(len(parts)):
            last = i == len(parts) - 1
            if self.excluded(b"/".join(parts[:i + 1]), parts[i], is_dir or not last):
                return True
        return False


def _glob(pattern: bytes) -> bytes:
    """The regular expression of an fnmatch pattern, on bytes (names are never decoded)."""
    return b"(?:" + fnmatch.translate(pattern.decode("latin-1")).encode("latin-1") + b")"


#: Replicate everything, deletes included.
NO_RULES = Rules()


@dataclass(slots=True)
class Remote:
    """One row of a secondary ``list_dir`` reply."""

    name: bytes
    gfid: bytes | None
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    xdigest: bytes
    nlink: int

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Remote:
        """Build from a ``list_dir`` row (name, gfid, type, mode, uid, gid, size, mtime...)."""
        return cls(*row[:10])


@dataclass(slots=True)
class DataJob:
    """A regular file whose content must be pushed to the secondary."""

    entry: Entry
    relpath: bytes
    #: Size of the secondary's copy when known from the listing; None: ask after the ensure.
    remote_size: int | None
    #: Index of this file's ``ensure`` in the plan's ops, if the plan has one.
    ensure_index: int | None = None
    #: Push only if the ensure *created* the file (an adoption expected to find the data
    #: in place may be refused by the applier, which then creates an empty file).
    if_created: bool = False
    #: The directory the file was found in: re-checked when the file cannot be found at
    #: ``relpath`` any more (moved since), so its data is never silently dropped.
    pgfid: bytes | None = None
    #: Open the file by this kernel file handle instead of ``relpath`` (live: a changed
    #: file with several links whose current name the kernel cannot give).
    handle: bytes | None = None


@dataclass(slots=True)
class SubDir:
    """A child directory to crawl next."""

    entry: Entry
    relpath: bytes
    #: Its row in this directory's secondary listing when it is already in place.
    remote: Remote | None
    #: A same-named directory without gfid is there (pre-seeded): it is adopted, and its
    #: listing must wait until the adopting ensure has been applied.
    adopt: bool = False


@dataclass(slots=True)
class Plan:
    """What to send for one directory, in order."""

    ops: list[dict[str, Any]] = field(default_factory=list)
    #: Indexes into ``ops`` of ensures whose inline ``data`` the crawler must read.
    want_data: list[int] = field(default_factory=list)
    data: list[DataJob] = field(default_factory=list)
    subdirs: list[SubDir] = field(default_factory=list)
    #: Number of entry (namespace) ops in ``ops``.
    entry_ops: int = 0


class SeenLinks:
    """Bounded memory of hardlinked gfids already handled in this crawl.

    A hardlinked file is seen once per name; its data and meta move once.  Forgetting
    an old gfid (the bound) costs a redundant, harmless re-check, never a wrong result.
    """

    def __init__(self, limit: int = 200_000) -> None:
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._limit = limit

    def first_time(self, gfid: bytes) -> bool:
        """Record ``gfid``; True if it was not recorded already."""
        if gfid in self._seen:
            self._seen.move_to_end(gfid)
            return False
        self._seen[gfid] = None
        if len(self._seen) > self._limit:
            self._seen.popitem(last=False)
        return True


def meta_differs(e: Entry, r: Remote) -> bool:
    """True when owner, mode, mtime or xattrs of the secondary copy differ."""
    if e.uid != r.uid or e.gid != r.gid or e.mtime_ns != r.mtime_ns or e.xdigest != r.xdigest:
        return True
    return e.type != T_SYMLINK and e.mode != r.mode


def ensure_op(pgfid: bytes, e: Entry) -> dict[str, Any]:
    """The ``ensure`` op that puts ``e`` at its name, created with all its meta if new."""
    op: dict[str, Any] = {"op": "ensure", "pgfid": pgfid, "name": e.name, "gfid": e.gfid,
                          "type": e.type, "meta": e.meta()}
    if e.target is not None:
        op["target"] = e.target
    if e.type in (T_CHR, T_BLK):
        op["rdev"] = e.rdev
    return op


def _child(relpath: bytes, name: bytes) -> bytes:
    return relpath + b"/" + name if relpath else name


def plan_dir(pgfid: bytes, relpath: bytes, primary: Iterable[Entry],
             secondary: Iterable[Remote], seen: SeenLinks,
             inline_max: int = INLINE_MAX, force_data: frozenset[bytes] = frozenset(),
             rules: Rules = NO_RULES) -> Plan:
    """Compute the ops that make the secondary directory ``pgfid`` equal the primary's.

    Order: ensures (creates, links, renames, adoptions, replacements), then deletes of
    names the primary no longer has, then meta of unchanged-name entries.  Ensures come
    before deletes so that a directory renamed within this directory is moved, not sent
    to limbo and back.  Files in ``force_data`` (the journal says their content changed)
    get their data compared even when size and mtime match.  ``rules``: entries excluded
    on either side are left alone; with ignore-deletes only renames remove a name.
    """
    plan = Plan()
    if rules.patterns:
        primary = [e for e in primary
                   if not rules.excluded(_child(relpath, e.name), e.name, e.type == T_DIR)]
        secondary = [r for r in secondary
                     if not rules.excluded(_child(relpath, r.name), r.name, r.type == T_DIR)]
    remote = {r.name: r for r in secondary}
    metas: list[dict[str, Any]] = []
    names: set[bytes] = set()
    placed: set[bytes] = set()  # gfids the primary has in this directory
    for e in primary:
        names.add(e.name)
        placed.add(e.gfid)
        r = remote.get(e.name)
        path = _child(relpath, e.name)
        in_place = r is not None and r.gfid == e.gfid and r.type == e.type
        if e.type == T_DIR:
            if not in_place:
                plan.ops.append(ensure_op(pgfid, e))
                plan.entry_ops += 1
            adopt = not in_place and r is not None and r.gfid is None and r.type == e.type
            plan.subdirs.append(SubDir(e, path, r if in_place else None, adopt))
            continue
        first = e.nlink <= 1 or seen.first_time(e.gfid)
        if in_place:
            assert r is not None
            if not first:
                continue
            if e.type == T_FILE and (r.size != e.size or r.mtime_ns != e.mtime_ns
                                     or e.gfid in force_data):
                if e.size <= inline_max:
                    plan.want_data.append(len(plan.ops))
                    plan.ops.append(ensure_op(pgfid, e))
                else:
                    plan.data.append(DataJob(e, path, r.size))
            elif meta_differs(e, r):
                metas.append({"op": "meta", "gfid": e.gfid, "meta": e.meta()})
            continue
        op = ensure_op(pgfid, e)
        # A same-type object without gfid (a pre-seeded copy) is adopted in place; its
        # data moves only where it differs.
        adopt = r is not None and r.gfid is None and r.type == e.type
        if e.type == T_FILE and first:
            if adopt and r is not None and r.size == e.size and r.mtime_ns == e.mtime_ns:
                # Same size and mtime (rsync's quick check): adopted, then meta only.
                if e.size:
                    plan.data.append(DataJob(e, path, r.size, len(plan.ops), if_created=True))
            elif e.size <= inline_max:
                plan.want_data.append(len(plan.ops))
            else:
                plan.data.append(DataJob(e, path, r.size if adopt and r is not None else None,
                                         len(plan.ops)))
        elif e.type == T_FILE:
            op.pop("meta")  # another name of a file already handled: link only
        plan.ops.append(op)
        plan.entry_ops += 1
    for name, r in remote.items():
        if name not in names:
            if rules.ignore_deletes and (r.gfid is None or r.gfid not in placed):
                continue  # not a rename within this directory: a delete, left alone
            plan.ops.append({"op": "delete", "pgfid": pgfid, "name": name,
                             "gfid": r.gfid if r.gfid is not None else NO_GFID})
            plan.entry_ops += 1
    plan.ops.extend(metas)
    for job in plan.data:
        job.pgfid = pgfid
    return plan


def dir_meta_needed(e: Entry, r: Remote | None, plan: Plan) -> bool:
    """A directory's own meta is (re)applied after its entries changed or when it differs."""
    return r is None or plan.entry_ops > 0 or meta_differs(e, r)
