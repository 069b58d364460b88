"""Resource discipline: after long runs of opens and of metadata churn, the server holds no more
descriptors, backing ids or memory than after the first tenth of the run.

Each test runs its workload in two phases with several client processes: the first tenth, then the
rest. After each phase it waits (bounded) until the server has seen every RELEASE and FORGET, which
the kernel sends asynchronously, and records the server's figures: open descriptors, backing ids,
the mirror's descriptor counts and its resident memory (VmRSS). The second record may not exceed
the first, except memory by a small tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, ServerProcess, mirror_argv, poll_until

from fusepass import control

pytestmark = pytest.mark.timeout(240)

PROCESSES = 4
RSS_TOLERANCE = (1.10, 4 << 10)  # factor, plus KiB
SETTLE_TIMEOUT = 20.0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def settled(mnt: Path, pid: int, done: Callable[[dict[str, Any]], bool]) -> dict[str, int]:
    """The server's figures once ``done(status)`` holds (polled: the kernel sends RELEASE and FORGET
    asynchronously and says nothing when it has); fails after SETTLE_TIMEOUT."""
    st = poll_until(lambda: control.query(str(mnt)), done, "the server did not settle", SETTLE_TIMEOUT)
    return {"open_fds": st["open_fds"], "backing_ids": st["passthrough"]["backing_ids"],
            "rss_kib": rss_kib(pid), "opens": st["passthrough"]["opens"],
            "served_opens": st["passthrough"]["served_opens"], **st["filesystem"]["descriptors"]}


def all_closed(st: dict[str, Any]) -> bool:
    d = st["filesystem"]["descriptors"]
    return bool(st["passthrough"]["backing_ids"] == 0 and d["files"] == 0 and d["dirs"] == 0)


def run_clients(code: str, args: list[list[str]], timeout: float) -> None:
    """Run one client process per argument list; each must exit 0 within ``timeout``."""
    procs = [subprocess.Popen([sys.executable, "-c", code, *a], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for a in args]
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            assert p.returncode == 0, out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def assert_no_growth(first: dict[str, int], last: dict[str, int]) -> None:
    assert last["backing_ids"] == 0
    assert last["open_fds"] <= first["open_fds"], (first, last)
    assert last["path"] <= first["path"], (first, last)
    assert last["inodes"] <= first["inodes"], (first, last)
    factor, extra = RSS_TOLERANCE
    assert last["rss_kib"] <= first["rss_kib"] * factor + extra, (first, last)


def report(name: str, first: dict[str, int], last: dict[str, int], seconds: float) -> None:
    print(f"\n{name} in {seconds:.1f}s: after the first tenth -> at the end: "
          + ", ".join(f"{k} {first[k]} -> {last[k]}" for k in ("open_fds", "backing_ids", "path", "inodes",
                                                                   "rss_kib")))


# --- open/close cycles ----------------------------------------------------------------------------

FILES = 1000
CYCLES = 100_000

# Opens files round-robin from ``start`` with ``stride``, alternately read-only and read-write, checks
# that each is the file it named, closes it.
OPENER = r"""
import os, sys
root, files, start, stride, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
paths = [os.path.join(root, "f%04d" % i) for i in range(files)]
for n in range(count):
    i = (start + n * stride) % files
    fd = os.open(paths[i], os.O_RDWR if n & 1 else os.O_RDONLY)
    try:
        head = os.pread(fd, 5, 0)
    finally:
        os.close(fd)
    if head != b"%05d" % i:
        sys.exit(f"file {i} read as {head!r}")
"""


def test_hundred_thousand_opens_leave_no_descriptors_backing_ids_or_memory(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(FILES):
        (src / f"f{i:04}").write_bytes(b"%05d" % i + os.urandom(4091))
    server = start_server(mirror_argv(src))
    assert server.proc is not None
    mnt, pid = Path(server.mountpoint), server.proc.pid

    def phase(cycles: int, offset: int) -> None:
        per = cycles // PROCESSES
        run_clients(OPENER, [[str(mnt), str(FILES), str(offset + k), str(PROCESSES), str(per)]
                             for k in range(PROCESSES)], timeout=180)

    start = time.monotonic()
    phase(CYCLES // 10, 0)
    first = settled(mnt, pid, all_closed)
    phase(CYCLES - CYCLES // 10, 1)
    last = settled(mnt, pid, all_closed)
    seconds = time.monotonic() - start
    report(f"{CYCLES:,} open/close cycles over {FILES:,} files", first, last, seconds)

    assert first["opens"] >= CYCLES // 10 and last["opens"] >= CYCLES, "the opens were not passed through"
    assert last["served_opens"] == 0
    assert_no_growth(first, last)


# --- metadata churn -------------------------------------------------------------------------------

CHURN = 20_000

# In its own directory: create a file with content, rename it, stat it, hard-link it, unlink both
# names; every tenth round also makes and removes a directory.
CHURNER = r"""
import os, sys
root, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(first, first + count):
    a, b, c = (os.path.join(root, "%s%d" % (p, i)) for p in "abc")
    fd = os.open(a, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"%08d" % i)
    os.close(fd)
    os.rename(a, b)
    if os.stat(b).st_size != 8:
        sys.exit(f"{b} has the wrong size")
    os.link(b, c)
    os.unlink(b)
    with open(c, "rb") as f:
        if f.read() != b"%08d" % i:
            sys.exit(f"{c} has the wrong content")
    os.unlink(c)
    if i % 10 == 0:
        os.mkdir(a)
        os.rmdir(a)
if os.listdir(root):
    sys.exit(f"left behind: {os.listdir(root)[:5]}")
"""


def test_metadata_churn_leaves_no_descriptors_inodes_or_memory(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for k in range(PROCESSES):
        (src / f"d{k}").mkdir()
    server = start_server(mirror_argv(src))
    assert server.proc is not None
    mnt, pid = Path(server.mountpoint), server.proc.pid
    baseline = settled(mnt, pid, all_closed)

    def phase(count: int, first: int) -> None:
        per = count // PROCESSES
        run_clients(CHURNER, [[str(mnt / f"d{k}"), str(first), str(per)] for k in range(PROCESSES)], timeout=180)

    def forgotten(st: dict[str, Any]) -> bool:  # every unlinked inode was forgotten
        return all_closed(st) and st["filesystem"]["descriptors"]["inodes"] <= baseline["inodes"] + PROCESSES

    start = time.monotonic()
    phase(CHURN // 10, 0)
    first = settled(mnt, pid, forgotten)
    phase(CHURN - CHURN // 10, CHURN)
    last = settled(mnt, pid, forgotten)
    seconds = time.monotonic() - start
    report(f"{CHURN:,} files created, renamed, linked and unlinked", first, last, seconds)

    assert sorted(os.listdir(src)) == [f"d{k}" for k in range(PROCESSES)]
    assert all(os.listdir(src / f"d{k}") == [] for k in range(PROCESSES))
    assert_no_growth(first, last)


# --- the soak, briefly --------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_soak_for_twenty_seconds_has_no_errors_mismatches_or_leaks(tmp_path: Path) -> None:
    """``bench/soak.py`` for 20 seconds: both mounts, every worker kind, every file checked at the end."""
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, "-m", "bench.soak", "--seconds", "20", "--json", str(out)], cwd=REPO,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=150)
    print(r.stdout[-3000:])
    summary = json.loads(out.read_text())
    assert summary["errors"] == 0 and summary["mismatches"] == 0, r.stdout
    assert summary["operations"] > 10_000 and summary["files_verified"] > 100, r.stdout
    assert summary["leaks_found"] == 0 and summary["server_log_errors"] == 0, r.stdout
    assert summary["left_mounted"] == [] and r.returncode == 0, r.stdout + r.stderr
    pt, served = summary["servers"]["pt"]["end"], summary["servers"]["served"]["end"]
    assert pt["passthrough_opens"] > 0 and pt["served_opens"] == 0
    assert served["passthrough_opens"] == 0 and served["served_opens"] > 0
