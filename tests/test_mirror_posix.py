"""POSIX behaviour of the mirror through a real mount, as root and as unprivileged users.

Most checks compare the mount with the source filesystem itself: the same operation, by the
same user, done through the mount and directly on the source must give the same result (the
same errno, the same owner and mode). The source is in a fresh directory under /tmp that every
user can traverse; the mount uses ``allow_other`` (``default_permissions`` is the default).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import NOBODY, ServerProcess, mirror_argv, run_as

from fusepass import control
from fusepass.mirror import Mirror
from fusepass.ops import ROOT_ID, Changes, Context

pytestmark = pytest.mark.timeout(90)

BOB = (65533, 65533)  # a second unprivileged user
ROOT_OTHER_GROUP = (0, 4242)  # root, with a primary group that is not 0
GROUP = 4321  # a group none of the test users belongs to

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_FOLLOW = 0x400
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 1, 2, 0x10
XATTR_CREATE, XATTR_REPLACE = os.XATTR_CREATE, os.XATTR_REPLACE

_libc = ctypes.CDLL(None, use_errno=True)


# --- helpers ------------------------------------------------------------------------------------


@dataclass
class Mirrored:
    """A mounted mirror: ``src`` is the source directory, ``mnt`` the mount point."""

    src: Path
    mnt: Path
    server: ServerProcess


@pytest.fixture
def mounted(public_tmp: Path, start_server: Callable[..., ServerProcess]) -> Mirrored:
    """A mirror of ``public_tmp/src``, mounted with allow_other at ``public_tmp/mnt``."""
    src = public_tmp / "src"
    src.mkdir(mode=0o755)
    server = start_server(mirror_argv(src, "-o", "allow_other"), mountpoint=public_tmp / "mnt")
    return Mirrored(src, Path(server.mountpoint), server)


@dataclass
class Work:
    """A directory of ``user``'s own, in the source (``src``) and through the mount (``mnt``)."""

    user: tuple[int, int] | None  # None: root, in this process
    src: Path
    mnt: Path

    def run(self, fn: Callable[[], Any]) -> Any:
        return fn() if self.user is None else run_as(*self.user, fn)


@pytest.fixture(params=[None, NOBODY, BOB], ids=["root", "nobody", "bob"])
def work(request: pytest.FixtureRequest, mounted: Mirrored) -> Work:
    """Run the test's body as root, as nobody and as a second user, in a directory of their own."""
    user = request.param
    make_dir(mounted.src / "work", 0o755, *(user or (0, 0)))
    return Work(user, mounted.src / "work", mounted.mnt / "work")


def outcome(user: tuple[int, int] | None, fn: Callable[[], Any]) -> int:
    """0 if ``fn()`` succeeds as ``user`` (None: as root in this process), else its errno."""
    try:
        if user is None:
            fn()
        else:
            run_as(*user, fn)
    except OSError as e:
        return e.errno
    return 0


def owner(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, st.st_mode


def make_dir(path: Path, mode: int, uid: int = 0, gid: int = 0) -> Path:
    """A directory made directly in the source, with exactly this mode and owner."""
    path.mkdir()
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def make_file(path: Path, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> Path:
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int], follow: bool = True) -> None:
    """utimensat(2) with (sec, nsec) pairs; nsec may be UTIME_NOW or UTIME_OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0 if follow else 0x100) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def linkat_empty_path(fd: int, newpath: Path) -> None:
    """linkat(fd, "", AT_FDCWD, newpath, AT_EMPTY_PATH): give an O_TMPFILE file a name."""
    if _libc.linkat(fd, b"", AT_FDCWD, os.fsencode(newpath), AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(newpath))


def link_through_proc(fd: int, newpath: Path) -> None:
    """linkat("/proc/self/fd/N", newpath, AT_SYMLINK_FOLLOW): the unprivileged way to name an
    O_TMPFILE file (os.link calls plain link(2) here, which would not follow the magic link)."""
    if _libc.linkat(AT_FDCWD, b"/proc/self/fd/%d" % fd, AT_FDCWD, os.fsencode(newpath), AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(newpath))


def create_everything(base: Path) -> dict[str, tuple[int, int, int]]:
    """Create one object of each kind in ``base`` (umask 022) and return (uid, gid, mode) of
    each as ``base`` shows it. Run as the user under test."""
    os.umask(0o022)
    os.close(os.open(base / "file", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    os.mkdir(base / "dir", 0o777)
    os.symlink("file", base / "link")
    os.mkfifo(base / "fifo", 0o666)
    os.mknod(base / "node", stat.S_IFREG | 0o640)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(base / "sock"))
    fd = os.open(base, os.O_TMPFILE | os.O_WRONLY, 0o600)
    try:
        os.write(fd, b"tmp")
        link_through_proc(fd, base / "tmp")
    finally:
        os.close(fd)
    return {name: owner(base / name) for name in sorted(os.listdir(base))}


# --- ownership -----------------------------------------------------------------------------------


@pytest.mark.parametrize("user", [ROOT_OTHER_GROUP, NOBODY, BOB], ids=["root", "nobody", "bob"])
def test_created_objects_belong_to_the_caller(mounted: Mirrored, user: tuple[int, int]) -> None:
    via_mount = make_dir(mounted.src / "via_mount", 0o777)
    native = make_dir(mounted.src / "native", 0o777)

    seen_through_mount = run_as(*user, lambda: create_everything(mounted.mnt / "via_mount"))
    expected = run_as(*user, lambda: create_everything(native))

    assert seen_through_mount == expected
    assert {name: owner(via_mount / name) for name in expected} == expected
    uid, gid = user
    assert all(o[:2] == (uid, gid) for o in expected.values())
    kinds = {name: stat.S_IFMT(mode) for name, (_, _, mode) in expected.items()}
    assert kinds == {
        "dir": stat.S_IFDIR, "fifo": stat.S_IFIFO, "file": stat.S_IFREG, "link": stat.S_IFLNK,
        "node": stat.S_IFREG, "sock": stat.S_IFSOCK, "tmp": stat.S_IFREG,
    }
    assert (via_mount / "tmp").read_bytes() == b"tmp"


def test_a_setgid_directory_passes_on_its_group(mounted: Mirrored) -> None:
    via_mount = make_dir(mounted.src / "via_mount", 0o2777, gid=GROUP)
    native = make_dir(mounted.src / "native", 0o2777, gid=GROUP)

    def create(base: Path) -> dict[str, tuple[int, int, int]]:
        os.umask(0)
        # nobody is not in GROUP: the kernel strips S_ISGID from the file, keeps it on the directory
        os.close(os.open(base / "file", os.O_CREAT | os.O_WRONLY, 0o2775))
        os.mkdir(base / "dir", 0o755)
        os.mkdir(base / "dir" / "sub", 0o700)
        os.symlink("file", base / "link")
        os.mkfifo(base / "fifo", 0o600)
        names = ["file", "dir", "dir/sub", "link", "fifo"]
        return {name: owner(base / name) for name in names}

    seen_through_mount = run_as(*NOBODY, lambda: create(mounted.mnt / "via_mount"))
    expected = run_as(*NOBODY, lambda: create(native))

    assert seen_through_mount == expected
    assert {name: owner(via_mount / name) for name in expected} == expected
    assert all(o[:2] == (NOBODY[0], GROUP) for o in expected.values())
    assert expected["dir"][2] & stat.S_ISGID and expected["dir/sub"][2] & stat.S_ISGID
    assert not expected["file"][2] & stat.S_ISGID


def test_root_creating_setuid_and_setgid_files_keeps_the_bits(mounted: Mirrored) -> None:
    os.umask(0)
    fd = os.open(mounted.mnt / "suid", os.O_CREAT | os.O_WRONLY, 0o6755)
    os.close(fd)
    os.mknod(mounted.mnt / "sgid", stat.S_IFREG | 0o2750)
    assert stat.S_IMODE(os.stat(mounted.src / "suid").st_mode) == 0o6755
    assert stat.S_IMODE(os.stat(mounted.src / "sgid").st_mode) == 0o2750
    assert stat.S_IMODE(os.stat(mounted.mnt / "suid").st_mode) == 0o6755


# --- permission checks ---------------------------------------------------------------------------


def _permission_cases(base: Path) -> list[tuple[str, int, Callable[[], Any]]]:
    """(what, expected errno, operation) for nobody, on the tree made by ``_permission_tree``."""

    def write_open(path: Path) -> Callable[[], Any]:
        return lambda: os.close(os.open(path, os.O_WRONLY))

    return [
        ("read a 0600 root file", errno.EACCES, lambda: (base / "secret").read_bytes()),
        ("write-open a 0444 file of one's own", errno.EACCES, write_open(base / "readonly")),
        ("truncate a 0444 file of one's own", errno.EACCES, lambda: os.truncate(base / "readonly", 0)),
        ("create a file in a 0755 root dir", errno.EACCES,
         lambda: os.close(os.open(base / "closed" / "new", os.O_CREAT | os.O_WRONLY, 0o644))),
        ("mkdir in a 0755 root dir", errno.EACCES, lambda: os.mkdir(base / "closed" / "new")),
        ("symlink in a 0755 root dir", errno.EACCES, lambda: os.symlink("x", base / "closed" / "new")),
        ("mkfifo in a 0755 root dir", errno.EACCES, lambda: os.mkfifo(base / "closed" / "new")),
        ("hard link into a 0755 root dir", errno.EACCES,
         lambda: os.link(base / "readonly", base / "closed" / "new")),
        ("unlink in a 0755 root dir", errno.EACCES, lambda: os.unlink(base / "closed" / "inside")),
        ("rename out of a 0755 root dir", errno.EACCES,
         lambda: os.rename(base / "closed" / "inside", base / "open" / "moved")),
        ("list a 0700 root dir", errno.EACCES, lambda: os.listdir(base / "private")),
        ("stat inside a 0700 root dir", errno.EACCES, lambda: os.stat(base / "private" / "x")),
        ("chmod a root file", errno.EPERM, lambda: os.chmod(base / "secret", 0o666)),
        ("chown a root file", errno.EPERM, lambda: os.chown(base / "secret", NOBODY[0], NOBODY[1])),
        ("give one's file away", errno.EPERM, lambda: os.chown(base / "readonly", BOB[0], -1)),
        ("chgrp one's file to a foreign group", errno.EPERM, lambda: os.chown(base / "readonly", -1, GROUP)),
        ("set explicit times on a writable root file", errno.EPERM,
         lambda: os.utime(base / "open" / "shared", ns=(1, 1))),
        ("set xattr on a root file", errno.EACCES, lambda: os.setxattr(base / "world", "user.x", b"1")),
        ("touch (UTIME_NOW) a writable root file", 0, lambda: os.utime(base / "open" / "shared")),
        ("chmod one's own file", 0, lambda: os.chmod(base / "readonly", 0o444)),
        ("chown one's own file to oneself", 0, lambda: os.chown(base / "readonly", NOBODY[0], NOBODY[1])),
        ("read a 0644 root file", 0, lambda: (base / "world").read_bytes()),
    ]


def _permission_tree(base: Path) -> None:
    make_file(base / "secret", b"secret", 0o600)
    make_file(base / "world", b"world", 0o644)
    make_file(base / "readonly", b"ro", 0o444, *NOBODY)
    make_dir(base / "closed", 0o755)
    make_file(base / "closed" / "inside", b"", 0o666)
    make_dir(base / "open", 0o777)
    make_file(base / "open" / "shared", b"", 0o666)
    make_dir(base / "private", 0o700)
    make_file(base / "private" / "x", b"", 0o666)


def test_permission_errors_match_the_source(mounted: Mirrored) -> None:
    _permission_tree(mounted.src)
    before = sorted((p.name, owner(p)) for p in mounted.src.rglob("*"))
    for what, expected, op in _permission_cases(mounted.mnt):
        assert outcome(NOBODY, op) == expected, f"through the mount: {what}"
    for what, expected, op in _permission_cases(mounted.src):
        assert outcome(NOBODY, op) == expected, f"on the source: {what}"
    after = sorted((p.name, owner(p)) for p in mounted.src.rglob("*"))
    assert after == before
    assert (mounted.src / "secret").read_bytes() == b"secret"
    assert (mounted.src / "readonly").read_bytes() == b"ro"


def test_sticky_directory_protects_other_users_files(mounted: Mirrored) -> None:
    shared_src = make_dir(mounted.src / "shared", 0o1777)
    shared = mounted.mnt / "shared"

    def alice_creates() -> None:
        os.umask(0o022)
        (shared / "alice").write_bytes(b"alice's")
        os.mkdir(shared / "alicedir")

    run_as(*NOBODY, alice_creates)
    run_as(*BOB, lambda: (shared / "bob").write_bytes(b"bob's"))
    assert owner(shared_src / "alice")[:2] == NOBODY and owner(shared_src / "bob")[:2] == BOB

    def bob_attempts(base: Path) -> dict[str, int]:
        return {
            "unlink": outcome(BOB, lambda: os.unlink(base / "alice")),
            "rename away": outcome(BOB, lambda: os.rename(base / "alice", base / "stolen")),
            "rename over": outcome(BOB, lambda: os.rename(base / "bob", base / "alice")),
            "exchange": outcome(BOB, lambda: renameat2(base / "bob", base / "alice", RENAME_EXCHANGE)),
            "rmdir": outcome(BOB, lambda: os.rmdir(base / "alicedir")),
            "rename dir": outcome(BOB, lambda: os.rename(base / "alicedir", base / "bobdir")),
            "write": outcome(BOB, lambda: os.close(os.open(base / "alice", os.O_WRONLY))),
        }

    through_mount = bob_attempts(shared)
    on_source = bob_attempts(shared_src)
    assert through_mount == on_source
    assert set(on_source.values()) <= {errno.EPERM, errno.EACCES}
    assert on_source["unlink"] == errno.EPERM and on_source["write"] == errno.EACCES
    assert sorted(os.listdir(shared_src)) == ["alice", "alicedir", "bob"]
    assert (shared_src / "alice").read_bytes() == b"alice's"

    # owners may rename and remove their own entries; root may remove anyone's
    run_as(*NOBODY, lambda: os.rename(shared / "alice", shared / "alice2"))
    run_as(*BOB, lambda: os.unlink(shared / "bob"))
    os.rmdir(shared / "alicedir")
    assert sorted(os.listdir(shared_src)) == ["alice2"]
    assert sorted(os.listdir(shared)) == ["alice2"]


def _privilege_operations() -> dict[str, Callable[[Path], object]]:
    def write(p: Path) -> None:
        with open(p, "r+b") as f:
            f.write(b"y")

    def ftruncate(p: Path) -> None:
        fd = os.open(p, os.O_WRONLY)
        try:
            os.ftruncate(fd, 2)
        finally:
            os.close(fd)

    def mapped_write(p: Path) -> None:
        with open(p, "r+b") as f, mmap.mmap(f.fileno(), 10) as m:
            m[0:1] = b"z"

    return {
        "write": write,
        "truncate": lambda p: os.truncate(p, 3),
        "open with O_TRUNC": lambda p: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)),
        "ftruncate": ftruncate,
        "chown": lambda p: os.chown(p, -1, os.getgid()),
        "mmap write": mapped_write,
    }


@pytest.mark.parametrize("passthrough", ["auto", "off"])
@pytest.mark.parametrize("user", [None, NOBODY, BOB], ids=["root", "nobody", "bob"])
def test_changes_drop_setuid_setgid_and_capabilities_exactly_as_on_the_source(
    public_tmp: Path, start_server: Callable[..., ServerProcess], user: tuple[int, int] | None, passthrough: str
) -> None:
    """Writing, truncating (three ways), chown and a write through a mapping, by root (who keeps
    the bits, holding CAP_FSETID) and by other users on files they may write: the same mode and
    the same security.capability through the mount as on the source. The mount negotiates
    HANDLE_KILLPRIV_V2, so the server, not the kernel, clears the bits when the kernel asks."""
    src = public_tmp / "src"
    src.mkdir(mode=0o755)
    server = start_server(mirror_argv(src, "-o", "allow_other", "--passthrough", passthrough),
                          mountpoint=public_tmp / "mnt")
    mnt = Path(server.mountpoint)
    uid, gid = user or (0, 0)
    capability = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # revision 2, effective: cap_net_bind_service
    results = {}
    for mode in (0o6777, 0o2775, 0o4755 if user is None else 0o4777):
        for what, op in _privilege_operations().items():
            if what == "chown" and user is not None:
                continue  # only root may give a file away; a user's own chown is another test
            for where, base in (("mount", mnt), ("source", src)):
                name = f"{where} {what} {mode:o}"
                make_file(src / name, b"x" * 10, mode, uid if what != "truncate" else uid, gid if user else GROUP)
                os.setxattr(src / name, "security.capability", capability)
                outcome(user, lambda op=op, p=base / name: op(p))
                st = os.stat(src / name)
                try:
                    cap = os.getxattr(src / name, "security.capability")
                except OSError:
                    cap = None
                results[where, what, mode] = (stat.S_IMODE(st.st_mode), cap)
    for (where, what, mode), got in results.items():
        if where == "mount":
            assert got == results["source", what, mode], f"{what} on a {mode:o} file"
    if user is not None:  # the rule the comparison rests on, as the source applies it (not to mappings)
        assert all(m & stat.S_ISUID == 0 for (w, what, _), (m, _) in results.items()
                   if w == "source" and what != "mmap write")


def test_writes_cost_no_getxattr_once_the_kernel_knows_the_file(mounted: Mirrored) -> None:
    """Under HANDLE_KILLPRIV_V2 the kernel remembers that a file has nothing to clear: a hundred
    writes ask the server GETXATTR(security.capability) at most once (without it: before each)."""
    make_file(mounted.src / "plain", b"", 0o666)

    def getxattrs() -> int:
        return int(control.query(str(mounted.server.mountpoint))["requests"].get("GETXATTR", {}).get("count", 0))

    with open(mounted.mnt / "plain", "r+b", buffering=0) as f:
        before = getxattrs()
        for i in range(100):
            f.write(b"%03d" % i)
        after = getxattrs()
    assert after - before <= 1, after - before
    assert (mounted.src / "plain").read_bytes() == b"".join(b"%03d" % i for i in range(100))


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_* xattr value from (tag, permissions, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 1, 2, 4, 0x10, 0x20
NO_ID = 0xFFFFFFFF


def test_acls_of_the_source_are_enforced(mounted: Mirrored) -> None:
    denied = make_file(mounted.src / "denied", b"no", 0o644)  # readable by mode, but not by nobody
    os.setxattr(denied, "system.posix_acl_access", posix_acl(
        (ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 0, NOBODY[0]), (ACL_GROUP_OBJ, 4, NO_ID), (ACL_MASK, 4, NO_ID),
        (ACL_OTHER, 4, NO_ID)))
    granted = make_file(mounted.src / "granted", b"yes", 0o600)  # not by mode, but nobody may read it
    os.setxattr(granted, "system.posix_acl_access", posix_acl(
        (ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 4, NOBODY[0]), (ACL_GROUP_OBJ, 0, NO_ID), (ACL_MASK, 4, NO_ID),
        (ACL_OTHER, 0, NO_ID)))
    for base in (mounted.src, mounted.mnt):
        assert outcome(NOBODY, lambda b=base: (b / "denied").read_bytes()) == errno.EACCES, base
        assert outcome(BOB, lambda b=base: (b / "denied").read_bytes()) == 0, base
        assert run_as(*NOBODY, lambda b=base: (b / "granted").read_bytes()) == b"yes"
        assert outcome(BOB, lambda b=base: (b / "granted").read_bytes()) == errno.EACCES, base

    # set through the mount: it lands in the source, and is enforced at once
    os.setxattr(mounted.mnt / "granted", "system.posix_acl_access", os.getxattr(denied, "system.posix_acl_access"))
    assert os.getxattr(granted, "system.posix_acl_access") == os.getxattr(denied, "system.posix_acl_access")
    assert outcome(NOBODY, lambda: (mounted.mnt / "granted").read_bytes()) == errno.EACCES


def test_a_default_acl_replaces_the_umask_as_on_the_source(mounted: Mirrored) -> None:
    default = posix_acl((ACL_USER_OBJ, 7, NO_ID), (ACL_USER, 7, BOB[0]), (ACL_GROUP_OBJ, 5, NO_ID),
                        (ACL_MASK, 7, NO_ID), (ACL_OTHER, 5, NO_ID))
    results = {}
    for where in ("mount", "source"):
        d = make_dir(mounted.src / f"{where}-acl", 0o777)
        os.setxattr(d, "system.posix_acl_default", default)
        make_dir(mounted.src / f"{where}-plain", 0o777)

    def create(base: Path) -> dict[str, tuple[int, bytes]]:
        os.umask(0o077)
        out = {}
        for kind in ("acl", "plain"):
            d = Path(f"{base}-{kind}")
            os.close(os.open(d / "file", os.O_CREAT | os.O_WRONLY, 0o666))
            os.mkdir(d / "dir", 0o777)
            os.mkfifo(d / "fifo", 0o666)
            for name in ("file", "dir", "fifo"):
                try:
                    acl = os.getxattr(d / name, "system.posix_acl_access")
                except OSError:
                    acl = b""
                out[f"{kind}/{name}"] = (os.stat(d / name).st_mode, acl)
        return out

    results["mount"] = run_as(*NOBODY, lambda: create(mounted.mnt / "mount"))
    results["source"] = run_as(*NOBODY, lambda: create(mounted.src / "source"))
    assert results["mount"] == results["source"]
    assert stat.S_IMODE(results["source"]["plain/file"][0]) == 0o600
    assert stat.S_IMODE(results["source"]["acl/file"][0]) == 0o664 and results["source"]["acl/file"][1]


# --- link counts and renames ---------------------------------------------------------------------


def nlink(path: Path) -> int:
    return os.lstat(path).st_nlink


def test_file_link_counts_follow_link_rename_and_unlink(work: Work) -> None:
    def body() -> None:
        m, s = work.mnt, work.src
        (m / "d").mkdir()
        (m / "a").write_bytes(b"data")
        assert nlink(m / "a") == 1
        os.link(m / "a", m / "b")
        os.link(m / "a", m / "d" / "c")
        assert [nlink(m / n) for n in ("a", "b", "d/c")] == [3, 3, 3]
        assert nlink(s / "a") == 3
        assert os.stat(m / "a").st_ino == os.stat(m / "d" / "c").st_ino
        os.rename(m / "b", m / "d" / "e")
        assert nlink(m / "a") == 3 and nlink(m / "d" / "e") == 3
        os.unlink(m / "a")
        assert nlink(m / "d" / "c") == 2
        os.unlink(m / "d" / "e")
        assert nlink(m / "d" / "c") == 1 and nlink(s / "d" / "c") == 1
        assert (m / "d" / "c").read_bytes() == b"data"

    work.run(body)


def test_directory_link_counts_follow_mkdir_rmdir_and_rename(work: Work) -> None:
    def body() -> None:
        m, s = work.mnt, work.src
        root0 = nlink(m)
        assert root0 == nlink(s)
        (m / "p").mkdir()
        assert nlink(m) == root0 + 1 and nlink(m / "p") == 2
        (m / "p" / "a").mkdir()
        (m / "p" / "b").mkdir()
        (m / "p" / "f").write_bytes(b"")
        assert nlink(m / "p") == 4 and nlink(s / "p") == 4
        (m / "q").mkdir()
        os.rename(m / "p" / "a", m / "q" / "a")
        assert (nlink(m / "p"), nlink(m / "q")) == (3, 3)
        os.rmdir(m / "p" / "b")
        assert nlink(m / "p") == 2
        os.rmdir(m / "q" / "a")
        os.rmdir(m / "q")
        assert nlink(m) == root0 + 1 == nlink(s)

    work.run(body)


def test_rename_replaces_and_moves(work: Work) -> None:
    def body() -> None:
        m, s = work.mnt, work.src
        (m / "a").write_bytes(b"A")
        (m / "b").write_bytes(b"B")
        ino_a = os.stat(m / "a").st_ino
        os.rename(m / "a", m / "b")
        assert not (m / "a").exists() and not (s / "a").exists()
        assert (m / "b").read_bytes() == b"A" and os.stat(m / "b").st_ino == ino_a
        assert os.listdir(m) == ["b"]

        (m / "d1").mkdir()
        (m / "d2").mkdir()
        os.rename(m / "b", m / "d1" / "x")
        os.rename(m / "d1" / "x", m / "d2" / "y")
        assert (s / "d2" / "y").read_bytes() == b"A"
        assert os.listdir(m / "d1") == [] and os.listdir(m / "d2") == ["y"]

        (m / "d1" / "inner").write_bytes(b"i")
        (m / "empty").mkdir()
        os.rename(m / "d1", m / "empty")  # a directory over an empty one
        assert not (m / "d1").exists() and (m / "empty" / "inner").read_bytes() == b"i"
        with pytest.raises(OSError) as e:
            os.rename(m / "d2", m / "empty")  # over a non-empty one
        assert e.value.errno == errno.ENOTEMPTY
        with pytest.raises(IsADirectoryError):
            os.rename(m / "d2" / "y", m / "empty")
        with pytest.raises(NotADirectoryError):
            os.rename(m / "empty", m / "d2" / "y")
        with pytest.raises(OSError) as e:
            os.rename(m / "d2", m / "d2" / "sub")  # into itself
        assert e.value.errno == errno.EINVAL
        assert sorted(os.listdir(s)) == ["d2", "empty"] and os.listdir(s / "d2") == ["y"]

    work.run(body)


def test_renameat2_noreplace_and_exchange(work: Work) -> None:
    def body() -> None:
        m, s = work.mnt, work.src
        (m / "a").write_bytes(b"A")
        (m / "b").write_bytes(b"BB")
        (m / "d").mkdir()
        (m / "d" / "c").write_bytes(b"CCC")
        with pytest.raises(FileExistsError):
            renameat2(m / "a", m / "b", RENAME_NOREPLACE)
        assert (s / "a").read_bytes() == b"A" and (s / "b").read_bytes() == b"BB"
        renameat2(m / "a", m / "new", RENAME_NOREPLACE)
        assert (m / "new").read_bytes() == b"A" and not (m / "a").exists()

        renameat2(m / "new", m / "b", RENAME_EXCHANGE)
        assert (m / "new").read_bytes() == b"BB" and (m / "b").read_bytes() == b"A"
        assert (s / "new").read_bytes() == b"BB" and (s / "b").read_bytes() == b"A"
        renameat2(m / "b", m / "d", RENAME_EXCHANGE)  # a file with a directory, across the tree
        assert (m / "b" / "c").read_bytes() == b"CCC" and (m / "d").read_bytes() == b"A"
        assert stat.S_ISDIR(os.lstat(s / "b").st_mode) and stat.S_ISREG(os.lstat(s / "d").st_mode)
        with pytest.raises(FileNotFoundError):
            renameat2(m / "d", m / "missing", RENAME_EXCHANGE)
        with pytest.raises(OSError) as e:
            renameat2(m / "d", m / "new", RENAME_EXCHANGE | RENAME_NOREPLACE)
        assert e.value.errno == errno.EINVAL

    work.run(body)


# --- times ---------------------------------------------------------------------------------------


def test_utime_round_trips_nanoseconds(work: Work) -> None:
    def body() -> None:
        m, s = work.mnt, work.src
        (m / "f").write_bytes(b"x")
        (m / "d").mkdir()
        os.symlink("f", m / "l")
        times = (1_234_567_890_123_456_789, 1_111_111_111_987_654_321)
        for name in ("f", "d"):
            os.utime(m / name, ns=times)
            st = os.stat(m / name)
            assert (st.st_atime_ns, st.st_mtime_ns) == times
            st = os.stat(s / name)
            assert (st.st_atime_ns, st.st_mtime_ns) == times
        os.utime(m / "l", ns=(5_000_000_001, 6_000_000_002), follow_symlinks=False)
        st = os.lstat(s / "l")
        assert (st.st_atime_ns, st.st_mtime_ns) == (5_000_000_001, 6_000_000_002)
        assert os.stat(s / "f").st_mtime_ns == times[1]

    work.run(body)


def test_utime_now_and_omit(work: Work) -> None:
    def body() -> None:
        m, s = work.mnt, work.src
        (m / "f").write_bytes(b"x")
        os.utime(m / "f", ns=(1_000_000_000_111, 2_000_000_000_222))

        utimensat(m / "f", (0, UTIME_OMIT), (3_000, 333))
        st = os.stat(m / "f")
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_111, 3_000_000_000_333)

        before = time.time_ns()
        utimensat(m / "f", (0, UTIME_NOW), (0, UTIME_OMIT))
        st = os.stat(m / "f")
        assert st.st_atime_ns >= before - 20_000_000 and st.st_mtime_ns == 3_000_000_000_333
        assert os.stat(s / "f").st_atime_ns == st.st_atime_ns

        before = time.time_ns()
        os.utime(m / "f")  # both now
        st = os.stat(m / "f")
        assert st.st_mtime_ns >= before - 20_000_000 and st.st_atime_ns >= before - 20_000_000
        assert os.stat(s / "f").st_mtime_ns == st.st_mtime_ns

    work.run(body)


def test_chown_to_minus_one_updates_ctime_as_on_the_source(work: Work) -> None:
    # POSIX lets chown(f, -1, -1) leave the times alone; ext4 updates ctime, so the mirror must too
    # (pjdfstest chown/00.t). The stat before each chown makes the next ctime a fine-grained one.
    def body() -> None:
        for base in (work.src, work.mnt):
            (base / "f").write_bytes(b"x")
            os.symlink("f", base / "l")
            for follow in (True, False):
                before = os.stat(base / "l", follow_symlinks=follow)
                os.chown(base / "l", -1, -1, follow_symlinks=follow)
                after = os.stat(base / "l", follow_symlinks=follow)
                assert after.st_ctime_ns > before.st_ctime_ns, (base, follow)
                assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
            if base == work.src:
                os.unlink(base / "l")
                os.unlink(base / "f")

    work.run(body)


@pytest.mark.parametrize("passthrough", ["auto", "off"])
def test_write_and_truncate_advance_mtime_and_ctime(
    public_tmp: Path, start_server: Callable[..., ServerProcess], passthrough: str
) -> None:
    src = public_tmp / "src"
    src.mkdir()
    server = start_server(mirror_argv(src, "--passthrough", passthrough))
    f = Path(server.mountpoint) / "f"
    f.write_bytes(b"x" * 100)
    os.utime(f, ns=(10**18, 10**18))  # 2001
    ctime0 = os.stat(f).st_ctime_ns
    with open(f, "r+b", buffering=0) as fh:
        fh.write(b"y")
        st = os.fstat(fh.fileno())
        assert st.st_mtime_ns > 10**18 and st.st_ctime_ns >= ctime0
        assert (st.st_mtime_ns, st.st_ctime_ns) == (os.stat(src / "f").st_mtime_ns, os.stat(src / "f").st_ctime_ns)
        os.utime(f, ns=(10**18, 10**18))
        os.ftruncate(fh.fileno(), 50)
        st = os.fstat(fh.fileno())
        assert st.st_mtime_ns > 10**18 and st.st_size == 50
    assert os.stat(f).st_size == 50 == os.stat(src / "f").st_size
    if passthrough == "auto":
        assert "WRITE" not in control.query(str(server.mountpoint))["requests"]


@pytest.mark.parametrize("passthrough", ["auto", "off"])
def test_offsets_beyond_4gib_o_direct_and_fsync(
    public_tmp: Path, start_server: Callable[..., ServerProcess], passthrough: str
) -> None:
    src = public_tmp / "src"
    src.mkdir()
    server = start_server(mirror_argv(src, "--passthrough", passthrough))
    mnt = Path(server.mountpoint)
    gib = 1 << 30
    with open(mnt / "big", "w+b", buffering=0) as f:
        fd = f.fileno()
        os.ftruncate(fd, 8 * gib)
        assert os.pwrite(fd, b"far away", 6 * gib + 3) == 8
        assert os.pread(fd, 12, 6 * gib + 1) == b"\0\0far away\0\0"
        assert os.lseek(fd, 5 * gib, os.SEEK_DATA) == 6 * gib
        os.fsync(fd)
        os.fdatasync(fd)
    assert os.stat(mnt / "big").st_size == 8 * gib == os.stat(src / "big").st_size
    with open(src / "big", "rb") as f:
        f.seek(6 * gib + 3)
        assert f.read(8) == b"far away"

    block = mmap.mmap(-1, 8192)  # page-aligned, as O_DIRECT wants
    block[:] = os.urandom(8192)
    fd = os.open(mnt / "direct", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    try:
        assert os.pwritev(fd, [block], 4096) == 8192
        back = mmap.mmap(-1, 8192)
        assert os.preadv(fd, [back], 4096) == 8192
        assert back[:] == block[:]
    finally:
        os.close(fd)
    assert (src / "direct").read_bytes() == bytes(4096) + block[:]
    dirfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


# --- extended attributes -------------------------------------------------------------------------


def test_user_xattrs(work: Work) -> None:
    def body() -> None:
        m, s = work.mnt, work.src
        (m / "f").write_bytes(b"")
        (m / "d").mkdir()
        for name in ("f", "d"):
            p = m / name
            assert os.listxattr(p) == []
            os.setxattr(p, "user.one", b"1")
            os.setxattr(p, "user.big", b"v" * 4000)
            os.setxattr(p, "user.empty", b"")
            assert os.getxattr(p, "user.one") == b"1"
            assert os.getxattr(p, "user.big") == b"v" * 4000
            assert os.getxattr(p, "user.empty") == b""
            assert sorted(os.listxattr(p)) == ["user.big", "user.empty", "user.one"]
            assert os.getxattr(s / name, "user.big") == b"v" * 4000
            with pytest.raises(FileExistsError):
                os.setxattr(p, "user.one", b"2", XATTR_CREATE)
            with pytest.raises(OSError) as e:
                os.setxattr(p, "user.none", b"2", XATTR_REPLACE)
            assert e.value.errno == errno.ENODATA
            os.setxattr(p, "user.one", b"22", XATTR_REPLACE)
            os.setxattr(p, "user.two", b"2", XATTR_CREATE)
            assert os.getxattr(s / name, "user.one") == b"22"
            os.removexattr(p, "user.one")
            with pytest.raises(OSError) as e:
                os.getxattr(p, "user.one")
            assert e.value.errno == errno.ENODATA
            with pytest.raises(OSError) as e:
                os.removexattr(p, "user.one")
            assert e.value.errno == errno.ENODATA
            assert sorted(os.listxattr(s / name)) == ["user.big", "user.empty", "user.two"]
        # the size probe and a too-small buffer
        buf = ctypes.create_string_buffer(10)
        path = os.fsencode(m / "f")
        assert _libc.getxattr(path, b"user.big", None, ctypes.c_size_t(0)) == 4000
        assert _libc.getxattr(path, b"user.big", buf, ctypes.c_size_t(10)) == -1
        assert ctypes.get_errno() == errno.ERANGE

    work.run(body)


# --- sparse files, fallocate, copy_file_range ---------------------------------------------------


def test_seek_data_and_seek_hole_on_a_sparse_file(work: Work) -> None:
    def body() -> None:
        m, s = work.mnt, work.src
        mib = 1 << 20
        with open(m / "sparse", "w+b", buffering=0) as f:
            fd = f.fileno()
            os.ftruncate(fd, 10 * mib)
            os.pwrite(fd, b"a" * 4096, mib)
            os.pwrite(fd, b"b" * 8192, 5 * mib)
            os.fsync(fd)
            probes = [(0, os.SEEK_DATA), (0, os.SEEK_HOLE), (mib, os.SEEK_HOLE), (mib + 4096, os.SEEK_DATA),
                      (5 * mib + 100, os.SEEK_DATA), (5 * mib, os.SEEK_HOLE)]
            got = [os.lseek(fd, off, whence) for off, whence in probes]
            with pytest.raises(OSError) as e:
                os.lseek(fd, 6 * mib, os.SEEK_DATA)
            assert e.value.errno == errno.ENXIO
            assert os.lseek(fd, 6 * mib, os.SEEK_HOLE) == 6 * mib
        with open(s / "sparse", "rb") as f:
            expected = [os.lseek(f.fileno(), off, whence) for off, whence in probes]
        assert got == expected
        assert got[:4] == [mib, 0, mib + 4096, 5 * mib]
        assert os.stat(m / "sparse").st_blocks == os.stat(s / "sparse").st_blocks < 10 * mib // 512

    work.run(body)


def test_fallocate_modes(work: Work) -> None:
    def body() -> None:
        m, s = work.mnt, work.src
        kib = 1024
        with open(m / "f", "w+b", buffering=0) as f:
            fd = f.fileno()
            os.posix_fallocate(fd, 0, 256 * kib)
            assert os.fstat(fd).st_size == 256 * kib
            assert os.stat(s / "f").st_blocks >= 256 * kib // 512
            os.pwrite(fd, b"z" * (256 * kib), 0)

            fallocate(fd, FALLOC_FL_KEEP_SIZE, 256 * kib, 256 * kib)
            assert os.fstat(fd).st_size == 256 * kib
            assert os.stat(s / "f").st_blocks >= 512 * kib // 512

            blocks = os.stat(s / "f").st_blocks
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 64 * kib, 64 * kib)
            assert os.fstat(fd).st_size == 256 * kib
            assert os.stat(s / "f").st_blocks == blocks - 64 * kib // 512
            data = os.pread(fd, 256 * kib, 0)
            assert data == b"z" * (64 * kib) + bytes(64 * kib) + b"z" * (128 * kib)
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 64 * kib

            fallocate(fd, FALLOC_FL_ZERO_RANGE, 200 * kib, 100 * kib)
            assert os.fstat(fd).st_size == 300 * kib
            assert os.pread(fd, 8, 200 * kib - 4) == b"z" * 4 + bytes(4)
            with pytest.raises(OSError) as e:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, 4096)  # punching needs KEEP_SIZE
            assert e.value.errno == errno.EOPNOTSUPP
        assert (s / "f").read_bytes() == (m / "f").read_bytes()
        assert len((s / "f").read_bytes()) == 300 * kib

    work.run(body)


def test_copy_file_range_between_mirror_files(work: Work) -> None:
    def body() -> None:
        m, s = work.mnt, work.src
        data = os.urandom(300_000)
        (m / "in").write_bytes(data)
        (m / "out").write_bytes(b"#" * 1000)
        with open(m / "in", "rb") as fin, open(m / "out", "r+b") as fout:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), 200_000, 50_000, 500)
            assert n == 200_000
        expected = b"#" * 500 + data[50_000:250_000]
        assert (m / "out").read_bytes() == expected
        assert (s / "out").read_bytes() == expected

    work.run(body)


def test_statvfs_matches_the_source(mounted: Mirrored) -> None:
    a, b = os.statvfs(mounted.mnt), os.statvfs(mounted.src)
    for field in ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax"):
        assert getattr(a, field) == getattr(b, field), field
    assert abs(a.f_bfree - b.f_bfree) < b.f_blocks // 100


# --- special files --------------------------------------------------------------------------------


def test_tmpfile_becomes_visible_once_linked(work: Work) -> None:
    def body() -> None:
        m, s = work.mnt, work.src
        (m / "d").mkdir()
        fd = os.open(m / "d", os.O_TMPFILE | os.O_RDWR, 0o640)
        try:
            os.write(fd, b"anonymous")
            assert os.listdir(s / "d") == [] and os.listdir(m / "d") == []
            assert os.fstat(fd).st_nlink == 0
            linkat_empty_path(fd, m / "d" / "named")
            link_through_proc(fd, m / "d" / "second")
            os.write(fd, b" file")
        finally:
            os.close(fd)
        assert sorted(os.listdir(s / "d")) == ["named", "second"]
        assert (s / "d" / "named").read_bytes() == b"anonymous file"
        assert os.stat(s / "d" / "named").st_nlink == 2
        assert stat.S_IMODE(os.stat(m / "d" / "second").st_mode) == 0o640

    work.run(body)


def test_tmpfile_opened_exclusive_cannot_be_linked(work: Work) -> None:
    def body() -> None:
        fd = os.open(work.mnt, os.O_TMPFILE | os.O_RDWR | os.O_EXCL, 0o600)
        try:
            with pytest.raises(OSError):
                link_through_proc(fd, work.mnt / "x")
        finally:
            os.close(fd)
        assert os.listdir(work.src) == []

    work.run(body)


def test_fifo_and_socket_nodes_appear_as_such(work: Work) -> None:
    def body() -> None:
        m, s = work.mnt, work.src
        os.mkfifo(m / "fifo", 0o640)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(m / "sock"))
        assert stat.S_ISFIFO(os.lstat(s / "fifo").st_mode) and stat.S_ISFIFO(os.lstat(m / "fifo").st_mode)
        assert stat.S_ISSOCK(os.lstat(s / "sock").st_mode) and stat.S_ISSOCK(os.lstat(m / "sock").st_mode)
        assert stat.S_IMODE(os.lstat(s / "fifo").st_mode) == 0o640
        # the FIFO works through the mount (the kernel handles it; the server only made the node)
        r = os.open(m / "fifo", os.O_RDONLY | os.O_NONBLOCK)
        try:
            w = os.open(m / "fifo", os.O_WRONLY | os.O_NONBLOCK)
            os.write(w, b"through")
            os.close(w)
            assert os.read(r, 100) == b"through"
        finally:
            os.close(r)

    work.run(body)


# --- containment: symlinks, '..', names ---------------------------------------------------------


@pytest.fixture
def deep(public_tmp: Path, start_server: Callable[..., ServerProcess]) -> Mirrored:
    """A mirror whose source lies two levels deeper than the mount point, so that a relative
    path resolved from the source and one resolved from the mount name different places."""
    src = public_tmp / "a" / "b" / "src"
    src.mkdir(parents=True)
    server = start_server(mirror_argv(src, "-o", "allow_other"), mountpoint=public_tmp / "mnt")
    return Mirrored(src, Path(server.mountpoint), server)


def test_symlinks_pointing_outside_are_text_and_never_followed_by_the_server(deep: Mirrored) -> None:
    m, s = deep.mnt, deep.src
    outside = s.parent / "outside"
    outside.write_bytes(b"outside")
    os.utime(outside, ns=(7, 7))
    os.symlink(str(outside), m / "abs")
    os.symlink("../outside", m / "rel")
    os.symlink("../escaped", m / "dangling")
    assert os.readlink(m / "abs") == str(outside) == os.readlink(s / "abs")
    assert os.readlink(m / "rel") == "../outside" == os.readlink(s / "rel")
    assert stat.S_ISLNK(os.lstat(m / "abs").st_mode)

    # operations on the link itself reach the link in the source, never its target
    os.utime(m / "abs", ns=(1, 2), follow_symlinks=False)
    os.chown(m / "abs", 1234, 1234, follow_symlinks=False)
    os.setxattr(m / "abs", "trusted.test", b"x", follow_symlinks=False)
    assert os.stat(outside).st_mtime_ns == 7 and owner(outside)[:2] == (0, 0)
    assert os.listxattr(outside) == []
    assert owner(s / "abs")[:2] == (1234, 1234) and os.lstat(s / "abs").st_mtime_ns == 2
    os.link(m / "abs", m / "hardlink", follow_symlinks=False)  # a second name for the link itself
    assert os.lstat(s / "hardlink").st_ino == os.lstat(s / "abs").st_ino
    assert os.readlink(s / "hardlink") == str(outside) and os.stat(outside).st_nlink == 1

    # the caller's kernel resolves the text relative to the mount, never the server relative to the source
    with pytest.raises(FileNotFoundError):
        (m / "rel").read_bytes()
    (m / "dangling").write_bytes(b"made by the caller")
    assert not (s.parent / "escaped").exists()
    assert (m.parent / "escaped").read_bytes() == b"made by the caller"
    with pytest.raises(FileExistsError):
        os.open(m / "dangling", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.unlink(m / "dangling")
    assert os.path.lexists(m.parent / "escaped") and not os.path.lexists(s / "dangling")
    assert (outside).read_bytes() == b"outside"


def test_dotdot_at_the_mount_root_is_the_mount_points_parent(deep: Mirrored) -> None:
    m, s = deep.mnt, deep.src
    (s.parent / "marker-next-to-source").write_bytes(b"")
    (m / "sub").mkdir()
    assert sorted(os.listdir(m / "..")) == sorted(os.listdir(m.parent))
    assert "marker-next-to-source" not in os.listdir(m / "..")
    assert os.stat(m / "..").st_ino == os.stat(m.parent).st_ino
    assert os.stat(m / "sub" / ".." / "..").st_ino == os.stat(m.parent).st_ino
    assert os.stat(m / "sub" / "..").st_ino == os.stat(m).st_ino
    assert os.stat(m).st_ino == os.stat(s).st_ino
    fd = os.open(m / "sub", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.stat("../..", dir_fd=fd).st_ino == os.stat(m.parent).st_ino
    finally:
        os.close(fd)


def test_hard_link_to_a_directory_is_refused(work: Work) -> None:
    def body() -> None:
        (work.mnt / "d").mkdir()
        with pytest.raises(PermissionError):
            os.link(work.mnt / "d", work.mnt / "e")
        assert os.listdir(work.src) == ["d"]

    work.run(body)


def test_names_longer_than_the_source_allows_are_refused(work: Work) -> None:
    def body() -> None:
        with pytest.raises(OSError) as e:
            (work.mnt / ("x" * 256)).write_bytes(b"")
        assert e.value.errno == errno.ENAMETOOLONG
        (work.mnt / ("y" * 255)).write_bytes(b"ok")
        assert os.listdir(work.src) == ["y" * 255]

    work.run(body)


def test_open_files_survive_unlink_and_rename(work: Work) -> None:
    def body() -> None:
        m, s = work.mnt, work.src
        (m / "f").write_bytes(b"before")
        with open(m / "f", "r+b", buffering=0) as f:
            os.rename(m / "f", m / "g")
            f.write(b"AFTER!")
            assert (s / "g").read_bytes() == b"AFTER!"
            os.unlink(m / "g")
            f.seek(0)
            assert f.read() == b"AFTER!"
            assert os.fstat(f.fileno()).st_nlink == 0
        assert os.listdir(s) == []

    work.run(body)


# --- the handlers directly: requests the kernel never sends, and races it cannot produce ----------


def ctx(uid: int = 0, gid: int = 0) -> Context:
    return Context(uid, gid, 4242, 1, memoryview(bytearray(1 << 16)))


@pytest.fixture
def direct(tmp_path: Path) -> Iterator[tuple[Mirror, Path]]:
    """A Mirror of ``tmp_path/src`` with room for a single O_PATH descriptor, not mounted."""
    src = tmp_path / "src"
    src.mkdir()
    fs = Mirror(str(src), max_path_fds=1)
    yield fs, src
    fs.destroy()


def test_names_with_a_slash_or_dots_are_refused(direct: tuple[Mirror, Path]) -> None:
    fs, src = direct
    (src / "sub").mkdir()
    (src / "sub" / "f").write_bytes(b"")
    (src.parent / "outside").write_bytes(b"")
    c = ctx()
    attempts: list[Callable[[], Any]] = []
    for name in (b"sub/f", b"..", b".", b"../outside", b"/etc", b"sub/"):
        attempts += [
            lambda n=name: fs.lookup(c, ROOT_ID, n),
            lambda n=name: fs.mkdir(c, ROOT_ID, n, 0o755, 0),
            lambda n=name: fs.mknod(c, ROOT_ID, n, stat.S_IFIFO | 0o644, 0, 0),
            lambda n=name: fs.symlink(c, ROOT_ID, n, b"target"),
            lambda n=name: fs.create(c, ROOT_ID, n, stat.S_IFREG | 0o644, 0, os.O_WRONLY),
            lambda n=name: fs.unlink(c, ROOT_ID, n),
            lambda n=name: fs.rmdir(c, ROOT_ID, n),
            lambda n=name: fs.rename(c, ROOT_ID, n, ROOT_ID, b"x", 0),
            lambda n=name: fs.rename(c, ROOT_ID, b"sub", ROOT_ID, n, 0),
        ]
    for attempt in attempts:
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EINVAL
    sub = fs.lookup(c, ROOT_ID, b"sub")
    with pytest.raises(OSError) as e:
        fs.link(c, sub.nodeid, ROOT_ID, b"sub/g")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        fs.lookup(c, sub.nodeid, b"..")
    assert e.value.errno == errno.EINVAL
    assert sorted(os.listdir(src)) == ["sub"] and os.listdir(src / "sub") == ["f"]
    assert (src.parent / "outside").exists()


def test_create_never_opens_or_chowns_a_name_that_appeared_meanwhile(direct: tuple[Mirror, Path]) -> None:
    """The kernel sends CREATE after a negative lookup; what the source has by then is not the
    caller's: an existing file is neither opened nor given away, a symlink never followed."""
    fs, src = direct
    make_file(src / "existing", b"root's", 0o600)
    (src / "dangling").symlink_to(src.parent / "created-outside")
    for name in (b"existing", b"dangling"):
        for flags in (os.O_RDWR, os.O_RDWR | os.O_TRUNC, os.O_RDWR | os.O_EXCL):
            with pytest.raises(OSError) as e:
                fs.create(ctx(*NOBODY), ROOT_ID, name, stat.S_IFREG | 0o666, 0, flags)
            assert e.value.errno in (errno.EEXIST, errno.ELOOP)
    assert owner(src / "existing")[:2] == (0, 0) and (src / "existing").read_bytes() == b"root's"
    assert not (src.parent / "created-outside").exists()
    for call in (lambda: fs.mkdir(ctx(*NOBODY), ROOT_ID, b"dangling", 0o755, 0),
                 lambda: fs.mknod(ctx(*NOBODY), ROOT_ID, b"dangling", stat.S_IFIFO | 0o644, 0, 0),
                 lambda: fs.symlink(ctx(*NOBODY), ROOT_ID, b"existing", b"x")):
        with pytest.raises(FileExistsError):
            call()
    assert not (src.parent / "created-outside").exists() and owner(src / "dangling")[:2] == (0, 0)


def test_a_reused_inode_number_is_a_new_node(direct: tuple[Mirror, Path]) -> None:
    """A file deleted behind the mirror's back, its descriptor evicted, and its inode number
    reused by a new file: the new file must get its own node, never the old one's."""
    fs, src = direct
    c = ctx()
    (src / "old").write_bytes(b"old")
    (src / "other").write_bytes(b"other")
    old = fs.lookup(c, ROOT_ID, b"old")
    fs.lookup(c, ROOT_ID, b"other")  # evicts old's descriptor (max_path_fds=1)
    assert fs.descriptor_counts()["path"] == 2  # the root's and other's
    ino = os.stat(src / "old").st_ino
    os.unlink(src / "old")
    for i in range(20):
        (src / f"new{i}").write_bytes(b"new")
        if os.stat(src / f"new{i}").st_ino == ino:
            break
    else:
        pytest.skip("the source filesystem did not reuse the inode number")
    new = fs.lookup(c, ROOT_ID, f"new{i}".encode())
    assert new.nodeid != old.nodeid and new.attr.st_ino == ino
    fs.lookup(c, ROOT_ID, b"other")  # evict again: the new node must reopen from its own handle
    assert fs.getattr(c, new.nodeid, None).st_size == 3
    opened = fs.open(c, new.nodeid, os.O_RDONLY)
    try:
        assert os.pread(opened.fh, 10, 0) == b"new"
    finally:
        fs.release(c, new.nodeid, opened.fh, 0)
    with pytest.raises(OSError) as e:
        fs.getattr(c, old.nodeid, None)
    assert e.value.errno == errno.ESTALE


def test_looking_up_an_evicted_inode_again_finds_it_without_a_descriptor(direct: tuple[Mirror, Path]) -> None:
    """The same file under its name keeps its node; the lookup proves it by the name's file
    handle and opens nothing, so a cyclic walk over more files than max_path_fds stays cheap."""
    fs, src = direct
    c = ctx()
    (src / "a").write_bytes(b"a")
    (src / "b").write_bytes(b"bb")
    a = fs.lookup(c, ROOT_ID, b"a")
    fs.lookup(c, ROOT_ID, b"b")  # evicts a's descriptor
    again = fs.lookup(c, ROOT_ID, b"a")
    assert again.nodeid == a.nodeid and again.attr.st_size == 1
    assert fs.descriptor_counts()["path"] == 2  # the root's and b's: a was not reopened
    os.rename(src / "b", src / "a")  # behind the mirror's back: the name now means another file
    replaced = fs.lookup(c, ROOT_ID, b"a")
    assert replaced.nodeid != a.nodeid and replaced.attr.st_size == 2


def test_an_open_file_stays_reachable_after_unlink_under_descriptor_pressure(
    direct: tuple[Mirror, Path],
) -> None:
    fs, src = direct
    c = ctx()
    (src / "f").write_bytes(b"data")
    (src / "other").write_bytes(b"")
    f = fs.lookup(c, ROOT_ID, b"f")
    opened = fs.open(c, f.nodeid, os.O_RDWR)
    os.unlink(src / "f")
    for _ in range(3):
        fs.lookup(c, ROOT_ID, b"other")  # would evict f's descriptor if the open did not pin it
    assert fs.getattr(c, f.nodeid, None).st_nlink == 0
    fs.setattr(c, f.nodeid, Changes(mode=0o600), None)
    fs.release(c, f.nodeid, opened.fh, 0)
    entry, tmp = fs.tmpfile(c, ROOT_ID, stat.S_IFREG | 0o600, 0, os.O_RDWR)
    fs.lookup(c, ROOT_ID, b"other")
    fs.link(c, entry.nodeid, ROOT_ID, b"named")
    fs.release(c, entry.nodeid, tmp.fh, 0)
    assert sorted(os.listdir(src)) == ["named", "other"]


def test_statx_through_the_mount_reports_the_source_birth_time(mirror: ServerProcess) -> None:
    """STATX reaches the server only for fields GETATTR lacks, such as the birth time."""
    src = mirror.source / "born"  # type: ignore[attr-defined]
    src.write_bytes(b"x")
    libc = ctypes.CDLL(None, use_errno=True)
    STATX_BTIME = 0x800

    def btime(path: Path) -> tuple[int, int, int]:
        buf = ctypes.create_string_buffer(256)
        assert libc.statx(-100, bytes(path), 0, STATX_BTIME, buf) == 0, ctypes.get_errno()
        mask = int.from_bytes(buf.raw[0:4], "little")
        sec = int.from_bytes(buf.raw[80:88], "little", signed=True)
        nsec = int.from_bytes(buf.raw[88:92], "little")
        return mask & STATX_BTIME, sec, nsec

    native = btime(src)
    assert native[0], "the source filesystem has no birth time"
    assert btime(Path(mirror.mountpoint) / "born") == native


def test_a_set_user_id_file_is_served_and_status_says_why(mounted: Mirrored) -> None:
    """Its writes must reach the server, which clears the bit for writers without CAP_FSETID."""
    make_file(mounted.src / "suid", b"x", 0o4755)
    make_file(mounted.src / "plain", b"x", 0o755)
    for name in ("suid", "plain"):
        with open(mounted.mnt / name, "rb") as f:
            assert f.read() == b"x"
    reasons = control.query(str(mounted.server.mountpoint))["passthrough"]["served_reasons"]
    assert reasons == {"set-user-ID or set-group-ID file (its writes must reach the server)": 1}
