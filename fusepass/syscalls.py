"""ctypes wrappers for the Linux calls Python's ``os`` module lacks: mount and umount2, ioctls that
return a value, renameat2, file handles, fallocate modes, utimensat with UTIME_NOW/OMIT, fchownat on
O_PATH descriptors, statx, fstatfs, fanotify, io_uring_setup and io_uring_enter, and a read(2) that a
signal interrupts. Every ctypes handle of the package lives here."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Callable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
MAX_HANDLE_SZ = 128
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _check(ret: int, what: str, path: str | bytes | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def last_errno() -> int:
    """The errno of the last failed call made through this module."""
    return ctypes.get_errno()


def mount(source: bytes, target: bytes, fstype: bytes, flags: int, data: bytes | None) -> int:
    """mount(2); returns 0 or the errno (callers word the error themselves)."""
    return 0 if _libc.mount(source, target, fstype, flags, data) == 0 else ctypes.get_errno()


def umount2(target: bytes, flags: int) -> int:
    """umount2(2); returns 0 or the errno."""
    return 0 if _libc.umount2(target, flags) == 0 else ctypes.get_errno()


def ioctl_value(fd: int, request: int, arg: bytes) -> int:
    """ioctl(2) returning the call's value, which ``fcntl.ioctl`` gives back only when the argument
    is a mutable buffer (one is made here). Returns -errno on failure."""
    try:
        return fcntl.ioctl(fd, request, bytearray(arg), True)
    except OSError as e:
        return -(e.errno or errno.EIO)


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int) -> None:
    _check(_libc.renameat2(olddirfd, oldname, newdirfd, newname, ctypes.c_uint(flags)), "renameat2", oldname)


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def name_to_handle(fd: int, name: bytes = b"") -> bytes:
    """The file handle, as opaque bytes, of the file ``fd`` refers to (an O_PATH fd is fine),
    or with ``name``, of that name in directory ``fd`` (a symlink itself, never followed)."""
    fh = _FileHandle()
    fh.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    flags = 0 if name else AT_EMPTY_PATH
    _check(_libc.name_to_handle_at(fd, name, ctypes.byref(fh), ctypes.byref(mount_id), flags),
           "name_to_handle_at", name or None)
    header = fh.handle_type.to_bytes(4, "little", signed=True)
    return header + bytes(fh.f_handle[: fh.handle_bytes])


def open_by_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """Open the file named by ``handle`` (from ``name_to_handle``) on the filesystem of ``mount_fd``.
    Needs CAP_DAC_READ_SEARCH; ESTALE if the file no longer exists."""
    fh = _FileHandle()
    fh.handle_type = int.from_bytes(handle[:4], "little", signed=True)
    data = handle[4:]
    fh.handle_bytes = len(data)
    ctypes.memmove(fh.f_handle, data, len(data))
    return _check(_libc.open_by_handle_at(mount_fd, ctypes.byref(fh), flags | os.O_CLOEXEC), "open_by_handle_at")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)), "fallocate")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimens(path: bytes, atime_ns: int | None, mtime_ns: int | None, atime_now: bool = False,
            mtime_now: bool = False) -> None:
    """Set times of ``path`` (following it); None leaves a time alone, *_now sets the current time."""
    times = (_Timespec * 2)()
    for ts, ns, now in ((times[0], atime_ns, atime_now), (times[1], mtime_ns, mtime_now)):
        if now:
            ts.tv_sec, ts.tv_nsec = 0, UTIME_NOW
        elif ns is None:
            ts.tv_sec, ts.tv_nsec = 0, UTIME_OMIT
        else:
            ts.tv_sec, ts.tv_nsec = divmod(ns, 1_000_000_000)
    _check(_libc.utimensat(AT_FDCWD, path, times, 0), "utimensat", path)


AT_STATX_SYNC_TYPE = 0x6000
_STATX_SIZE = 256


def statx(dirfd: int, name: bytes, flags: int, mask: int) -> bytes:
    """The raw 256-byte ``struct statx`` (laid out as ``abi.STATX``: the kernel's fuse_statx is
    the same structure)."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    _check(_libc.statx(dirfd, name, flags, ctypes.c_uint(mask), buf), "statx", name)
    return buf.raw


def fchownat(dirfd: int, name: bytes, uid: int, gid: int, flags: int) -> None:
    """chown relative to ``dirfd``; with ``name`` b"" and AT_EMPTY_PATH, chown ``dirfd`` itself
    (works on O_PATH descriptors and on symlinks)."""
    _check(_libc.fchownat(dirfd, name, ctypes.c_uint(uid & 0xFFFFFFFF), ctypes.c_uint(gid & 0xFFFFFFFF), flags),
           "fchownat", name)


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def fs_magic(fd: int) -> int:
    """The f_type (filesystem magic number) of the filesystem holding ``fd``; 0 if unknown."""
    buf = _Statfs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        return 0
    return int(buf.f_type) & 0xFFFFFFFF


_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]


def fanotify_init(flags: int, event_f_flags: int) -> int:
    """A new fanotify group: the descriptor its events are read from."""
    return _check(_libc.fanotify_init(flags, event_f_flags), "fanotify_init")


def fanotify_mark(group_fd: int, flags: int, mask: int, dirfd: int, path: bytes | None) -> None:
    """Add, change or remove the mark of ``path`` (relative to ``dirfd``) in an fanotify group."""
    _check(_libc.fanotify_mark(group_fd, flags, mask, dirfd, path), "fanotify_mark", path)


_libc.syscall.restype = ctypes.c_long
_NR_IO_URING_SETUP = 425  # x86-64 and every architecture with the generic syscall table
_NR_IO_URING_ENTER = 426


def io_uring_setup(entries: int, params: bytearray) -> int:
    """io_uring_setup(2): a new ring's descriptor; ``params`` (a ``struct io_uring_params``) is read
    and filled in by the kernel."""
    holder = (ctypes.c_char * len(params)).from_buffer(params)
    ret = _libc.syscall(ctypes.c_long(_NR_IO_URING_SETUP), ctypes.c_uint(entries), ctypes.byref(holder))
    return _check(int(ret), "io_uring_setup")


# A handle of syscall(2) of its own, called with no argument types declared: ctypes then converts
# plain ints without building an object for each (what argtypes costs: about 1.5 us a call, and this
# runs once per request). The number is a prebuilt c_long (syscall() reads a long); the other
# arguments are 32-bit for the kernel (it truncates them), and the signal mask size is unused
# without a mask (NULL) and without IORING_ENTER_EXT_ARG.
_enter = ctypes.CDLL(None, use_errno=True).syscall
_enter.restype = ctypes.c_long
_ENTER_NUMBER = ctypes.c_long(_NR_IO_URING_ENTER)


def io_uring_enter(fd: int, to_submit: int, min_complete: int, flags: int) -> int:
    """io_uring_enter(2) without a signal mask: how many submissions the kernel took. The GIL is
    released while it waits."""
    ret = _enter(_ENTER_NUMBER, fd, to_submit, min_complete, flags, None, 0)
    if ret < 0:
        return _check(ret, "io_uring_enter")
    return int(ret)


def io_uring_enterer(fd: int, flags: int) -> Callable[[int, int], int]:
    """io_uring_enter(2) of ring ``fd`` with ``flags``, as ``enter(to_submit, min_complete)``
    returning how many submissions were taken or -errno: the request path's form, one Python
    call and no exception on EINTR."""
    call, number = _enter, _ENTER_NUMBER
    get_errno = ctypes.get_errno

    def enter(to_submit: int, min_complete: int) -> int:
        ret: int = call(number, fd, to_submit, min_complete, flags, None, 0)
        return ret if ret >= 0 else -get_errno()

    return enter


_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class SharedMapping:
    """mmap(2) of a descriptor's memory (MAP_SHARED | MAP_POPULATE), as ``view``. Unlike the ``mmap``
    module, it keeps no duplicate of the descriptor, so closing the descriptor and the mapping
    releases the object. ``close`` releases the view first: using it afterwards raises ValueError."""

    def __init__(self, fd: int, length: int, offset: int) -> None:
        addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                          fd, offset)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap: {os.strerror(err)}")
        self._addr, self._length = addr, length
        self.view: memoryview | None = memoryview((ctypes.c_char * length).from_address(addr)).cast("B")

    def close(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
            _libc.munmap(self._addr, self._length)


def buffer_address(buf: bytearray | mmap.mmap) -> int:
    """The address of a writable buffer's first byte, for the kernel to read or write later. It stays
    valid while ``buf`` is open and not resized (an mmap never is)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


_libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.read.restype = ctypes.c_ssize_t


def read_interruptible(fd: int, address: int, size: int) -> int:
    """read(2) into ``size`` bytes at ``address`` (see ``buffer_address``), returning the count, or
    minus the errno. Unlike ``os.read``, a signal caught meanwhile ends it with -EINTR instead of
    being retried: a thread blocked in it can be woken with ``signal.pthread_kill``."""
    n = _libc.read(fd, address, size)
    return int(n) if n >= 0 else -ctypes.get_errno()
