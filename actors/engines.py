"""Data engines: how a regular file's content travels, and the bandwidth limit.

Entry ops always go through the secondary's EntryApplier (an ``ensure`` creates a file
empty, with its gfid and meta); an engine only moves data into that existing inode.

- ``native`` (default): georep's own block delta over the protocol connection
  (:func:`fsops.transfer.push_file`), one file at a time per Syncer.
- ``rsync``: one ``rsync --inplace --existing`` per batch of files (``--files-from``),
  over its own ssh connection (the same ssh command and options as the protocol
  connection) or to the local path of a local secondary.
- ``tarssh``: one ``tar -c | ssh host tar -x --overwrite`` per batch (or a local
  ``tar -x``).

Both external engines write *in place* (rsync ``--inplace``, GNU tar ``--overwrite``
opens the existing file with ``O_TRUNC``), so the secondary inode, its gfid xattr and
its ``.georep/gfid`` index hardlink survive.  They are told not to copy owners, times
or xattrs (``-X`` would copy the primary's ``trusted.georep.gfid`` over the
secondary's): the Syncer stamps the exact meta with a ``meta`` op after checking each
file (see :mod:`actors.syncer`).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

from transport.endpoint import Endpoint, ssh_base_argv

NATIVE, RSYNC, TARSSH = "native", "rsync", "tarssh"
ENGINES = (NATIVE, RSYNC, TARSSH)

#: An external engine runs once per this many files ...
BATCH_FILES = 1000
#: ... or this many bytes of file content, whichever comes first.
BATCH_BYTES = 256 << 20

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?(?:/s)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_rate(text: str) -> int:
    """Bytes per second from ``"500000"``, ``"512K"``, ``"1M"``, ``"1.5G"`` (binary units).

    Raises ValueError for anything else or for a rate below 1 byte/s.
    """
    m = _RATE.match(text)
    if not m:
        raise ValueError(f"not a rate: {text!r} (use BYTES, or a K/M/G suffix: 512K, 1M)")
    rate = int(float(m[1]) * _UNITS[m[2].lower()])
    if rate < 1:
        raise ValueError(f"rate {text!r} is below 1 byte/s")
    return rate


class TokenBucket:
    """A bandwidth limit shared by threads: ``consume(n)`` sleeps until ``n`` bytes may go.

    Tokens accrue at ``rate`` bytes/s up to ``burst``; a request larger than what is
    available goes into debt and the caller sleeps the debt off, so requests of any size
    are accepted and the long-run rate never exceeds ``rate``.
    """

    def __init__(self, rate: int, burst: int | None = None) -> None:
        if rate < 1:
            raise ValueError("rate must be >= 1 byte/s")
        self.rate = rate
        self.burst = burst if burst is not None else max(64 << 10, rate // 4)
        self._tokens = float(self.burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, n: int) -> float:
        """Take ``n`` bytes' worth of tokens; returns the seconds slept."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)  # throttling: the point is to wait
        return wait


@dataclass
class EngineSpec:
    """What an external engine needs to reach both sides."""

    engine: str
    primary_root: str
    secondary: Endpoint
    ssh_command: str = "ssh"
    bwlimit: int | None = None
    #: Syncers running engines at once; rsync's per-process limit is bwlimit / jobs.
    jobs: int = 1
    bucket: TokenBucket | None = None


@dataclass
class BatchOutcome:
    """How one external run went: per-file problems and the run as a whole."""

    returncode: int
    #: relpath -> the stderr line that names it (its transfer failed).
    failed: dict[bytes, str] = field(default_factory=dict)
    #: The whole batch failed (no file can be trusted); the last stderr line says why.
    fatal: str | None = None
    argv: list[str] = field(default_factory=list)


def _stderr_lines(data: bytes) -> list[str]:
    text = data.decode("utf-8", "backslashreplace")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _last(lines: Sequence[str], what: str, code: int) -> str:
    return f"{what} exited with status {code}" + (f": {lines[-1]}" if lines else "")


def _ssh_prefix(spec: EngineSpec) -> list[str]:
    return ssh_base_argv(spec.secondary, ssh_command=spec.ssh_command)


def _remote_dest(ep: Endpoint) -> str:
    host = f"[{ep.host}]" if ep.host and ":" in ep.host else ep.host
    return f"{host}:{os.path.join(ep.path, '')}"


def rsync_argv(spec: EngineSpec) -> list[str]:
    """The rsync command line of a batch (file list NUL-separated on stdin).

    ``--inplace`` writes into the existing inode; ``--existing`` never creates a file or
    directory (the EntryApplier does that, with the gfid); ``-I`` never skips a file on
    size+mtime (georep already decided it differs).  No ``-a``: owners, modes, times and
    xattrs come from georep's ``meta`` op afterwards (and ``-X`` would copy the primary's
    gfid xattr).  ``--sparse`` with ``--inplace`` needs rsync >= 3.1.3 on both ends.
    """
    argv = ["rsync", "--relative", "--from0", "--files-from=-", "--inplace", "--existing",
            "--ignore-times", "--sparse", "--numeric-ids", "--open-noatime",
            "--no-implied-dirs"]
    if spec.bwlimit:
        per = max(1, spec.bwlimit // max(1, spec.jobs) // 1024)
        argv.append(f"--bwlimit={per}")
    src = os.path.join(os.path.abspath(spec.primary_root), "")
    if spec.secondary.is_local:
        return [*argv, src, os.path.join(os.path.abspath(spec.secondary.path), "")]
    return [*argv, "-e", shlex.join(_ssh_prefix(spec)), src, _remote_dest(spec.secondary)]


def tar_create_argv(spec: EngineSpec) -> list[str]:
    """GNU tar writing the listed files (NUL-separated on stdin) to stdout."""
    return ["tar", "--create", "--file=-", "--sparse", "--no-recursion",
            "--atime-preserve=system", "--numeric-owner", "-C",
            os.path.abspath(spec.primary_root), "--null", "--verbatim-files-from",
            "--files-from=-"]


#: Extraction writes into existing files (``--overwrite``: O_TRUNC on the same inode,
#: never through a symlink), leaves mtime to georep's meta (``-m``) and owners/modes
#: too (they are re-stamped after the batch).
_TAR_X = ["tar", "--extract", "--file=-", "--overwrite", "--touch", "--no-same-owner",
          "--no-same-permissions"]


def tar_extract_argv(spec: EngineSpec) -> list[str]:
    """The extracting side: a local tar, or ssh running tar on the secondary host."""
    ep = spec.secondary
    if ep.is_local:
        return [*_TAR_X, "-C", os.path.abspath(ep.path)]
    remote = shlex.join([*_TAR_X, "-C", ep.path])
    return [*_ssh_prefix(spec), "--", ep.host or "", remote]


def _collect(stream: IO[bytes] | None, into: list[bytes]) -> threading.Thread:
    def run() -> None:
        if stream is not None:
            into.append(stream.read())
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _feed(stream: IO[bytes] | None, data: bytes) -> threading.Thread:
    def run() -> None:
        if stream is None:
            return
        try:
            stream.write(data)
        except BrokenPipeError:
            pass  # the reader died: its status says why
        finally:
            try:
                stream.close()
            except BrokenPipeError:
                pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _file_list(relpaths: Sequence[bytes], dot: bool) -> bytes:
    # "./" keeps GNU tar from reading a name that starts with "-" as an option.
    return b"".join((b"./" + p if dot else p) + b"\0" for p in relpaths)


def _named(relpaths: Sequence[bytes], lines: Sequence[str]) -> dict[bytes, str]:
    """relpath -> the first stderr line that mentions it."""
    out: dict[bytes, str] = {}
    if not lines:
        return out
    for p in relpaths:
        name = os.fsdecode(p)
        for ln in lines:
            if name in ln:
                out[p] = ln
                break
    return out


def run_batch(spec: EngineSpec, relpaths: Sequence[bytes], *,
              timeout: float | None = None) -> BatchOutcome:
    """Run the engine once for ``relpaths`` (relative to both roots)."""
    if spec.engine == RSYNC:
        return _run_rsync(spec, relpaths, timeout)
    if spec.engine == TARSSH:
        return _run_tar(spec, relpaths, timeout)
    raise ValueError(f"engine {spec.engine!r} does not run in batches")


def _run_rsync(spec: EngineSpec, relpaths: Sequence[bytes],
               timeout: float | None) -> BatchOutcome:
    argv = rsync_argv(spec)
    try:
        proc = subprocess.run(argv, input=_file_list(relpaths, dot=False),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=timeout, check=False)
    except OSError as e:
        return BatchOutcome(-1, fatal=f"cannot run rsync: {e.strerror}", argv=argv)
    except subprocess.TimeoutExpired:
        return BatchOutcome(-1, fatal=f"rsync did not finish within {timeout} s", argv=argv)
    lines = _stderr_lines(proc.stderr)
    out = BatchOutcome(proc.returncode, argv=argv)
    if proc.returncode == 0:
        return out
    if proc.returncode in (23, 24):
        # Partial transfer: the files rsync names failed, the others went through (and
        # are checked one by one by the Syncer anyway).
        out.failed = _named(relpaths, lines)
        if out.failed or proc.returncode == 24:
            return out
    out.fatal = _last(lines, "rsync", proc.returncode)
    return out


def _run_tar(spec: EngineSpec, relpaths: Sequence[bytes],
             timeout: float | None) -> BatchOutcome:
    c_argv, x_argv = tar_create_argv(spec), tar_extract_argv(spec)
    argv = [*c_argv, "|", *x_argv]
    relay = spec.bucket is not None
    try:
        creator = subprocess.Popen(c_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
    except OSError as e:
        return BatchOutcome(-1, fatal=f"cannot run tar: {e.strerror}", argv=argv)
    try:
        extractor = subprocess.Popen(x_argv, stdin=subprocess.PIPE if relay else creator.stdout,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as e:
        creator.kill()
        creator.wait()
        return BatchOutcome(-1, fatal=f"cannot run {x_argv[0]}: {e.strerror}", argv=argv)
    c_err: list[bytes] = []
    x_err: list[bytes] = []
    threads = [_feed(creator.stdin, _file_list(relpaths, dot=True)),
               _collect(creator.stderr, c_err), _collect(extractor.stderr, x_err)]
    if relay:
        assert spec.bucket is not None and creator.stdout is not None
        _relay(creator.stdout, extractor.stdin, spec.bucket)
    else:
        assert creator.stdout is not None
        creator.stdout.close()  # the extractor holds its own copy of the pipe
    try:
        x_code = extractor.wait(timeout=timeout)
        c_code = creator.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in (creator, extractor):
            p.kill()
            p.wait()
        return BatchOutcome(-1, fatal=f"tar did not finish within {timeout} s", argv=argv)
    for t in threads:
        t.join(timeout=30)
    c_lines = _stderr_lines(b"".join(c_err))
    x_lines = _stderr_lines(b"".join(x_err))
    if x_code != 0:
        what = "tar -x" if spec.secondary.is_local else f"ssh {spec.secondary.host} tar -x"
        return BatchOutcome(x_code, fatal=_last(x_lines or c_lines, what, x_code), argv=argv)
    # tar -c exits 1 when a file changed or vanished while read ("file changed as we read
    # it"): those files are named; the Syncer re-checks every file anyway.
    if c_code not in (0, 1):
        return BatchOutcome(c_code, fatal=_last(c_lines, "tar -c", c_code), argv=argv)
    return BatchOutcome(c_code, failed=_named(relpaths, c_lines) if c_code else {}, argv=argv)


def _relay(src: IO[bytes], dst: IO[bytes] | None, bucket: TokenBucket,
           chunk: int = 256 << 10) -> None:
    """Copy ``src`` to ``dst`` at the bucket's rate (tarssh's bandwidth limit)."""
    assert dst is not None
    try:
        while True:
            data = src.read1(chunk) if hasattr(src, "read1") else src.read(chunk)
            if not data:
                break
            bucket.consume(len(data))
            dst.write(data)
    except BrokenPipeError:
        pass  # the extractor died: its exit status says why
    finally:
        src.close()
        try:
            dst.close()
        except BrokenPipeError:
            pass
