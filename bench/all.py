"""Every benchmark scenario in turn: ``make bench`` runs this.

    python -m bench.all [--quick] [--million] [--only NAME,...]

Runs, one after the other (never two at once: they would share the CPUs), each scenario
module with its standard parameters; each one measures georep and its peers in the same
run, alternating, and writes its table to stdout, its JSON to ``bench/results/`` and its
own section of BENCHMARKS.md:

- ``initial_sync``: first/second/no-change sync vs rsync, local (bench/initial_sync.py)
- ``ssh``: first sync of 20,000 entries / ~1 GiB and a 1 GiB file over ssh vs rsync and
  the ssh pipe (bench/ssh.py): issue #8's initial-sync scenario
- ``live``: continuous replication latency, bursts, renames vs lsyncd (bench/live.py)
- ``bigfile``: 1 MiB changed in a 1 GiB file (bytes on the wire, time) vs rsync, and
  the ceiling: disk read, ssh pipe (bench/bigfile.py)
- ``scale``: 100 changes in 20k / 200k (/ 1M with ``--million``) entry trees: georep
  live vs an rsync rescan vs lsyncd, and peak RSS (bench/scale.py)

``--quick`` runs every module with small parameters (a few minutes in all) and does not
touch BENCHMARKS.md (``--no-update-md``): a smoke test of the benchmarks themselves, not
figures to quote.  ``--million`` adds the 1,000,000-entry tree to ``scale`` (long: about
half an hour on 2 CPUs).  Missing peers (rsync, lsyncd, sshd) are installed first with
``scripts/setup.sh`` (Debian packages).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from bench.common import REPO, log

FULL: dict[str, list[str]] = {
    "initial_sync": ["--entries", "20000", "--reps", "3"],
    "ssh": ["--entries", "20000", "--data-mib", "1024", "--reps", "3", "--big-mib", "1024"],
    "live": [],
    "bigfile": ["--mib", "1024", "--reps", "3"],
    "scale": ["--sizes", "20000,200000", "--reps", "3"],
}
QUICK: dict[str, list[str]] = {
    "initial_sync": ["--entries", "2000", "--reps", "1", "--no-big-sparse"],
    "ssh": ["--entries", "2000", "--data-mib", "64", "--reps", "1", "--big-mib", "64"],
    "live": ["--duration", "3", "--burst", "500", "--rename-files", "500"],
    "bigfile": ["--mib", "64", "--reps", "1"],
    "scale": ["--sizes", "5000", "--reps", "1", "--settle", "1"],
}


def peers_missing() -> list[str]:
    missing = [t for t in ("rsync", "lsyncd", "ssh", "ssh-keygen") if shutil.which(t) is None]
    if not os.access("/usr/sbin/sshd", os.X_OK):
        missing.append("sshd")
    return missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small parameters, a few minutes, BENCHMARKS.md left alone")
    ap.add_argument("--million", action="store_true",
                    help="scale: also the 1,000,000-entry tree (long)")
    ap.add_argument("--only", default=",".join(FULL),
                    help=f"comma-separated subset of {','.join(FULL)}")
    ns = ap.parse_args(argv)
    missing = peers_missing()
    if missing:
        log(f"bench.all: missing {', '.join(missing)}: running scripts/setup.sh")
        subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], check=True,
                       env=dict(os.environ, PY=sys.executable))
    table = QUICK if ns.quick else FULL
    names = [n for n in ns.only.split(",") if n]
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(unknown)}")
    status: list[tuple[str, int, float]] = []
    for name in names:
        args = list(table[name])
        if ns.quick:
            args.append("--no-update-md")
        if name == "scale" and ns.million:
            args.append("--million")
        cmd = [sys.executable, "-m", f"bench.{name}", *args]
        log(f"\n=== {' '.join(['python', *cmd[1:]])}   (load {os.getloadavg()[0]:.2f})")
        t0 = time.monotonic()
        rc = subprocess.run(cmd, cwd=REPO, check=False).returncode
        status.append((name, rc, time.monotonic() - t0))
    log("\n=== bench.all summary")
    for name, rc, secs in status:
        log(f"  {name:13s} {'ok' if rc == 0 else f'FAILED (exit {rc})':18s} {secs:7.0f} s")
    return 0 if all(rc == 0 for _, rc, _ in status) else 1


if __name__ == "__main__":
    sys.exit(main())
