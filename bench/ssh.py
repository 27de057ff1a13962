"""georep over ssh next to rsync and a bare ssh pipe, in the same run, against one sshd.

    python -m bench.ssh [--entries 20000] [--data-mib 1024] [--reps 3] [--big-mib 1024]
                        [--drop-caches | --keep-caches] [--workdir DIR]

Starts a private OpenSSH server on 127.0.0.1 the way the tests do
(``tests.support.sshd.start_sshd``: own host key, own client key, root login) and measures:

1. ``tree``: the first sync of the ``tests.support.treegen`` tree (``--entries``, its data
   topped up to ``--data-mib`` MiB with files of 64 KiB to 48 MiB: issue #8's "20,000
   entries / ~1 GB"; ``--data-mib 0`` is the plain tree, ~112 MiB of data) into an
   empty remote directory, ``--reps`` times, tool order alternating: georep (native
   engine, one ssh connection) vs ``rsync -aHAX --numeric-ids -e "ssh ..."`` (the issue's
   reference) and ``rsync -aHAXS`` (with ``--sparse``).  Where georep puts AES-GCM first
   (a CPU with AES instructions, docs/ssh.md "Cipher"), georep with OpenSSH's default
   cipher and rsync with georep's cipher run too, so that the table separates what the
   cipher gives from what georep does.  As root, the page cache is dropped and the
   primary re-read before every run (``--keep-caches``: every copy stays cached until
   the end).  georep's xattrs are stripped from the primary before each of its runs (a
   true first sync).  Every georep copy is compared with ``compare_trees`` (untimed).
2. ``big``: one file of ``--big-mib`` MiB of random data (not sparse): georep native, and
   for reference the rsync and tarssh engines, into an empty remote directory, vs
   ``cat FILE | ssh HOST 'cat > /dev/null'`` (the ssh pipe's ceiling) and
   ``cat FILE | ssh HOST 'cat > DEST'`` (the same, writing the file).  Throughput is
   size / wall time of the whole command (process start, ssh handshake and final
   ``commit`` included).

All ssh commands use the same options (``SshServer.ssh_command()``: key, port, no host key
checks); the ``cat | ssh`` references use the cipher georep picks, and one more row the
OpenSSH default.  Medians are reported; JSON goes to ``bench/results/ssh-<timestamp>.json`` and
the table to the ``## Over ssh`` section of BENCHMARKS.md (between its markers).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    GEOREP_NODE,
    BenchError,
    Run,
    drop_caches,
    fmt_ratio,
    fmt_s,
    log,
    machine_info,
    median,
    read_tree,
    rmtree,
    strip_georep_xattrs,
    timed,
    update_section,
    write_results,
)
from tests.support.compare import compare_trees
from tests.support.sshd import REMOTE_COMMAND, SshServer, sshd_missing, start_sshd
from tests.support.treegen import make_tree
from transport.endpoint import Endpoint, ssh_base_argv

TREE_TOOLS = ("georep", "georep-chacha", "rsync", "rsync-aes", "rsync-S")
#: OpenSSH's default cipher, which georep replaces by AES-GCM on a CPU with AES (docs/ssh.md).
CHACHA = "chacha20-poly1305@openssh.com"
BIG_TOOLS = ("georep", "ssh-cat-null", "ssh-cat-file", "ssh-cat-sync", "disk-write",
             "georep-rsync", "georep-tarssh", "ssh-cat-null-default")


def georep_cmd(server: SshServer, src: Path, dst: Path, *extra: str,
               python: str = sys.executable, georep: str = str(GEOREP_NODE)) -> list[str]:
    return [python, georep, "sync", str(src), f"{server.user}@{server.host}:{dst}", "--once",
            "--json", "--ssh-command", server.ssh_command(), "--remote-command",
            REMOTE_COMMAND, *extra]


def georep_ciphers(server: SshServer) -> str:
    """The cipher option georep adds to ``server.ssh_command()`` here ("" when none)."""
    argv = ssh_base_argv(Endpoint("/", server.host, server.user), ssh_command=server.ssh_command())
    return "".join(f" {a}" for a in argv if a.startswith("-oCiphers="))


def rsync_cmd(server: SshServer, src: Path, dst: Path, sparse: bool,
              ssh_extra: str = "") -> list[str]:
    return ["rsync", "-aHAXS" if sparse else "-aHAX", "--numeric-ids", "-e",
            server.ssh_command() + ssh_extra, f"{src}/", f"{server.user}@{server.host}:{dst}/"]


def cat_cmd(server: SshServer, src: Path, remote: str, ssh_extra: str = "") -> list[str]:
    pipe = (f"cat {shlex.quote(str(src))} | {server.ssh_command()}{ssh_extra} "
            f"{server.user}@{server.host} {shlex.quote(remote)}")
    return ["sh", "-c", pipe]


def run_georep(tool: str, argv: list[str]) -> Run:
    os.sync()
    run = timed(tool, argv)
    summary = json.loads(run.stdout)
    if not summary.get("ok"):
        raise BenchError(f"{tool} did not converge: {run.stdout[-3000:]}")
    run.extra = {"georep_seconds": summary.get("seconds"), "counters": summary.get("counters"),
                 "transfer": summary.get("transfer")}
    return run


def verify(src: Path, dst: Path, what: str) -> None:
    diffs = compare_trees(src, dst)
    if diffs:
        raise BenchError(f"{what}: copy differs ({len(diffs)}):\n  " + "\n  ".join(diffs[:20]))
    log(f"  verified {what}: identical")


def report(what: str, run: Run, size: int | None = None) -> None:
    rate = f", {size / run.seconds / 1e6:7.1f} MB/s" if size else ""
    log(f"{what} {run.tool:14s} {run.seconds:7.2f} s wall, {run.cpu:6.2f} s cpu{rate}")


def bench_tree(ns: argparse.Namespace, server: SshServer, work: Path,
               result: dict[str, Any]) -> dict[str, list[Run]]:
    src = work / "tree"
    aes = georep_ciphers(server)
    result["georep_ciphers"] = aes.strip()
    # Without AES instructions georep keeps ssh's default: the cipher variants are the same.
    tree_tools = TREE_TOOLS if aes else ("georep", "rsync", "rsync-S")
    runs: dict[str, list[Run]] = {t: [] for t in tree_tools}
    log(f"building the tree ({ns.entries} entries, {ns.data_mib} MiB of data) in {src}")
    result["tree"] = make_tree(src, entries=ns.entries, data_mib=ns.data_mib)
    read_tree(src)
    for rep in range(ns.reps):
        tools = tree_tools if rep % 2 == 0 else tuple(reversed(tree_tools))
        for tool in tools:
            # A new directory per run, earlier copies kept until the end (deleting 20,000
            # inodes just before a run slows inode allocation on journal-less ext4).
            dst = work / f"dst-{tool}-{rep + 1}"
            dst.mkdir()
            if tool.startswith("georep"):
                # Before the caches are dropped: this walk would warm them for georep only.
                strip_georep_xattrs(src)
            os.sync()
            if ns.drop_caches or ns.cold_primary:
                # Every run from the same memory state: only the primary tree cached
                # (--cold-primary: nothing cached, as on a host whose data is on disk).
                if not drop_caches():
                    raise BenchError("--drop-caches: cannot write /proc/sys/vm/drop_caches")
                if not ns.cold_primary:
                    read_tree(src)
            if tool.startswith("georep"):
                extra = (["--ssh-command", f"{server.ssh_command()} -c {CHACHA}"]
                         if tool == "georep-chacha" else [])
                run = run_georep(tool, georep_cmd(server, src, dst, *extra))
            else:
                run = timed(tool, rsync_cmd(server, src, dst, sparse=tool == "rsync-S",
                                            ssh_extra=aes if tool == "rsync-aes" else ""))
            runs[tool].append(run)
            report(f"tree rep {rep + 1}/{ns.reps}", run)
            if tool == "georep" and rep == 0:
                verify(src, dst, "georep's first sync over ssh")
    for tool in tree_tools:
        for rep in range(ns.reps):
            rmtree(work / f"dst-{tool}-{rep + 1}")
    rmtree(src)
    return runs


def bench_big(ns: argparse.Namespace, server: SshServer, work: Path,
              result: dict[str, Any]) -> dict[str, list[Run]]:
    src = work / "big"
    src.mkdir()
    big = src / "big.bin"
    size = ns.big_mib << 20
    log(f"writing {ns.big_mib} MiB of random data to {big}")
    with open(big, "wb") as f:
        for _ in range(ns.big_mib // 8):
            f.write(os.urandom(8 << 20))
    result["big_bytes"] = size
    read_tree(src)
    aes = georep_ciphers(server)
    result["georep_ciphers"] = aes.strip()
    runs: dict[str, list[Run]] = {t: [] for t in BIG_TOOLS}
    for rep in range(ns.reps):
        tools = BIG_TOOLS if rep % 2 == 0 else tuple(reversed(BIG_TOOLS))
        for tool in tools:
            dst = work / f"bigdst-{tool}"
            rmtree(dst)
            dst.mkdir()
            if tool.startswith("georep"):
                strip_georep_xattrs(src)
                engine = tool.split("-", 1)[1] if "-" in tool else "native"
                run = run_georep(tool, georep_cmd(server, src, dst, "--engine", engine))
                if rep == 0:
                    verify(src, dst, f"{tool}: the big file")
            elif tool == "disk-write":
                # The secondary's disk alone: how fast 1 GiB is written *durably* there (georep
                # syncs the secondary before it moves its marks; `cat > DEST` does not).
                os.sync()
                run = timed(tool, ["dd", f"if={big}", f"of={dst / 'big.bin'}", "bs=1M",
                                   "conv=fdatasync", "status=none"])
            else:
                dest = shlex.quote(str(dst / 'big.bin'))
                remote = {"ssh-cat-null": "cat > /dev/null", "ssh-cat-file": f"cat > {dest}",
                          "ssh-cat-sync": f"cat > {dest} && sync {dest}",
                          "ssh-cat-null-default": "cat > /dev/null"}[tool]
                os.sync()
                # The pipe with georep's cipher (the ceiling georep is held to), and once
                # with OpenSSH's default for reference.
                run = timed(tool, cat_cmd(server, big, remote,
                                          "" if tool == "ssh-cat-null-default" else aes))
            runs[tool].append(run)
            report(f"big  rep {rep + 1}/{ns.reps}", run, size)
            rmtree(dst)
    rmtree(src)
    return runs


def _med(runs: list[Run]) -> float | None:
    return median([r.seconds for r in runs])


def _cpu(runs: list[Run]) -> float | None:
    return median([r.cpu for r in runs])


def _mcpu(runs: list[Run]) -> float:
    return median([r.machine_cpu for r in runs]) or 0.0


def _mbs(size: int, secs: float | None) -> str:
    return "-" if not secs else f"{size / secs / 1e6:.0f} MB/s"


def render(result: dict[str, Any], tree: dict[str, list[Run]] | None,
           big: dict[str, list[Run]] | None, results_path: str) -> str:
    m = result["machine"]
    p = result["params"]
    state = ("--cold-primary" if p.get("cold_primary") else
             "--drop-caches" if p.get("drop_caches") else "--keep-caches")
    out = [f"Generated by `python -m bench.ssh --entries {p['entries']} "
           f"--data-mib {p.get('data_mib', 0)} {state} --reps {p['reps']} "
           f"--big-mib {p['big_mib']}` on "
           f"{result['started']} (georep {m['georep_rev']}); raw numbers in "
           f"`{results_path}` (not committed).",
           "",
           "One private sshd on 127.0.0.1 (tests/support/sshd.py), the same ssh options for "
           "every tool (`ssh -F /dev/null -i KEY -p PORT -o StrictHostKeyChecking=no ...`; "
           f"the cipher is said per table). Machine: {m['nproc']} CPUs ({m['cpu']}), "
           f"{m['mem_gib']} GiB, {m['filesystem'].split()[0] if m['filesystem'] else '?'}, "
           f"Python {m['python']}, {m['rsync']}. Medians of wall time; CPU = user + sys of "
           "the command and its children (the ssh client and, for rsync, its local "
           "processes; the remote side runs under sshd and is not counted, except "
           "that on one machine it competes for the same 2 CPUs); CPU whole machine = "
           "busy time of all CPUs during the run (/proc/stat): both ends, the kernel's "
           "writeback, and anything else that ran.",
           ""]
    aes = result.get("georep_ciphers") or ""
    cipher_note = (f"georep offers AES-GCM first here (`{aes}`, docs/ssh.md \"Cipher\"); "
                   f"OpenSSH's own default is `{CHACHA}`" if aes else
                   "no AES instructions: georep keeps OpenSSH's default cipher")
    if tree:
        t = result["tree"]
        g = _med(tree["georep"])
        out += [f"**Initial sync of the treegen tree** ({t['entries']} entries, "
                f"{t.get('data_bytes', 0) / 2**20:.0f} MiB of data in "
                f"{t['files']} files ({t.get('media_files', 0)} of them of 64 KiB to 48 MiB "
                f"under media/), {t['bytes'] / 2**20:.0f} MiB apparent incl. a 256 MiB "
                "sparse file), into an empty remote directory; "
                + ("before every run the page cache is dropped and the primary is not read "
                   "again (`--cold-primary`: every tool reads the tree from the disk)"
                   if result["params"].get("cold_primary") else
                   "before every run the page cache is dropped and the primary read again "
                   "(`--drop-caches`: every run from the same memory state)"
                   if result["params"].get("drop_caches") else
                   "every copy stays until the end, and in the page cache for what it "
                   "wrote through it (rsync: all of its data; georep: files under 1 MiB)")
                + f". Cipher: {cipher_note}. The issue's reference is `rsync -aHAX "
                "--numeric-ids` as a user runs it (ssh's default cipher); the rows with the "
                "other cipher separate what the cipher gives from what georep itself does:",
                "",
                "| tool | ssh cipher | n | wall | georep / this | CPU here | CPU whole machine |",
                "|---|---|---:|---:|---:|---:|---:|"]
        rows = {"georep": ("georep (native), as shipped", "AES-GCM" if aes else "default"),
                "georep-chacha": ("georep (native), `-c` " + CHACHA.split("@")[0],
                                  "chacha20 (OpenSSH default)"),
                "rsync": ("rsync -aHAX --numeric-ids", "chacha20 (OpenSSH default)"
                          if aes else "default"),
                "rsync-aes": ("rsync -aHAX --numeric-ids, georep's cipher", "AES-GCM"),
                "rsync-S": ("rsync -aHAXS --numeric-ids", "chacha20 (OpenSSH default)"
                            if aes else "default")}
        for tool, (name, cipher) in rows.items():
            if tool not in tree:
                continue
            m_ = _med(tree[tool])
            out.append(f"| {name} | {cipher} | {len(tree[tool])} | {fmt_s(m_)} | "
                       f"{'-' if tool == 'georep' else fmt_ratio(g, m_)} | "
                       f"{_cpu(tree[tool]) or 0:.2f} s | {_mcpu(tree[tool]):.2f} s |")
        if "rsync-aes" in tree:
            out += ["", "Same cipher on both sides: georep / rsync -aHAX = "
                    f"{fmt_ratio(g, _med(tree['rsync-aes']))} with AES-GCM, "
                    f"{fmt_ratio(_med(tree['georep-chacha']), _med(tree['rsync']))} with "
                    "chacha20. Per repetition, georep / rsync -aHAX: " + ", ".join(
                        f"{a.seconds / b.seconds:.2f}"
                        for a, b in zip(tree["georep"], tree["rsync"], strict=False)) + "."]
        out.append("")
    if big:
        size = result["big_bytes"]
        ref, durable = _med(big["ssh-cat-null"]), _med(big["ssh-cat-sync"])
        out += [f"**One {size >> 20} MiB file of random data** (not sparse), into an empty "
                "remote directory (georep: whole command, start-up and commit included; "
                "like `sync DEST`, it returns only once the data is on the secondary's disk). "
                f"Cipher: {cipher_note}; the `cat | ssh` rows use georep's, the last row "
                "OpenSSH's default:",
                "",
                "| tool | n | wall | throughput | % of `cat \\| ssh 'cat > /dev/null'` |"
                " % of `ssh 'cat > DEST && sync DEST'` | CPU here | CPU whole machine |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        names = {"georep": "georep --engine native", "georep-rsync": "georep --engine rsync",
                 "georep-tarssh": "georep --engine tarssh",
                 "ssh-cat-null": "`cat FILE \\| ssh HOST 'cat > /dev/null'`",
                 "ssh-cat-file": "`cat FILE \\| ssh HOST 'cat > DEST'`",
                 "ssh-cat-sync": "`cat FILE \\| ssh HOST 'cat > DEST && sync DEST'`",
                 "disk-write": "`dd if=FILE of=DEST bs=1M conv=fdatasync` (no ssh: the disk)",
                 "ssh-cat-null-default": "`cat FILE \\| ssh HOST 'cat > /dev/null'`, "
                                         "OpenSSH's default cipher"}
        for tool in BIG_TOOLS:
            if tool not in big:
                continue
            s = _med(big.get(tool, []))
            pct = "-" if not s or not ref else f"{ref / s * 100:.0f} %"
            dpct = "-" if not s or not durable else f"{durable / s * 100:.0f} %"
            out.append(f"| {names[tool]} | {len(big.get(tool, []))} | {fmt_s(s)} | "
                       f"{_mbs(size, s)} | {pct} | {dpct} | {_cpu(big.get(tool, [])) or 0:.2f} s | "
                       f"{_mcpu(big.get(tool, [])):.2f} s |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ssh", description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=20000)
    ap.add_argument("--data-mib", type=int, default=1024,
                    help="data in the tree, MiB (issue #8: ~1 GB; 0: the plain tree, ~112 MiB)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--workdir", help="parent of the scratch directory (default $TMPDIR)")
    caches = ap.add_mutually_exclusive_group()
    caches.add_argument("--drop-caches", dest="drop_caches", action="store_true",
                        default=os.geteuid() == 0,
                        help="tree: drop the page cache and re-read the primary before every "
                             "run, so no run pays for the copies cached before it (the "
                             "default as root)")
    caches.add_argument("--keep-caches", dest="drop_caches", action="store_false",
                        help="tree: keep every copy in the page cache until the end (the "
                             "default when not root)")
    caches.add_argument("--cold-primary", action="store_true",
                        help="tree: drop the page cache before every run and do not read "
                             "the primary again: every tool reads it from the disk (root)")
    ap.add_argument("--skip-tree", action="store_true")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--no-update-md", action="store_true")
    ns = ap.parse_args(argv)
    why = sshd_missing()
    if why:
        log(f"bench.ssh: {why}")
        return 2
    base = Path(ns.workdir) if ns.workdir else Path(tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="georep-bench-ssh-", dir=base))
    result: dict[str, Any] = {"benchmark": "ssh", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "params": {"entries": ns.entries, "data_mib": ns.data_mib,
                                         "drop_caches": ns.drop_caches,
                                         "cold_primary": ns.cold_primary,
                                         "reps": ns.reps,
                                         "big_mib": ns.big_mib},
                              "machine": machine_info(base)}
    tree = big = None
    try:
        with start_sshd(work / "sshd") as server:
            result["ssh_command"] = server.ssh_command()
            if not ns.skip_tree:
                tree = bench_tree(ns, server, work, result)
            if not ns.skip_big:
                big = bench_big(ns, server, work, result)
    finally:
        rmtree(work)
    result["runs"] = {
        "tree": {k: [r.as_dict() for r in v] for k, v in (tree or {}).items()},
        "big": {k: [r.as_dict() for r in v] for k, v in (big or {}).items()},
    }
    path = write_results("ssh", result)
    body = render(result, tree, big, str(path.relative_to(path.parents[2])))
    print(body)
    if not ns.no_update_md:
        update_section("ssh", body, title="Over ssh")
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
