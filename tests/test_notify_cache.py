"""STORE and RETRIEVE notifications on an in-process session: the kernel's page cache, written and read back."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusepass import MountOptions, Session
from fusepass import mount as mountmod
from fusepass.examples.memfs import MemFS


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    s = Session(MemFS(), str(mnt), MountOptions(fsname="memfs", subtype="memfs"), threads=2)
    try:
        with s:
            yield s
    finally:
        if mountmod.mount_entry(str(mnt)) is not None:  # backstop if the session could not clean up
            s.abort()
            mountmod.unmount(str(mnt), lazy=True)


def test_retrieve_returns_what_the_page_cache_holds(session: Session) -> None:
    path = Path(session.mountpoint) / "f"
    path.write_bytes(b"a" * 8192)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 8192, 0) == b"a" * 8192  # now cached
        ino = os.fstat(fd).st_ino  # memfs uses the node id as st_ino
        assert session.notifier.retrieve(ino, 0, 8192) == b"a" * 8192
    finally:
        os.close(fd)


def test_store_puts_data_the_reader_then_sees_without_a_read(session: Session) -> None:
    path = Path(session.mountpoint) / "g"
    path.write_bytes(b"a" * 8192)
    fd = os.open(path, os.O_RDONLY)
    try:
        ino = os.fstat(fd).st_ino
        reads_before = session.op_stats().get("READ")
        session.notifier.store(ino, 0, b"b" * 4096)
        assert os.pread(fd, 4096, 0) == b"b" * 4096
        assert session.op_stats().get("READ") == reads_before
    finally:
        os.close(fd)


def test_notifications_for_an_unknown_inode_fail_with_enoent(session: Session) -> None:
    with pytest.raises(OSError) as e:
        session.notifier.invalidate_inode(987654)
    assert e.value.errno == 2
