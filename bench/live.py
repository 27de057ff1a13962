"""Continuous replication: georep ``sync`` (no ``--once``) next to lsyncd, same run.

    python -m bench.live [--duration 20] [--rate 100] [--burst 5000] [--rename-files 5000]
                         [--local] [--million] [--workdir DIR] [--keep] [--no-update-md]

Each tool follows its own copy of the same source tree into its own target directory,
over ssh to a private sshd on 127.0.0.1 (``tests.support.sshd``; ``--local``: a local
target path instead), one tool at a time (both are given the whole machine; the other
one is stopped and, for georep, its recorder daemon too).  The target is on this
machine, so the poller below watches it directly.  Per tool:

1. start it and wait until the target has every name of the source (lsyncd's initial
   rsync, georep's hybrid crawl);
2. **latency**: a writer creates small files at ``--rate`` per second for ``--duration``
   s; a poller stats every pending name on the target every 5 ms and records when each
   appears with its full size (write-to-visible latency: from the writer's ``close``);
3. **burst**: ``--burst`` small files created as fast as Python can; time from the first
   create until the target lists them all;
4. **rename**: a directory of ``--rename-files`` files, once replicated, is renamed; time
   until the target shows the new name with all its files and the old name gone.

``--million`` (georep only, long): 1,000,000 empty files in 1,000 directories, then a
continuous sync from scratch (hybrid crawl, then following 10,000 more creates); the
sync worker's RSS is sampled every 0.5 s (psutil) and its peak reported, with the
secondary host's and the recorder's.

lsyncd runs with ``settings { nodaemon = true } sync { default.rsync, source = SRC,
target = DST, delay = 1 }`` (over ssh: ``bench.common.LSYNCD_SSH_CONF``, the one of
bench.scale: ``target = "root@127.0.0.1:DST/"``, rsync options archive, hard_links,
acls, xattrs, --numeric-ids, ``rsh`` the same ssh command georep gets): by design it
waits ``delay`` seconds to aggregate events.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    GEOREP_NODE,
    LSYNCD_SSH_COMMAND,
    LSYNCD_SSH_CONF,
    SSH_LEGEND,
    log,
    machine_info,
    rmtree,
    sh,
    update_section,
    write_results,
)
from tests.support.sshd import REMOTE_COMMAND, SshServer, sshd_missing, start_sshd

TOOLS = ("georep", "lsyncd")
POLL = 0.005
TARGETS = {"latency_p50": 0.5, "latency_p99": 2.0, "burst": 2.5, "rename": 0.5,
           "rss_mib": 150.0}
LSYNCD_CONF = """settings {{ nodaemon = true }}
sync {{ default.rsync, source = "{src}", target = "{dst}", delay = 1 }}
"""


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s: {what}")
        time.sleep(POLL)
    return time.monotonic() - t0


def names(root: Path) -> set[str]:
    """Relative paths under ``root`` (rsync's temporary dot-files left out)."""
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for n in dirnames + filenames:
            if not n.startswith("."):
                out.add(os.path.join(rel, n))
    return out


def visible(d: Path) -> set[str]:
    try:
        return {n for n in os.listdir(d) if not n.startswith(".")}
    except FileNotFoundError:
        return set()


# -- the tools ------------------------------------------------------------------------------


class Tool:
    """A running replicator from ``src`` to ``dst``."""

    def __init__(self, name: str, base: Path, server: SshServer | None = None) -> None:
        self.name = name
        self.base = base
        self.server = server
        self.src = base / f"src-{name}"
        self.dst = base / f"dst-{name}"
        self.state = base / f"state-{name}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dst.mkdir(exist_ok=True)
        err = open(self.base / f"{self.name}.log", "ab")  # noqa: SIM115 (child keeps it)
        srv = self.server
        target = str(self.dst) if srv is None else f"{srv.user}@{srv.host}:{self.dst}"
        if self.name == "georep":
            env = dict(os.environ, GEOREP_STATE_DIR=str(self.state))
            argv = [sys.executable, str(GEOREP_NODE), "sync", str(self.src), target]
            if srv is not None:
                argv += ["--ssh-command", srv.ssh_command(), "--remote-command",
                         REMOTE_COMMAND]
        else:
            conf = self.base / "lsyncd.conf"
            conf.write_text(LSYNCD_CONF.format(src=self.src, dst=self.dst) if srv is None
                            else LSYNCD_SSH_CONF.format(src=self.src, target=f"{target}/",
                                                        rsh=srv.ssh_command()))
            env = dict(os.environ)
            argv = ["lsyncd", str(conf)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                     env=env)
        err.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for p in helpers(self.base):
            try:
                p.kill()  # the recorder daemon, a secondary host left behind
            except psutil.NoSuchProcess:
                pass

    def georep_log(self) -> str:
        found = list(self.state.glob("sessions/*/georep.log"))
        return found[0].read_text(errors="replace") if found else ""

    def wait_initial(self, timeout: float) -> float:
        """Until the target has every name of the source (and georep is live)."""
        want = names(self.src)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}")
            if self.name == "georep" and "crawl=Changelog Crawl" not in self.georep_log():
                return False
            return names(self.dst) >= want

        t0 = time.monotonic()
        while not ready():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{self.name}: initial sync not done in {timeout:.0f} s")
            time.sleep(0.2)
        return time.monotonic() - t0


def helpers(base: Path) -> list[psutil.Process]:
    """Processes (other than us) whose command line names the scratch directory."""
    key = str(base)
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid != os.getpid() and any(key in c for c in (p.info["cmdline"] or [])):
            out.append(p)
    return out


# -- scenarios ------------------------------------------------------------------------------


def latency(tool: Tool, rate: float, duration: float) -> dict[str, Any]:
    src, dst = tool.src / "lat", tool.dst / "lat"
    src.mkdir()
    wait_for(dst.is_dir, 30, "lat/ on the target")
    n = int(rate * duration)
    created: dict[int, float] = {}
    seen: dict[int, float] = {}
    lock = threading.Lock()
    done = threading.Event()
    payload = b"x" * 100

    def poller() -> None:
        while True:
            with lock:
                pending = [i for i in created if i not in seen]
            finished = done.is_set()
            for i in pending:
                try:
                    st = os.stat(dst / f"f{i:05d}")
                except FileNotFoundError:
                    continue
                if st.st_size == len(payload):
                    seen[i] = time.monotonic()
            if finished and (len(seen) == n or time.monotonic() - done_at[0] > 30):
                return
            time.sleep(POLL)

    done_at = [0.0]
    th = threading.Thread(target=poller)
    th.start()
    t0 = time.monotonic()
    for i in range(n):
        ahead = t0 + i / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)  # pacing the writer
        with open(src / f"f{i:05d}", "wb") as f:
            f.write(payload)
        with lock:
            created[i] = time.monotonic()
    done_at[0] = time.monotonic()
    done.set()
    th.join()
    lat = sorted(seen[i] - created[i] for i in seen)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else lat * 99
    return {"files": n, "missing": n - len(lat), "p50": statistics.median(lat),
            "p99": q[98], "max": lat[-1], "mean": statistics.fmean(lat),
            "writer_seconds": done_at[0] - t0}


def burst(tool: Tool, count: int) -> dict[str, Any]:
    src, dst = tool.src / "burst", tool.dst / "burst"
    src.mkdir()
    wait_for(dst.is_dir, 30, "burst/ on the target")
    t0 = time.monotonic()
    for i in range(count):
        with open(src / f"b{i:05d}", "wb") as f:
            f.write(b"y" * 200)
    written = time.monotonic() - t0
    wait_for(lambda: len(visible(dst)) >= count, 120, "the burst on the target")
    return {"files": count, "seconds": time.monotonic() - t0, "writer_seconds": written}


def rename(tool: Tool, count: int) -> dict[str, Any]:
    src = tool.src / "rdir"
    src.mkdir()
    for i in range(count):
        with open(src / f"r{i:05d}", "wb") as f:
            f.write(b"z" * 50)
    old, new = tool.dst / "rdir", tool.dst / "rdir.renamed"
    wait_for(lambda: len(visible(old)) >= count, 120, "the directory on the target")
    time.sleep(2.0)  # let lsyncd's aggregation window and georep's marks settle (not sync)
    t0 = time.monotonic()
    os.rename(src, tool.src / "rdir.renamed")
    wait_for(lambda: not old.exists() and len(visible(new)) >= count, 120,
             "the renamed directory on the target")
    return {"files": count, "seconds": time.monotonic() - t0}


def run_tool(name: str, base: Path, ns: argparse.Namespace,
             server: SshServer | None) -> dict[str, Any]:
    tool = Tool(name, base, server)
    tool.src.mkdir()
    for d in range(10):
        (tool.src / f"d{d}").mkdir()
        for i in range(100):
            (tool.src / f"d{d}" / f"f{i}").write_bytes(b"seed" * 10)
    log(f"[{name}] starting")
    tool.start()
    try:
        out: dict[str, Any] = {"initial_seconds": tool.wait_initial(300)}
        proc = psutil.Process(tool.proc.pid) if tool.proc else None
        log(f"[{name}] latency: {ns.rate:.0f} files/s for {ns.duration:.0f} s")
        out["latency"] = latency(tool, ns.rate, ns.duration)
        log(f"[{name}] burst of {ns.burst}")
        out["burst"] = burst(tool, ns.burst)
        log(f"[{name}] rename of a directory of {ns.rename_files}")
        out["rename"] = rename(tool, ns.rename_files)
        if proc is not None:
            out["rss_mib_end"] = round(proc.memory_info().rss / 2**20, 1)
        log(f"[{name}] {json.dumps(out)}")
        return out
    finally:
        tool.stop()


# -- the million-entry tree -----------------------------------------------------------------


def million(base: Path, entries: int) -> dict[str, Any]:
    tool = Tool("georep", base / "million")
    tool.base.mkdir()
    tool.src.mkdir()
    per_dir = 1000
    t0 = time.monotonic()
    for d in range(-(-entries // per_dir)):
        dd = tool.src / f"d{d // 32:02d}" / f"e{d:04d}"
        dd.mkdir(parents=True)
        ddb = os.fsencode(dd)
        for i in range(min(per_dir, entries - d * per_dir)):
            os.mknod(b"%s/f%04d" % (ddb, i))
    gen = time.monotonic() - t0
    log(f"[million] {entries} files generated in {gen:.0f} s")
    samples: dict[str, float] = {"worker": 0.0, "secondary": 0.0, "recorder": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            for p in helpers(tool.base):
                try:
                    cmd = p.cmdline()
                    rss = p.memory_info().rss / 2**20
                except psutil.NoSuchProcess:
                    continue
                role = ("recorder" if "recorder" in cmd else "secondary" if "secondary" in cmd
                        else "worker" if "sync" in cmd else None)
                if role:
                    samples[role] = max(samples[role], rss)

    th = threading.Thread(target=sample, daemon=True)
    t1 = time.monotonic()
    tool.start()
    th.start()
    try:
        initial = tool.wait_initial(3600)
        log(f"[million] hybrid crawl done in {initial:.0f} s")
        follow = tool.src / "d00" / "follow"
        follow.mkdir()
        for i in range(10_000):
            os.mknod(os.fsencode(follow / f"n{i:05d}"))
        dst = tool.dst / "d00" / "follow"
        t2 = time.monotonic()
        follow_s: float | None = None
        try:
            wait_for(lambda: len(visible(dst)) >= 10_000, 900, "the follow-up creates")
            follow_s = time.monotonic() - t2
        except TimeoutError as e:
            log(f"[million] {e}")
        time.sleep(5)  # keep sampling the idle follower a little (not a sync point)
    finally:
        stop.set()
        th.join()
        log_text = tool.georep_log()
        tool.stop()
    res = {"entries": entries, "generate_seconds": round(gen, 1),
           "initial_seconds": round(initial, 1),
           "start_to_live_seconds": round(time.monotonic() - t1, 1),
           "follow_10k_seconds": None if follow_s is None else round(follow_s, 2),
           "crawl_log": [ln for ln in log_text.splitlines() if "crawl=" in ln or "gap" in ln],
           "peak_rss_mib": {k: round(v, 1) for k, v in samples.items()}}
    log(f"[million] {json.dumps(res)}")
    return res


# -- report ---------------------------------------------------------------------------------


def rows(result: dict[str, Any]) -> list[tuple[str, float | None, float | None, float]]:
    g, ls = result["tools"].get("georep", {}), result["tools"].get("lsyncd", {})

    def get(d: dict[str, Any], *path: str) -> float | None:
        for k in path:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return float(d)  # type: ignore[arg-type]

    out = [
        (f"write-to-visible p50 ({result['rate']:.0f} files/s)", get(g, "latency", "p50"),
         get(ls, "latency", "p50"), TARGETS["latency_p50"]),
        (f"write-to-visible p99 ({result['rate']:.0f} files/s)", get(g, "latency", "p99"),
         get(ls, "latency", "p99"), TARGETS["latency_p99"]),
        (f"burst of {result['burst']} creates, all visible", get(g, "burst", "seconds"),
         get(ls, "burst", "seconds"), TARGETS["burst"]),
        (f"rename of a {result['rename_files']}-file directory", get(g, "rename", "seconds"),
         get(ls, "rename", "seconds"), TARGETS["rename"]),
    ]
    m = result.get("million")
    if m:
        out.append((f"worker peak RSS, {m['entries']:,} entries (MiB)",
                    m["peak_rss_mib"]["worker"], None, TARGETS["rss_mib"]))
    return out


def table(result: dict[str, Any]) -> str:
    lines = ["| metric | georep | lsyncd | georep / lsyncd | target | met |",
             "|---|---:|---:|---:|---:|:---:|"]
    for name, g, ls, target in rows(result):
        mib = "MiB" in name
        unit = "" if mib else " s"
        cells = ["-" if x is None else (f"{x:.0f}" if mib else f"{x:.3f} s") for x in (g, ls)]
        ratio = "-" if g is None or not ls else f"{g / ls:.2f}x"
        met = "-" if g is None else ("yes" if g <= target else "**no**")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio} | "
                     f"{target:g}{unit} | {met} |")
    return "\n".join(lines)


def markdown(result: dict[str, Any], json_path: Path) -> str:
    m = result["machine"]
    cmd = ("python -m bench.live" + (" --local" if result.get("transport") == "local" else "")
           + (" --million" if result.get("million") else ""))
    over_ssh = result.get("transport") == "ssh"
    parts = [
        f"Generated by `{cmd}` on {result['date']} (georep {m['georep_rev']}); raw numbers "
        f"in `bench/results/{json_path.name}` (not committed).",
        "",
        "| machine | |", "|---|---|",
        f"| CPUs (nproc) | {m['nproc']} ({m['cpu']}) |",
        f"| memory | {m['mem_gib']} GiB |",
        f"| kernel | {m['kernel']} |",
        f"| filesystem | {m['filesystem']} |",
        f"| Python | {m['python']} |",
        f"| lsyncd | {result['lsyncd_version']} |",
        f"| rsync | {m['rsync']} |",
        "",
        table(result),
        "",
        "Each tool follows its own copy of a 1,010-entry tree "
        + ("over ssh to a private sshd on 127.0.0.1 (tests/support/sshd.py; the target "
           "directory is on this machine, so the poller watches it directly)"
           if over_ssh else "into a local directory")
        + ", one tool at a time (the other stopped).  Latency: a writer creates 100-byte files at "
        f"{result['rate']:.0f}/s for {result['duration']:.0f} s; a poller stats each "
        "pending name on the target every 5 ms; latency is from the writer's `close` to "
        "the name being visible with its full size.  Burst: from the first create to the "
        "last name listed on the target.  Rename: from `rename(2)` to the new name listed "
        "with all files and the old name gone.",
        "",
    ]
    if over_ssh:
        parts += [
            f"Commands ({SSH_LEGEND}; georep offers AES-GCM first on this CPU, lsyncd's "
            "rsync uses OpenSSH's default cipher: for files of 100 bytes the cipher does "
            "not show):",
            "",
            "```",
            "GEOREP_STATE_DIR=STATE python bin/georep-node sync SRC HOST:DST "
            "--ssh-command SSH --remote-command 'python bin/georep-node'",
            LSYNCD_SSH_COMMAND,
            "```",
        ]
    else:
        parts += [
            "Commands (local target directories):",
            "",
            "```",
            "GEOREP_STATE_DIR=STATE python bin/georep-node sync SRC DST",
            "lsyncd CONF   # settings { nodaemon = true } "
            "sync { default.rsync, source = SRC, target = DST, delay = 1 }",
            "```",
        ]
    for tool, r in result["tools"].items():
        lat = r.get("latency", {})
        parts.append("")
        parts.append(f"{tool}: initial sync {r.get('initial_seconds', 0):.1f} s; latency "
                     f"mean {lat.get('mean', 0):.3f} s, max {lat.get('max', 0):.3f} s, "
                     f"{lat.get('missing', 0)} file(s) never seen; RSS at the end "
                     f"{r.get('rss_mib_end', '-')} MiB.")
    mm = result.get("million")
    if mm:
        parts += ["", f"Million: {mm['entries']:,} empty files in 1,000 directories "
                  f"(generated in {mm['generate_seconds']:.0f} s), first continuous sync "
                  f"from scratch: hybrid crawl in {mm['initial_seconds']:.0f} s, then "
                  f"10,000 more creates followed in {mm['follow_10k_seconds']} s.  Peak "
                  f"RSS (0.5 s samples): worker {mm['peak_rss_mib']['worker']:.0f} MiB, "
                  f"secondary host {mm['peak_rss_mib']['secondary']:.0f} MiB, recorder "
                  f"{mm['peak_rss_mib']['recorder']:.0f} MiB.  Session log: "
                  + "; ".join(ln.split(" WARNING ")[-1] for ln in mm.get("crawl_log", []))]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--burst", type=int, default=5000)
    ap.add_argument("--rename-files", type=int, default=5000)
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--local", action="store_true",
                    help="local target directories instead of ssh to 127.0.0.1")
    ap.add_argument("--million", action="store_true", help="also the 1,000,000-entry RSS run")
    ap.add_argument("--million-entries", type=int, default=1_000_000)
    ap.add_argument("--only-million", action="store_true", help="only the million run")
    ap.add_argument("--million-from", metavar="JSON",
                    help="take the million run from an earlier results file")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-update-md", action="store_true")
    ns = ap.parse_args(argv)
    over_ssh = not ns.local and not ns.only_million
    why = sshd_missing() if over_ssh else None
    if why:
        log(f"bench.live: {why} (or run it with --local)")
        return 2
    base = Path(tempfile.mkdtemp(prefix="georep-bench-live-", dir=ns.workdir))
    # Not under ``base``: stopping a tool kills every process that names ``base``.
    sshd_dir = (Path(tempfile.mkdtemp(prefix="georep-bench-sshd-", dir=ns.workdir))
                if over_ssh else None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(base),
        "lsyncd_version": (sh(["lsyncd", "--version"]).splitlines() or [""])[0],
        "rate": ns.rate, "duration": ns.duration, "burst": ns.burst,
        "rename_files": ns.rename_files, "tools": {},
        "transport": "ssh" if over_ssh else "local",
    }
    try:
        if not ns.only_million:
            with (start_sshd(sshd_dir) if sshd_dir else contextlib.nullcontext()) as server:
                for name in ns.tools.split(","):
                    result["tools"][name] = run_tool(name, base, ns, server)
                    result["tools"][name]["load1_after"] = os.getloadavg()[0]
        if ns.million or ns.only_million:
            result["million"] = million(base, ns.million_entries)
        elif ns.million_from:
            result["million"] = json.loads(Path(ns.million_from).read_text())["million"]
    finally:
        for p in helpers(base):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if not ns.keep:
            rmtree(base)
        if sshd_dir:
            rmtree(sshd_dir)
    path = write_results("live", result)
    print(table(result))
    print(f"results: {path}")
    if not ns.no_update_md:
        update_section("live", markdown(result, path),
                       title="Continuous replication: georep vs lsyncd")
    return 0


if __name__ == "__main__":
    sys.exit(main())

