"""Change propagation at scale and memory: georep live vs an rsync rescan vs lsyncd, over ssh.

    python -m bench.scale [--sizes 20000,200000] [--million] [--reps 3] [--changes 100]
                          [--cache DIR] [--workdir DIR] [--no-update-md]

Trees: a seeded, fast layout (``generate``): ``m###/l#####/f#######``, 500 files per
leaf directory, 20 leaves per middle directory; nine files in ten are empty, one in ten
holds 100 bytes (``os.open``/``os.write``/``os.close`` loops, no treegen extras).  A tree
of N entries (files + directories, root not counted) is built once and kept under
``--cache`` (default ``/tmp/georep-bench-trees``) for later runs; a run only rewrites
file contents in it, and clears georep's marks on its root before starting.

Per size, over one private sshd on 127.0.0.1 (``tests.support.sshd``), each tool into its
own remote directory:

1. **initial** (untimed for the comparison, but timed and memory-sampled): georep
   ``sync --once`` into an empty directory, then the continuous ``sync`` started on top
   of it (its hybrid crawl over the in-sync replica, until its log says
   ``crawl=Changelog Crawl``); ``rsync -aHAX --numeric-ids`` into an empty directory;
   lsyncd into an empty directory (its start-up rsync, until it logs ``Startup ...
   finished``).  The resident set size of every process of the tool (primary and
   secondary side, found by their command lines) is sampled every 0.5 s with psutil;
   the peaks are reported per role.
2. **change propagation**, ``--reps`` times, tool order alternating: the tool whose turn
   it is is brought up to date (live tools are waited for; rsync runs once untimed),
   then ``--changes`` (100) random files get new content (a new size), and we time
   them.  Only that tool reacts: lsyncd is SIGSTOPped outside its turn, georep only
   during a peer's timed window (never for minutes: its secondary drops a connection
   that is silent for 120 s).  What is timed:
   - georep (continuous ``sync`` running and caught up) and lsyncd: from the last
     ``close`` until all 100 files have their new content on the secondary (polled
     every 5 ms: size, then content);
   - rsync: ``rsync -aHAX --numeric-ids --delete -e SSH SRC/ HOST:DST/`` started right
     after the last write, its wall time (a full rescan of both trees).

lsyncd: ``sync { default.rsync, source = SRC, target = "root@127.0.0.1:DST", delay = 1,
rsync = { archive, hard_links, acls, xattrs, --numeric-ids, rsh = SSH } }``: it
aggregates events for ``delay`` seconds by design, so its latency is at least 1 s.

Results: ``bench/results/scale-<stamp>.json`` and the ``scale`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from actors.batcher import MAX_BYTES_IN_FLIGHT, MAX_OPS_IN_FLIGHT
from bench.common import (
    GEOREP_NODE,
    LSYNCD_SSH_COMMAND,
    LSYNCD_SSH_CONF,
    SSH_LEGEND,
    BenchError,
    log,
    machine_info,
    median,
    sh,
    timed,
    update_section,
    write_results,
)
from tests.support.sshd import REMOTE_COMMAND, SshServer, sshd_missing, start_sshd

LAYOUT = "v1"
LEAF_FILES = 500
MID_LEAVES = 20
TOOLS = ("georep", "rsync", "lsyncd")
TARGET_RATIO_200K = 20.0
TARGET_RSS_MIB = 150.0


# -- the tree -------------------------------------------------------------------------------


def layout(entries: int) -> tuple[int, int, int]:
    """(files, leaf dirs, middle dirs) adding up to ``entries`` (or just under)."""
    files = entries
    while True:
        leaves = -(-files // LEAF_FILES)
        mids = -(-leaves // MID_LEAVES)
        if files + leaves + mids <= entries:
            return files, leaves, mids
        files -= 1


def file_rel(i: int) -> str:
    leaf = i // LEAF_FILES
    return f"m{leaf // MID_LEAVES:03d}/l{leaf:05d}/f{i:07d}"


def generate(entries: int, cache: Path) -> tuple[Path, dict[str, Any]]:
    """The cached tree of ``entries`` entries, built when missing."""
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"tree-{LAYOUT}-{entries}"
    marker = cache / f"tree-{LAYOUT}-{entries}.json"
    if marker.exists() and root.is_dir():
        info = json.loads(marker.read_text())
        info["cached"] = True
        return root, info
    subprocess.run(["rm", "-rf", str(root)], check=True)
    files, leaves, mids = layout(entries)
    log(f"generating {entries:,} entries ({files:,} files, {leaves + mids:,} dirs) in {root}")
    t0 = time.monotonic()
    root.mkdir()
    payload = b"0123456789" * 10
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for leaf in range(leaves):
        d = os.fsencode(root / file_rel(leaf * LEAF_FILES)).rsplit(b"/", 1)[0]
        os.makedirs(d, exist_ok=True)
        for i in range(leaf * LEAF_FILES, min(files, (leaf + 1) * LEAF_FILES)):
            fd = os.open(b"%s/f%07d" % (d, i), flags, 0o644)
            if i % 10 == 0:
                os.write(fd, payload)
            os.close(fd)
    info = {"entries": files + leaves + mids, "files": files, "dirs": leaves + mids,
            "layout": LAYOUT, "generate_seconds": round(time.monotonic() - t0, 1)}
    marker.write_text(json.dumps(info) + "\n")
    info["cached"] = False
    log(f"  generated in {info['generate_seconds']} s")
    return root, info


def clear_marks(root: Path) -> None:
    """georep's marks on the root (not its gfid): every run starts as a new session."""
    for name in os.listxattr(root):
        if ".georep." in name and not name.endswith("gfid"):
            os.removexattr(root, name)


def count_entries(root: Path) -> int:
    n = 0
    stack = [os.fsencode(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.name.startswith(b".georep") or e.name.startswith(b".~tmp~"):
                    continue
                n += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return n


# -- memory sampling ------------------------------------------------------------------------


class RssSampler:
    """Peak RSS per role, summed over the role's processes at each 0.5 s sample."""

    def __init__(self, classify: Callable[[str, list[str]], str | None]) -> None:
        self.classify = classify
        self.peak: dict[str, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            cur: dict[str, float] = {}
            for p in psutil.process_iter(["name", "cmdline"]):
                if p.pid == os.getpid():
                    continue
                role = self.classify(p.info["name"] or "", p.info["cmdline"] or [])
                if role is None:
                    continue
                try:
                    cur[role] = cur.get(role, 0.0) + p.memory_info().rss / 2**20
                except psutil.Error:
                    continue
            for role, v in cur.items():
                self.peak[role] = max(self.peak.get(role, 0.0), v)
            if cur:
                self.peak["total"] = max(self.peak.get("total", 0.0), sum(cur.values()))
            self.samples += 1
            if self._stop.wait(0.5):
                return

    def __enter__(self) -> RssSampler:
        self._th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._th.join()

    def result(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in sorted(self.peak.items())}


def georep_roles(src: Path, dst: Path, state: Path) -> Callable[[str, list[str]], str | None]:
    s, d, st = str(src), str(dst), str(state)

    def classify(name: str, cmd: list[str]) -> str | None:
        if not name.startswith("python") and name != "georep-node":
            return None
        line = " ".join(cmd)
        if "recorder" in line and st in line:
            return "recorder"
        if "secondary" in cmd and d in line:
            return "secondary"
        if "sync" in cmd and s in cmd:
            return "worker"
        return None
    return classify


def rsync_roles(src: Path, dst: Path) -> Callable[[str, list[str]], str | None]:
    s, d = str(src), str(dst)

    def classify(name: str, cmd: list[str]) -> str | None:
        line = " ".join(cmd)
        if name == "rsync" and (s in line or d in line):
            return "rsync"
        if name == "lsyncd" and f"lsyncd-{dst.name}.conf" in line:
            return "lsyncd"
        return None
    return classify


# -- the tools ------------------------------------------------------------------------------


class Live:
    """georep's continuous sync or lsyncd, following ``src`` into ``dst`` over ssh."""

    def __init__(self, name: str, src: Path, dst: Path, work: Path, server: SshServer) -> None:
        self.name, self.src, self.dst, self.work, self.server = name, src, dst, work, server
        self.state = work / f"state-{name}-{dst.name}"
        self.logfile = work / f"{name}-{dst.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.log_offset = 0

    def start(self) -> None:
        self.dst.mkdir(exist_ok=True)
        self.log_offset = len(self.log_text())  # a restart appends to the same log
        target = f"{self.server.user}@{self.server.host}:{self.dst}"
        if self.name == "georep":
            env = dict(os.environ, GEOREP_STATE_DIR=str(self.state))
            argv = [sys.executable, str(GEOREP_NODE), "sync", str(self.src), target,
                    "--ssh-command", self.server.ssh_command(), "--remote-command",
                    REMOTE_COMMAND]
        else:
            conf = self.work / f"lsyncd-{self.dst.name}.conf"
            conf.write_text(LSYNCD_SSH_CONF.format(src=self.src, target=f"{target}/",
                                               rsh=self.server.ssh_command()))
            env = dict(os.environ)
            argv = ["lsyncd", str(conf)]
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, env=env, start_new_session=True)

    def log_text(self) -> str:
        if self.name == "georep":
            found = list(self.state.glob("sessions/*/georep.log"))
            return found[0].read_text(errors="replace") if found else ""
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited: {self.logfile.read_text()[-3000:]}")
        text = self.log_text()[self.log_offset:]
        if self.name == "georep":
            return "crawl=Changelog Crawl" in text
        return "Startup of" in text and "finished" in text

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        while not self.ready():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{self.name}: not live after {timeout:.0f} s")
            time.sleep(0.5)
        return time.monotonic() - t0

    def pause(self) -> None:
        if self.proc is not None and not self.paused:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.paused:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.paused = False

    def stop(self) -> None:
        self.resume()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # helpers we started that outlive it: the recorder daemon (its state dir in the
        # command line) and the secondary host or rsync server (the destination)
        keys = (str(self.state), str(self.dst))
        for p in psutil.process_iter(["pid", "cmdline"]):
            line = " ".join(p.info["cmdline"] or [])
            if p.pid != os.getpid() and any(k in line for k in keys):
                try:
                    p.kill()
                except psutil.Error:
                    pass


def rsync_argv(server: SshServer, src: Path, dst: Path, delete: bool) -> list[str]:
    return ["rsync", "-aHAX", "--numeric-ids", *(["--delete"] if delete else []), "-e",
            server.ssh_command(), f"{src}/", f"{server.user}@{server.host}:{dst}/"]


def wait_visible(dst: Path, want: dict[str, bytes], timeout: float) -> float:
    """Poll until every ``dst/rel`` has the content ``want[rel]``; monotonic time then."""
    pending = dict(want)
    deadline = time.monotonic() + timeout
    while pending:
        for rel, content in list(pending.items()):
            p = dst / rel
            try:
                if os.stat(p).st_size != len(content):
                    continue
                with open(p, "rb") as f:
                    if f.read() != content:
                        continue
            except FileNotFoundError:
                continue
            del pending[rel]
        if not pending:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} of {len(want)} files not visible in {dst}")
        time.sleep(0.005)
    return time.monotonic()


# -- one size -------------------------------------------------------------------------------


def run_size(entries: int, ns: argparse.Namespace, server: SshServer, work: Path,
             rnd: random.Random) -> dict[str, Any]:
    src, info = generate(entries, Path(ns.cache))
    clear_marks(src)
    subprocess.run(["tar", "-cf", "/dev/null", "-C", str(src), "."], check=True)  # warm dentries
    files = info["files"]
    dst = {t: work / f"dst-{entries}-{t}" for t in TOOLS}
    res: dict[str, Any] = {"tree": info, "initial": {}, "changes": {t: [] for t in TOOLS},
                           "notes": []}
    lives: dict[str, Live] = {}
    try:
        # -- initial syncs, memory sampled
        g = Live("georep", src, dst["georep"], work, server)
        dst["georep"].mkdir()
        log(f"[{entries}] georep sync --once into an empty directory")
        with RssSampler(georep_roles(src, dst["georep"], g.state)) as smp:
            argv = [sys.executable, str(GEOREP_NODE), "sync", str(src),
                    f"{server.user}@{server.host}:{dst['georep']}", "--once", "--json",
                    "--ssh-command", server.ssh_command(), "--remote-command", REMOTE_COMMAND]
            os.sync()
            r = timed("georep", argv)
        summary = json.loads(r.stdout)
        res["initial"]["georep_once"] = {"seconds": round(r.seconds, 2), "cpu": round(r.cpu, 2),
                                         "load1": r.load1, "peak_rss_mib": smp.result(),
                                         "ok": summary.get("ok"),
                                         "counters": summary.get("counters")}
        log(f"  {json.dumps(res['initial']['georep_once'])[:300]}")
        log(f"[{entries}] georep continuous sync on top of it (hybrid crawl)")
        with RssSampler(georep_roles(src, dst["georep"], g.state)) as smp:
            load = os.getloadavg()[0]
            g.start()
            lives["georep"] = g
            secs = g.wait_ready(ns.timeout)
        res["initial"]["georep_live"] = {"seconds": round(secs, 2), "load1": load,
                                         "peak_rss_mib": smp.result()}
        log(f"  {json.dumps(res['initial']['georep_live'])}")

        log(f"[{entries}] rsync into an empty directory")
        dst["rsync"].mkdir()
        with RssSampler(rsync_roles(src, dst["rsync"])) as smp:
            os.sync()
            r = timed("rsync", rsync_argv(server, src, dst["rsync"], delete=False))
        res["initial"]["rsync"] = {"seconds": round(r.seconds, 2), "cpu": round(r.cpu, 2),
                                   "load1": r.load1, "peak_rss_mib": smp.result()}
        log(f"  {json.dumps(res['initial']['rsync'])}")

        if "lsyncd" in ns.tools:
            log(f"[{entries}] lsyncd into an empty directory")
            ls = Live("lsyncd", src, dst["lsyncd"], work, server)
            with RssSampler(rsync_roles(src, dst["lsyncd"])) as smp:
                load = os.getloadavg()[0]
                os.sync()
                ls.start()
                lives["lsyncd"] = ls
                try:
                    secs = ls.wait_ready(ns.lsyncd_timeout)
                except (TimeoutError, BenchError) as e:
                    res["notes"].append(f"lsyncd: {e}")
                    log(f"  lsyncd not usable at {entries}: {e}")
                    ls.stop()
                    del lives["lsyncd"]
                    secs = None
            res["initial"]["lsyncd"] = {"seconds": None if secs is None else round(secs, 2),
                                        "load1": load, "peak_rss_mib": smp.result()}
            log(f"  {json.dumps(res['initial']['lsyncd'])}")
            if "lsyncd" in lives:
                ls.pause()

        for name, d in dst.items():
            if name in lives or name == "rsync":
                n = count_entries(d)
                res["initial"].setdefault("entries_on_secondary", {})[name] = n
                if n != info["entries"]:
                    raise BenchError(f"{name}: {n} entries on the secondary, want "
                                     f"{info['entries']}")

        # -- change propagation
        expected: dict[str, bytes] = {}

        def restart(name: str, why: str) -> None:
            """A live tool that stopped replicating: say so, start it again, catch up."""
            res["notes"].append(f"{name} at {entries:,} entries: {why}; restarted")
            log(f"  {name}: {why}; restarting it")
            lives[name].stop()
            lives[name] = Live(name, src, dst[name], work, server)
            lives[name].start()
            lives[name].wait_ready(ns.timeout)
            wait_visible(dst[name], expected, ns.timeout)

        phase = 0
        hybrid_seen = g.log_text().count("crawl=Hybrid Crawl")
        rfail_seen = g.log_text().count("recorder failed")
        tools = [t for t in TOOLS if t == "rsync" or t in lives]
        for rep in range(ns.reps):
            order = tools if rep % 2 == 0 else list(reversed(tools))
            for tool in order:
                if tool in lives:
                    live = lives[tool]
                    live.resume()
                    if expected:
                        try:
                            wait_visible(dst[tool], expected, ns.live_timeout)
                        except TimeoutError as e:
                            restart(tool, f"catching up before rep {rep + 1}: {e}")
                    time.sleep(ns.settle)
                elif expected:
                    timed("rsync-catchup", rsync_argv(server, src, dst[tool], delete=True))
                if tool != "georep" and "georep" in lives:
                    # only the tool whose turn it is reacts to these changes; georep is
                    # stopped for the peer's timed window only (never for minutes: its
                    # secondary drops a connection that is silent for 120 s)
                    lives["georep"].pause()
                picks = rnd.sample(range(files), ns.changes)
                new: dict[str, bytes] = {}
                load = os.getloadavg()[0]
                for i in picks:
                    rel = file_rel(i)
                    body = f"{time.time_ns()} phase {phase} file {i} ".encode()
                    content = body.ljust(1000 + phase, b".")
                    fd = os.open(src / rel, os.O_WRONLY | os.O_TRUNC)
                    os.write(fd, content)
                    os.close(fd)
                    new[rel] = content
                    if len(new) == 1:
                        t_first = time.monotonic()
                t_last = time.monotonic()
                expected.update(new)
                rec: dict[str, Any] = {"rep": rep, "load1": load,
                                       "write_seconds": round(t_last - t_first, 4)}
                if tool in lives:
                    try:
                        t_vis = wait_visible(dst[tool], new, ns.live_timeout)
                        rec["seconds"] = round(t_vis - t_last, 4)
                        rec["from_first_write"] = round(t_vis - t_first, 4)
                    except TimeoutError as e:
                        rec.update(seconds=None, stalled=True)
                        restart(tool, f"rep {rep + 1}: {e} after {ns.live_timeout:.0f} s")
                    if tool != "georep":
                        lives[tool].pause()
                    if tool == "georep":
                        # a full rescan during the phase (journal gap: the recorder
                        # restarted) is part of what was measured: say so
                        text = lives[tool].log_text()
                        rec["hybrid_crawls"] = text.count("crawl=Hybrid Crawl") - hybrid_seen
                        hybrid_seen += rec["hybrid_crawls"]
                        rec["recorder_failures"] = text.count("recorder failed") - rfail_seen
                        rfail_seen += rec["recorder_failures"]
                else:
                    r = timed("rsync", rsync_argv(server, src, dst[tool], delete=True))
                    wait_visible(dst[tool], new, 0)
                    rec.update(seconds=round(r.seconds, 4), cpu=round(r.cpu, 3))
                if tool != "georep" and "georep" in lives:
                    lives["georep"].resume()
                res["changes"][tool].append(rec)
                log(f"[{entries}] rep {rep + 1}/{ns.reps} {tool:7s} {rec['seconds']} s "
                    f"(load {load:.2f}) {json.dumps(rec)}")
                phase += 1
    finally:
        for live in lives.values():
            live.stop()
        for d in dst.values():
            subprocess.run(["rm", "-rf", str(d)], check=False)
    return res


# -- report ---------------------------------------------------------------------------------


def _med(recs: list[dict[str, Any]], key: str = "seconds") -> float | None:
    return median([r[key] for r in recs if r.get(key) is not None])


def _s(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3f} s" if x < 10 else f"{x:.1f} s")


def _mib(d: dict[str, Any] | None, role: str) -> str:
    if not d or role not in d.get("peak_rss_mib", {}):
        return "-"
    return f"{d['peak_rss_mib'][role]:.0f}"


def render(result: dict[str, Any], path: Path) -> str:
    m = result["machine"]
    sizes = result["sizes"]
    loads = [rec["load1"] for s in sizes.values() for recs in s["changes"].values()
             for rec in recs]
    loads += [v["load1"] for s in sizes.values() for v in s["initial"].values()
              if isinstance(v, dict) and "load1" in v]
    out = [f"Generated by `{result['command']}` on {result['started']} (georep "
           f"{m['georep_rev']}); raw numbers in `bench/results/{path.name}` (not committed). "
           f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_gib']} GiB, "
           f"{(m['filesystem'] or '?').split()[0]}, kernel {m['kernel']}, Python {m['python']},"
           f" {m['rsync']}, lsyncd {result['lsyncd_version']}, {result['ssh_version']}; one "
           "private sshd on 127.0.0.1 (default cipher); primary and secondaries on the same "
           "disk.",
           "",
           *[f"Sizes {', '.join(f'{int(x):,}' for x in inc['sizes'])} are from an earlier run, "
             f"`{inc['command']}` started {inc['started']} "
             f"(`bench/results/{inc['file']}`)." for inc in result.get("included", [])],
           "",
           f"1-minute load average before the timed runs: {min(loads):.1f} to "
           f"{max(loads):.1f} on {m['nproc']} CPUs. The machine is shared (other developers' "
           "test suites and benchmarks ran at the same time), so wall times are noisy." if loads
           else "",
           "",
           f"**{result['changes']} files changed (new content) in an in-sync tree: time until "
           "the secondary has all of them** (medians over the repetitions, tools alternating; "
           "georep and lsyncd: from the last write to all visible; rsync: the whole "
           "`rsync --delete` rescan):",
           "",
           "| entries | n | georep live | rsync -aHAX rescan | lsyncd (delay=1) | "
           "rsync / georep | lsyncd / georep | georep rounds with a full rescan / stalled | "
           "load (1 min) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for entries, s in sizes.items():
        ch = s["changes"]
        g, r, ls = _med(ch["georep"]), _med(ch["rsync"]), _med(ch["lsyncd"])
        ld = [rec["load1"] for recs in ch.values() for rec in recs]
        out.append(f"| {int(entries):,} | {len(ch['georep'])} | {_s(g)} | {_s(r)} | {_s(ls)} | "
                   f"{'-' if not g or r is None else f'{r / g:.1f}x'} | "
                   f"{'-' if not g or ls is None else f'{ls / g:.1f}x'} | "
                   f"{sum(1 for rec in ch['georep'] if rec.get('hybrid_crawls'))} / "
                   f"{sum(1 for rec in ch['georep'] if rec.get('stalled'))} | "
                   f"{min(ld):.1f}-{max(ld):.1f} |" if ld else "")
    out += ["",
            "**Initial syncs of the same trees** (into empty remote directories, except georep "
            "live, which starts on top of its `--once` copy; peak RSS in MiB, summed over the "
            "role's processes, sampled every 0.5 s):",
            "",
            "| entries | georep --once | georep live start (hybrid crawl) | rsync -aHAX | "
            "lsyncd start | RSS georep --once worker / secondary | RSS georep live worker / "
            "secondary / recorder | RSS rsync (all its processes) | RSS lsyncd + its rsyncs |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for entries, s in sizes.items():
        i = s["initial"]
        go, gl, rs, ls = (i.get("georep_once"), i.get("georep_live"), i.get("rsync"),
                          i.get("lsyncd"))
        out.append(
            f"| {int(entries):,} | {_s(go and go['seconds'])} | {_s(gl and gl['seconds'])} | "
            f"{_s(rs and rs['seconds'])} | {_s(ls and ls['seconds'])} | "
            f"{_mib(go, 'worker')} / {_mib(go, 'secondary')} | "
            f"{_mib(gl, 'worker')} / {_mib(gl, 'secondary')} / {_mib(gl, 'recorder')} | "
            f"{_mib(rs, 'rsync')} | "
            f"{'-' if not ls else _mib(ls, 'lsyncd') + ' + ' + _mib(ls, 'rsync')} |")
    notes = [n for s in sizes.values() for n in s["notes"]]
    if notes:
        out += ["", "Notes: " + "; ".join(notes)]
    out += ["", "Targets:"]
    for entries, s in sizes.items():
        ch = s["changes"]
        g, r = _med(ch["georep"]), _med(ch["rsync"])
        if int(entries) == 200_000 and g and r:
            out.append(f"- 200,000 entries: georep >= {TARGET_RATIO_200K:.0f}x faster than the "
                       f"rsync rescan: {r / g:.1f}x, "
                       f"{'met' if r / g >= TARGET_RATIO_200K else 'MISSED'}.")
    gs = [(int(e), _med(s["changes"]["georep"])) for e, s in sizes.items()]
    gs = [(e, g) for e, g in gs if g]
    if len(gs) >= 2:
        out.append(f"- flat as the tree grows: georep {gs[0][1]:.3f} s at {gs[0][0]:,} -> "
                   f"{gs[-1][1]:.3f} s at {gs[-1][0]:,} entries "
                   f"({gs[-1][1] / gs[0][1]:.2f}x for {gs[-1][0] / gs[0][0]:.0f}x the entries).")
    for entries, s in sizes.items():
        for key, what in (("georep_once", "sync --once"), ("georep_live", "continuous")):
            d = s["initial"].get(key)
            if d and "worker" in d["peak_rss_mib"] and int(entries) >= 1_000_000:
                w = d["peak_rss_mib"]["worker"]
                out.append(f"- worker RSS <= {TARGET_RSS_MIB:.0f} MB at {int(entries):,} entries "
                           f"({what}): {w:.0f} MiB = {w * 1.048576:.0f} MB, "
                           f"{'met' if w * 1.048576 <= TARGET_RSS_MIB else 'MISSED'}.")
    for entries, s in sizes.items():
        c = (s["initial"].get("georep_once") or {}).get("counters") or {}
        if "peak_ops_in_flight" in c:
            # What bounds the worker's memory (actors/batcher.Credits), counted, not sampled.
            out.append(f"- ops in flight during sync --once at {int(entries):,} entries: peak "
                       f"{c['peak_ops_in_flight']:,} (budget {MAX_OPS_IN_FLIGHT:,}), inline "
                       f"data {c.get('peak_inline_bytes_in_flight', 0) / 2**20:.1f} MiB "
                       f"(budget {MAX_BYTES_IN_FLIGHT / 2**20:.0f} MiB).")
    out += ["", f"Commands ({SSH_LEGEND}):", "", "```",
            "georep-node sync SRC HOST:DST --once --json --ssh-command SSH --remote-command "
            "'python bin/georep-node'",
            "georep-node sync SRC HOST:DST --ssh-command SSH --remote-command "
            "'python bin/georep-node'      # continuous",
            "rsync -aHAX --numeric-ids --delete -e SSH SRC/ HOST:DST/",
            LSYNCD_SSH_COMMAND,
            "```"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="20000,200000",
                    help="comma-separated tree sizes in entries (default 20000,200000)")
    ap.add_argument("--million", action="store_true", help="also 1,000,000 entries (long)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--tools", default="georep,rsync,lsyncd")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds a live tool is left alone after catching up (default 2)")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--lsyncd-timeout", type=float, default=1800.0)
    ap.add_argument("--live-timeout", type=float, default=120.0,
                    help="a live tool that has not replicated the changes after this long is "
                         "counted as stalled and restarted (default 120 s)")
    ap.add_argument("--cache", default="/tmp/georep-bench-trees")
    ap.add_argument("--workdir")
    ap.add_argument("--include", metavar="JSON", action="append", default=[],
                    help="also show the sizes of an earlier results file (e.g. a "
                         "scale-partial-*.json of a run that went on to a larger size)")
    ap.add_argument("--no-update-md", action="store_true")
    ns = ap.parse_args(argv)
    why = sshd_missing()
    if why:
        log(f"bench.scale: {why}")
        return 2
    sizes = [int(s) for s in ns.sizes.split(",") if s] + ([1_000_000] if ns.million else [])
    base = Path(ns.workdir) if ns.workdir else Path(tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="georep-bench-scale-", dir=base))
    cmd = "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {
        "benchmark": "scale", "command": cmd.strip(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(base),
        "lsyncd_version": (sh(["lsyncd", "--version"]).splitlines() or [""])[0].replace(
            "Version: ", ""),
        "ssh_version": subprocess.run(["ssh", "-V"], capture_output=True, text=True,
                                      check=False).stderr.strip().split(",")[0],
        "changes": ns.changes, "reps": ns.reps, "seed": ns.seed, "sizes": {}}
    rnd = random.Random(ns.seed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        with start_sshd(work / "sshd") as server:
            for entries in sizes:
                result["sizes"][str(entries)] = run_size(entries, ns, server, work, rnd)
                write_results("scale-partial", result)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    for extra in ns.include:
        old = json.loads(Path(extra).read_text())
        merged = {k: v for k, v in old["sizes"].items() if k not in result["sizes"]}
        result["included"] = [*result.get("included", []),
                              {"file": Path(extra).name, "command": old["command"],
                               "started": old["started"], "sizes": sorted(merged, key=int)}]
        result["sizes"] = dict(sorted({**merged, **result["sizes"]}.items(),
                                      key=lambda kv: int(kv[0])))
    path = write_results("scale", result)
    body = render(result, path)
    print(body)
    if not ns.no_update_md:
        update_section("scale", body, title="Change propagation at scale, and memory")
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
