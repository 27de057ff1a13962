"""An ssh client wrapper that counts the bytes crossing the ssh channel, both ways.

    python bench/sshcount.py LOGFILE ssh [ssh options] HOST COMMAND...

Runs the rest of its arguments (the real ssh client) with pipes and copies its own stdin
to the child's stdin and the child's stdout to its own stdout, counting both.  When the
child exits it appends one JSON line ``{"up": N, "down": M, "rc": RC}`` to LOGFILE:
``up`` = bytes sent to the remote command (the client's stdin), ``down`` = bytes
received from it.  These are the bytes of the ssh *channel* (what the tool asks ssh to
carry: protocol frames, checksums, data), the same for every tool; the cipher's own
overhead (packet headers, MACs, ~1-2 %) comes on top and is not counted.

Used as ``--ssh-command`` for georep and ``-e`` for rsync, so both are measured the
same way.  Run as a script (not ``-m``) so it starts without importing the repo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading


def _pump(src: int, dst: int, counts: dict[str, int], key: str) -> None:
    while True:
        try:
            buf = os.read(src, 1 << 18)
        except OSError:
            buf = b""
        if not buf:
            break
        counts[key] += len(buf)
        view = memoryview(buf)
        try:
            while view:
                view = view[os.write(dst, view):]
        except OSError:  # the reader went away: keep counting what arrives
            continue


def main() -> int:
    log, argv = sys.argv[1], sys.argv[2:]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    counts = {"up": 0, "down": 0}
    child_in = proc.stdin.fileno()

    def up() -> None:
        _pump(0, child_in, counts, "up")
        try:
            proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass

    threading.Thread(target=up, daemon=True).start()
    _pump(proc.stdout.fileno(), 1, counts, "down")
    rc = proc.wait()
    line = json.dumps({"up": counts["up"], "down": counts["down"], "rc": rc}) + "\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line.encode())
    os.close(fd)
    sys.stdout.flush()
    os._exit(rc)


if __name__ == "__main__":
    main()
