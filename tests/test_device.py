"""Owned resources on a real mount: a Mount that unmounts itself, a session served on a descriptor
obtained elsewhere, and backing ids that close themselves."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusepass import MountOptions, Session
from fusepass import mount as mountmod
from fusepass.examples.memfs import MemFS

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if mountmod.mount_entry(str(path)) is not None:  # backstop: nothing stays mounted
        conn = mountmod.connection_id(str(path))
        if conn is not None:
            mountmod.abort_connection(conn)
        mountmod.unmount(str(path), lazy=True)


def test_a_mount_used_as_a_context_manager_unmounts_and_closes_its_descriptor(mnt: Path) -> None:
    with mountmod.mount(str(mnt), MountOptions(fsname="ctx", subtype="ctx")) as m:
        fd = m.device.fd
        assert mountmod.mount_entry(str(mnt)) is not None
    assert mountmod.mount_entry(str(mnt)) is None
    assert m.device.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_session_serves_a_connection_mounted_by_someone_else(mnt: Path) -> None:
    """The mount is made first (as a supervisor or another program would) and handed over as a
    descriptor: the session only serves it, and its close leaves the mount point unmounted."""
    m = mountmod.mount(str(mnt), MountOptions(fsname="handed", subtype="handed"))
    with Session(MemFS(), str(mnt), threads=2, device=m.device) as s:
        assert s.mount is None, "the session made no mount of its own"
        (mnt / "f").write_bytes(b"served on a handed-over descriptor")
        assert (mnt / "f").read_bytes() == b"served on a handed-over descriptor"
        assert s.op_stats()["CREATE"].requests == 1
    assert mountmod.mount_entry(str(mnt)) is None
