"""A watched source: the kernel caches names, attributes, listings and pages for a day, and every
change made directly in the source while they are cached still shows through the mount.

Each scenario first makes the mount cache what it is about to change (and checks that a second
look costs no request), then changes the source behind the mount's back, then waits on the
change itself showing through the mount: with a day-long cache, only a notification can make it
show. Passthrough and served (page cache) alike.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, mirror_argv, poll_until

from fusepass import control

pytestmark = pytest.mark.timeout(120)

Scenario = tuple[Callable[[Path], None], Callable[[Path], Any], Callable[[Path], None], Callable[[Path], Any]]


#: Requests for what the kernel may cache: names, listings and pages (an open is always asked, and a
#: read makes the kernel ask for the atime it changed).
CACHEABLE = ("LOOKUP", "READDIR", "READDIRPLUS", "READ")


def requests(mnt: Path, ops: tuple[str, ...] = CACHEABLE) -> int:
    counts = control.query(str(mnt))["requests"]
    return sum(counts.get(op, {}).get("count", 0) for op in ops)


def size_and_data(p: Path) -> tuple[int, bytes]:
    return os.stat(p).st_size, p.read_bytes()


def exists(p: Path) -> bool:
    return os.path.lexists(p)


def write(p: Path, data: bytes) -> None:
    p.write_bytes(data)


def replace(d: Path) -> None:
    write(d / "tmp", b"the replacement, longer")
    os.rename(d / "tmp", d / "f")


SCENARIOS: dict[str, Scenario] = {
    # name: (prepare the source, look through the mount, change the source, what the look must become)
    "content and size": (lambda d: write(d / "f", b"old"), lambda m: size_and_data(m / "f"),
                         lambda d: write(d / "f", b"new and longer"), lambda d: (14, b"new and longer")),
    "created name": (lambda d: None, lambda m: exists(m / "f"), lambda d: write(d / "f", b"x"), lambda d: True),
    "removed name": (lambda d: write(d / "f", b"x"), lambda m: exists(m / "f"), lambda d: os.unlink(d / "f"),
                     lambda d: False),
    "renamed name": (lambda d: write(d / "a", b"x"), lambda m: (exists(m / "a"), exists(m / "b")),
                     lambda d: os.rename(d / "a", d / "b"), lambda d: (False, True)),
    "replaced name": (lambda d: write(d / "f", b"old"), lambda m: ((m / "f").read_bytes(), os.stat(m / "f").st_ino),
                      replace, lambda d: (b"the replacement, longer", os.stat(d / "f").st_ino)),
    "directory moved": (lambda d: (d / "sub").mkdir() or write(d / "sub" / "g", b"in sub"),
                        lambda m: (exists(m / "sub"), exists(m / "moved" / "g") and (m / "moved" / "g").read_bytes()),
                        lambda d: os.rename(d / "sub", d / "moved"), lambda d: (False, b"in sub")),
    "mode": (lambda d: write(d / "f", b"x"), lambda m: stat.S_IMODE(os.stat(m / "f").st_mode),
             lambda d: os.chmod(d / "f", 0o640), lambda d: 0o640),
    "owner": (lambda d: write(d / "f", b"x"), lambda m: (os.stat(m / "f").st_uid, os.stat(m / "f").st_gid),
              lambda d: os.chown(d / "f", 4242, 4343), lambda d: (4242, 4343)),
    "times": (lambda d: write(d / "f", b"x"), lambda m: os.stat(m / "f").st_mtime_ns,
              lambda d: os.utime(d / "f", ns=(10**18, 10**18)), lambda d: 10**18),
    "hard link": (lambda d: write(d / "f", b"x"), lambda m: (os.stat(m / "f").st_nlink, exists(m / "h")),
                  lambda d: os.link(d / "f", d / "h"), lambda d: (2, True)),
    "listing": (lambda d: write(d / "a", b"x"), lambda m: sorted(os.listdir(m)),
                lambda d: write(d / "b", b"x") or os.unlink(d / "a"), lambda d: ["b"]),
}


@pytest.fixture(params=["auto", "off"], ids=["passthrough", "served"])
def watched(request: pytest.FixtureRequest, tmp_path: Path,
            start_server: Callable[..., ServerProcess]) -> tuple[Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    for name in SCENARIOS:
        (src / name.replace(" ", "-")).mkdir()
    server = start_server(mirror_argv(src, "--passthrough", request.param))
    mnt = Path(server.mountpoint)
    watcher = control.query(str(mnt))["filesystem"]["watcher"]
    assert watcher["on"] and watcher["timeout_s"] >= 3600, watcher
    return src, mnt


def test_every_kind_of_change_behind_the_mounts_back_shows_through_its_long_caches(
    watched: tuple[Path, Path]
) -> None:
    src, mnt = watched
    for name, (prepare, look, change, expected) in SCENARIOS.items():
        d, m = src / name.replace(" ", "-"), mnt / name.replace(" ", "-")
        prepare(d)
        look(m)  # now cached
        before = requests(mnt)
        first = look(m)
        assert requests(mnt) == before, f"{name}: a second look asked the server (nothing was cached)"
        change(d)
        want = expected(d)
        assert first != want, f"{name}: the scenario changes nothing"
        poll_until(lambda m=m, look=look: look(m), lambda v, want=want: v == want,  # noqa: B023
                   f"{name}: the change never showed through the mount")


def test_changes_made_through_the_mount_keep_their_caches(watched: tuple[Path, Path]) -> None:
    """The server's own changes raise events too; they are the mount's, so nothing is invalidated.
    (Data written through a passthrough file is the caller's own write to the backing file: the
    kernel refreshes the attributes after it anyway, so it is left out here.)"""
    src, mnt = watched
    os.mknod(mnt / "made", 0o644)
    os.rename(mnt / "made", mnt / "made-here")
    os.chmod(mnt / "made-here", 0o600)
    os.utime(mnt / "made-here", ns=(10**18, 10**18))
    os.mkdir(mnt / "dir-here")
    os.stat(mnt / "made-here")
    before = requests(mnt, ("LOOKUP", "GETATTR"))
    st = os.stat(mnt / "made-here")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == 10**18 and os.path.isdir(mnt / "dir-here")
    assert requests(mnt, ("LOOKUP", "GETATTR")) == before, "the mount's own changes dropped its caches"
    counts = control.query(str(mnt))["filesystem"]["watcher"]["notifications"]
    assert counts["entries"] == 0 and counts["inodes"] == 0, counts


def test_a_burst_that_overflows_the_event_queue_leaves_nothing_stale(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """With fanotify's queue made small for this mount (and put back), a thousand changes made while
    the server is stopped lose events: the mount then drops every cached name and attribute, and
    shows the source as it is."""
    limit = Path("/proc/sys/fs/fanotify/max_queued_events")
    saved = limit.read_text()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(100):
        write(src / f"old{i}", b"old")
    limit.write_text("64")
    try:
        server = start_server(mirror_argv(src))
    finally:
        limit.write_text(saved)
    mnt = Path(server.mountpoint)
    assert len(os.listdir(mnt)) == 100
    assert all((mnt / f"old{i}").read_bytes() == b"old" for i in range(100))
    assert not (mnt / "new0").exists()  # a negative entry, cached
    server.signal(signal.SIGSTOP)  # nothing uses the mount meanwhile: the changes go to the source
    try:
        for i in range(100):
            write(src / f"old{i}", b"new content")
        for i in range(1000):
            write(src / f"new{i}", b"x")
    finally:
        server.signal(signal.SIGCONT)
    poll_until(lambda: control.query(str(mnt))["filesystem"]["watcher"]["notifications"]["overflows"],
               lambda n: n > 0, "the queue of 64 events never overflowed")
    assert sorted(os.listdir(mnt)) == sorted(os.listdir(src))
    assert (mnt / "new0").exists()
    assert all((mnt / f"old{i}").read_bytes() == b"new content" for i in range(100))
