"""The source watcher on real directories: every kind of change arrives with the handles and names the
mirror knows its inodes by, changes outside the watched directories never arrive, an overflowing queue is
reported, and stopping leaves no descriptor or thread behind."""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import NOBODY, ServerProcess, run_as

from fusepass import syscalls
from fusepass.watcher import OVERFLOW, Change, Event, SourceWatcher, WatcherUnavailable, parse_events

MAX_QUEUED = Path("/proc/sys/fs/fanotify/max_queued_events")


class Collector:
    """The watcher's callback: records every change, and lets the test wait for one."""

    def __init__(self) -> None:
        self.changes: queue.Queue[Change] = queue.Queue()
        self.seen: list[Change] = []
        self.batches = 0

    def __call__(self, changes: list[Change]) -> None:
        self.batches += 1
        for c in changes:
            self.changes.put(c)

    def until(self, match: Callable[[Change], bool], what: str, timeout: float = 10.0) -> Change:
        deadline = time.monotonic() + timeout
        while True:
            try:
                change = self.changes.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no change {what} within {timeout}s; seen: {self.seen}") from None
            self.seen.append(change)
            if match(change):
                return change


def handle(path: Path) -> bytes:
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    try:
        return syscalls.name_to_handle(fd)
    finally:
        os.close(fd)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    path.mkdir()
    return path


@pytest.fixture
def watched(src: Path) -> Iterator[tuple[SourceWatcher, Collector]]:
    collector = Collector()
    with SourceWatcher(str(src), collector) as watcher:
        yield watcher, collector


@contextlib.contextmanager
def opened(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_PATH)
    try:
        yield fd
    finally:
        os.close(fd)


def test_root_handle_is_the_sources_name_to_handle(src: Path, watched: tuple[SourceWatcher, Collector]) -> None:
    watcher, _ = watched
    assert watcher.root_handle == handle(src)
    assert watcher.marks == 1


def test_create_names_the_directory_the_entry_and_the_new_file(src: Path,
                                                               watched: tuple[SourceWatcher, Collector]) -> None:
    _, seen = watched
    (src / "new").write_bytes(b"x")
    c = seen.until(lambda c: c.name == b"new" and bool(c.events & Event.CREATE), "CREATE new")
    assert c.dir == handle(src)
    assert c.handle == handle(src / "new")
    assert not c.is_dir


def test_mkdir_is_a_create_of_a_directory(src: Path, watched: tuple[SourceWatcher, Collector]) -> None:
    _, seen = watched
    (src / "d").mkdir()
    c = seen.until(lambda c: c.name == b"d" and bool(c.events & Event.CREATE), "CREATE d")
    assert c.is_dir and c.dir == handle(src) and c.handle == handle(src / "d")


def test_delete_names_the_entry_and_the_file_that_went(src: Path, watched: tuple[SourceWatcher, Collector]) -> None:
    _, seen = watched
    (src / "gone").write_bytes(b"")
    gone = handle(src / "gone")
    (src / "gone").unlink()
    c = seen.until(lambda c: bool(c.events & Event.DELETE), "DELETE gone")
    assert (c.dir, c.name, c.handle) == (handle(src), b"gone", gone)


def test_rename_between_watched_directories_has_both_names(src: Path,
                                                           watched: tuple[SourceWatcher, Collector]) -> None:
    watcher, seen = watched
    (src / "a").mkdir()
    (src / "b").mkdir()
    with opened(src / "b") as fd:
        watcher.watch(fd)
    (src / "a" / "f").write_bytes(b"")  # a is not watched: its entries are not reported
    moved = handle(src / "a" / "f")
    with opened(src / "a") as fd:
        watcher.watch(fd)
    (src / "a" / "f").rename(src / "b" / "g")
    c = seen.until(lambda c: bool(c.events & Event.RENAME), "RENAME f -> g")
    assert (c.dir, c.name) == (handle(src / "a"), b"f")
    assert (c.new_dir, c.new_name) == (handle(src / "b"), b"g")
    assert c.handle == moved


def test_rename_out_of_the_watched_directories_has_only_the_old_name(tmp_path: Path, src: Path,
                                                                     watched: tuple[SourceWatcher, Collector]) -> None:
    _, seen = watched
    (src / "f").write_bytes(b"")
    moved = handle(src / "f")
    (src / "f").rename(tmp_path / "outside")
    c = seen.until(lambda c: bool(c.events & Event.RENAME), "RENAME out")
    assert (c.dir, c.name, c.handle) == (handle(src), b"f", moved)
    assert c.new_dir is None and c.new_name is None


def test_write_reports_modify_then_close_write_of_the_file(src: Path,
                                                           watched: tuple[SourceWatcher, Collector]) -> None:
    _, seen = watched
    path = src / "data"
    path.write_bytes(b"old")
    h = handle(path)
    seen.until(lambda c: bool(c.events & Event.CLOSE_WRITE), "the creation's CLOSE_WRITE")
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, b"new content")
        c = seen.until(lambda c: bool(c.events & Event.MODIFY), "MODIFY")
        assert (c.handle, c.dir, c.name) == (h, handle(src), b"data")
    finally:
        os.close(fd)
    c = seen.until(lambda c: bool(c.events & Event.CLOSE_WRITE), "CLOSE_WRITE")
    assert c.handle == h


def test_attribute_change_of_a_child_and_of_the_directory_itself(src: Path,
                                                                 watched: tuple[SourceWatcher, Collector]) -> None:
    _, seen = watched
    (src / "f").write_bytes(b"")
    seen.until(lambda c: bool(c.events & Event.CLOSE_WRITE), "the creation")
    os.chmod(src / "f", 0o600)
    c = seen.until(lambda c: bool(c.events & Event.ATTRIB), "ATTRIB of f")
    assert (c.handle, c.dir, c.name) == (handle(src / "f"), handle(src), b"f")
    os.chmod(src, 0o750)
    c = seen.until(lambda c: bool(c.events & Event.ATTRIB) and c.is_dir, "ATTRIB of the directory")
    assert (c.handle, c.dir, c.name) == (handle(src), None, None)


def test_a_watched_directory_moved_and_deleted_reports_itself(tmp_path: Path, src: Path,
                                                              watched: tuple[SourceWatcher, Collector]) -> None:
    watcher, seen = watched
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "d").mkdir()
    with opened(outside / "d") as fd:
        h = watcher.watch(fd)
    (outside / "d").rename(outside / "e")
    c = seen.until(lambda c: bool(c.events & Event.MOVE_SELF), "MOVE_SELF")
    assert c.handle == h and c.is_dir
    (outside / "e").rmdir()  # no descriptor of it is left open, so the inode goes at once
    c = seen.until(lambda c: bool(c.events & Event.DELETE_SELF), "DELETE_SELF")
    assert c.handle == h


def test_a_watched_file_reports_changes_made_through_another_hard_link(
        tmp_path: Path, src: Path, watched: tuple[SourceWatcher, Collector]) -> None:
    watcher, seen = watched
    (src / "f").write_bytes(b"")
    seen.until(lambda c: bool(c.events & Event.CLOSE_WRITE), "the creation")
    os.link(src / "f", tmp_path / "other-name")
    with opened(src / "f") as fd:
        h = watcher.watch(fd)
    with open(tmp_path / "other-name", "ab") as f:
        f.write(b"through the other name")
    c = seen.until(lambda c: bool(c.events & Event.MODIFY), "MODIFY through the other link")
    assert c.handle == h


def test_changes_outside_the_watched_directories_never_arrive(tmp_path: Path, src: Path,
                                                             watched: tuple[SourceWatcher, Collector]) -> None:
    _, seen = watched
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    (src / "sub").mkdir()  # inside the source, but never watched
    seen.until(lambda c: c.name == b"sub", "mkdir sub")
    seen.seen.clear()
    for i in range(200):
        (sibling / f"s{i}").write_bytes(b"x")
        (src / "sub" / f"u{i}").write_bytes(b"x")
    os.rename(sibling / "s0", sibling / "s-renamed")
    os.chmod(sibling, 0o700)
    (src / "sentinel").write_bytes(b"")  # queued after everything above: when it arrives, the rest had
    seen.until(lambda c: c.name == b"sentinel", "the sentinel")
    foreign = {handle(sibling), handle(src / "sub")}
    assert all(c.dir not in foreign and c.new_dir not in foreign and c.handle not in foreign for c in seen.seen)
    assert {c.name for c in seen.seen} == {b"sentinel"}


@contextlib.contextmanager
def event_queue_of(size: int) -> Iterator[int]:
    """Groups made inside the block queue at most ``size`` events (the kernel reads the limit when a group
    is made); the limit is put back on leaving. Yields the size in force (the old one if not writable)."""
    old = MAX_QUEUED.read_text().strip()
    try:
        MAX_QUEUED.write_text(str(size))
    except OSError:
        yield int(old)
        return
    try:
        yield size
    finally:
        MAX_QUEUED.write_text(old)


def test_an_overflowing_queue_is_reported(src: Path) -> None:
    seen = Collector()
    with event_queue_of(16) as queued:
        watcher = SourceWatcher(str(src), seen)
    try:
        for i in range(queued + 50):  # not read yet (the thread starts after); distinct names never merge
            (src / f"f{i}").write_bytes(b"")
        watcher.start()
        seen.until(lambda c: c is OVERFLOW, "OVERFLOW")
        assert watcher.counts["overflows"] == 1
        assert sum(1 for c in seen.seen if c is not OVERFLOW) == queued
    finally:
        watcher.stop()


def test_changes_made_by_the_ignored_process_never_arrive(src: Path) -> None:
    seen = Collector()
    with SourceWatcher(str(src), seen, ignore_pid=os.getpid()):
        (src / "mine").write_bytes(b"x")
        subprocess.run(["touch", str(src / "theirs")], check=True, timeout=30)
        seen.until(lambda c: c.name == b"theirs", "CREATE theirs")
    # fanotify keeps a group's events in order: had "mine" been reported, it would be there already
    assert not [c for c in seen.seen if c.name == b"mine" or c.handle == handle(src / "mine")]


def test_overflow_and_malformed_records_parse_without_guessing() -> None:
    overflow = struct.pack("=IBBHQii", 24, 3, 0, 24, 0x4000, -1, 0)
    assert parse_events(overflow) == [OVERFLOW]
    assert parse_events(overflow[:20]) == []  # truncated
    assert parse_events(struct.pack("=IBBHQii", 24, 2, 0, 24, 0x100, -1, 0)) == []  # unknown version
    assert parse_events(struct.pack("=IBBHQii", 8, 3, 0, 24, 0x100, -1, 0) + overflow) == []  # bad length


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_stop_leaves_no_descriptor_or_thread(src: Path) -> None:
    before = _fds()
    seen = Collector()
    watcher = SourceWatcher(str(src), seen).start()
    (src / "d").mkdir()
    with opened(src / "d") as fd:
        watcher.watch(fd)
    (src / "f").write_bytes(b"")
    seen.until(lambda c: c.name == b"f", "a change")
    watcher.stop()
    watcher.stop()  # idempotent
    assert _fds() == before
    assert not any(t.name == "fusepass-watcher" for t in threading.enumerate())


def test_stop_from_the_callback_ends_the_thread_and_closes_the_group(src: Path) -> None:
    before = _fds()
    stopped = threading.Event()
    watcher: SourceWatcher

    def on_changes(changes: list[Change]) -> None:
        watcher.stop()
        stopped.set()

    watcher = SourceWatcher(str(src), on_changes).start()
    (src / "f").write_bytes(b"")
    assert stopped.wait(10)
    for thread in [t for t in threading.enumerate() if t.name == "fusepass-watcher"]:
        thread.join(10)
    assert _fds() == before


def test_a_failing_callback_is_counted_and_watching_goes_on(src: Path) -> None:
    seen = Collector()
    failed = threading.Event()

    def on_changes(changes: list[Change]) -> None:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("a bug in the callback")
        seen(changes)

    with SourceWatcher(str(src), on_changes) as watcher:
        (src / "first").write_bytes(b"")
        assert failed.wait(10)
        (src / "second").write_bytes(b"")
        seen.until(lambda c: c.name == b"second", "the change after the failure")
        assert watcher.counts["callback_errors"] == 1


def test_unwatch_stops_the_reports_of_a_directory(src: Path, watched: tuple[SourceWatcher, Collector]) -> None:
    watcher, seen = watched
    (src / "d").mkdir()
    with opened(src / "d") as fd:
        watcher.watch(fd)
        assert watcher.marks == 2
        watcher.unwatch(fd)
        watcher.unwatch(fd)  # nothing left to remove: no error
    assert watcher.marks == 1
    (src / "d" / "quiet").write_bytes(b"")
    (src / "sentinel").write_bytes(b"")
    seen.until(lambda c: c.name == b"sentinel", "the sentinel")
    assert b"quiet" not in {c.name for c in seen.seen}


def test_why_not_is_none_on_ext4_and_tmpfs(src: Path, tmp_path: Path) -> None:
    assert SourceWatcher.why_not(str(src)) is None
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], check=True)
    try:
        assert SourceWatcher.why_not(str(mnt)) is None
        seen = Collector()
        with SourceWatcher(str(mnt), seen) as watcher:
            (mnt / "f").write_bytes(b"")
            c = seen.until(lambda c: c.name == b"f", "a change on tmpfs")
            assert c.dir == watcher.root_handle and c.handle == handle(mnt / "f")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_why_not_in_words_for_sources_without_a_watcher(tmp_path: Path, memfs: ServerProcess) -> None:
    mountpoint = str(memfs.mountpoint)
    assert "FUSE" in (SourceWatcher.why_not(mountpoint) or "")
    assert "file handles" in (SourceWatcher.why_not("/proc/self") or "")
    assert "cannot open" in (SourceWatcher.why_not(str(tmp_path / "missing")) or "")
    with pytest.raises(WatcherUnavailable, match="FUSE"):
        SourceWatcher(mountpoint, lambda changes: None)


def test_an_unprivileged_process_can_watch_its_directories(public_tmp: Path) -> None:
    os.chown(public_tmp, *NOBODY)

    def as_nobody() -> tuple[bool, bool, bytes | None]:
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.geteuid() == NOBODY[0]
        seen = Collector()
        with SourceWatcher(str(public_tmp), seen) as watcher:
            (public_tmp / "mine").write_bytes(b"")
            c = seen.until(lambda c: c.name == b"mine", "a change, as nobody")
            return c.dir == watcher.root_handle, c.handle == handle(public_tmp / "mine"), c.name

    assert run_as(*NOBODY, as_nobody) == (True, True, b"mine")
