"""Changes made directly in the source, behind the mount's back, show through the mount.

With ``-o timeout=0`` the kernel revalidates every name and attribute on use, so a change is
visible at once; that makes these tests deterministic. Each runs with passthrough and with
the server answering READ/WRITE itself (page-cache mode), where stale cached pages would show.
The last test pins down the other side: with a long timeout and no watcher of the source
(``-o nowatch``) a name may stay stale, but what it serves is always the data of one file, never
another's. With the watcher (the default), tests/test_mirror_watch.py shows every change at once.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import NOBODY, ServerProcess, mirror_argv, run_as

pytestmark = pytest.mark.timeout(60)

AT_FDCWD = -100
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), ctypes.c_uint(RENAME_EXCHANGE)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


@pytest.fixture(params=["auto", "off"], ids=["passthrough", "served"])
def live(request: pytest.FixtureRequest, public_tmp: Path,
         start_server: Callable[..., ServerProcess]) -> tuple[Path, Path]:
    """(source, mount point) of a mirror with no caching of names or attributes."""
    src = public_tmp / "src"
    src.mkdir(mode=0o755)
    server = start_server(mirror_argv(src, "-o", "timeout=0,allow_other", "--passthrough", request.param),
                          mountpoint=public_tmp / "mnt")
    return src, Path(server.mountpoint)


def test_new_and_deleted_files_show_at_once(live: tuple[Path, Path]) -> None:
    src, mnt = live
    assert os.listdir(mnt) == []
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "f")  # a negative lookup: it must not be cached
    (src / "f").write_bytes(b"new")
    (src / "d").mkdir()
    (src / "d" / "g").write_bytes(b"in d")
    assert sorted(os.listdir(mnt)) == ["d", "f"]
    assert (mnt / "f").read_bytes() == b"new"
    assert (mnt / "d" / "g").read_bytes() == b"in d"
    os.unlink(src / "f")
    os.unlink(src / "d" / "g")
    os.rmdir(src / "d")
    assert not (mnt / "f").exists() and not (mnt / "d").exists()
    assert os.listdir(mnt) == []


def test_renames_in_the_source_show_at_once(live: tuple[Path, Path]) -> None:
    src, mnt = live
    (src / "d1").mkdir()
    (src / "d1" / "f").write_bytes(b"moving")
    assert (mnt / "d1" / "f").read_bytes() == b"moving"
    ino = os.stat(mnt / "d1" / "f").st_ino
    (src / "d2").mkdir()
    os.rename(src / "d1" / "f", src / "d2" / "g")
    assert not (mnt / "d1" / "f").exists()
    assert (mnt / "d2" / "g").read_bytes() == b"moving"
    assert os.stat(mnt / "d2" / "g").st_ino == ino
    os.rename(src / "d2", src / "d3")
    assert sorted(os.listdir(mnt)) == ["d1", "d3"]
    assert (mnt / "d3" / "g").read_bytes() == b"moving"


def test_content_and_attribute_changes_show_at_once(live: tuple[Path, Path]) -> None:
    src, mnt = live
    (src / "f").write_bytes(b"first version")
    assert (mnt / "f").read_bytes() == b"first version"
    with open(mnt / "f", "rb", buffering=0) as held:
        assert held.read() == b"first version"
        (src / "f").write_bytes(b"SECOND VERSION")  # the same inode, rewritten longer
        assert (mnt / "f").read_bytes() == b"SECOND VERSION"
        assert os.pread(held.fileno(), 100, 0) == b"SECOND VERSION"
        with open(src / "f", "r+b") as f:
            f.write(b"third")  # in place, size unchanged
        assert (mnt / "f").read_bytes() == b"thirdD VERSION"
        assert os.pread(held.fileno(), 100, 0) == b"thirdD VERSION"
        os.truncate(src / "f", 3)
        assert os.stat(mnt / "f").st_size == 3
        assert os.pread(held.fileno(), 100, 0) == b"thi"
    os.chmod(src / "f", 0o600)
    assert os.stat(mnt / "f").st_mode & 0o777 == 0o600
    with pytest.raises(PermissionError):  # the kernel checks permissions against fresh attributes
        run_as(*NOBODY, lambda: (mnt / "f").read_bytes())
    os.chmod(src / "f", 0o644)
    assert run_as(*NOBODY, lambda: (mnt / "f").read_bytes()) == b"thi"


def test_a_rename_swap_behind_the_mounts_back_never_mixes_files(live: tuple[Path, Path]) -> None:
    src, mnt = live
    (src / "a").write_bytes(b"A" * 5000)
    (src / "b").write_bytes(b"b" * 3)
    assert (mnt / "a").read_bytes() == b"A" * 5000 and (mnt / "b").read_bytes() == b"b" * 3
    ino_a, ino_b = os.stat(mnt / "a").st_ino, os.stat(mnt / "b").st_ino
    with open(mnt / "a", "rb", buffering=0) as held:
        exchange(src / "a", src / "b")
        assert (mnt / "a").read_bytes() == b"b" * 3
        assert (mnt / "b").read_bytes() == b"A" * 5000
        assert (os.stat(mnt / "a").st_ino, os.stat(mnt / "b").st_ino) == (ino_b, ino_a)
        assert os.pread(held.fileno(), 10000, 0) == b"A" * 5000  # an open file follows its inode
        assert os.fstat(held.fileno()).st_size == 5000
        # the classic swap through a third name
        os.rename(src / "a", src / "tmp")
        os.rename(src / "b", src / "a")
        os.rename(src / "tmp", src / "b")
        assert (mnt / "a").read_bytes() == b"A" * 5000
        assert (mnt / "b").read_bytes() == b"b" * 3
        assert os.pread(held.fileno(), 10000, 0) == b"A" * 5000


def test_a_name_recreated_in_the_source_serves_the_new_file(live: tuple[Path, Path]) -> None:
    src, mnt = live
    (src / "f").write_bytes(b"old file")
    with open(mnt / "f", "rb", buffering=0) as held:
        os.unlink(src / "f")
        (src / "f").write_bytes(b"the new one")  # very likely reusing the inode number
        assert (mnt / "f").read_bytes() == b"the new one"
        assert os.pread(held.fileno(), 100, 0) == b"old file"
    assert (mnt / "f").read_bytes() == b"the new one"


def test_with_a_long_timeout_a_stale_name_still_serves_one_whole_file(
    public_tmp: Path, start_server: Callable[..., ServerProcess]
) -> None:
    src = public_tmp / "src"
    src.mkdir()
    server = start_server(mirror_argv(src, "-o", "timeout=300,nowatch"))  # no watcher: names go stale
    mnt = Path(server.mountpoint)
    (src / "a").write_bytes(b"A" * 5000)
    (src / "b").write_bytes(b"b" * 3)
    assert (mnt / "a").read_bytes() == b"A" * 5000 and (mnt / "b").read_bytes() == b"b" * 3
    exchange(src / "a", src / "b")
    # the kernel still maps the names to the old inodes; each serves its own data and size
    for name, data in (("a", b"A" * 5000), ("b", b"b" * 3)):
        assert os.stat(mnt / name).st_size == len(data)
        assert (mnt / name).read_bytes() == data
    os.unlink(src / "a")  # the file "b" still names in the kernel is deleted in the source
    try:
        data = (mnt / "b").read_bytes()
    except OSError as e:
        assert e.errno in (errno.ESTALE, errno.ENOENT)
    else:
        assert data == b"b" * 3  # its own data, as an unlinked open file would still give
