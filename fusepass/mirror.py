"""The mirror filesystem: a source directory re-served through FUSE, regular-file I/O passed through.

Every operation works relative to descriptors the server holds (``*at()`` calls on O_PATH
descriptors), never by rebuilding paths, and never follows a symlink or ``..``: nothing
outside the source root can be reached. Inodes are identified by (st_dev, st_ino); their
O_PATH descriptors live in a bounded LRU cache and are reopened from file handles
(``open_by_handle_at``) when evicted, so the server's descriptor count stays bounded
however many inodes the kernel remembers. Without CAP_DAC_READ_SEARCH (an unprivileged
server) file handles cannot be opened, and every remembered inode keeps its descriptor.

Subclass to add policy: ``check_open`` may refuse an open with an errno, ``is_hidden``
hides names; see ``fusepass.examples.readonly_audit``. Rules written as globs, and an audit
log, are ``fusepass.policy_mirror``'s.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import functools
import logging
import os
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from . import abi, syscalls
from .coherence import Coherence
from .journal import Journal, State
from .ops import (
    ROOT_ID,
    Attr,
    AttrLike,
    Changes,
    ConnectionInfo,
    Context,
    DirListing,
    Entry,
    Opened,
    Operations,
    StatfsReply,
    StatxReply,
)
from .protocol import dirent_records
from .watcher import Change, Event, SourceWatcher, WatcherUnavailable

log = logging.getLogger("fusepass.mirror")

FUSE_SUPER_MAGIC = 0x65735546
OVERLAYFS_SUPER_MAGIC = 0x794C7630
_STACKED_MAGICS = (FUSE_SUPER_MAGIC, OVERLAYFS_SUPER_MAGIC)
_XATTR_CREATE, _XATTR_REPLACE = 1, 2
# O_NOFOLLOW: the kernel already refused it on a symlink, and reopening through /proc/self/fd (a magic
# symlink) with it fails with ELOOP (GNU tar opens every file so).
_OPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_NOFOLLOW
_NO_CHANGES = Changes()
_CAPABILITY = b"security.capability"
_DOTS = (b".", b"..")
# What a journal keeps of a node: (st_dev, st_ino, S_IFMT bits), then its file handle.
_IDENTITY = struct.Struct("<QQI")
# Flags an open file is reopened with after a restart: without what creating or truncating asked.
_REOPEN_DROP = _OPEN_DROP | os.O_TRUNC | os.O_TMPFILE
#: Cache timeouts (seconds) for names and attributes: without a watcher, changes made in the source
#: directly show through the mount within this time; with one, the kernel keeps what it has until told.
SHORT_TIMEOUT = 1.0
LONG_TIMEOUT = 86400.0
#: Rename flags under which a file at the new name keeps that name (or gets the old one).
_TARGET_STAYS = int(abi.RenameFlag.NOREPLACE | abi.RenameFlag.EXCHANGE)


def _proc(fd: int) -> bytes:
    return b"/proc/self/fd/%d" % fd


def _check_name(name: bytes) -> None:
    if name in (b".", b"..") or b"/" in name:
        raise OSError(errno.EINVAL, "invalid name")


@dataclass(slots=True, eq=False)
class Inode:
    nodeid: int
    key: tuple[int, int]  # (st_dev, st_ino)
    kind: int  # S_IFMT bits
    fd: int  # O_PATH descriptor, or -1 while evicted
    handle: bytes | None  # file handle to reopen it, None if not available
    lookups: int = 0
    busy: int = 0  # operations using ``fd`` right now: it cannot be evicted
    #: The last few processes that opened it through the mount in passthrough: its backing file is
    #: closed by the caller's own process, and the watcher sees that pid.
    openers: tuple[int, ...] = ()
    opens: int = 0  # open files (the kernel's file handles) of it
    kept: bool = False  # the supervisor holds a descriptor of it (``Journal.keep``)


class _DirHandle:
    __slots__ = ("fd", "entries", "packed", "ends")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.entries: list[tuple[bytes, int, int]] | None = None  # snapshot: (name, inode number, S_IFMT or 0)
        # The snapshot as READDIR records, packed once: record i ends at ends[i] in packed.
        self.packed = b""
        self.ends: list[int] = []

    def pack(self) -> None:
        assert self.entries is not None
        self.packed, self.ends = dirent_records(self.entries)


class Mirror(Operations):
    """Mirror ``source``. ``timeout`` is the entry/attribute cache time in seconds (short by
    default, so changes made directly in the source show up quickly; use a long one when the
    mount is the only writer). ``max_path_fds`` bounds the O_PATH descriptor cache."""

    readdirplus = True
    #: Its handlers never wait for one another: one ring entry per queue (``Operations``; creates
    #: 10-20 % faster over the ring, untar 15-25 %); ``-o io_uring_depth`` for a slow source.
    io_uring_depth = 1

    def __init__(self, source: str, *, timeout: float | None = None, max_path_fds: int = 8192,
                 watch: bool = True) -> None:
        self.source = os.path.realpath(source)
        st = os.stat(self.source)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "source is not a directory", self.source)
        self._timeout = timeout
        self._set_timeouts(timeout if timeout is not None else SHORT_TIMEOUT)
        self.max_path_fds = max_path_fds
        self._lock = threading.Lock()
        root_fd = os.open(self.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._mount_fd = os.open(self.source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.handles = self._handles_work(root_fd)
        if not self.handles:
            log.warning("file handles unavailable (no CAP_DAC_READ_SEARCH?): one descriptor per remembered inode")
        root = Inode(ROOT_ID, (st.st_dev, st.st_ino), stat.S_IFDIR, root_fd, None, lookups=1)
        self._inodes: dict[int, Inode] = {ROOT_ID: root}
        self._by_key: dict[tuple[int, int], Inode] = {root.key: root}
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._next_nodeid = ROOT_ID + 1
        self._dirs: dict[int, _DirHandle] = {}
        self._next_dir = 1
        self._files: dict[int, Inode] = {}  # open files: their descriptor (the fh) -> the inode, pinned
        self.killpriv_v2 = False  # decided at INIT
        self._conn: ConnectionInfo | None = None
        # (inode, thread) that just had its file capability removed by the kernel before a write:
        # the empty SETATTR that follows is the rest of that, not a chown(f, -1, -1).
        self._privileges_removed: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._source_state: str | None = None  # what became of the source directory, once noticed
        # Keeping the kernel's caches true (decided at INIT): the watcher of the source, the
        # directories it marks (by file handle), and why there is none, in words.
        self._by_handle: dict[bytes, Inode] = {}
        self._watch_lock = threading.Lock()
        self.watcher: SourceWatcher | None = None
        self.coherence: Coherence | None = None
        self.watch_why_not: str | None = None if watch else "switched off (-o nowatch)"
        # Under a supervisor: what the kernel holds is recorded, and open files' descriptors live at
        # fh_base and above, where a successor can reopen them under the same numbers.
        self.journal: Journal | None = None
        self.fh_base = 0
        self._placeholders: set[int] = set()  # numbers of open files a successor could not reopen
        self._appending: set[int] = set()  # under a supervisor, open files opened O_APPEND (``_hold``)
        if watch and not self.handles:
            self.watch_why_not = ("file handles cannot be opened without CAP_DAC_READ_SEARCH, so changed files "
                                  "cannot be named")

    def _set_timeouts(self, seconds: float) -> None:
        # A name missing from the source is remembered as missing for as long as a name found is.
        self.entry_timeout = self.attr_timeout = self.negative_timeout = seconds

    @property
    def stacked(self) -> bool:
        """Whether the source lives on a stacked filesystem (passthrough then needs depth 2)."""
        return syscalls.fs_magic(self._mount_fd) in _STACKED_MAGICS

    def init(self, conn: ConnectionInfo) -> None:
        # POSIX_ACL: the kernel enforces the source's ACLs (with a mode-only check, an ACL
        # entry denying a user would be ignored, since the server opens files as root).
        # DONT_MASK: then the kernel leaves the umask to us, to skip it under a default ACL.
        # HANDLE_KILLPRIV_V2: the kernel stops asking GETXATTR(security.capability) before every
        # write, and tells us instead when a change must clear set-user-ID and set-group-ID (the
        # source itself clears security.capability on every write, truncate and chown).
        F = abi.InitFlag
        conn.want |= F.POSIX_ACL | F.DONT_MASK | F.HANDLE_KILLPRIV_V2
        self.killpriv_v2 = bool(conn.kernel_flags & F.HANDLE_KILLPRIV_V2) and conn.proto_minor >= 33
        self._conn = conn  # its ``want`` is what was granted, once INIT is answered
        if self.watch_why_not is None and conn.notifier is not None:
            self._start_watching(conn)

    def _start_watching(self, conn: ConnectionInfo) -> None:
        """Watch the source, so that the kernel may cache names, attributes and listings for long
        (``LONG_TIMEOUT`` unless a timeout was given): every change made behind the mount's back
        becomes a notification. Without a watcher the short timeouts stay."""
        assert conn.notifier is not None
        try:
            watcher = SourceWatcher(self.source, self._on_changes, ignore_pid=os.getpid())
        except WatcherUnavailable as e:
            self.watch_why_not = str(e)
            log.info("changes to the source are not watched (%s): short cache timeouts", e)
            return
        self._by_handle[watcher.root_handle] = self._inodes[ROOT_ID]  # (the root is never evicted: no handle)
        self.coherence = Coherence(conn.notifier, self._resolve, self._known, self._opened_by)
        self.watcher = watcher.start()
        self._set_timeouts(self._timeout if self._timeout is not None else LONG_TIMEOUT)

    def _resolve(self, handle: bytes) -> int | None:
        inode = self._by_handle.get(handle)
        return inode.nodeid if inode is not None else None

    @property
    def passthrough(self) -> bool:
        """Whether INIT granted passthrough (files may then be passed through to the kernel)."""
        return self._conn is not None and bool(self._conn.want & abi.InitFlag.PASSTHROUGH)

    def _opened_by(self, nodeid: int, pid: int) -> bool:
        inode = self._inodes.get(nodeid)
        return inode is not None and pid in inode.openers

    def _known(self) -> list[int]:
        with self._lock:
            return list(self._inodes)

    def _on_changes(self, changes: list[Change]) -> None:
        assert self.coherence is not None and self.watcher is not None
        root = self.watcher.root_handle
        if any(c.handle == root and c.events & (Event.DELETE_SELF | Event.MOVE_SELF) for c in changes):
            self.source_state()  # logs it
        self.coherence.apply(changes)

    # --- policy hooks for subclasses -----------------------------------------------------

    def check_open(self, ctx: Context, ino: int, flags: int) -> None:
        """Called before every open and create; raise OSError(errno) to refuse it."""

    def is_hidden(self, parent: int, name: bytes) -> bool:
        """Return True to hide ``name`` in directory ``parent`` (lookup, readdir, create)."""
        return False

    def source_path(self, ino: int) -> str:
        """The current path of ``ino`` in the source (the kernel tracks renames), for logs."""
        with self._pinned(ino) as fd:
            return os.readlink(_proc(fd).decode())

    def source_state(self) -> str | None:
        """None while the source directory is where it was mounted from; otherwise what became of
        it, in words ("removed", "moved to PATH"). Logged once when first noticed."""
        with self._pinned(ROOT_ID) as fd:
            try:
                gone = os.fstat(fd).st_nlink == 0
                now = os.readlink(_proc(fd).decode())
            except OSError as e:
                return f"cannot be checked: {e.strerror}"
        state = "removed" if gone or now.endswith(" (deleted)") else None if now == self.source else f"moved to {now}"
        if state != self._source_state:
            self._source_state = state
            if state is not None:
                log.warning("the source directory %s was %s; the mount goes on serving what it holds",
                            self.source, state)
        return state

    # --- surviving a restart ------------------------------------------------------------

    def persist(self, journal: Journal, fh_base: int) -> bool:
        """Record what the kernel holds in ``journal``; open files get descriptors from ``fh_base`` up.
        False (nothing recorded) without file handles, by which alone a successor could find the files."""
        if not self.handles:
            return False
        self.journal = journal
        self.fh_base = fh_base
        return True

    def _journal_lookup(self, inode: Inode) -> None:
        if self.journal is not None and inode.nodeid != ROOT_ID:
            self.journal.lookup(inode.nodeid)

    def restore(self, state: State) -> None:
        """Take over what a predecessor left (after ``init``, before any request): its node ids
        (reopened from their handles when first used), its open files, under their old
        descriptor numbers, and its open directories (listed afresh: offsets index the new listing).
        What the kernel caches is then invalidated, as after lost events."""
        with self._lock:
            for nodeid, (lookups, identity) in state.nodes.items():
                if nodeid == ROOT_ID or len(identity) < _IDENTITY.size:
                    continue
                dev, number, kind = _IDENTITY.unpack_from(identity)
                handle = identity[_IDENTITY.size:] or None
                inode = Inode(nodeid, (dev, number), kind, -1, handle, lookups=lookups)
                self._inodes[nodeid] = inode
                self._by_key[inode.key] = inode
                if handle is not None:
                    self._by_handle[handle] = inode
            self._next_nodeid = max(self._next_nodeid, state.max_nodeid + 1)
        if self.watcher is not None:
            for inode in list(self._inodes.values()):
                if inode.kind == stat.S_IFDIR and inode.nodeid != ROOT_ID:
                    try:
                        with self._pinned(inode.nodeid) as fd:
                            self._watch(inode, fd)
                    except OSError as e:
                        log.debug("a directory of the predecessor is gone: %s", e)
        for fh, (nodeid, flags, _) in state.files.items():
            self._reopen(fh, nodeid, flags)
        assert self.journal is not None
        for nodeid in state.kept:
            held = self._inodes.get(nodeid)
            if held is not None and held.opens:
                held.kept = True
            else:
                self.journal.let_go(nodeid)
        for fh, (nodeid, _) in state.dirs.items():
            try:
                with self._pinned(nodeid) as pfd:
                    fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
            except OSError as e:
                log.warning("an open directory of the predecessor cannot be reopened: %s", e)
                continue
            with self._lock:
                self._dirs[fh] = _DirHandle(fd)
                self._next_dir = max(self._next_dir, fh + 1)
        if self.watcher is not None:
            # Between the predecessor's end and these marks nothing watched the source: whatever the
            # kernel caches may be stale, so all of it is dropped (on the watcher's thread: a
            # notification may wait for a resent request that only the workers will answer).
            self.watcher.report_lost()

    def _reopen(self, fh: int, nodeid: int, flags: int) -> None:
        """Open a predecessor's open file again under its number ``fh``, pinned as ``_opened`` pins.
        One that cannot be reopened gets a placeholder under its number (its requests fail with
        EBADF), so that no file opened later can take the number the kernel still uses."""
        try:
            fcntl.fcntl(fh, fcntl.F_GETFD)
        except OSError:
            pass
        else:
            log.warning("descriptor %d of an open file is taken; the file cannot be served", fh)
            return
        inode = self._inodes.get(nodeid)
        fd = -1
        try:
            if inode is None:
                raise OSError(errno.ESTALE, f"node {nodeid} was forgotten")
            pfd = self._acquire_fd(inode)
            try:
                fd = os.open(_proc(pfd), (flags & ~_REOPEN_DROP) | os.O_CLOEXEC)
            except BaseException:
                self._release_fd(inode)
                raise
        except OSError as e:
            log.warning("an open file of the predecessor cannot be reopened (%s): its requests fail", e.strerror)
            os.dup2(self._inodes[ROOT_ID].fd, fh, inheritable=False)  # O_PATH: reads and writes fail
            self._placeholders.add(fh)
            return
        os.dup2(fd, fh, inheritable=False)
        os.close(fd)
        assert inode is not None
        with self._lock:
            self._hold(fh, inode, flags)

    # --- the inode table ---------------------------------------------------------------

    def _handles_work(self, fd: int) -> bool:
        try:
            handle = syscalls.name_to_handle(fd)
            os.close(syscalls.open_by_handle(self._mount_fd, handle, os.O_PATH))
            return True
        except OSError:
            return False

    def _get(self, ino: int) -> Inode:
        inode = self._inodes.get(ino)
        if inode is None:
            raise OSError(errno.ESTALE, "unknown node id")
        return inode

    def _pinned(self, ino: int) -> _Pin:
        return _Pin(self, self._get(ino))

    def _acquire_fd(self, inode: Inode) -> int:
        with self._lock:
            inode.busy += 1
            if inode.fd >= 0:
                if inode.handle is not None:
                    self._lru.move_to_end(inode.nodeid)
                return inode.fd
        try:
            assert inode.handle is not None
            fd = syscalls.open_by_handle(self._mount_fd, inode.handle, os.O_PATH)
        except OSError as e:
            with self._lock:
                inode.busy -= 1
            raise OSError(errno.ESTALE if e.errno == errno.ESTALE else e.errno, "file is gone") from None
        with self._lock:
            if inode.fd >= 0:
                os.close(fd)
            else:
                inode.fd = fd
                self._lru[inode.nodeid] = None
                self._evict()
            return inode.fd

    def _release_fd(self, inode: Inode) -> None:
        with self._lock:
            inode.busy -= 1
            if inode.busy or inode.fd < 0 or self._inodes.get(inode.nodeid) is inode:
                return
            fd, inode.fd = inode.fd, -1  # forgotten while in use
        os.close(fd)

    def _evict(self) -> None:
        """Close the least recently used idle descriptors beyond the cap (lock held)."""
        excess = len(self._lru) - self.max_path_fds
        busy: list[int] = []
        while excess > 0 and self._lru:
            nodeid, _ = self._lru.popitem(last=False)
            inode = self._inodes.get(nodeid)
            if inode is not None and inode.busy:
                busy.append(nodeid)  # in use: it stays, and counts towards the cap
                continue
            if inode is not None and inode.fd >= 0:
                os.close(inode.fd)
                inode.fd = -1
            excess -= 1
        for nodeid in reversed(busy):
            self._lru[nodeid] = None
            self._lru.move_to_end(nodeid, last=False)

    def _remember(self, fd: int, st: os.stat_result, pin: bool = False) -> tuple[Inode, os.stat_result]:
        """Take ownership of ``fd`` (O_PATH) for the inode it names; count one lookup. Returns the
        inode and the attributes to hand the kernel (``st``, or newer if the directory was just
        marked for watching: what changed before the mark is in them, what changes after, reported).
        ``pin``: also mark the descriptor busy (release it with ``_release_fd``).

        An inode whose descriptor is open is the same file as anything with its (st_dev,
        st_ino): the number cannot be reused while the file is held. One whose descriptor was
        evicted may have been deleted and its number reused by a new file; the file handles
        (which carry the generation) tell them apart, and a new file gets a new node id."""
        key = (st.st_dev, st.st_ino)
        kind = stat.S_IFMT(st.st_mode)
        with self._lock:
            inode = self._by_key.get(key)
            if inode is not None and inode.kind == kind and inode.fd >= 0:
                inode.lookups += 1
                self._journal_lookup(inode)
                inode.busy += pin
                os.close(fd)
                return inode, st
        handle = None
        if self.handles:
            try:
                handle = syscalls.name_to_handle(fd)
            except OSError:
                handle = None  # e.g. a filesystem without export support: keep the fd
        with self._lock:
            inode = self._by_key.get(key)
            if inode is not None and inode.kind == kind and (inode.fd >= 0 or inode.handle == handle):
                inode.lookups += 1
                self._journal_lookup(inode)
                inode.busy += pin
                if inode.fd < 0:
                    inode.fd = fd
                    self._lru[inode.nodeid] = None
                    self._evict()
                else:
                    os.close(fd)
                return inode, st
            if inode is not None:  # the inode number now belongs to another file
                del self._by_key[key]
            inode = Inode(self._next_nodeid, key, kind, fd, handle, lookups=1, busy=int(pin) + 1)
            self._next_nodeid += 1
            self._inodes[inode.nodeid] = inode
            self._by_key[key] = inode
            if self.journal is not None:
                self.journal.node(inode.nodeid, _IDENTITY.pack(*key, kind) + (handle or b""))
            if handle is not None:
                self._by_handle[handle] = inode
                self._lru[inode.nodeid] = None
                self._evict()
        try:
            if self.watcher is not None and kind == stat.S_IFDIR:
                st = self._watch(inode, fd)
        finally:
            self._release_fd(inode)  # held busy until marked, so the descriptor stayed this directory's
        return inode, st

    def _watch(self, inode: Inode, fd: int) -> os.stat_result:
        """Mark a directory the kernel is about to learn; its attributes as of the mark."""
        assert self.watcher is not None
        with self._watch_lock:
            try:
                self.watcher.watch(fd)
            except OSError as e:
                log.warning("cannot watch a directory of the source (%s): its changes may stay unseen "
                            "for up to %s s", e, self.attr_timeout)
        return os.fstat(fd)

    def _unwatch(self, inode: Inode, fd: int) -> None:
        """Remove the mark of a directory the kernel forgot (unless it has been learnt again meanwhile)."""
        assert self.watcher is not None
        with self._watch_lock:
            if self._by_key.get(inode.key) is not None:
                return
            try:
                self.watcher.unwatch(fd)
            except OSError as e:
                log.debug("unwatching a forgotten directory: %s", e)

    def _entry(self, inode: Inode, st: os.stat_result) -> Entry:
        return Entry(inode.nodeid, st, self.entry_timeout, self.attr_timeout)

    def _lookup_at(self, dirfd: int, name: bytes, st: os.stat_result | None = None) -> Entry:
        """Count one lookup of ``name`` in ``dirfd`` (``st``: its lstat, if just taken)."""
        if st is None:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        with self._lock:
            inode = self._by_key.get((st.st_dev, st.st_ino))
            if inode is not None and inode.kind != stat.S_IFMT(st.st_mode):
                inode = None
            # Held open, its number cannot have been reused: the name still means this inode.
            if inode is not None and inode.fd >= 0:
                inode.lookups += 1
                self._journal_lookup(inode)
                return self._entry(inode, st)
        if inode is not None and inode.handle is not None and self._same_file(dirfd, name, inode):
            # Its descriptor was evicted; the name's handle (taken after the stat, so the stat was
            # of this file too: a file the handle names existed all along) proves it is the same
            # file. It stays without a descriptor until one is needed.
            with self._lock:
                if self._inodes.get(inode.nodeid) is inode:
                    inode.lookups += 1
                    self._journal_lookup(inode)
                    return self._entry(inode, st)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._entry(*self._remember(fd, st))

    @staticmethod
    def _same_file(dirfd: int, name: bytes, inode: Inode) -> bool:
        try:
            return syscalls.name_to_handle(dirfd, name) == inode.handle
        except OSError:
            return False

    def _created(self, ctx: Context, dirfd: int, name: bytes, mode: int) -> Entry:
        """Give the just-created ``name`` in ``dirfd`` to the calling user, then look it up.
        The object is pinned by an O_PATH descriptor first, so that whatever replaces the
        name meanwhile is never chowned; if it cannot be given away, it is removed again."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            st = self._give_to_caller(ctx, fd, dirfd, mode)
        except BaseException:
            _discard_created(dirfd, name, fd)
            raise
        return self._entry(*self._remember(fd, st))

    def _give_to_caller(self, ctx: Context, fd: int, dirfd: int, mode: int) -> os.stat_result:
        """Make the object behind ``fd``, which the server created, look as if the caller had
        created it: the caller's uid, and the caller's gid unless the parent directory is
        setgid (the new object then already has the directory's group). chown clears setuid
        and setgid on regular files, so the requested ones are put back; the kernel has
        already removed from ``mode`` any bit the caller may not set."""
        st = os.fstat(fd)
        gid = st.st_gid if os.fstat(dirfd).st_mode & stat.S_ISGID else ctx.gid
        if (st.st_uid, st.st_gid) != (ctx.uid, gid):
            syscalls.fchownat(fd, b"", ctx.uid, gid, syscalls.AT_EMPTY_PATH)
            st = os.fstat(fd)
        wanted = mode & (stat.S_ISUID | stat.S_ISGID) if stat.S_ISREG(st.st_mode) else 0
        # Permission bits the server's own umask took away (the caller's was applied already),
        # unless a default ACL decided them.
        lost = 0 if stat.S_ISLNK(st.st_mode) else mode & 0o777 & ~st.st_mode
        if lost and not _default_acl(dirfd):
            wanted |= lost
        if st.st_mode & wanted != wanted:
            os.chmod(_proc(fd), stat.S_IMODE(st.st_mode) | wanted)
            st = os.fstat(fd)
        return st

    # --- names and attributes -----------------------------------------------------------

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        _check_name(name)
        if self.is_hidden(parent, name):
            raise OSError(errno.ENOENT, "hidden")
        with self._pinned(parent) as pfd:
            return self._lookup_at(pfd, name)

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        unwatch: list[Inode] = []
        closing: list[int] = []  # closed after the lock: the last close of an unlinked file frees it, slowly
        with self._lock:
            for nodeid, n in items:
                inode = self._inodes.get(nodeid)
                if inode is None or nodeid == ROOT_ID:
                    continue
                inode.lookups -= n
                if self.journal is not None:
                    self.journal.forget(nodeid, n)
                if inode.lookups <= 0:
                    del self._inodes[nodeid]
                    if self._by_key.get(inode.key) is inode:
                        del self._by_key[inode.key]
                    if inode.handle is not None and self._by_handle.get(inode.handle) is inode:
                        del self._by_handle[inode.handle]
                    self._lru.pop(nodeid, None)
                    if self.watcher is not None and inode.kind == stat.S_IFDIR:
                        inode.busy += 1  # its descriptor names it until the mark is gone
                        unwatch.append(inode)
                    elif inode.fd >= 0 and inode.busy == 0:
                        closing.append(inode.fd)
                        inode.fd = -1
        for fd in closing:
            os.close(fd)
        for inode in unwatch:
            self._forget_directory(inode)

    def _forget_directory(self, inode: Inode) -> None:
        try:
            fd = inode.fd if inode.fd >= 0 else syscalls.open_by_handle(self._mount_fd, inode.handle or b"", os.O_PATH)
        except OSError:
            fd = -1  # gone from the source: its mark went with it
        if fd >= 0:
            self._unwatch(inode, fd)
            if fd != inode.fd:
                os.close(fd)
        self._release_fd(inode)

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> os.stat_result:
        if fh is not None and ino != ROOT_ID and fh in self._files:
            return os.fstat(fh)
        if ino == ROOT_ID:
            self.source_state()  # asked about once per attribute timeout: where a removal gets noticed
        inode = self._inodes.get(ino)
        if inode is not None and inode.fd >= 0:
            # Without pinning: the descriptor may be evicted and its number reused meanwhile, but then
            # the stat shows another inode and the pinned way below is taken.
            try:
                st = os.fstat(inode.fd)
            except OSError:
                pass
            else:
                if (st.st_dev, st.st_ino) == inode.key:
                    return st
        with self._pinned(ino) as fd:
            return os.fstat(fd)

    def setattr(self, ctx: Context, ino: int, changes: Changes, fh: int | None) -> os.stat_result:
        with self._pinned(ino) as fd:
            path = _proc(fd)
            # An empty SETATTR is chown(f, -1, -1): passed on, so the source updates ctime (and clears
            # set-user-ID) as it would; unless it ends the kernel's removal of a file capability.
            if changes == _NO_CHANGES and self._took_privileges(ino, ctx.pid):
                return os.fstat(fd)
            if changes.uid is not None or changes.gid is not None or changes == _NO_CHANGES:
                uid = -1 if changes.uid is None else changes.uid
                gid = -1 if changes.gid is None else changes.gid
                syscalls.fchownat(fd, b"", uid, gid, syscalls.AT_EMPTY_PATH)
            if changes.mode is not None:
                os.chmod(path, stat.S_IMODE(changes.mode))
            if changes.size is not None:
                if fh is not None and fh in self._files:
                    os.ftruncate(fh, changes.size)
                else:
                    os.truncate(path, changes.size)
                if changes.kill_suidgid:  # truncated for a caller without CAP_FSETID; the server has it
                    _kill_suid_sgid(path)
            if changes.atime_ns is not None or changes.mtime_ns is not None or changes.atime_now or changes.mtime_now:
                syscalls.utimens(path, changes.atime_ns, changes.mtime_ns, changes.atime_now, changes.mtime_now)
            return os.fstat(fd)

    def statx(self, ctx: Context, ino: int, fh: int | None, flags: int, mask: int) -> StatxReply:
        """The fields plain GETATTR cannot carry (birth time, attributes) come from statx(2)."""
        at = syscalls.AT_EMPTY_PATH | syscalls.AT_SYMLINK_NOFOLLOW | (flags & syscalls.AT_STATX_SYNC_TYPE)
        if fh is not None and fh in self._files:
            raw = syscalls.statx(fh, b"", at, mask)
        else:
            with self._pinned(ino) as fd:
                raw = syscalls.statx(fd, b"", at, mask)
        (smask, blksize, attributes, nlink, uid, gid, mode, _, st_ino, size, blocks, attributes_mask,
         a_s, a_ns, _, b_s, b_ns, _, c_s, c_ns, _, m_s, m_ns, _, rmaj, rmin, dmaj, dmin) = abi.STATX.unpack(raw)
        return StatxReply(
            mask=smask, blksize=blksize, attributes=attributes, nlink=nlink, uid=uid, gid=gid, mode=mode,
            ino=st_ino, size=size, blocks=blocks, attributes_mask=attributes_mask,
            atime_ns=a_s * 1_000_000_000 + a_ns, btime_ns=b_s * 1_000_000_000 + b_ns,
            ctime_ns=c_s * 1_000_000_000 + c_ns, mtime_ns=m_s * 1_000_000_000 + m_ns,
            rdev_major=rmaj, rdev_minor=rmin, dev_major=dmaj, dev_minor=dmin,
        )

    def readlink(self, ctx: Context, ino: int) -> bytes:
        with self._pinned(ino) as fd:
            return os.readlink(b"", dir_fd=fd)

    def statfs(self, ctx: Context, ino: int) -> StatfsReply:
        with self._pinned(ino) as fd:
            s = os.fstatvfs(fd)
        return StatfsReply.from_statvfs(s)

    # --- namespace ------------------------------------------------------------------------

    def _create_in(self, ctx: Context, parent: int, name: bytes) -> _Pin:
        _check_name(name)
        if self.is_hidden(parent, name):
            raise OSError(errno.EACCES, "hidden name")
        return self._pinned(parent)

    def _mode_for(self, dirfd: int, mode: int, umask: int) -> int:
        """The caller's umask applies to a new object, unless its directory has a default ACL
        (which the source filesystem then applies instead, as it would for the caller)."""
        if not mode & umask or _default_acl(dirfd):
            return mode
        return mode & ~umask

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int) -> Entry:
        with self._create_in(ctx, parent, name) as pfd:
            mode = self._mode_for(pfd, mode, umask)
            os.mknod(name, mode, rdev, dir_fd=pfd)
            return self._created(ctx, pfd, name, mode)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        with self._create_in(ctx, parent, name) as pfd:
            mode = self._mode_for(pfd, mode, umask)
            os.mkdir(name, mode, dir_fd=pfd)
            return self._created(ctx, pfd, name, mode)

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        with self._create_in(ctx, parent, name) as pfd:
            os.symlink(target, name, dir_fd=pfd)
            return self._created(ctx, pfd, name, 0)

    def link(self, ctx: Context, ino: int, newparent: int, newname: bytes) -> Entry:
        with self._create_in(ctx, newparent, newname) as pfd, self._pinned(ino) as fd:
            os.link(_proc(fd), newname, dst_dir_fd=pfd, follow_symlinks=True)
            return self._lookup_at(pfd, newname)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        _check_name(name)
        with self._pinned(parent) as pfd:
            self._keep_if_last_name(pfd, name)
            os.unlink(name, dir_fd=pfd)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        _check_name(name)
        with self._pinned(parent) as pfd:
            os.rmdir(name, dir_fd=pfd)

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        _check_name(name)
        with self._create_in(ctx, newparent, newname) as newfd, self._pinned(parent) as oldfd:
            if not flags & _TARGET_STAYS:
                self._keep_if_last_name(newfd, newname)
            if flags:
                syscalls.renameat2(oldfd, name, newfd, newname, flags)
            else:
                os.rename(name, newname, src_dir_fd=oldfd, dst_dir_fd=newfd)

    def _hold(self, fh: int, inode: Inode, flags: int) -> None:
        """Count open file ``fh`` of ``inode`` (lock held); under a supervisor, remember one opened
        O_APPEND: its served writes are journaled (``_journaled_append``)."""
        self._files[fh] = inode
        inode.opens += 1
        if flags & os.O_APPEND and self.journal is not None:
            self._appending.add(fh)

    def _keep_if_last_name(self, dirfd: int, name: bytes) -> None:
        """Under a supervisor, a file open through the mount that is about to lose its last name
        (``name`` in ``dirfd``) is given to the supervisor first: a successor can then reopen it."""
        if self.journal is None or not self._files:
            return
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except OSError:
            return  # the unlink or rename will say why
        if st.st_nlink == 1 and not stat.S_ISDIR(st.st_mode):
            inode = self._by_key.get((st.st_dev, st.st_ino))
            if inode is not None:
                self._keep(inode)

    def _keep(self, inode: Inode) -> None:
        """``Journal.keep`` an open file's inode, once (under the lock: ``release`` lets it go)."""
        assert self.journal is not None
        with self._lock:
            if inode.opens and not inode.kept and inode.fd >= 0:  # open files are pinned: fd is there
                self.journal.keep(inode.nodeid, inode.fd)
                inode.kept = True

    # --- files ---------------------------------------------------------------------------------

    def _opened(self, ctx: Context, fd: int, inode: Inode, flags: int, mode: int = 0) -> Opened:
        """Record an open file. Its inode stays pinned (its O_PATH descriptor is never evicted)
        until the release: a file unlinked while open cannot be reopened from its handle.

        Under HANDLE_KILLPRIV_V2 a set-user-ID or set-group-ID file is served, never passed
        through: a passthrough write never reaches the server, which is then the only one that
        would clear those bits (the kernel leaves it to the server, and the source does not
        clear them for the server, which holds CAP_FSETID)."""
        serve = self.killpriv_v2 and _is_sxid(mode)
        if self.journal is not None:
            fd = _move_up(fd, self.fh_base)
            self.journal.opened(fd, inode.nodeid, flags, ctx.unique)
        with self._lock:
            self._hold(fd, inode, flags)
            if self.passthrough and not serve and ctx.pid not in inode.openers:
                inode.openers = (ctx.pid, *inode.openers[:3])
        # Watched, a served file's cached pages stay true across opens (the watcher drops them when
        # the source changes); passthrough has no pages of its own to keep.
        return Opened(fh=fd, backing_fd=None if serve else fd, keep_cache=self.watcher is not None,
                      served_because="set-user-ID or set-group-ID file (its writes must reach the server)"
                      if serve else None)

    def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        self.check_open(ctx, ino, flags)
        inode = self._get(ino)
        pfd = self._acquire_fd(inode)
        try:
            fd = os.open(_proc(pfd), (flags & ~_OPEN_DROP) | os.O_CLOEXEC)
            mode = 0
            if self.killpriv_v2:
                mode = os.fstat(fd).st_mode
                if flags & os.O_TRUNC and ctx.kill_suidgid and _is_sxid(mode):
                    mode = _kill_suid_sgid(fd)
            elif flags & os.O_TRUNC and ctx.uid != 0:  # the kernel did not say: a guess by the caller's uid
                _kill_suid_sgid(fd)
        except BaseException:
            self._release_fd(inode)
            raise
        return self._opened(ctx, fd, inode, flags, mode)

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int, flags: int) -> tuple[Entry, Opened]:
        # The kernel sends CREATE only for a name it just found missing. Always exclusive: a
        # file that appeared in the source meanwhile is never opened (or given away) without
        # the permission checks an OPEN would have had; the caller gets EEXIST instead.
        with self._create_in(ctx, parent, name) as pfd:
            self.check_open(ctx, parent, flags | os.O_CREAT)
            mode = self._mode_for(pfd, mode, umask)
            open_flags = (flags & ~_OPEN_DROP) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, open_flags, mode, dir_fd=pfd)
            try:
                st = self._give_to_caller(ctx, fd, pfd, mode)
                path_fd = os.open(_proc(fd), os.O_PATH | os.O_CLOEXEC)
            except BaseException:
                _discard_created(pfd, name, fd)
                raise
            inode, st = self._remember(path_fd, st, pin=True)
        return self._entry(inode, st), self._opened(ctx, fd, inode, flags, st.st_mode)

    def tmpfile(self, ctx: Context, parent: int, mode: int, umask: int, flags: int) -> tuple[Entry, Opened]:
        with self._pinned(parent) as pfd:
            self.check_open(ctx, parent, flags | os.O_TMPFILE)
            mode = self._mode_for(pfd, mode, umask)
            fd = os.open(b".", (flags & ~_OPEN_DROP) | os.O_TMPFILE | os.O_CLOEXEC, mode, dir_fd=pfd)
            try:
                st = self._give_to_caller(ctx, fd, pfd, mode)
                path_fd = os.open(_proc(fd), os.O_PATH | os.O_CLOEXEC)
            except BaseException:
                os.close(fd)
                raise
            inode, st = self._remember(path_fd, st, pin=True)
        entry, opened = self._entry(inode, st), self._opened(ctx, fd, inode, flags, st.st_mode)
        if self.journal is not None:
            self._keep(inode)  # it never had a name
        return entry, opened

    def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> memoryview:
        buf = ctx.buffer(size)
        n = os.preadv(fh, [buf], offset)
        return buf[:n]

    def write(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview, flags: int) -> int:
        if flags & abi.WRITE_KILL_SUIDGID:  # a writer without CAP_FSETID: as the source would for it
            _kill_suid_sgid(fh)
        if flags & abi.WRITE_CACHE:
            # Dirty pages of a mapping: the source never drops privileges for those, but the pwrite
            # that stores them would drop a file capability; it is put back.
            capability = _capability(fh)
            written = os.pwrite(fh, data, offset)
            if capability is not None:
                os.setxattr(fh, _CAPABILITY, capability)
            return written
        if fh in self._appending:
            return self._journaled_append(ctx, fh, data)
        return os.pwrite(fh, data, offset)

    def _journaled_append(self, ctx: Context, fh: int, data: memoryview) -> int:
        """An O_APPEND write under a supervisor. Where it begins is recorded first: if the server dies
        before its reply, the kernel resends it, and a successor must not append it a second time
        (a write at an offset may simply be made again; an append would duplicate the data)."""
        journal = self.journal
        assert journal is not None
        if ctx.unique & abi.UNIQUE_RESEND:
            start = journal.appended_at(ctx.unique)
            if start is not None and _holds(fh, start, data):
                return len(data)  # made by the predecessor
        journal.appending(ctx.unique, os.fstat(fh).st_size)
        return os.pwrite(fh, data, 0)  # O_APPEND: at the end, whatever the offset

    def release(self, ctx: Context, ino: int, fh: int, flags: int) -> None:
        with self._lock:
            inode = self._files.pop(fh, None)
            placeholder = fh in self._placeholders
            self._placeholders.discard(fh)
            self._appending.discard(fh)
            if inode is not None:
                inode.opens -= 1
                if inode.kept and not inode.opens:
                    assert self.journal is not None
                    self.journal.let_go(inode.nodeid)
                    inode.kept = False
        if self.journal is not None:
            self.journal.released(fh, ctx.unique)
        if inode is None and not placeholder:
            raise OSError(errno.EBADF, "no such open file")  # never close a number that is not its own
        os.close(fh)
        if inode is not None:
            self._release_fd(inode)

    def fsync(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(fh)

    def fallocate(self, ctx: Context, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        syscalls.fallocate(fh, mode, offset, length)

    def lseek(self, ctx: Context, ino: int, fh: int, offset: int, whence: int) -> int:
        return os.lseek(fh, offset, whence)

    def copy_file_range(
        self, ctx: Context, ino_in: int, fh_in: int, off_in: int, ino_out: int, fh_out: int, off_out: int,
        length: int, flags: int,
    ) -> int:
        return os.copy_file_range(fh_in, fh_out, length, off_in, off_out)

    # --- directories ---------------------------------------------------------------------

    def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        with self._pinned(ino) as pfd:
            fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
        with self._lock:
            handle_id = self._next_dir
            self._next_dir += 1
            self._dirs[handle_id] = _DirHandle(fd)
        if self.journal is not None:
            self.journal.opened(handle_id, ino, 0, ctx.unique, is_dir=True)
        # Watched, a listing stays true: the kernel may keep it (until the directory changes).
        cached = self.watcher is not None
        return Opened(fh=handle_id, cache_dir=cached, keep_cache=cached)

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int, listing: DirListing) -> None:
        """A READDIR is answered from the directory stream alone (name, inode number and type);
        only READDIRPLUS, whose entries carry attributes and count lookups, stats each name."""
        d = self._dirs[fh]
        if offset == 0 or d.entries is None:
            d.entries = self._snapshot(ino, d.fd)
            d.packed, d.ends = b"", []
        plus = listing.plus
        if not plus and type(listing) is DirListing:  # a slice of the listing packed once: no work per entry
            if not d.ends:
                d.pack()
            if offset >= len(d.ends):
                return
            start = d.ends[offset - 1] if offset else 0
            stop = bisect.bisect_right(d.ends, start + listing.room)
            if stop > offset:
                listing.add_records(memoryview(d.packed)[start : d.ends[stop - 1]])
            return
        for index in range(offset, len(d.entries)):
            name, number, kind = d.entries[index]
            lookup = None
            attr: AttrLike
            if plus and name not in _DOTS:
                try:
                    attr = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed since the snapshot
                lookup = functools.partial(self._lookup_at, d.fd, name, attr)
            else:
                attr = Attr(ino=number, mode=kind)
            if not listing.add(name, index + 1, attr, lookup):
                return

    def _snapshot(self, ino: int, fd: int) -> list[tuple[bytes, int, int]]:
        """The listing as the stream gives it, after "." and ".." (never looked up). Names come as
        bytes (the stream is opened again by its /proc path) and types from d_type: no stat."""
        number = os.fstat(fd).st_ino
        entries = [(b".", number, stat.S_IFDIR), (b"..", number, stat.S_IFDIR)]
        lnk, dir_, reg = stat.S_IFLNK, stat.S_IFDIR, stat.S_IFREG
        with os.scandir(_proc(fd)) as it:
            entries += [
                (e.name, e.inode(), lnk if e.is_symlink() else dir_ if e.is_dir(follow_symlinks=False)
                 else reg if e.is_file(follow_symlinks=False) else 0)
                for e in it
            ]
        if type(self).is_hidden is not Mirror.is_hidden:  # a subclass hides names
            entries[2:] = [entry for entry in entries[2:] if not self.is_hidden(ino, entry[0])]
        return entries

    def releasedir(self, ctx: Context, ino: int, fh: int) -> None:
        with self._lock:
            d = self._dirs.pop(fh, None)
        if self.journal is not None:
            self.journal.released(fh, ctx.unique, is_dir=True)
        if d is not None:
            os.close(d.fd)

    def fsyncdir(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        os.fsync(self._dirs[fh].fd)

    # --- extended attributes --------------------------------------------------------------

    def setxattr(self, ctx: Context, ino: int, name: bytes, value: bytes, flags: int) -> None:
        with self._pinned(ino) as fd:
            os.setxattr(_proc(fd), name, value, flags)

    def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes:
        with self._pinned(ino) as fd:
            return os.getxattr(_proc(fd), name)

    def listxattr(self, ctx: Context, ino: int) -> list[bytes]:
        with self._pinned(ino) as fd:
            return [os.fsencode(n) for n in os.listxattr(_proc(fd))]

    def removexattr(self, ctx: Context, ino: int, name: bytes) -> None:
        with self._pinned(ino) as fd:
            os.removexattr(_proc(fd), name)
        if name == _CAPABILITY:
            with self._lock:
                self._privileges_removed[ino, ctx.pid] = None
                while len(self._privileges_removed) > 64:
                    self._privileges_removed.popitem(last=False)

    def _took_privileges(self, ino: int, pid: int) -> bool:
        """Whether this thread just removed ``ino``'s file capability: a write's privilege removal
        (REMOVEXATTR, then an empty SETATTR) is under way, which changes nothing else."""
        with self._lock:
            return self._privileges_removed.pop((ino, pid), 0) is None

    # --- lifecycle ----------------------------------------------------------------------

    def destroy(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        with self._lock:
            for fd in self._files:
                _close_quietly(fd)
            self._files.clear()
            for d in self._dirs.values():
                _close_quietly(d.fd)
            self._dirs.clear()
            for inode in self._inodes.values():
                if inode.fd >= 0:
                    _close_quietly(inode.fd)
                    inode.fd = -1
            self._lru.clear()

    def status(self) -> dict[str, object]:
        watching: dict[str, object] = {"on": self.watcher is not None, "why_not": self.watch_why_not,
                                       "timeout_s": self.entry_timeout}
        if self.watcher is not None and self.coherence is not None:
            watching.update(marks=self.watcher.marks, events=dict(self.watcher.counts),
                            notifications=dict(self.coherence.counts))
        return {"source": self.source, "source_state": self.source_state() or "present",
                "file_handles": self.handles, "descriptors": self.descriptor_counts(), "watcher": watching}

    def descriptor_counts(self) -> dict[str, int]:
        """Descriptors the mirror holds, by purpose (for status and tests)."""
        with self._lock:
            return {
                "path": sum(1 for i in self._inodes.values() if i.fd >= 0),
                "files": len(self._files),
                "dirs": len(self._dirs),
                "inodes": len(self._inodes),
                #: Open files without a name whose descriptor the supervisor holds (``_keep``).
                "kept_by_supervisor": sum(1 for i in self._inodes.values() if i.kept),
            }


class _Pin:
    """``with mirror._pinned(ino) as fd``: the inode's O_PATH descriptor, safe from eviction."""

    __slots__ = ("mirror", "inode")

    def __init__(self, mirror: Mirror, inode: Inode) -> None:
        self.mirror = mirror
        self.inode = inode

    def __enter__(self) -> int:
        return self.mirror._acquire_fd(self.inode)

    def __exit__(self, *exc: object) -> None:
        self.mirror._release_fd(self.inode)


def _holds(fd: int, offset: int, data: memoryview) -> bool:
    """Whether the file open as ``fd`` (perhaps write-only) holds ``data`` at ``offset``."""
    reader = os.open(_proc(fd), os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(reader, len(data), offset) == data
    finally:
        os.close(reader)


def stacked_source(path: str) -> bool:
    """Whether ``path`` lives on a stacked filesystem (passthrough then needs depth 2)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return syscalls.fs_magic(fd) in _STACKED_MAGICS
    finally:
        os.close(fd)


def _move_up(fd: int, base: int) -> int:
    """``fd`` moved to the lowest free number from ``base`` up."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base)
    os.close(fd)
    return high


def _default_acl(dirfd: int) -> bool:
    """Whether the directory has a default ACL (which then decides new objects' modes, not a umask)."""
    try:
        os.getxattr(_proc(dirfd), "system.posix_acl_default")
    except OSError:
        return False
    return True


def _capability(fd: int) -> bytes | None:
    try:
        return os.getxattr(fd, _CAPABILITY)
    except OSError:
        return None


def _is_sxid(mode: int) -> bool:
    """Set-user-ID, or set-group-ID with group execute: the bits a write by another user clears."""
    return bool(mode & stat.S_ISUID or mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP)


def _kill_suid_sgid(target: int | bytes) -> int:
    """What writing or truncating does to a file for a caller without CAP_FSETID: drop setuid, and
    setgid if group-executable. The server changed it with its own privileges, which keep them.
    ``target``: an open descriptor or a path. Returns the mode the file is left with."""
    mode = os.stat(target).st_mode
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and mode & stat.S_IXGRP:
        kill |= stat.S_ISGID
    if kill:
        mode &= ~kill
        os.chmod(target, stat.S_IMODE(mode))
    return mode


def _discard_created(dirfd: int, name: bytes, fd: int) -> None:
    """Undo a creation that cannot be completed: remove ``name`` if it still is the file
    ``fd`` holds, and close ``fd``."""
    try:
        _remove_if_same(dirfd, name, os.fstat(fd))
    finally:
        os.close(fd)


def _remove_if_same(dirfd: int, name: bytes, st: os.stat_result) -> None:
    """Undo a creation: remove ``name`` if it is still the object ``st`` describes."""
    try:
        now = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            if stat.S_ISDIR(now.st_mode):
                os.rmdir(name, dir_fd=dirfd)
            else:
                os.unlink(name, dir_fd=dirfd)
    except OSError:
        pass


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
