"""Data engines (native, rsync, tarssh) over a real sshd and to a local secondary, the
bandwidth limit and ssh compression.  Nothing is mocked.

For every engine: a generated tree converges (compare_trees == []), then again after the
acceptance change mix, and a file whose data changed keeps its secondary inode, which is
still the one its gfid index link points to.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from actors.engines import TokenBucket, parse_rate
from fsops.constants import GFID_XATTR
from tests.e2e.helpers import georep
from tests.support.compare import compare_trees
from tests.support.sshd import REMOTE_COMMAND, SshServer
from tests.support.treegen import BIG16, apply_changes, make_tree

ENGINES = ["native", "rsync", "tarssh"]
needs_tools = pytest.mark.skipif(shutil.which("rsync") is None or shutil.which("tar") is None,
                                 reason="rsync and GNU tar are needed")


def _sync(primary: Path, secondary: str, *extra: str,
          sshd: SshServer | None = None) -> dict[str, object]:
    args: list[str] = []
    if sshd is not None:
        args = ["--ssh-command", sshd.ssh_command(), "--remote-command", REMOTE_COMMAND]
    proc = georep("sync", primary, secondary, "--once", "--json", *args, *extra, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    summary: dict[str, object] = json.loads(proc.stdout)
    return summary


def index_path(root: Path, obj: Path) -> Path:
    """The gfid index link of the secondary object ``obj``: ``<root>/.georep/gfid/`` then
    ``ab/<hex>`` (docs/protocol.md) or an older secondary's ``abc/<hex>``."""
    h = os.getxattr(obj, GFID_XATTR, follow_symlinks=False)[:16].hex()
    base = root / ".georep" / "gfid"
    for p in (base / h[0:2] / h, base / h[0:3] / h):
        if os.path.lexists(p):
            return p
    raise AssertionError(f"no index link for gfid {h} of {obj}")


def _spec(where: str, sshd: SshServer | None, secondary: Path) -> str:
    if where == "local":
        return str(secondary)
    assert sshd is not None
    return f"{sshd.user}@{sshd.host}:{secondary}"


@needs_tools
@pytest.mark.parametrize("where", ["local", "ssh"])
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_converges_and_keeps_inodes(engine: str, where: str, tmp_path: Path,
                                           request: pytest.FixtureRequest) -> None:
    sshd: SshServer | None = request.getfixturevalue("sshd") if where == "ssh" else None
    primary, secondary = tmp_path / "p", tmp_path / "s"
    make_tree(primary, entries=2000, big_sparse=False, big_files_mib=2, big_dir_files=500)
    spec = _spec(where, sshd, secondary)
    first = _sync(primary, spec, "--engine", engine, sshd=sshd)
    assert compare_trees(primary, secondary) == []
    counters = first["counters"]
    assert isinstance(counters, dict)
    assert counters.get("data_files", 0) >= 1  # some files are big enough for the engine
    if engine != "native":
        assert counters.get(f"{engine}_runs", 0) >= 1
        # One process per batch, not per file.
        assert counters[f"{engine}_runs"] <= counters["data_files"]

    big = secondary / os.fsdecode(BIG16)
    ino = os.stat(big).st_ino
    assert os.stat(index_path(secondary, big)).st_ino == ino

    apply_changes(primary)
    second = _sync(primary, spec, "--engine", engine, sshd=sshd)
    assert compare_trees(primary, secondary) == []
    c2 = second["counters"]
    assert isinstance(c2, dict) and c2.get("data_files", 0) >= 1
    # The data update went into the same inode, which the gfid index still links.
    assert os.stat(big).st_ino == ino
    assert os.stat(index_path(secondary, big)).st_ino == ino

    # A third run has nothing to move.
    third = _sync(primary, spec, "--engine", engine, sshd=sshd)
    c3 = third["counters"]
    assert isinstance(c3, dict) and c3.get("data_files", 0) == 0
    assert compare_trees(primary, secondary) == []


@needs_tools
@pytest.mark.parametrize("engine", ENGINES)
def test_hardlinked_file_keeps_its_links(engine: str, tmp_path: Path) -> None:
    """In-place writes: a hardlinked file updated by any engine stays one inode."""
    primary, secondary = tmp_path / "p", tmp_path / "s"
    primary.mkdir()
    (primary / "a").write_bytes(os.urandom(300_000))
    os.link(primary / "a", primary / "b")
    _sync(primary, str(secondary), "--engine", engine)
    ino = os.stat(secondary / "a").st_ino
    with open(primary / "a", "r+b") as f:
        f.seek(100_000)
        f.write(os.urandom(50_000))
        f.write(b"tail" * 1000)
    _sync(primary, str(secondary), "--engine", engine)
    assert compare_trees(primary, secondary) == []
    st = os.stat(secondary / "b")
    assert st.st_ino == ino == os.stat(secondary / "a").st_ino
    assert st.st_nlink == 3  # two names and the index link
    assert os.stat(index_path(secondary, secondary / "a")).st_ino == ino


@needs_tools
@pytest.mark.parametrize("engine", ["rsync", "tarssh"])
def test_engine_failure_is_a_ledger_failure(engine: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The external process fails: its files are listed with its stderr line, exit 1."""
    primary, secondary = tmp_path / "p", tmp_path / "s"
    primary.mkdir()
    (primary / "big.bin").write_bytes(os.urandom(200_000))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = "rsync" if engine == "rsync" else "tar"
    fake = bin_dir / tool
    fake.write_text(f"#!/bin/sh\necho 'fake {tool}: disk on fire' >&2\nexit 12\n")
    fake.chmod(0o755)
    with monkeypatch.context() as m:
        m.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        proc = georep("sync", primary, secondary, "--once", "--json", "--engine", engine)
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert len(summary["failures"]) == 1
    line = summary["failures"][0]
    assert "'big.bin'" in line and "disk on fire" in line and "status 12" in line
    # The next run (the real tool again) repairs it.
    _sync(primary, str(secondary), "--engine", engine)
    assert compare_trees(primary, secondary) == []


@pytest.mark.parametrize("engine", ENGINES)
def test_bwlimit_throttles(engine: str, tmp_path: Path) -> None:
    """A 4 MiB file at --bwlimit 1M takes about 4 s (asserted: at least 3 s)."""
    if engine != "native" and (shutil.which("rsync") is None or shutil.which("tar") is None):
        pytest.skip("rsync and GNU tar are needed")
    primary, secondary = tmp_path / "p", tmp_path / "s"
    primary.mkdir()
    (primary / "four.bin").write_bytes(os.urandom(4 << 20))
    t0 = time.monotonic()
    _sync(primary, str(secondary), "--engine", engine, "--bwlimit", "1M", "--jobs", "1")
    elapsed = time.monotonic() - t0
    assert compare_trees(primary, secondary) == []
    assert elapsed >= 3.0, f"{engine}: 4 MiB at 1 MiB/s took only {elapsed:.2f} s"


def test_compress_over_ssh(sshd: SshServer, tmp_path: Path) -> None:
    primary, secondary = tmp_path / "p", tmp_path / "s"
    primary.mkdir()
    (primary / "zeros.bin").write_bytes(b"\0" * 300_000 + b"x" * 300_000)
    for engine in ENGINES:
        _sync(primary, f"{sshd.user}@{sshd.host}:{secondary}", "--compress", "--engine", engine,
              sshd=sshd)
        assert compare_trees(primary, secondary) == []


def test_parse_rate_and_bucket() -> None:
    assert parse_rate("1000") == 1000
    assert parse_rate("512K") == 512 << 10
    assert parse_rate("1M") == 1 << 20
    assert parse_rate("1.5g") == 3 << 29
    assert parse_rate("2MiB") == 2 << 20
    for bad in ("", "fast", "-1M", "0"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    bucket = TokenBucket(1 << 20, burst=0)
    assert bucket.consume(1 << 18) >= 0.2  # 256 KiB at 1 MiB/s with no burst: ~0.25 s
    proc = georep("sync", "/nonexistent", "/tmp/x", "--bwlimit", "lots")
    assert proc.returncode == 2 and "not a rate" in proc.stderr
