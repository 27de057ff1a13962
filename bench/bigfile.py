"""A 1 GiB file with 1 MiB changed in the middle, and the ceiling (disk, ssh pipe).

    python -m bench.bigfile [--mib 1024] [--reps 3] [--workdir DIR] [--no-update-md]

Against one private sshd on 127.0.0.1 (``tests.support.sshd.start_sshd``, as bench.ssh),
all tools with the same ssh options:

1. **delta**: one file of ``--mib`` MiB of random data is synced once (untimed) by each
   tool into its own remote directory; then, per repetition, 1 MiB of new random data is
   written at a MiB-aligned offset in the middle of the file (a different MiB each
   time) and each tool, order alternating, syncs it again:
   - ``georep-node sync SRC HOST:DST --once --json`` (native engine: block delta),
   - ``rsync -aHAX --numeric-ids --inplace -e SSH SRC/ HOST:DST/``,
   - ``rsync -aHAX --numeric-ids -e SSH SRC/ HOST:DST/`` (default: new file + rename).
   Bytes on the wire: every tool's ssh client is wrapped in ``bench/sshcount.py``,
   which counts the bytes of the ssh channel both ways (stdin/stdout of the ssh
   client), so georep's protocol overhead (framing, signatures, lookups) is counted the
   same way as rsync's.  georep's own ``--json`` transfer counters are recorded next to it.
   CPU time is counted on both sides: here (the tool and its ssh client, from ``wait4``)
   and there (the process sshd starts: ``georep-node secondary`` or the remote rsync),
   by running the remote command under GNU ``/usr/bin/time -o FILE`` (same machine);
   without ``/usr/bin/time`` the "there" column is left out.  Before each run the source
   and that tool's copy are read once (page cache warm for every tool; the ceiling below
   measures cold reads) and ``sync`` is called.
2. **ceiling**: ``dd if=FILE of=/dev/null bs=1M`` after ``echo 3 >
   /proc/sys/vm/drop_caches`` (cold disk read; root only, benchmark only), the same with
   a warm cache, ``cat FILE | ssh HOST 'cat > /dev/null'`` (the ssh pipe), and georep's
   first sync of the file into an empty remote directory, warm and cold cache; georep's
   throughput is reported as a percentage of the pipe and of the disk.

Results: ``bench/results/bigfile-<stamp>.json`` and the ``bigfile`` section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    SSH_LEGEND,
    BenchError,
    Run,
    drop_caches,
    log,
    machine_info,
    median,
    rmtree,
    sh,
    strip_georep_xattrs,
    timed,
    update_section,
    write_results,
)
from bench.ssh import cat_cmd, georep_ciphers, georep_cmd, run_georep
from tests.support.sshd import REMOTE_COMMAND, SshServer, sshd_missing, start_sshd

SSHCOUNT = REPO / "bench" / "sshcount.py"
#: GNU time, to count the remote side's CPU (the remote process is sshd's child, not ours).
GNU_TIME = "/usr/bin/time"
DELTA_TOOLS = ("georep", "rsync-inplace", "rsync")
TARGET_BYTES_RATIO = 1.2


def counted_ssh(server: SshServer, logfile: Path) -> str:
    return f"{sys.executable} {SSHCOUNT} {logfile} {server.ssh_command()}"


def read_counts(logfile: Path) -> dict[str, int]:
    """Sum of the channel bytes of every ssh connection logged to ``logfile``."""
    tot = {"up": 0, "down": 0, "connections": 0}
    if logfile.exists():
        for line in logfile.read_text().splitlines():
            d = json.loads(line)
            tot["up"] += d["up"]
            tot["down"] += d["down"]
            tot["connections"] += 1
    tot["total"] = tot["up"] + tot["down"]
    return tot


def rsync_argv(ssh: str, server: SshServer, src: Path, dst: Path, inplace: bool,
               rsync_path: str | None = None) -> list[str]:
    return ["rsync", "-aHAX", "--numeric-ids", *(["--inplace"] if inplace else []),
            *(["--rsync-path", rsync_path] if rsync_path else []), "-e", ssh,
            f"{src}/", f"{server.user}@{server.host}:{dst}/"]


def remote_timed(command: str, timefile: Path | None) -> str:
    """``command`` (a remote shell command) run under GNU time writing "user sys" to
    ``timefile``; unchanged when GNU time is not there (``timefile`` None)."""
    if timefile is None:
        return command
    return f"{GNU_TIME} -f '%U %S' -o {shlex.quote(str(timefile))} {command}"


def read_remote_cpu(timefile: Path | None) -> float | None:
    """User + system seconds GNU time wrote for the remote process, or None."""
    if timefile is None or not timefile.exists():
        return None
    user, sys_ = timefile.read_text().split()[-2:]
    return float(user) + float(sys_)


def write_random(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))


def same_file(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode == 0


def bench_delta(ns: argparse.Namespace, server: SshServer, work: Path, src: Path,
                big: Path, result: dict[str, Any]) -> dict[str, list[Run]]:
    size = ns.mib << 20
    dsts = {t: work / f"delta-{t}" for t in DELTA_TOOLS}
    logs = work / "counts"
    logs.mkdir()

    def run(tool: str, tag: str) -> Run:
        logfile = logs / f"{tool}-{tag}.jsonl"
        timefile = logs / f"{tool}-{tag}.time" if os.access(GNU_TIME, os.X_OK) else None
        ssh = counted_ssh(server, logfile)
        # Both copies in the page cache for every tool (the ceiling measures cold reads),
        # and nothing left dirty for anyone's syncfs/fsync to wait for.
        for f in (big, dsts[tool] / big.name):
            if f.exists():
                subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)
        os.sync()
        if tool == "georep":
            r = run_georep(tool, georep_cmd(server, src, dsts[tool], "--ssh-command", ssh,
                                            "--remote-command",
                                            remote_timed(REMOTE_COMMAND, timefile)))
        else:
            r = timed(tool, rsync_argv(ssh, server, src, dsts[tool], tool == "rsync-inplace",
                                       remote_timed("rsync", timefile) if timefile else None))
        r.extra["wire"] = read_counts(logfile)
        r.extra["cpu_remote"] = read_remote_cpu(timefile)
        return r

    log("delta: initial copies (untimed)")
    for tool in DELTA_TOOLS:
        dsts[tool].mkdir()
        r = run(tool, "initial")
        log(f"  {tool:14s} initial {r.seconds:6.2f} s, wire {r.extra['wire']['total']:,} B")
    runs: dict[str, list[Run]] = {t: [] for t in DELTA_TOOLS}
    for rep in range(ns.reps):
        off = (size // 2 // (1 << 20) + 4 * rep) << 20
        with open(big, "r+b") as f:
            os.pwrite(f.fileno(), os.urandom(1 << 20), off)
        tools = DELTA_TOOLS if rep % 2 == 0 else tuple(reversed(DELTA_TOOLS))
        for tool in tools:
            r = run(tool, f"rep{rep}")
            r.extra["offset"] = off
            runs[tool].append(r)
            w = r.extra["wire"]
            there = r.extra["cpu_remote"]
            log(f"delta rep {rep + 1}/{ns.reps} {tool:14s} {r.seconds:6.2f} s wall, "
                f"{r.cpu:5.2f} s cpu here, "
                f"{'?' if there is None else f'{there:5.2f}'} s there, "
                f"wire up {w['up']:,} down {w['down']:,} B, load {r.load1:.2f}")
            if rep == 0 and not same_file(big, dsts[tool] / big.name):
                raise BenchError(f"{tool}: the copy differs from the source")
    for d in dsts.values():
        rmtree(d)
    return runs


def bench_ceiling(ns: argparse.Namespace, server: SshServer, work: Path, src: Path,
                  big: Path, result: dict[str, Any]) -> dict[str, list[Run]]:
    tools = ("dd-cold", "dd-warm", "ssh-pipe", "georep-warm", "georep-cold")
    runs: dict[str, list[Run]] = {t: [] for t in tools}
    result["drop_caches"] = drop_caches()
    # The pipe with the cipher georep picks for this server (docs/ssh.md "Cipher").
    result["georep_ciphers"] = aes = georep_ciphers(server)
    dd = ["dd", f"if={big}", "of=/dev/null", "bs=1M"]
    for rep in range(ns.reps):
        order = tools if rep % 2 == 0 else tuple(reversed(tools))
        for tool in order:
            cold = tool.endswith("-cold")
            if cold:
                drop_caches()
            else:
                subprocess.run(["cat", str(big)], stdout=subprocess.DEVNULL, check=True)
                os.sync()
            if tool.startswith("dd"):
                r = timed(tool, dd)
            elif tool == "ssh-pipe":
                r = timed(tool, cat_cmd(server, big, "cat > /dev/null", aes))
            else:
                dst = work / "ceiling-dst"
                rmtree(dst)
                dst.mkdir()
                strip_georep_xattrs(src)
                if cold:
                    drop_caches()
                r = run_georep(tool, georep_cmd(server, src, dst))
                rmtree(dst)
            runs[tool].append(r)
            log(f"ceiling rep {rep + 1}/{ns.reps} {tool:12s} {r.seconds:6.2f} s, "
                f"{(ns.mib << 20) / r.seconds / 1e6:7.1f} MB/s, load {r.load1:.2f}")
    return runs


def _med(runs: list[Run], key: str = "seconds") -> float | None:
    if key == "seconds":
        return median([r.seconds for r in runs])
    if key == "cpu":
        return median([r.cpu for r in runs])
    if key in ("cpu_remote", "cpu_total"):
        there: list[float] = [r.extra["cpu_remote"] for r in runs
                              if r.extra.get("cpu_remote") is not None]
        if len(there) < len(runs):
            return None
        return median([t + (r.cpu if key == "cpu_total" else 0.0)
                       for r, t in zip(runs, there, strict=True)])
    return median([float(r.extra["wire"][key]) for r in runs])


def _secs(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f} s"


def render(result: dict[str, Any], delta: dict[str, list[Run]] | None,
           ceiling: dict[str, list[Run]] | None, path: Path) -> str:
    m = result["machine"]
    size = result["mib"] << 20
    loads = [r.load1 for rs in list((delta or {}).values()) + list((ceiling or {}).values())
             for r in rs]
    out = [f"Generated by `python -m bench.bigfile --mib {result['mib']} --reps "
           f"{result['reps']}` on {result['started']} (georep {m['georep_rev']}); raw numbers in "
           f"`bench/results/{path.name}` (not committed).  Machine: {m['nproc']} CPUs "
           f"({m['cpu']}), {m['mem_gib']} GiB, {(m['filesystem'] or '?').split()[0]}, "
           f"kernel {m['kernel']}, Python {m['python']}, {m['rsync']}, "
           f"{result['ssh_version']}; one private sshd on 127.0.0.1. Cipher: the delta runs "
           "go through bench/sshcount.py, a wrapper georep does not pick a cipher for, so "
           "both tools use OpenSSH's default there; the ceiling's pipe uses the cipher georep "
           f"picks ({result.get('georep_ciphers') or 'ssh default'}; docs/ssh.md \"Cipher\").",
           "",
           f"1-minute load average before the timed runs: {min(loads):.1f} to "
           f"{max(loads):.1f} on {m['nproc']} CPUs (a shared machine: other developers' test "
           "suites ran meanwhile; wall times are noisy, CPU times less so)." if loads else "",
           ""]
    if delta:
        g_tot = _med(delta["georep"], "total")
        out += [f"**{result['mib']} MiB file of random data, 1 MiB rewritten in the middle**, "
                f"synced onto the previous copy, both copies in the page cache (medians of "
                f"{result['reps']}; bytes = ssh "
                "channel payload both ways, counted by `bench/sshcount.py` wrapped around "
                "each tool's ssh client):",
                "",
                "| tool | n | wall | CPU here | CPU there | CPU both | sent (up) |"
                " received (down) | total on the wire | bytes / georep's | time / georep's |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        names = {"georep": "georep sync --once (native delta)",
                 "rsync-inplace": "rsync -aHAX --numeric-ids --inplace",
                 "rsync": "rsync -aHAX --numeric-ids (default)"}
        g_s = _med(delta["georep"])
        for tool in DELTA_TOOLS:
            rs = delta[tool]
            s, tot = _med(rs), _med(rs, "total")
            out.append(f"| {names[tool]} | {len(rs)} | {s:.2f} s | {_med(rs, 'cpu'):.2f} s | "
                       f"{_secs(_med(rs, 'cpu_remote'))} | {_secs(_med(rs, 'cpu_total'))} | "
                       f"{_med(rs, 'up') / 1e6:.3f} MB | {_med(rs, 'down') / 1e6:.3f} MB | "
                       f"{tot / 1e6:.3f} MB | {tot / g_tot:.2f}x | {s / g_s:.2f}x |")
        out += ["", "CPU here: the tool and its ssh client (`wait4`); CPU there: the process "
                "sshd started for it (`georep-node secondary`, the remote `rsync`), counted by "
                "GNU `/usr/bin/time -o FILE` around the remote command; sshd itself is in "
                "neither; each column is its own median."]
        g = delta["georep"][0].extra.get("transfer") or {}
        out += ["", f"georep's own counters (`--json` `transfer`, first repetition): "
                f"`{json.dumps(g, sort_keys=True)}`.", ""]
        out += ["Per repetition (wall, georep / rsync --inplace / rsync, load): " + "; ".join(
            f"{delta['georep'][i].seconds:.2f} / {delta['rsync-inplace'][i].seconds:.2f} / "
            f"{delta['rsync'][i].seconds:.2f} s ({delta['georep'][i].load1:.1f})"
            for i in range(len(delta["georep"]))) + ".", ""]
        ri = _med(delta["rsync-inplace"], "total")
        tr = _med(delta["rsync-inplace"])
        out += [f"Targets: bytes within {TARGET_BYTES_RATIO}x of rsync --inplace: georep/rsync = "
                f"{g_tot / ri:.2f}x ({'met' if g_tot <= TARGET_BYTES_RATIO * ri else 'MISSED'});"
                f" time <= rsync --inplace: georep/rsync = {g_s / tr:.2f}x "
                f"({'met' if g_s <= tr else 'MISSED'}).", ""]
    if ceiling:
        pipe = _med(ceiling["ssh-pipe"])
        disk = _med(ceiling["dd-cold"])
        out += [f"**The ceiling: one {result['mib']} MiB file** (drop_caches "
                f"{'available' if result.get('drop_caches') else 'NOT available: cold = warm'}):",
                "",
                "| what | n | wall | throughput | % of the ssh pipe | % of the cold disk read |",
                "|---|---:|---:|---:|---:|---:|"]
        names = {"dd-cold": "`dd if=FILE of=/dev/null bs=1M`, caches dropped",
                 "dd-warm": "`dd if=FILE of=/dev/null bs=1M`, page cache warm",
                 "ssh-pipe": "`cat FILE \\| ssh HOST 'cat > /dev/null'` (warm)",
                 "georep-warm": "georep sync --once, empty remote dir, warm cache",
                 "georep-cold": "georep sync --once, empty remote dir, caches dropped"}
        for tool in ("dd-cold", "dd-warm", "ssh-pipe", "georep-warm", "georep-cold"):
            s = _med(ceiling[tool])
            out.append(f"| {names[tool]} | {len(ceiling[tool])} | {s:.2f} s | "
                       f"{size / s / 1e6:.0f} MB/s | {pipe / s * 100:.0f} % | "
                       f"{disk / s * 100:.0f} % |")
        out.append("")
    out += [f"Commands ({SSH_LEGEND}, wrapped in `python bench/sshcount.py LOG` for the "
            "delta):",
            "",
            "```",
            "georep-node sync SRC HOST:DST --once --json --ssh-command SSH "
            "--remote-command \"$TIME python bin/georep-node\"",
            "rsync -aHAX --numeric-ids --inplace --rsync-path \"$TIME rsync\" -e SSH SRC/ "
            "HOST:DST/",
            "rsync -aHAX --numeric-ids --rsync-path \"$TIME rsync\" -e SSH SRC/ HOST:DST/",
            "# TIME=\"/usr/bin/time -f '%U %S' -o FILE\" (the remote side's CPU, delta only)",
            "sync; echo 3 > /proc/sys/vm/drop_caches; dd if=FILE of=/dev/null bs=1M",
            "cat FILE | SSH HOST 'cat > /dev/null'",
            "```"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bigfile",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir")
    ap.add_argument("--skip-delta", action="store_true")
    ap.add_argument("--skip-ceiling", action="store_true")
    ap.add_argument("--no-update-md", action="store_true")
    ns = ap.parse_args(argv)
    why = sshd_missing()
    if why:
        log(f"bench.bigfile: {why}")
        return 2
    base = Path(ns.workdir) if ns.workdir else Path(tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="georep-bench-bigfile-", dir=base))
    result: dict[str, Any] = {
        "benchmark": "bigfile", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mib": ns.mib, "reps": ns.reps, "machine": machine_info(base),
        "ssh_version": subprocess.run(["ssh", "-V"], capture_output=True, text=True,
                                      check=False).stderr.strip(),
        "sshd_version": sh(["dpkg-query", "-W", "-f", "${Version}", "openssh-server"])}
    delta = ceiling = None
    try:
        with start_sshd(work / "sshd") as server:
            src = work / "src"
            src.mkdir()
            big = src / "big.bin"
            log(f"writing {ns.mib} MiB of random data to {big}")
            write_random(big, ns.mib)
            if not ns.skip_ceiling:
                ceiling = bench_ceiling(ns, server, work, src, big, result)
            if not ns.skip_delta:
                strip_georep_xattrs(src)
                delta = bench_delta(ns, server, work, src, big, result)
    finally:
        rmtree(work)
    result["runs"] = {"delta": {k: [r.as_dict() for r in v] for k, v in (delta or {}).items()},
                      "ceiling": {k: [r.as_dict() for r in v]
                                  for k, v in (ceiling or {}).items()}}
    path = write_results("bigfile", result)
    body = render(result, delta, ceiling, path)
    print(body)
    if not ns.no_update_md:
        update_section("bigfile", body, title="One big file: delta and the ceiling")
    log(f"results: {path}  (commands: {shlex.join(['python', '-m', 'bench.bigfile'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
