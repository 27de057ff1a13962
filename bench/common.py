"""Helpers shared by the benchmarks: timing, machine description, results, BENCHMARKS.md."""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GEOREP_NODE = REPO / "bin" / "georep-node"
RESULTS_DIR = REPO / "bench" / "results"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"

#: xattr prefixes georep writes on the primary (gfids, marks).
GEOREP_XATTR_PREFIXES = (b"trusted.georep.", b"user.georep.")

#: How the generated sections name the ssh client of the test sshd
#: (tests.support.sshd.SshServer.ssh_command) and its host.
SSH_LEGEND = ("HOST = root@127.0.0.1, SSH = `ssh -F /dev/null -i KEY -p PORT -o "
              "StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o "
              "IdentitiesOnly=yes`")
#: lsyncd replicating over ssh with what ``rsync -aHAX --numeric-ids`` carries.
LSYNCD_SSH_CONF = """settings {{ nodaemon = true, insist = false }}
sync {{
    default.rsync,
    source = "{src}",
    target = "{target}",
    delay = 1,
    rsync = {{
        archive = true, hard_links = true, acls = true, xattrs = true,
        rsh = "{rsh}",
        _extra = {{ "--numeric-ids" }}
    }}
}}
"""
#: LSYNCD_SSH_CONF as the generated sections show it.
LSYNCD_SSH_COMMAND = ("lsyncd CONF   # sync { default.rsync, source = SRC, target = \"HOST:DST/\", "
                      "delay = 1, rsync = { archive, hard_links, acls, xattrs, rsh = SSH, "
                      "_extra = { \"--numeric-ids\" } } }")


@dataclass
class Run:
    """One timed command."""

    tool: str
    argv: list[str]
    seconds: float
    returncode: int
    stdout: str = ""
    stderr: str = ""
    cpu_user: float = 0.0
    cpu_sys: float = 0.0
    load1: float = 0.0
    machine_cpu: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_sys

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"tool": self.tool, "argv": self.argv,
                             "seconds": round(self.seconds, 4), "returncode": self.returncode,
                             "cpu_user": round(self.cpu_user, 3),
                             "cpu_sys": round(self.cpu_sys, 3), "load1": self.load1,
                             "machine_cpu": round(self.machine_cpu, 3)}
        d.update(self.extra)
        return d


class BenchError(RuntimeError):
    """A benchmarked command failed or produced a wrong result."""


def read_tree(path: Path) -> None:
    """Read every file, inode and xattr of ``path`` once, so every tool starts with a warm
    page cache (through a pipe: GNU tar skips reading when it writes to /dev/null)."""
    tar = subprocess.Popen(["tar", "--xattrs", "--acls", "-cf", "-", "-C", str(path), "."],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert tar.stdout is not None
    while tar.stdout.read(1 << 20):
        pass
    tar.wait()


def drop_caches() -> bool:
    """``sync`` and drop the page cache, dentries and inodes (root only); False if refused."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def machine_busy_seconds() -> float:
    """CPU-seconds every CPU of the machine has spent busy since boot (/proc/stat: user,
    nice, system, irq, softirq; not idle, iowait, or the time a hypervisor gave to other
    guests), or 0.0 where there is no /proc/stat."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return 0.0
    ticks = [int(x) for x in fields]
    busy = sum(ticks[:7]) - ticks[3] - ticks[4]  # user nice system (idle iowait) irq softirq
    return busy / os.sysconf("SC_CLK_TCK")


def timed(tool: str, argv: Sequence[str], *, check: bool = True) -> Run:
    """Run ``argv``; measure its wall time and CPU time (its own and its reaped children's).

    CPU time (user + sys from ``wait4``) is reported next to wall time because it is far
    less sensitive to other load on the machine; the 1-minute load average before the run
    is recorded too, and so is the whole machine's busy CPU time during the run
    (``machine_cpu``: both ends of a local ssh, kernel writeback, and anything else that
    ran).
    """
    argv = [str(a) for a in argv]
    load = os.getloadavg()[0]
    busy0 = machine_busy_seconds()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=out, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t0
        busy = machine_busy_seconds() - busy0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    run = Run(tool, argv, dt, p.returncode, stdout, stderr,
              cpu_user=ru.ru_utime, cpu_sys=ru.ru_stime, load1=load, machine_cpu=busy)
    if check and p.returncode != 0:
        raise BenchError(f"{tool}: exit {p.returncode}: {shlex.join(argv)}\n"
                         f"stdout: {stdout[-2000:]}\nstderr: {stderr[-2000:]}")
    return run


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def sh(argv: Sequence[str]) -> str:
    """Output of a small command, '' when it fails."""
    try:
        return subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, check=False).stdout.strip()
    except OSError:
        return ""


def machine_info(workdir: Path) -> dict[str, Any]:
    """What the numbers depend on: CPU count, memory, kernel, filesystem, versions."""
    mem_kib = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
    except OSError:
        pass
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    fs = sh(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T", str(workdir)]) or sh(
        ["stat", "-f", "-c", "%T", str(workdir)])
    rev = sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = bool(sh(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]))
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "filesystem": fs,
        "python": platform.python_version(),
        "rsync": (sh(["rsync", "--version"]).splitlines() or [""])[0],
        "georep_rev": rev + ("-dirty" if dirty else ""),
    }


# -- the primary's georep xattrs (so that every repetition is a true first sync) --------------


def _walk(root: bytes):
    """Every path under ``root`` (included), no symlink following."""
    yield root
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                yield e.path
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)


def georep_xattrs(root: Path) -> dict[bytes, dict[bytes, bytes]]:
    """georep's own xattrs on every object under ``root`` (path -> name -> value)."""
    out: dict[bytes, dict[bytes, bytes]] = {}
    for p in _walk(os.fsencode(root)):
        try:
            names = os.listxattr(p, follow_symlinks=False)
        except OSError:
            continue
        own = {}
        for n in names:
            nb = os.fsencode(n)
            if nb.startswith(GEOREP_XATTR_PREFIXES):
                own[nb] = os.getxattr(p, nb, follow_symlinks=False)
        if own:
            out[p] = own
    return out


def strip_georep_xattrs(root: Path) -> int:
    """Remove georep's xattrs (gfids, marks) from the tree: it looks never synced again."""
    n = 0
    for p, own in georep_xattrs(root).items():
        for name in own:
            try:
                os.removexattr(p, name, follow_symlinks=False)
            except OSError as e:  # a hardlink of an inode already stripped
                if e.errno != errno.ENODATA:
                    raise
                continue
            n += 1
    return n


def restore_georep_xattrs(root: Path, saved: dict[bytes, dict[bytes, bytes]]) -> None:
    """Put back what :func:`georep_xattrs` saved (same inodes, so the gfids stay valid)."""
    strip_georep_xattrs(root)
    for p, own in saved.items():
        for name, value in own.items():
            os.setxattr(p, name, value, follow_symlinks=False)


def rmtree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        shutil.rmtree(path)


# -- output -----------------------------------------------------------------------------------


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def update_section(name: str, body: str, *, title: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the generated section ``name`` of BENCHMARKS.md (created when missing).

    Only the text between the ``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->``
    markers is rewritten; the rest of the file (hand-written analysis) is kept.
    """
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nGenerated sections are rewritten by the benchmark that owns them; "
        "edit only outside the `<!-- bench:... -->` markers.\n")
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pat.search(text):
        text = pat.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    path.write_text(text)


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "-"
    return f"{a / b:.2f}x"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
