"""First sync of the hostile sample tree: georep next to rsync, in the same run.

    python -m bench.initial_sync [--entries 20000] [--data-mib 0] [--reps 3] [--keep]
                                 [--workdir DIR]

Builds the seeded tree of ``tests.support.treegen`` once, reads it once untimed (warm page
cache for every tool), then measures, into fresh destinations on the same filesystem:

1. ``initial``: first sync into an empty directory, ``--reps`` times, tool order alternating
   per repetition.  Before every timed run georep's own xattrs (gfids, marks) are removed
   from the primary, so each georep run is a true first sync (gfid assignment included) and
   rsync never copies them.  Peers: ``rsync -aHAX --numeric-ids`` (the issue's command) and
   ``rsync -aHAXS --numeric-ids`` (``-S``: without it rsync writes the 256 MiB sparse file
   as zeros).
2. ``changes``: ``tests.support.treegen.apply_changes`` on the primary, then a second
   georep ``--once`` onto its previous copy vs rsync (``--delete`` added, else rsync leaves
   deleted and renamed-away entries behind) onto its previous copy.  Once (the change mix
   can only be applied once to a tree).
3. ``nochange``: a third run with nothing changed, ``--reps`` times.

Every georep result is compared with ``tests.support.compare.compare_trees`` (untimed) and
the benchmark fails loudly on any difference.  Results: a table on stdout, JSON in
``bench/results/initial_sync-<timestamp>.json`` and the generated section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    GEOREP_NODE,
    REPO,
    BenchError,
    Run,
    fmt_ratio,
    fmt_s,
    georep_xattrs,
    log,
    machine_info,
    median,
    read_tree,
    restore_georep_xattrs,
    rmtree,
    strip_georep_xattrs,
    timed,
    update_section,
    write_results,
)
from tests.support.compare import compare_trees
from tests.support.treegen import apply_changes, make_tree

TOOLS = ("georep", "rsync", "rsync-S", "rsync-sync")
RSYNC = ["rsync", "-aHAX", "--numeric-ids"]
RSYNC_S = ["rsync", "-aHAXS", "--numeric-ids"]


def command(tool: str, src: Path, dst: Path, *, delete: bool = False,
            python: str = sys.executable, georep: str = str(GEOREP_NODE)) -> list[str]:
    if tool == "georep":
        return [python, georep, "sync", str(src), str(dst), "--once", "--json"]
    base = list(RSYNC_S if tool == "rsync-S" else RSYNC)
    if delete:
        base.append("--delete")
    argv = [*base, f"{src}/", f"{dst}/"]
    if tool == "rsync-sync":
        # georep returns once the secondary is on disk (its commit syncfs's it); this is
        # rsync with the same promise: `sync -f` is a syncfs of the destination's filesystem.
        return ["sh", "-c", f"{shlex.join(argv)} && sync -f {shlex.quote(str(dst))}"]
    return argv


def run_tool(tool: str, src: Path, dst: Path, *, delete: bool = False) -> Run:
    os.sync()  # write back the previous run's data outside the timed region
    run = timed(tool, command(tool, src, dst, delete=delete))
    if tool == "georep":
        summary = json.loads(run.stdout)
        if not summary.get("ok"):
            raise BenchError(f"georep did not converge: {run.stdout[-3000:]}")
        run.extra = {"georep_seconds": summary.get("seconds"),
                     "counters": summary.get("counters"), "transfer": summary.get("transfer")}
    return run


def verify(src: Path, dst: Path, what: str) -> None:
    t0 = time.perf_counter()
    diffs = compare_trees(src, dst)
    if diffs:
        head = "\n  ".join(diffs[:30])
        raise BenchError(f"{what}: georep's copy differs from the primary "
                         f"({len(diffs)} difference(s)):\n  {head}")
    log(f"  verified {what}: identical ({time.perf_counter() - t0:.1f} s)")


def warm_up(src: Path) -> None:
    """Read the tree once (:func:`bench.common.read_tree`) and start each tool once."""
    t0 = time.perf_counter()
    read_tree(src)
    subprocess.run([sys.executable, str(GEOREP_NODE), "--help"], stdout=subprocess.DEVNULL,
                   check=True)
    subprocess.run(["rsync", "--version"], stdout=subprocess.DEVNULL, check=True)
    log(f"warm-up read: {time.perf_counter() - t0:.1f} s")


def report(what: str, run: Run) -> None:
    log(f"{what} {run.tool:8s} {run.seconds:7.2f} s wall, {run.cpu:6.2f} s cpu "
        f"(load before {run.load1:.1f})")


def order(rep: int) -> tuple[str, ...]:
    return TOOLS if rep % 2 == 0 else tuple(reversed(TOOLS))


def bench(ns: argparse.Namespace) -> dict[str, Any]:
    base = Path(ns.workdir) if ns.workdir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="georep-bench-", dir=base))
    src = work / "primary"
    dst = {t: work / f"dst-{t}" for t in TOOLS}
    runs: dict[str, dict[str, list[Run]]] = {s: {t: [] for t in TOOLS}
                                             for s in ("initial", "changes", "nochange")}
    result: dict[str, Any] = {
        "benchmark": "initial_sync",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": {"entries": ns.entries, "reps": ns.reps, "seed": ns.seed,
                   "big_sparse": ns.big_sparse, "big_dir_files": ns.big_dir_files,
                   "data_mib": ns.data_mib},
        "machine": machine_info(base),
        "workdir": str(work),
    }
    try:
        log(f"building the tree ({ns.entries} entries, seed {ns.seed}) in {src}")
        t0 = time.perf_counter()
        result["tree"] = make_tree(src, seed=ns.seed, entries=ns.entries,
                                   big_sparse=ns.big_sparse,
                                   big_files_mib=4 if ns.big_sparse else 1,
                                   big_dir_files=ns.big_dir_files,
                                   data_mib=ns.data_mib)
        log(f"  built in {time.perf_counter() - t0:.1f} s: {result['tree']['entries']} entries, "
            f"{result['tree']['bytes'] / 2**20:.0f} MiB apparent")
        warm_up(src)

        # 1. first sync into empty directories
        saved_marks: dict[bytes, dict[bytes, bytes]] = {}
        for rep in range(ns.reps):
            for tool in order(rep):
                # A new directory per run, earlier copies kept until the end: deleting
                # 20,000 inodes just before a run makes journal-less ext4 skip each
                # recently freed inode while allocating (ialloc's recently_deleted), which
                # doubled the CPU time of whichever tool ran next.
                dst[tool] = work / f"dst-{tool}-{rep + 1}"
                dst[tool].mkdir()
                strip_georep_xattrs(src)
                run = run_tool(tool, src, dst[tool])
                runs["initial"][tool].append(run)
                report(f"initial  rep {rep + 1}/{ns.reps}", run)
                if tool == "georep":
                    saved_marks = georep_xattrs(src)
                    verify(src, dst[tool], f"initial sync rep {rep + 1}")

        # The copies of the last repetition are the "previous copies" of the second sync.
        # The primary gets back the gfids/marks of georep's last run (as if nothing had been
        # stripped), and the rsync copies are brought up to date with them, untimed, so the
        # timed rsync runs below copy only what apply_changes changed.
        restore_georep_xattrs(src, saved_marks)
        for tool in TOOLS[1:]:
            run_tool(tool, src, dst[tool], delete=True)

        # 2. second sync after the change mix
        log("applying the change mix")
        result["changes"] = json.loads(json.dumps(
            apply_changes(src, seed=ns.seed + 1),
            default=lambda o: os.fsdecode(o) if isinstance(o, bytes) else str(o)))
        for tool in TOOLS:
            run = run_tool(tool, src, dst[tool], delete=True)
            runs["changes"][tool].append(run)
            report("changes  ", run)
        verify(src, dst["georep"], "second sync (after the changes)")

        # 3. nothing changed
        for rep in range(ns.reps):
            for tool in order(rep):
                run = run_tool(tool, src, dst[tool], delete=True)
                runs["nochange"][tool].append(run)
                report(f"nochange rep {rep + 1}/{ns.reps}", run)
        verify(src, dst["georep"], "no-change sync")
    finally:
        if ns.keep:
            log(f"kept {work}")
        else:
            rmtree(work)

    result["commands"] = {
        "initial": {t: shlex.join(command(t, Path("PRIMARY"), Path("EMPTY_DEST"),
                                          python="python", georep="bin/georep-node"))
                    for t in TOOLS},
        "changes/nochange": {t: shlex.join(command(t, Path("PRIMARY"), Path("PREVIOUS_COPY"),
                                                   delete=True)) for t in TOOLS},
    }
    result["runs"] = {s: {t: [r.as_dict() for r in rs] for t, rs in per.items()}
                      for s, per in runs.items()}
    result["medians"] = {s: {t: median([r.seconds for r in rs]) for t, rs in per.items()}
                         for s, per in runs.items()}
    result["cpu_medians"] = {s: {t: median([r.cpu for r in rs]) for t, rs in per.items()}
                             for s, per in runs.items()}
    return result


SCENARIOS = (
    ("initial", "first sync, empty destination"),
    ("changes", "second sync after apply_changes"),
    ("nochange", "third sync, nothing changed"),
)


def table(result: dict[str, Any]) -> str:
    med, cpu = result["medians"], result["cpu_medians"]
    n = {s: len(result["runs"][s]["georep"]) for s, _ in SCENARIOS}
    lines = [
        "| scenario | n | georep | rsync -aHAX | georep / rsync -aHAX | rsync -aHAXS "
        "| georep / rsync -aHAXS | rsync -aHAX && sync -f | georep / (rsync && sync) "
        "| CPU georep / rsync / rsync -S / rsync && sync |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, label in SCENARIOS:
        g, r, rs = med[s]["georep"], med[s]["rsync"], med[s]["rsync-S"]
        rsy = med[s].get("rsync-sync")
        c = cpu[s]
        lines.append(f"| {label} | {n[s]} | {fmt_s(g)} | {fmt_s(r)} | {fmt_ratio(g, r)} "
                     f"| {fmt_s(rs)} | {fmt_ratio(g, rs)} | {fmt_s(rsy)} | {fmt_ratio(g, rsy)} "
                     f"| {c['georep']:.2f} / {c['rsync']:.2f} / {c['rsync-S']:.2f} / "
                     f"{c.get('rsync-sync') or 0:.2f} s |")
    return "\n".join(lines)


def markdown(result: dict[str, Any], json_path: Path) -> str:
    m, t, p = result["machine"], result["tree"], result["params"]
    cmds = result["commands"]
    loads = [r["load1"] for per in result["runs"].values() for rs in per.values() for r in rs]
    first = result["runs"]["initial"]["georep"][0]
    counters = first.get("counters") or {}
    transfer = first.get("transfer") or {}
    rel = json_path.relative_to(REPO) if json_path.is_relative_to(REPO) else json_path
    return f"""\
Generated by `python -m bench.initial_sync --entries {p['entries']} \
{f"--data-mib {p['data_mib']} " if p.get('data_mib') else ""}--reps {p['reps']}` on \
{result['started']} (georep {m['georep_rev']}); raw numbers in `{rel}` (not committed).
Wall times are medians over `n` runs, each tool into a new destination on the same
filesystem (earlier copies are kept until the end: deleting 20,000 inodes just before a
run makes journal-less ext4 slower to allocate inodes for the next one), tool order
alternating per repetition, page cache warm (one untimed read of the tree first), `sync`
before every timed run.  CPU = user + sys of the command and its
children (georep: primary and secondary host; rsync: its three processes), medians.
1-minute load average just before the timed runs: {min(loads):.1f} to {max(loads):.1f}
(on {m['nproc']} CPUs; anything above ~0.5 means other work shared the machine and the
wall times are noisy: compare the CPU column too).

| machine | |
|---|---|
| CPUs (nproc) | {m['nproc']} ({m['cpu'] or 'unknown model'}) |
| memory | {m['mem_gib']} GiB |
| kernel | {m['kernel']} |
| filesystem | {m['filesystem']} |
| Python | {m['python']} |
| rsync | {m['rsync']} |

Tree: `tests.support.treegen` seed {p['seed']}, {t['entries']} entries ({t['dirs']} dirs,
{t['files']} files, {t['symlinks']} symlinks, {t['hardlink_groups']} hardlink groups,
{t['xattr_entries']} entries with xattrs, {t['acl_entries']} with ACLs),
{t.get('data_bytes', 0) / 2**20:.0f} MiB of data, {t['bytes'] / 2**20:.0f} MiB apparent size{
    ', including a 256 MiB sparse file' if p['big_sparse'] else ''}.

{table(result)}

Commands (first sync into an empty directory; later syncs onto the previous copy):

```
{cmds['initial']['georep']}
{cmds['initial']['rsync']}
{cmds['initial']['rsync-S']}
{cmds['initial'].get('rsync-sync', '')}
{cmds['changes/nochange']['rsync']}
{cmds['changes/nochange']['rsync-S']}
```

georep's times include its `commit`: a syncfs of the secondary before the marks move (a
replica it reports as done is on disk). rsync does not sync; the `rsync && sync -f`
column gives it the same promise.

georep's first sync (first repetition): {counters.get('scanned', 0)} entries scanned,
{counters.get('created', 0)} created, {counters.get('linked', 0)} hardlinks,
{counters.get('inline_files', 0)} small files sent inline
({counters.get('inline_bytes', 0) / 2**20:.1f} MiB), {transfer.get('files', 0)} files by the
data path ({transfer.get('bytes_sent', 0) / 2**20:.1f} MiB sent), in-process time
{first.get('georep_seconds')} s of {first['seconds']:.2f} s wall.
The primary's gfids are removed before each first-sync run, so gfid assignment is included.
"""


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(f"bench.initial_sync: killed by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-big-sparse", dest="big_sparse", action="store_false",
                    help="no 256 MiB sparse file, 1 MiB big files")
    ap.add_argument("--data-mib", type=int, default=0,
                    help="top the tree's data up to this many MiB with files of 64 KiB to "
                         "48 MiB (default 0: the plain tree, ~112 MiB of data)")
    ap.add_argument("--big-dir-files", type=int, default=None,
                    help="files in the one big directory (default: min(5000, entries/4))")
    ap.add_argument("--workdir", help="parent of the scratch directory (default: $TMPDIR or /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--no-update-md", dest="update_md", action="store_false",
                    help="do not rewrite the section of BENCHMARKS.md")
    ns = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # clean the scratch directory on kill
    if ns.big_dir_files is None:
        ns.big_dir_files = min(5000, ns.entries // 4)
    if ns.reps < 1:
        ap.error("--reps must be at least 1")
    try:
        result = bench(ns)
    except BenchError as e:
        print(f"bench.initial_sync: FAILED: {e}", file=sys.stderr)
        return 1
    path = write_results("initial_sync", result)
    print(table(result))
    print(f"\nresults: {path}")
    if ns.update_md:
        update_section("initial_sync", markdown(result, path),
                       title="Initial sync: georep vs rsync")
        print("updated BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
