"""The handler API a filesystem implements: inode-based, in the spirit of libfuse's low-level API.

Subclass ``Operations`` and override the handlers your filesystem supports; the session
answers every other request with ENOSYS (and the kernel then stops sending most of them).
A handler reports failure by raising ``OSError(errno, ...)``. Any other exception is logged
with its traceback and the caller sees EIO; the server keeps serving.

Every handler gets a ``Context`` first: the caller's uid, gid and pid, and whether the
request has been interrupted. Inode numbers (``ino``) are the node ids the kernel uses;
1 is the root.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import abi
from .notify import Notifier
from .protocol import Attr, Entry, StatfsReply, StatxReply, dirent_size, entry_body, pack_dirent, pack_direntplus

__all__ = [
    "Attr", "Changes", "Context", "DirListing", "Entry", "Opened", "Operations", "StatfsReply",
    "StatxReply", "ROOT_ID",
]

ROOT_ID = abi.ROOT_ID


class Context:
    """Who is asking, for one request. ``interrupted`` turns true if the caller gave up
    (a signal); a long handler should check it, or block in ``wait_interrupted``."""

    __slots__ = ("uid", "gid", "pid", "unique", "interrupted", "_event", "scratch", "undo")

    def __init__(self, uid: int, gid: int, pid: int, unique: int, scratch: memoryview) -> None:
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.unique = unique
        self.interrupted = False
        self._event: threading.Event | None = None
        #: This worker's reply buffer (see ``buffer``).
        self.scratch = scratch
        #: Run by the session if the reply cannot be delivered (the request is gone).
        self.undo: list[Callable[[], None]] | None = None

    def wait_interrupted(self, timeout: float | None = None) -> bool:
        """Block until the request is interrupted or ``timeout`` passes; True if interrupted."""
        with _event_lock:
            if self.interrupted:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def interrupt(self) -> None:
        with _event_lock:
            self.interrupted = True
            if self._event is not None:
                self._event.set()

    def on_undelivered(self, fn: Callable[[], None]) -> None:
        """Have ``fn`` run if this request's reply never reaches the kernel (the caller was
        killed or the connection aborted): the place to take back what the reply promised."""
        if self.undo is None:
            self.undo = [fn]
        else:
            self.undo.append(fn)

    def buffer(self, size: int) -> memoryview:
        """A scratch buffer of ``size`` bytes (at most ``abi.MAX_WRITE``) owned by this
        worker, for READ replies: fill it and return it, with no allocation."""
        if size > len(self.scratch):
            raise ValueError(f"scratch buffer holds {len(self.scratch)} bytes, {size} asked")
        return self.scratch[:size]


_event_lock = threading.Lock()


@dataclass(slots=True)
class Opened:
    """The answer to OPEN, OPENDIR, CREATE and TMPFILE.

    ``backing_fd``: a descriptor of a regular file whose data this open file should be
    (the descriptor stays the filesystem's; the kernel keeps its own reference). When
    passthrough is available the kernel then reads and writes it directly and the
    filesystem never sees READ or WRITE for this open; otherwise the session falls
    back to serving, so ``read``/``write`` must still work for ``fh``.
    """

    fh: int = 0
    backing_fd: int | None = None
    direct_io: bool = False
    keep_cache: bool = False
    nonseekable: bool = False
    cache_dir: bool = False
    noflush: bool = False
    parallel_direct_writes: bool = False

    def fopen_flags(self) -> int:
        f = abi.FopenFlag
        flags = 0
        for on, bit in (
            (self.direct_io, f.DIRECT_IO), (self.keep_cache, f.KEEP_CACHE),
            (self.nonseekable, f.NONSEEKABLE), (self.cache_dir, f.CACHE_DIR),
            (self.noflush, f.NOFLUSH), (self.parallel_direct_writes, f.PARALLEL_DIRECT_WRITES),
        ):
            if on:
                flags |= bit
        return flags


@dataclass(slots=True, frozen=True)
class Changes:
    """What SETATTR asks to change; ``None`` leaves a field alone. ``*_now`` means
    "set to the current time" (UTIME_NOW)."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    atime_now: bool = False
    mtime_now: bool = False
    kill_suidgid: bool = False


class DirListing:
    """The buffer one READDIR or READDIRPLUS reply is packed into.

    Call ``add`` once per entry, in order, until it returns False (the reply is full;
    that entry was not added and must come first next time). ``next_offset`` is the
    cookie the kernel hands back to continue after this entry; it must be nonzero.
    """

    __slots__ = ("plus", "_buf", "_pos", "_limit")

    def __init__(self, buf: bytearray | memoryview, size: int, plus: bool) -> None:
        self.plus = plus
        self._buf = buf
        self._pos = 0
        self._limit = min(size, len(buf))

    def add(self, name: bytes, next_offset: int, attr: Attr, lookup: Callable[[], Entry] | None = None) -> bool:
        """Add one entry. In a READDIRPLUS reply ``lookup`` is called (only if the entry
        fits) to produce the entry, and that counts one lookup exactly as LOOKUP would;
        without ``lookup`` the name is listed but not linked."""
        size = dirent_size(name, self.plus)
        if self._pos + size > self._limit:
            return False
        dtype = (attr.mode >> 12) & 0xF
        if self.plus:
            if lookup is None or name in (b".", b".."):
                body = entry_body(Entry(0, attr, 0.0, 0.0))
            else:
                body = entry_body(lookup())
            self._pos = pack_direntplus(self._buf, self._pos, body, attr.ino, next_offset, dtype, name)
        else:
            self._pos = pack_dirent(self._buf, self._pos, attr.ino, next_offset, dtype, name)
        return True

    def result(self) -> memoryview:
        return memoryview(self._buf)[: self._pos]


class Operations:
    """Base class of a filesystem. Override what you support; leave the rest.

    Class attributes are the filesystem's caching choices: ``entry_timeout`` and
    ``attr_timeout`` (seconds the kernel may cache names and attributes),
    ``negative_timeout`` (how long "no such name" is cached), and ``readdirplus``
    (ask the kernel for READDIRPLUS, which returns attributes with names).
    """

    entry_timeout: float = 1.0
    attr_timeout: float = 1.0
    negative_timeout: float = 0.0
    readdirplus: bool = False

    # lifecycle
    def init(self, conn: ConnectionInfo) -> None:
        """Called with what INIT negotiated, before the reply; may adjust ``conn.want``."""

    def destroy(self) -> None:
        """Called once when the session ends, after the last request."""

    def status(self) -> dict[str, object]:
        """Filesystem-specific facts for ``fusepass status`` (under the key "filesystem")."""
        return {}

    # names and attributes
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        raise OSError(errno.ENOSYS, "lookup")

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        """The kernel dropped ``nlookup`` references to each (ino, nlookup). No reply."""

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> Attr:
        raise OSError(errno.ENOSYS, "getattr")

    def setattr(self, ctx: Context, ino: int, changes: Changes, fh: int | None) -> Attr:
        raise OSError(errno.ENOSYS, "setattr")

    def statx(self, ctx: Context, ino: int, fh: int | None, flags: int, mask: int) -> StatxReply:
        raise OSError(errno.ENOSYS, "statx")

    def readlink(self, ctx: Context, ino: int) -> bytes:
        raise OSError(errno.ENOSYS, "readlink")

    def access(self, ctx: Context, ino: int, mask: int) -> None:
        raise OSError(errno.ENOSYS, "access")

    def statfs(self, ctx: Context, ino: int) -> StatfsReply:
        raise OSError(errno.ENOSYS, "statfs")

    # namespace changes
    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int) -> Entry:
        raise OSError(errno.ENOSYS, "mknod")

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        raise OSError(errno.ENOSYS, "mkdir")

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        raise OSError(errno.ENOSYS, "symlink")

    def link(self, ctx: Context, ino: int, newparent: int, newname: bytes) -> Entry:
        raise OSError(errno.ENOSYS, "link")

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        raise OSError(errno.ENOSYS, "unlink")

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        raise OSError(errno.ENOSYS, "rmdir")

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        raise OSError(errno.ENOSYS, "rename")

    # files
    def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        raise OSError(errno.ENOSYS, "open")

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int, flags: int) -> tuple[Entry, Opened]:
        raise OSError(errno.ENOSYS, "create")

    def tmpfile(self, ctx: Context, parent: int, mode: int, umask: int, flags: int) -> tuple[Entry, Opened]:
        raise OSError(errno.ENOSYS, "tmpfile")

    def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> bytes | bytearray | memoryview:
        raise OSError(errno.ENOSYS, "read")

    def write(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview, flags: int) -> int:
        """``data`` is a view of the request buffer, valid only during this call."""
        raise OSError(errno.ENOSYS, "write")

    def flush(self, ctx: Context, ino: int, fh: int, lock_owner: int) -> None:
        raise OSError(errno.ENOSYS, "flush")

    def release(self, ctx: Context, ino: int, fh: int, flags: int) -> None:
        """The last close of an open file. Errors are ignored by the kernel."""

    def fsync(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        raise OSError(errno.ENOSYS, "fsync")

    def fallocate(self, ctx: Context, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        raise OSError(errno.ENOSYS, "fallocate")

    def lseek(self, ctx: Context, ino: int, fh: int, offset: int, whence: int) -> int:
        raise OSError(errno.ENOSYS, "lseek")

    def copy_file_range(
        self, ctx: Context, ino_in: int, fh_in: int, off_in: int, ino_out: int, fh_out: int, off_out: int,
        length: int, flags: int,
    ) -> int:
        raise OSError(errno.ENOSYS, "copy_file_range")

    # locks (only sent if implemented: the kernel otherwise locks locally)
    def getlk(
        self, ctx: Context, ino: int, fh: int, owner: int, start: int, end: int, type: int, pid: int
    ) -> tuple[int, int, int, int]:
        """Return the conflicting lock as (start, end, type, pid), or type F_UNLCK."""
        raise OSError(errno.ENOSYS, "getlk")

    def setlk(
        self, ctx: Context, ino: int, fh: int, owner: int, start: int, end: int, type: int, pid: int, wait: bool
    ) -> None:
        raise OSError(errno.ENOSYS, "setlk")

    def flock(self, ctx: Context, ino: int, fh: int, owner: int, type: int, wait: bool) -> None:
        raise OSError(errno.ENOSYS, "flock")

    # directories
    def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        raise OSError(errno.ENOSYS, "opendir")

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int, listing: DirListing) -> None:
        raise OSError(errno.ENOSYS, "readdir")

    def releasedir(self, ctx: Context, ino: int, fh: int) -> None:
        """Errors are ignored by the kernel."""

    def fsyncdir(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        raise OSError(errno.ENOSYS, "fsyncdir")

    # extended attributes
    def setxattr(self, ctx: Context, ino: int, name: bytes, value: bytes, flags: int) -> None:
        raise OSError(errno.ENOSYS, "setxattr")

    def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes:
        raise OSError(errno.ENOSYS, "getxattr")

    def listxattr(self, ctx: Context, ino: int) -> Sequence[bytes]:
        raise OSError(errno.ENOSYS, "listxattr")

    def removexattr(self, ctx: Context, ino: int, name: bytes) -> None:
        raise OSError(errno.ENOSYS, "removexattr")


@dataclass(slots=True)
class ConnectionInfo:
    """What INIT negotiated. ``want`` may be changed in ``Operations.init``. ``notifier`` sends
    the kernel cache invalidations and data (keep it: it stays valid for the connection's life)."""

    proto_minor: int
    kernel_flags: abi.InitFlag
    want: abi.InitFlag
    max_write: int
    max_readahead: int
    max_pages: int
    max_stack_depth: int
    time_gran: int = 1
    max_background: int = 64
    congestion_threshold: int = 48
    notifier: Notifier | None = None


def implemented(fs: Operations, name: str) -> bool:
    """Whether ``fs`` overrides the handler ``name`` of the base class."""
    return getattr(type(fs), name) is not getattr(Operations, name)
