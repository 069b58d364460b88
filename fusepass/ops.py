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
from typing import TYPE_CHECKING

from . import abi
from .notify import Notifier
from .protocol import (
    Attr,
    AttrLike,
    Entry,
    StatfsReply,
    StatxReply,
    dirent_size,
    entry_body,
    mode_and_ino,
    pack_dirent,
    pack_direntplus,
)

if TYPE_CHECKING:
    from .journal import Journal, State

__all__ = [
    "Attr", "AttrLike", "Changes", "Context", "DirListing", "Entry", "Opened", "Operations", "StatfsReply",
    "StatxReply", "ROOT_ID",
]

ROOT_ID = abi.ROOT_ID


class Context:
    """Who is asking, for one request. ``interrupted`` turns true if the caller gave up
    (a signal); a long handler should check it, or block in ``wait_interrupted``. An
    ``async def`` handler needs neither: the interrupt cancels its task."""

    # _cancel is left unset (not None) on purpose: the request path creates a Context per
    # request, and only a request served on the event loop gets one (see ``cancel_with``).
    __slots__ = ("uid", "gid", "pid", "unique", "interrupted", "_event", "scratch", "undo", "kill_suidgid",
                 "_cancel")

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
        #: OPEN and CREATE under FUSE_HANDLE_KILLPRIV_V2: the caller lacks CAP_FSETID, so a truncating
        #: open must clear set-user-ID (and set-group-ID on a group-executable file) as the kernel would.
        self.kill_suidgid = False

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
            cancel = getattr(self, "_cancel", None)
        if cancel is not None:
            cancel()

    def cancel_with(self, cancel: Callable[[], None]) -> None:
        """Have ``interrupt`` call ``cancel`` (at once if the request was interrupted already):
        how the dispatcher cancels the task of an async handler."""
        with _event_lock:
            if not self.interrupted:
                self._cancel = cancel
                return
        cancel()

    def on_undelivered(self, fn: Callable[[], None]) -> None:
        """Have ``fn`` run if this request's reply never reaches the kernel (the caller was
        killed or the connection aborted): the place to take back what the reply promised."""
        if self.undo is None:
            self.undo = [fn]
        else:
            self.undo.append(fn)

    def buffer(self, size: int) -> memoryview:
        """A scratch buffer of ``size`` bytes (at most ``abi.MAX_WRITE``) owned by this
        worker, for READ replies: fill it and return it, with no allocation. A request served
        on the event loop has no worker buffer (many are in flight at once): it gets a new one."""
        if size > len(self.scratch):
            if not self.scratch:
                return memoryview(bytearray(size))
            raise ValueError(f"scratch buffer holds {len(self.scratch)} bytes, {size} asked")
        return self.scratch[:size]


_event_lock = threading.Lock()


# The FOPEN bits as plain ints: an open builds its flags on the request path, and IntFlag
# arithmetic costs a member lookup per operation.
_DIRECT_IO, _KEEP_CACHE, _NONSEEKABLE, _CACHE_DIR, _NOFLUSH, _PARALLEL_DIRECT_WRITES = (
    int(abi.FopenFlag.DIRECT_IO), int(abi.FopenFlag.KEEP_CACHE), int(abi.FopenFlag.NONSEEKABLE),
    int(abi.FopenFlag.CACHE_DIR), int(abi.FopenFlag.NOFLUSH), int(abi.FopenFlag.PARALLEL_DIRECT_WRITES))


@dataclass(slots=True)
class Opened:
    """The answer to OPEN, OPENDIR, CREATE and TMPFILE.

    ``fh``: any 64-bit number; the kernel hands it back to every later request on this open
    file (read, write, flush, release...). Use it to find your per-open state.

    ``backing_fd``: a descriptor of a regular file whose data this open file is. When
    passthrough is available the session registers it with the kernel after your handler
    returns, and the kernel then reads, writes and maps that file itself: the filesystem
    sees no READ or WRITE for this open. The descriptor stays yours: keep it open until
    ``release`` of this ``fh`` and close it there (the kernel holds its own reference once
    registered, but the session registers it only after you return, and it is what you
    serve from if passthrough cannot be had). Without passthrough (the kernel lacks it,
    ``--passthrough off``, no CAP_SYS_ADMIN, a stacking limit, or the inode is already open
    in served mode) the session answers the open as served and your ``read``/``write`` are
    called for ``fh``, so they must still work. The kernel allows one backing file per
    inode: a second open of an inode already open in passthrough shares the first one's
    backing file, whatever ``backing_fd`` it offers.

    The flags: ``direct_io`` (no page cache: every read and write reaches the server, and a
    short read is not end of file), ``keep_cache`` (do not drop the cached data at this open),
    ``nonseekable``, ``cache_dir`` (for OPENDIR: let the kernel cache the listing),
    ``noflush`` (no FLUSH at close), ``parallel_direct_writes``. Passthrough ignores the ones
    that concern the page cache.

    ``served_because``: with no ``backing_fd``, why this open is served, in words for
    ``fusepass status`` (default: "the filesystem gave no backing file").
    """

    fh: int = 0
    backing_fd: int | None = None
    direct_io: bool = False
    keep_cache: bool = False
    nonseekable: bool = False
    cache_dir: bool = False
    noflush: bool = False
    parallel_direct_writes: bool = False
    served_because: str | None = None

    def fopen_flags(self) -> int:
        flags = 0
        for on, bit in (
            (self.direct_io, _DIRECT_IO), (self.keep_cache, _KEEP_CACHE), (self.nonseekable, _NONSEEKABLE),
            (self.cache_dir, _CACHE_DIR), (self.noflush, _NOFLUSH),
            (self.parallel_direct_writes, _PARALLEL_DIRECT_WRITES),
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
    cookie the kernel hands back as ``offset`` to continue after this entry: it must be
    nonzero, and every cookie must stay valid for as long as the directory is open (an
    index into a listing kept per open directory handle is the simple way). Adding nothing
    means the end of the directory. ``plus`` tells whether this is READDIRPLUS.
    """

    __slots__ = ("plus", "_buf", "_pos", "_limit")

    def __init__(self, buf: bytearray | memoryview, size: int, plus: bool) -> None:
        self.plus = plus
        self._buf = buf
        self._pos = 0
        self._limit = min(size, len(buf))

    def add(self, name: bytes, next_offset: int, attr: AttrLike, lookup: Callable[[], Entry] | None = None) -> bool:
        """Add one entry; False if it does not fit. ``attr`` (an ``Attr`` or an ``os.stat_result``)
        needs at least ``ino`` (what ``d_ino`` shows) and the file type bits of ``mode``. In a READDIRPLUS reply
        ``lookup`` is called (only if the entry fits) to produce the entry, and that counts
        one lookup exactly as LOOKUP would, to be given back through ``forget``; without
        ``lookup`` (and for "." and "..") the name is listed but not linked, and counts nothing."""
        size = dirent_size(name, self.plus)
        if self._pos + size > self._limit:
            return False
        mode, ino = mode_and_ino(attr)
        dtype = (mode >> 12) & 0xF
        if self.plus:
            if lookup is None or name in (b".", b".."):
                body = entry_body(Entry(0, attr, 0.0, 0.0))
            else:
                body = entry_body(lookup())
            self._pos = pack_direntplus(self._buf, self._pos, body, ino, next_offset, dtype, name)
        else:
            self._pos = pack_dirent(self._buf, self._pos, ino, next_offset, dtype, name)
        return True

    @property
    def room(self) -> int:
        """Bytes left in this reply."""
        return self._limit - self._pos

    def add_records(self, records: bytes | memoryview) -> None:
        """Append READDIR records packed ahead of time (``protocol.dirent_record``), at most
        ``room`` bytes of them: a cheap way to answer a listing the filesystem keeps packed. Only
        for READDIR (``plus`` false): READDIRPLUS entries count lookups and go through ``add``."""
        if self.plus:
            raise ValueError("READDIRPLUS entries are added one by one, with their lookups")
        if len(records) > self.room:
            raise ValueError(f"{len(records)} bytes of records, {self.room} bytes of room")
        self._buf[self._pos : self._pos + len(records)] = records
        self._pos += len(records)

    def result(self) -> memoryview:
        return memoryview(self._buf)[: self._pos]


class Operations:
    """Base class of a filesystem. Override what you support; leave the rest.

    **Errors.** Raise ``OSError(errno, message)``: the caller's system call fails with that
    errno. Any other exception is logged with its traceback and the caller sees EIO; the
    server keeps serving either way. A handler you do not override is answered ENOSYS, and
    for most requests (FLUSH, ACCESS, xattrs, locks, OPEN...) the kernel then stops asking.

    **Threads.** A session runs several worker threads (four by default, ``--threads N``);
    each calls handlers as requests arrive, so handlers run concurrently, for different
    inodes and for the same one, and complete in any order. Lock the state they share.
    ``forget`` and ``release`` may run on any worker, even while another request on that
    inode is in flight.

    **Coroutines.** Any request handler may be ``async def``, and plain and coroutine handlers
    mix in one filesystem. The session runs coroutine handlers on one asyncio event loop (a
    private one on a thread of its own, or yours: ``Session(..., loop=...)``, or
    ``await fusepass.aio.serve(session)``), as many at once as requests arrive, up to
    ``max_in_flight`` (4096 by default; further requests wait in the kernel), while plain
    handlers stay on the worker threads. A coroutine returns what the plain handler would.
    An INTERRUPT cancels its task and the caller gets EINTR: clean up in ``finally`` (or
    ``except asyncio.CancelledError``, re-raising it); a reply is never half sent, and an
    open cancelled before it returns registers no backing file. ``ctx.buffer(size)`` gives
    a coroutine a new buffer (the worker's is not its). They all share the loop, so none
    may block it: no blocking I/O or ``time.sleep`` (``asyncio.to_thread`` runs such work
    elsewhere), and notifications go through ``fusepass.aio.AsyncNotifier``. ``init``,
    ``destroy``, ``status`` and ``forget`` must stay plain (they are called outside any
    request, or must never wait). For mypy, this class declares each handler's plain form:
    a coroutine override needs ``# type: ignore[override]``.

    **Node ids and lookup counts.** ``ino``, ``parent`` and ``nodeid`` are the kernel's node
    ids; 1 is the root (``ROOT_ID``), which is never forgotten. Every ``Entry`` that reaches
    the kernel (from ``lookup``, ``mknod``, ``mkdir``, ``symlink``, ``link``, ``create``,
    ``tmpfile`` and each ``DirListing.add`` with ``lookup`` in a READDIRPLUS reply) counts
    one lookup of its node id; ``forget`` gives them back. Keep a node, and keep its id
    from naming anything else, until its count is back at zero, even after it is unlinked.
    If the reply never reaches the kernel (the caller was killed) the session calls
    ``forget`` for it itself.

    **Descriptors.** ``fh`` is what your ``open``/``opendir`` returned in ``Opened.fh``;
    ``fh`` arguments that may be None (getattr, setattr) are None when the request does not
    come through an open file. Descriptors you hand over in ``Opened.backing_fd`` stay
    yours: close them in ``release``.

    **Caching.** ``entry_timeout`` and ``attr_timeout`` are the seconds the kernel may keep
    a name and attributes without asking again; ``negative_timeout`` is how long "no such
    name" (ENOENT from ``lookup``) is kept; ``readdirplus`` asks the kernel for READDIRPLUS,
    which returns attributes (and entries) with names. Set them as class or instance
    attributes before the session starts. To drop what the kernel cached after a change it
    did not see, see the notifications in the tutorial.

    **io_uring.** ``io_uring_depth``: the ring entries per queue this filesystem asks for when the
    session is not told (None: the transport's default, two). One is faster for handlers that
    never wait for one another: a request that overlaps the last (a background RELEASE) waits in
    the kernel and the same thread fetches it, instead of a second thread contending for the GIL;
    but a handler that blocks (on an interrupt, a lock, a slow disk) then holds up its CPU's callers.
    """

    entry_timeout: float = 1.0
    attr_timeout: float = 1.0
    negative_timeout: float = 0.0
    readdirplus: bool = False
    io_uring_depth: int | None = None

    # lifecycle
    def init(self, conn: ConnectionInfo) -> None:
        """Called with what INIT negotiated, before the kernel gets its reply and before any
        other request. May clear or set flags in ``conn.want`` (``abi.InitFlag``); a flag the
        kernel did not offer is dropped. Keep ``conn.notifier`` to drop what the kernel cached
        when something changes behind its back. Raising fails the mount."""

    def destroy(self) -> None:
        """Called once when the session ends, after the last request (the mount is gone)."""

    def status(self) -> dict[str, object]:
        """Filesystem-specific facts for ``fusepass status`` (under the key "filesystem").
        Called from the status socket's thread: read shared state under your lock."""
        return {}

    # surviving a restart (``fusepass.supervisor``)
    def persist(self, journal: Journal, fh_base: int) -> bool:
        """Under a supervisor, before INIT: record in ``journal`` every node id handed out (with
        what it names), lookup, forget, open and release, before the reply that depends on it, so
        that a successor can ``restore`` them; give open files handles of ``fh_base`` and above
        if they are descriptors. Return False (the default) if this filesystem cannot: a server
        that dies then takes its mount with it."""
        return False

    def restore(self, state: State) -> None:
        """In a successor, after ``init`` and before any request: take over ``state`` (what the
        journal recorded) so that every node id and handle the kernel holds means what it meant."""

    # names and attributes
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        """Find ``name`` in directory ``parent``; return its Entry, which counts one lookup.
        ENOENT if there is no such name (cached for ``negative_timeout``), ENOTDIR if
        ``parent`` is not a directory. ``name`` is never "." or ".." except when the mount is
        exported over NFS."""
        raise OSError(errno.ENOSYS, "lookup")

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        """The kernel dropped ``nlookup`` references to each (ino, nlookup): subtract them
        from the lookup counts and free a node whose count reaches zero (unless it is still
        open or linked). No reply; exceptions are logged and otherwise ignored."""

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> AttrLike:
        """The attributes of ``ino`` (``fh``: the open file an fstat came through, else None), as
        an ``Attr`` or an ``os.stat_result``.
        Cached for ``attr_timeout``. For a passed-through file, report the backing file's
        size and times: the kernel asks again after every passthrough write."""
        raise OSError(errno.ENOSYS, "getattr")

    def setattr(self, ctx: Context, ino: int, changes: Changes, fh: int | None) -> AttrLike:
        """chmod, chown, truncate, utimes in one request: apply the fields of ``changes``
        that are not None and return the new attributes. ``fh`` is set for ftruncate and
        friends. Truncation by ``open(O_TRUNC)`` reaches ``open`` as the O_TRUNC flag, not here
        (the session negotiates atomic O_TRUNC). Permission checks are yours unless the
        mount uses ``default_permissions``: then the kernel has done them (EPERM for a
        chown by a non-owner, for instance)."""
        raise OSError(errno.ENOSYS, "setattr")

    def statx(self, ctx: Context, ino: int, fh: int | None, flags: int, mask: int) -> StatxReply:
        """statx(2) with the fields ``mask`` asks for (birth time, attributes). Without it the
        kernel answers statx from ``getattr``."""
        raise OSError(errno.ENOSYS, "statx")

    def readlink(self, ctx: Context, ino: int) -> bytes:
        """The target of symbolic link ``ino``; EINVAL if ``ino`` is not one."""
        raise OSError(errno.ENOSYS, "readlink")

    def access(self, ctx: Context, ino: int, mask: int) -> None:
        """access(2) with ``mask`` of R_OK, W_OK, X_OK (or F_OK, 0): return to allow, raise
        EACCES to refuse. Not sent when the mount uses ``default_permissions``; ENOSYS
        makes the kernel allow every later one."""
        raise OSError(errno.ENOSYS, "access")

    def statfs(self, ctx: Context, ino: int) -> StatfsReply:
        """statvfs(2). Without it the session answers zero counts, 512-byte blocks and
        255-byte names."""
        raise OSError(errno.ENOSYS, "statfs")

    # namespace changes
    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int) -> Entry:
        """Create a regular file, device, FIFO or socket (the type is in ``mode``'s S_IFMT
        bits; ``rdev`` for devices). ``mode`` has the caller's umask applied already;
        ``umask`` is that umask. Return its Entry (one lookup). EEXIST if ``name`` exists.
        The kernel uses it for creating files when ``create`` is not implemented."""
        raise OSError(errno.ENOSYS, "mknod")

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        """Create directory ``name`` (``mode`` without the S_IFDIR bit, umask applied);
        return its Entry (one lookup). EEXIST if ``name`` exists."""
        raise OSError(errno.ENOSYS, "mkdir")

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        """Create symbolic link ``name`` whose content is ``target``; return its Entry."""
        raise OSError(errno.ENOSYS, "symlink")

    def link(self, ctx: Context, ino: int, newparent: int, newname: bytes) -> Entry:
        """Give ``ino`` the further name ``newname`` in ``newparent``; return the Entry of
        ``ino`` itself (same node id, one more lookup, its new link count). EPERM for a
        directory."""
        raise OSError(errno.ENOSYS, "link")

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        """Remove the name ``name`` (not a directory: EISDIR). The node lives on while its
        lookup count is above zero or it is open: an open file stays readable."""
        raise OSError(errno.ENOSYS, "unlink")

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        """Remove the empty directory ``name``: ENOTEMPTY if it has entries, ENOTDIR if it
        is not a directory."""
        raise OSError(errno.ENOSYS, "rmdir")

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        """Move ``name`` to ``newname``, replacing what is there. ``flags`` are renameat2's:
        RENAME_NOREPLACE (1: EEXIST if ``newname`` exists), RENAME_EXCHANGE (2: swap the
        two), RENAME_WHITEOUT (4); raise EINVAL for flags you do not support. The node ids
        stay the same: they now have the new names."""
        raise OSError(errno.ENOSYS, "rename")

    # files
    def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        """Open ``ino``. ``flags`` are the caller's open flags without O_CREAT, O_EXCL and
        O_NOCTTY: the access mode, O_APPEND, O_TRUNC (empty the file now), O_SYNC...
        Return an ``Opened``; give ``backing_fd`` to pass the data through the kernel."""
        raise OSError(errno.ENOSYS, "open")

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int, flags: int) -> tuple[Entry, Opened]:
        """Create regular file ``name`` and open it: open(O_CREAT) of a name the kernel found
        missing. Return its Entry (one lookup) and the Opened. EEXIST if it exists after all.
        Without it the kernel uses ``mknod`` then ``open``."""
        raise OSError(errno.ENOSYS, "create")

    def tmpfile(self, ctx: Context, parent: int, mode: int, umask: int, flags: int) -> tuple[Entry, Opened]:
        """open(O_TMPFILE): create a nameless regular file in ``parent`` and open it. Return
        its Entry (one lookup) and the Opened."""
        raise OSError(errno.ENOSYS, "tmpfile")

    def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> bytes | bytearray | memoryview:
        """At most ``size`` bytes at ``offset``. Return fewer only at the end of the file:
        the kernel treats a short read as end of file (unless the open was ``direct_io``).
        ``ctx.buffer(size)`` is a reusable buffer to fill and return without allocating."""
        raise OSError(errno.ENOSYS, "read")

    def write(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview, flags: int) -> int:
        """Write ``data`` at ``offset``; return the number of bytes written (all of them,
        except on an error you could not avoid). ``data`` is a view of the request buffer,
        valid only during this call: copy it to keep it. The kernel has already moved
        ``offset`` to the end for O_APPEND. EFBIG or ENOSPC when it does not fit."""
        raise OSError(errno.ENOSYS, "write")

    def flush(self, ctx: Context, ino: int, fh: int, lock_owner: int) -> None:
        """Sent at every close(2) of a descriptor of this open file (dups included); an error
        here is what close() returns. ENOSYS makes the kernel stop sending it."""
        raise OSError(errno.ENOSYS, "flush")

    def release(self, ctx: Context, ino: int, fh: int, flags: int) -> None:
        """The last close of an open file: free what ``fh`` holds and close its backing
        descriptor. Sent asynchronously after close() returned; errors are ignored by the
        kernel. Every successful open gets exactly one release."""

    def fsync(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        """fsync(2) (``datasync``: fdatasync). Sent for passed-through files too: sync the
        backing file."""
        raise OSError(errno.ENOSYS, "fsync")

    def fallocate(self, ctx: Context, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        """fallocate(2) with its ``mode`` flags (0: allocate and extend the size)."""
        raise OSError(errno.ENOSYS, "fallocate")

    def lseek(self, ctx: Context, ino: int, fh: int, offset: int, whence: int) -> int:
        """lseek for SEEK_DATA and SEEK_HOLE (the kernel does the others itself); return the
        new offset, ENXIO past the end."""
        raise OSError(errno.ENOSYS, "lseek")

    def copy_file_range(
        self, ctx: Context, ino_in: int, fh_in: int, off_in: int, ino_out: int, fh_out: int, off_out: int,
        length: int, flags: int,
    ) -> int:
        """Copy ``length`` bytes between two open files of this mount; return how many."""
        raise OSError(errno.ENOSYS, "copy_file_range")

    # locks (only sent if implemented: the kernel otherwise locks locally)
    def getlk(
        self, ctx: Context, ino: int, fh: int, owner: int, start: int, end: int, type: int, pid: int
    ) -> tuple[int, int, int, int]:
        """fcntl(F_GETLK): return the lock that conflicts with the one described, as (start,
        end, type, pid), or type F_UNLCK if none does. POSIX locks are negotiated only when
        both ``getlk`` and ``setlk`` are implemented."""
        raise OSError(errno.ENOSYS, "getlk")

    def setlk(
        self, ctx: Context, ino: int, fh: int, owner: int, start: int, end: int, type: int, pid: int, wait: bool
    ) -> None:
        """fcntl(F_SETLK/F_SETLKW): take or release (type F_UNLCK) a lock for ``owner``;
        EAGAIN on conflict, or block until it can be had when ``wait`` (check
        ``ctx.wait_interrupted``: the caller may give up)."""
        raise OSError(errno.ENOSYS, "setlk")

    def flock(self, ctx: Context, ino: int, fh: int, owner: int, type: int, wait: bool) -> None:
        """flock(2) as a lock type (F_RDLCK, F_WRLCK, F_UNLCK) for ``owner``; the session
        also calls it with F_UNLCK at the release of a file that held one."""
        raise OSError(errno.ENOSYS, "flock")

    # directories
    def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        """Open directory ``ino`` for reading; ``Opened.fh`` comes back to ``readdir`` and
        ``releasedir``. ENOTDIR if it is not one."""
        raise OSError(errno.ENOSYS, "opendir")

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int, listing: DirListing) -> None:
        """Fill ``listing`` with the entries after cookie ``offset`` (0: from the start),
        in order, until ``listing.add`` returns False; add nothing at the end. The cookie of
        an entry is the ``next_offset`` you gave the entry before it. Include "." and ".."
        if you want ``ls -a`` to show them. In READDIRPLUS (``listing.plus``), give ``add`` a
        ``lookup`` so the kernel gets entries; each counts one lookup."""
        raise OSError(errno.ENOSYS, "readdir")

    def releasedir(self, ctx: Context, ino: int, fh: int) -> None:
        """The last close of an open directory: free what ``fh`` holds. Errors are ignored
        by the kernel."""

    def fsyncdir(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        """fsync(2) of an open directory."""
        raise OSError(errno.ENOSYS, "fsyncdir")

    # extended attributes
    def setxattr(self, ctx: Context, ino: int, name: bytes, value: bytes, flags: int) -> None:
        """Set attribute ``name``. ``flags``: XATTR_CREATE (1: EEXIST if it exists),
        XATTR_REPLACE (2: ENODATA if it does not). ENOTSUP for a namespace you do not keep."""
        raise OSError(errno.ENOSYS, "setxattr")

    def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes:
        """The value of attribute ``name``, whole (the session answers size probes and
        ERANGE itself); ENODATA if it is not set. The kernel asks for
        ``security.capability`` before each write by a process: ENODATA (or ENOSYS, which
        stops all xattr requests) is the cheap answer."""
        raise OSError(errno.ENOSYS, "getxattr")

    def listxattr(self, ctx: Context, ino: int) -> Sequence[bytes]:
        """The names of the attributes of ``ino``."""
        raise OSError(errno.ENOSYS, "listxattr")

    def removexattr(self, ctx: Context, ino: int, name: bytes) -> None:
        """Remove attribute ``name``; ENODATA if it is not set."""
        raise OSError(errno.ENOSYS, "removexattr")


@dataclass(slots=True)
class ConnectionInfo:
    """What INIT negotiated. ``want`` may be changed in ``Operations.init``. ``notifier`` sends
    the kernel cache invalidations and data (keep it: it stays valid for the connection's life)."""

    proto_minor: int
    kernel_flags: int  # the abi.InitFlag bits the kernel offered
    want: int  # the abi.InitFlag bits asked for (granted, after INIT)
    max_write: int
    max_readahead: int
    max_pages: int
    max_stack_depth: int
    time_gran: int = 1
    max_background: int = 64
    congestion_threshold: int = 48
    notifier: Notifier | None = None
    #: Seconds after which the kernel aborts the connection if a request is still unanswered
    #: (FUSE_REQUEST_TIMEOUT, protocol 7.43); 0: never. Honoured only where the kernel offers it.
    request_timeout: int = 0


def implemented(fs: Operations, name: str) -> bool:
    """Whether ``fs`` overrides the handler ``name`` of the base class."""
    return getattr(type(fs), name) is not getattr(Operations, name)
