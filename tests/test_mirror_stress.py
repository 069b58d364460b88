"""50,000 files through the mount under a 20,000 open-file limit, with bounded server descriptors.

The kernel remembers every inode it looked up; a mirror that held one O_PATH descriptor per
remembered inode would run out of descriptors long before 50,000. With ``max_path_fds=1000``
the server must keep its descriptor count near 1,000 however many inodes the kernel holds, and
every operation must still succeed (evicted inodes are reopened from their file handles).
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ServerProcess, mirror_argv

from fusepass import control

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

DIRS, PER_DIR = 100, 500
MAX_PATH_FDS = 1000
SLACK = 100  # /dev/fuse clones, the control socket, stdio, files open at the moment of the sample
CLIENTS = 4
OPEN_FILES_LIMIT = 20_000


def _open_files_limit(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc/PID/limits")


def _churn(directory: Path) -> None:
    """Create, stat, rename, hard-link and unlink PER_DIR files in a new ``directory``; the
    PER_DIR hard links stay."""
    directory.mkdir()
    names = range(PER_DIR)
    for i in names:
        os.close(os.open(directory / f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    for i in names:
        assert os.stat(directory / f"f{i}").st_size == 0
    for i in names:
        os.rename(directory / f"f{i}", directory / f"g{i}")
    for i in names:
        os.link(directory / f"g{i}", directory / f"h{i}")
    for i in names:
        os.unlink(directory / f"g{i}")


def test_fifty_thousand_files_with_bounded_descriptors(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    server = start_server(mirror_argv(src, "-o", f"max_path_fds={MAX_PATH_FDS}"))
    assert server.proc is not None
    # The limit the test is about, whatever this machine's default: set on the server alone.
    resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (OPEN_FILES_LIMIT, OPEN_FILES_LIMIT))
    assert _open_files_limit(server.proc.pid) == (OPEN_FILES_LIMIT, OPEN_FILES_LIMIT)
    mnt = Path(server.mountpoint)

    samples: list[dict] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def sample() -> None:
        status = control.query(str(mnt))
        samples.append({"open_fds": status["open_fds"], **status["filesystem"]["descriptors"]})

    def client(first: int) -> None:
        try:
            for d in range(first, DIRS, CLIENTS):
                _churn(mnt / f"d{d:03}")
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()

    def sampler() -> None:
        while not done.wait(0.5):
            sample()

    watcher = threading.Thread(target=sampler)
    watcher.start()
    try:
        for t in threads:
            t.join()
    finally:
        done.set()
        watcher.join()
    elapsed = time.monotonic() - start
    assert not errors, errors[0]

    # every file is there, with one link, in the source and through the mount (a sample is stat'ed there)
    expected = sorted(f"h{i}" for i in range(PER_DIR))
    for d in range(DIRS):
        assert sorted(os.listdir(src / f"d{d:03}")) == expected
        assert sorted(os.listdir(mnt / f"d{d:03}")) == expected
    assert all(os.stat(src / f"d{d:03}" / f"h{i}").st_nlink == 1 for d in range(DIRS) for i in range(PER_DIR))
    assert all(os.stat(mnt / f"d{d:03}" / f"h{i}").st_nlink == 1 for d in range(DIRS) for i in range(0, PER_DIR, 10))
    sample()

    print(f"\n{DIRS * PER_DIR} files churned in {elapsed:.1f}s; {len(samples)} samples; "
          f"max open_fds {max(s['open_fds'] for s in samples)}, max path fds {max(s['path'] for s in samples)}, "
          f"max inodes {max(s['inodes'] for s in samples)}")
    assert len(samples) >= 5
    for s in samples:
        assert 0 < s["open_fds"] < MAX_PATH_FDS + SLACK, s
        assert s["path"] <= MAX_PATH_FDS + CLIENTS + 1, s  # + pinned (open or in use) inodes
    # the cap was what kept it there: far more inodes were remembered than descriptors held
    assert max(s["inodes"] for s in samples) > 5 * MAX_PATH_FDS
    assert max(s["path"] for s in samples) >= MAX_PATH_FDS - CLIENTS
