"""memfs mounted for real and driven through ordinary system calls from this process (the
server is another process): data, attributes, names, links, xattrs and statfs."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import platform
import stat
from pathlib import Path

import pytest
from conftest import NOBODY, ServerProcess, python_module, run_as

pytestmark = pytest.mark.timeout(60)

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100
SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    if SYS_RENAMEAT2 is None:
        pytest.skip(f"renameat2 syscall number unknown on {platform.machine()}")
    rc = _libc.syscall(ctypes.c_long(SYS_RENAMEAT2), ctypes.c_int(AT_FDCWD), os.fsencode(old),
                       ctypes.c_int(AT_FDCWD), os.fsencode(new), ctypes.c_uint(flags))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old), None, str(new))


@pytest.fixture
def mnt(memfs: ServerProcess) -> Path:
    return Path(memfs.mountpoint)


def expect_errno(code: int, fn, *args, **kw) -> None:
    with pytest.raises(OSError) as info:
        fn(*args, **kw)
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"


# --- data --------------------------------------------------------------------------------


def test_write_then_read_through_file_descriptors(mnt):
    path = mnt / "f"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        assert os.write(fd, b"hello world") == 11
        os.lseek(fd, 0, os.SEEK_SET)
        assert os.read(fd, 100) == b"hello world"
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.read(fd, 5) == b"hello"
        assert os.read(fd, 100) == b" world"
        assert os.read(fd, 100) == b""
    finally:
        os.close(fd)
    expect_errno(errno.EEXIST, os.open, path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    expect_errno(errno.ENOENT, os.open, mnt / "missing", os.O_RDONLY)


def test_pread_and_pwrite_at_offsets_including_past_the_end(mnt):
    path = mnt / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.pwrite(fd, b"0123456789", 0) == 10
        assert os.pwrite(fd, b"abc", 4) == 3
        assert os.pread(fd, 100, 0) == b"0123abc789"
        assert os.pread(fd, 3, 8) == b"89"
        assert os.pwrite(fd, b"Z", 20) == 1  # leaves a hole of zeros
        assert os.pread(fd, 100, 0) == b"0123abc789" + bytes(10) + b"Z"
        assert os.pread(fd, 10, 100) == b""
    finally:
        os.close(fd)
    assert path.stat().st_size == 21
    assert path.read_bytes() == b"0123abc789" + bytes(10) + b"Z"


def test_open_with_o_trunc_empties_the_file(mnt):
    path = mnt / "f"
    path.write_bytes(b"x" * 5000)
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert path.stat().st_size == 3
    assert path.read_bytes() == b"new"


def test_o_append_writes_go_to_the_end(mnt):
    path = mnt / "f"
    path.write_bytes(b"start;")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"one;")
        os.write(fd, b"two;")
    finally:
        os.close(fd)
    with open(path, "ab") as f:
        f.write(b"three")
    assert path.read_bytes() == b"start;one;two;three"


def test_five_mib_file_round_trips_with_the_same_sha256(mnt):
    data = os.urandom(5 * 1024 * 1024 + 123)
    path = mnt / "big"
    with open(path, "wb") as f:
        for off in range(0, len(data), 200_000):  # odd-sized writes across page boundaries
            f.write(data[off:off + 200_000])
    assert path.stat().st_size == len(data)
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 3 * 1024 * 1024 + 7) == data[3 * 1024 * 1024 + 7:][:4096]
    finally:
        os.close(fd)


def test_truncate_grows_with_zeros_and_shrinks(mnt):
    path = mnt / "f"
    path.write_bytes(b"abcdef")
    os.truncate(path, 10)
    assert path.stat().st_size == 10
    assert path.read_bytes() == b"abcdef" + bytes(4)
    os.truncate(path, 2)
    assert path.stat().st_size == 2
    assert path.read_bytes() == b"ab"
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, 0)
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
    assert path.read_bytes() == b""


# --- attributes ----------------------------------------------------------------------------


def test_stat_reports_size_mode_nlink_and_owner(mnt):
    old = os.umask(0o022)
    try:
        fd = os.open(mnt / "f", os.O_CREAT | os.O_WRONLY, 0o640)
        os.write(fd, b"12345")
        os.close(fd)
        os.mkdir(mnt / "d", 0o750)
        os.mkdir(mnt / "d" / "sub")
    finally:
        os.umask(old)
    st = os.stat(mnt / "f")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_size, st.st_nlink, st.st_uid, st.st_gid) == (5, 1, os.getuid(), os.getgid())
    d = os.stat(mnt / "d")
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o750
    assert d.st_nlink == 3  # ".", its name, and "sub/.."
    assert os.stat(mnt / "d" / "sub").st_nlink == 2
    assert st.st_ino != d.st_ino
    root = os.stat(mnt)
    assert stat.S_ISDIR(root.st_mode)
    assert root.st_dev == st.st_dev != os.stat(mnt.parent).st_dev


def test_files_belong_to_the_uid_and_gid_that_created_them(public_tmp, start_server):
    server = start_server(python_module("fusepass.examples.memfs", "-o", "allow_other"),
                          mountpoint=public_tmp / "mnt")
    mnt = Path(server.mountpoint)
    os.chmod(mnt, 0o1777)

    def create() -> tuple[int, int, int, int]:
        (mnt / "mine").write_bytes(b"x")
        os.mkdir(mnt / "mydir")
        st, dst = os.stat(mnt / "mine"), os.stat(mnt / "mydir")
        return st.st_uid, st.st_gid, dst.st_uid, dst.st_gid

    assert run_as(*NOBODY, create) == (*NOBODY, *NOBODY)
    st = os.stat(mnt / "mine")
    assert (st.st_uid, st.st_gid) == NOBODY
    # default_permissions: the kernel applies the usual ownership rules
    with pytest.raises(PermissionError):
        run_as(*NOBODY, lambda: os.chown(mnt / "mine", 0, 0))
    (mnt / "roots").write_bytes(b"r")
    with pytest.raises(PermissionError):
        run_as(*NOBODY, lambda: os.chmod(mnt / "roots", 0o666))


def test_chmod_and_chown(mnt):
    path = mnt / "f"
    path.write_bytes(b"x")
    os.chmod(path, 0o4751)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o4751
    os.chmod(path, 0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chown(path, 1234, 5678)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(path, -1, 42)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (1234, 42)
    assert stat.S_ISREG(st.st_mode)


def test_utime_keeps_nanoseconds(mnt):
    path = mnt / "f"
    path.write_bytes(b"x")
    atime, mtime = 1_500_000_000_123_456_789, 1_600_000_000_987_654_321
    os.utime(path, ns=(atime, mtime))
    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
    os.mkdir(mnt / "d")
    os.utime(mnt / "d", ns=(1, 2))
    st = os.stat(mnt / "d")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1, 2)
    before = os.stat(path).st_mtime_ns
    os.utime(path)  # "now"
    assert os.stat(path).st_mtime_ns > before


def test_statvfs_reports_the_filesystem_numbers(mnt):
    sv = os.statvfs(mnt)
    assert sv.f_bsize == 4096 and sv.f_frsize == 4096
    assert sv.f_namemax == 255
    assert sv.f_blocks == 1 << 20 and sv.f_files == 1 << 20
    (mnt / "f").write_bytes(b"x" * (4096 * 10))
    after = os.statvfs(mnt)
    assert after.f_bfree == sv.f_bfree - 10
    assert after.f_ffree == sv.f_ffree - 1


# --- directories -------------------------------------------------------------------------


def test_listing_two_thousand_names_returns_each_exactly_once(mnt):
    d = mnt / "many"
    os.mkdir(d)
    names = {f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(2000)}
    for name in names:
        os.mknod(d / name, stat.S_IFREG | 0o644)
    listed = os.listdir(d)
    assert len(listed) == len(names)
    assert set(listed) == names
    with os.scandir(d) as it:
        entries = list(it)
    assert sorted(e.name for e in entries) == sorted(names)
    assert all(e.is_file(follow_symlinks=False) for e in entries)
    os.mkdir(d / "subdir")
    with os.scandir(d) as it:
        kinds = {e.name: e.is_dir(follow_symlinks=False) for e in it}
    assert kinds.pop("subdir") is True
    assert len(kinds) == 2000 and not any(kinds.values())


def test_rmdir_removes_only_empty_directories(mnt):
    os.makedirs(mnt / "a" / "b")
    (mnt / "a" / "b" / "f").write_bytes(b"")
    expect_errno(errno.ENOTEMPTY, os.rmdir, mnt / "a")
    expect_errno(errno.ENOTEMPTY, os.rmdir, mnt / "a" / "b")
    expect_errno(errno.ENOTDIR, os.rmdir, mnt / "a" / "b" / "f")
    os.unlink(mnt / "a" / "b" / "f")
    os.rmdir(mnt / "a" / "b")
    assert os.stat(mnt / "a").st_nlink == 2
    os.rmdir(mnt / "a")
    assert os.listdir(mnt) == []
    expect_errno(errno.ENOENT, os.rmdir, mnt / "a")


def test_unlink_removes_the_name_and_an_open_file_stays_readable(mnt):
    path = mnt / "f"
    path.write_bytes(b"still here")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.unlink(path)
        assert not path.exists()
        assert "f" not in os.listdir(mnt)
        assert os.pread(fd, 100, 0) == b"still here"
    finally:
        os.close(fd)
    expect_errno(errno.ENOENT, os.unlink, path)
    os.mkdir(mnt / "d")
    expect_errno(errno.EISDIR, os.unlink, mnt / "d")


# --- rename --------------------------------------------------------------------------------


def test_rename_within_a_directory(mnt):
    (mnt / "a").write_bytes(b"A")
    ino = os.stat(mnt / "a").st_ino
    os.rename(mnt / "a", mnt / "b")
    assert not (mnt / "a").exists()
    assert (mnt / "b").read_bytes() == b"A"
    assert os.stat(mnt / "b").st_ino == ino
    assert sorted(os.listdir(mnt)) == ["b"]


def test_rename_over_an_existing_file_replaces_it(mnt):
    (mnt / "a").write_bytes(b"A")
    (mnt / "b").write_bytes(b"old B")
    os.rename(mnt / "a", mnt / "b")
    assert (mnt / "b").read_bytes() == b"A"
    assert sorted(os.listdir(mnt)) == ["b"]
    os.mkdir(mnt / "d")
    (mnt / "d" / "x").write_bytes(b"")
    os.mkdir(mnt / "e")
    expect_errno(errno.ENOTEMPTY, os.rename, mnt / "e", mnt / "d")
    expect_errno(errno.EISDIR, os.rename, mnt / "b", mnt / "d")
    expect_errno(errno.ENOTDIR, os.rename, mnt / "e", mnt / "b")


def test_rename_across_directories_moves_files_and_directories(mnt):
    os.mkdir(mnt / "src")
    os.mkdir(mnt / "dst")
    (mnt / "src" / "f").write_bytes(b"F")
    os.mkdir(mnt / "src" / "sub")
    (mnt / "src" / "sub" / "inner").write_bytes(b"I")
    os.rename(mnt / "src" / "f", mnt / "dst" / "g")
    os.rename(mnt / "src" / "sub", mnt / "dst" / "sub")
    assert os.listdir(mnt / "src") == []
    assert sorted(os.listdir(mnt / "dst")) == ["g", "sub"]
    assert (mnt / "dst" / "g").read_bytes() == b"F"
    assert (mnt / "dst" / "sub" / "inner").read_bytes() == b"I"
    assert os.stat(mnt / "src").st_nlink == 2
    assert os.stat(mnt / "dst").st_nlink == 3
    assert os.stat(mnt / "dst" / "sub" / "..").st_ino == os.stat(mnt / "dst").st_ino
    expect_errno(errno.EINVAL, os.rename, mnt / "dst", mnt / "dst" / "sub" / "inside")


def test_rename_noreplace_refuses_an_existing_target(mnt):
    (mnt / "a").write_bytes(b"A")
    (mnt / "b").write_bytes(b"B")
    expect_errno(errno.EEXIST, renameat2, mnt / "a", mnt / "b", RENAME_NOREPLACE)
    assert (mnt / "a").read_bytes() == b"A" and (mnt / "b").read_bytes() == b"B"
    renameat2(mnt / "a", mnt / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(mnt)) == ["b", "c"]
    assert (mnt / "c").read_bytes() == b"A"


def test_rename_exchange_swaps_two_names(mnt):
    (mnt / "a").write_bytes(b"A")
    os.mkdir(mnt / "d")
    (mnt / "d" / "b").write_bytes(b"BB")
    ino_a, ino_b = os.stat(mnt / "a").st_ino, os.stat(mnt / "d" / "b").st_ino
    renameat2(mnt / "a", mnt / "d" / "b", RENAME_EXCHANGE)
    assert (mnt / "a").read_bytes() == b"BB"
    assert (mnt / "d" / "b").read_bytes() == b"A"
    assert os.stat(mnt / "a").st_ino == ino_b and os.stat(mnt / "d" / "b").st_ino == ino_a
    expect_errno(errno.ENOENT, renameat2, mnt / "a", mnt / "nothing", RENAME_EXCHANGE)


# --- links -------------------------------------------------------------------------------------


def test_hard_links_share_data_and_count_nlink(mnt):
    (mnt / "a").write_bytes(b"shared")
    os.mkdir(mnt / "d")
    os.link(mnt / "a", mnt / "b")
    os.link(mnt / "a", mnt / "d" / "c")
    for name in ("a", "b", "d/c"):
        assert os.stat(mnt / name).st_nlink == 3
    assert os.stat(mnt / "b").st_ino == os.stat(mnt / "a").st_ino
    with open(mnt / "b", "r+b") as f:
        f.write(b"SH")
    assert (mnt / "d" / "c").read_bytes() == b"SHared"
    os.unlink(mnt / "a")
    assert os.stat(mnt / "b").st_nlink == 2
    os.unlink(mnt / "d" / "c")
    assert os.stat(mnt / "b").st_nlink == 1
    assert (mnt / "b").read_bytes() == b"SHared"
    expect_errno(errno.EEXIST, os.link, mnt / "b", mnt / "b")
    expect_errno(errno.EPERM, os.link, mnt / "d", mnt / "dlink")


def test_symlink_and_readlink(mnt):
    (mnt / "target").write_bytes(b"T")
    os.symlink("target", mnt / "rel")
    os.symlink("/nonexistent/elsewhere", mnt / "dangling")
    assert os.readlink(mnt / "rel") == "target"
    assert os.readlink(mnt / "dangling") == "/nonexistent/elsewhere"
    st = os.lstat(mnt / "rel")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("target")
    assert (mnt / "rel").read_bytes() == b"T"
    assert os.stat(mnt / "rel").st_ino == os.stat(mnt / "target").st_ino
    expect_errno(errno.ENOENT, os.stat, mnt / "dangling")
    expect_errno(errno.EINVAL, os.readlink, mnt / "target")
    long_target = "x/" * 1000 + "end"
    os.symlink(long_target, mnt / "long")
    assert os.readlink(mnt / "long") == long_target


# --- extended attributes ------------------------------------------------------------------------


def test_xattrs_set_get_list_remove(mnt):
    path = mnt / "f"
    path.write_bytes(b"")
    assert os.listxattr(path) == []
    os.setxattr(path, "user.one", b"1")
    os.setxattr(path, "user.two", b"\x00binary\xff" * 100)
    assert os.getxattr(path, "user.one") == b"1"
    assert os.getxattr(path, "user.two") == b"\x00binary\xff" * 100
    assert sorted(os.listxattr(path)) == ["user.one", "user.two"]
    os.setxattr(path, "user.one", b"replaced")
    assert os.getxattr(path, "user.one") == b"replaced"
    os.removexattr(path, "user.one")
    assert os.listxattr(path) == ["user.two"]
    os.mkdir(mnt / "d")
    os.setxattr(mnt / "d", "user.dir", b"")
    assert os.getxattr(mnt / "d", "user.dir") == b""


def test_xattr_flags_and_missing_names(mnt):
    path = mnt / "f"
    path.write_bytes(b"")
    os.setxattr(path, "user.a", b"1", os.XATTR_CREATE)
    expect_errno(errno.EEXIST, os.setxattr, path, "user.a", b"2", os.XATTR_CREATE)
    assert os.getxattr(path, "user.a") == b"1"
    expect_errno(errno.ENODATA, os.setxattr, path, "user.b", b"2", os.XATTR_REPLACE)
    os.setxattr(path, "user.a", b"3", os.XATTR_REPLACE)
    assert os.getxattr(path, "user.a") == b"3"
    expect_errno(errno.ENODATA, os.getxattr, path, "user.missing")
    expect_errno(errno.ENODATA, os.removexattr, path, "user.missing")
