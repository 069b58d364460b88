"""The mirror filesystem: a source directory re-served through FUSE, regular-file I/O passed through.

Every operation works relative to descriptors the server holds (``*at()`` calls on O_PATH
descriptors), never by rebuilding paths, and never follows a symlink or ``..``: nothing
outside the source root can be reached. Inodes are identified by (st_dev, st_ino); their
O_PATH descriptors live in a bounded LRU cache and are reopened from file handles
(``open_by_handle_at``) when evicted, so the server's descriptor count stays bounded
however many inodes the kernel remembers. Without CAP_DAC_READ_SEARCH (an unprivileged
server) file handles cannot be opened, and every remembered inode keeps its descriptor.

Subclass to add policy: ``check_open`` may refuse an open with an errno, ``is_hidden``
hides names; see ``fusepass.examples.readonly_audit``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from . import abi, syscalls
from .ops import (
    ROOT_ID,
    Attr,
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

log = logging.getLogger("fusepass.mirror")

FUSE_SUPER_MAGIC = 0x65735546
OVERLAYFS_SUPER_MAGIC = 0x794C7630
_STACKED_MAGICS = (FUSE_SUPER_MAGIC, OVERLAYFS_SUPER_MAGIC)
_XATTR_CREATE, _XATTR_REPLACE = 1, 2
# O_NOFOLLOW: the kernel already refused it on a symlink, and reopening through /proc/self/fd (a magic
# symlink) with it fails with ELOOP (GNU tar opens every file so).
_OPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_NOFOLLOW
_NO_CHANGES = Changes()


def _attr(st: os.stat_result) -> Attr:
    return Attr(
        ino=st.st_ino, mode=st.st_mode, nlink=st.st_nlink, uid=st.st_uid, gid=st.st_gid, rdev=st.st_rdev,
        size=st.st_size, blocks=st.st_blocks, blksize=st.st_blksize,
        atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
    )


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


class _DirHandle:
    __slots__ = ("fd", "entries")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.entries: list[tuple[bytes, int]] | None = None  # (name, d_type-ish mode) snapshot


class Mirror(Operations):
    """Mirror ``source``. ``timeout`` is the entry/attribute cache time in seconds (short by
    default, so changes made directly in the source show up quickly; use a long one when the
    mount is the only writer). ``max_path_fds`` bounds the O_PATH descriptor cache."""

    readdirplus = True

    def __init__(self, source: str, *, timeout: float = 1.0, max_path_fds: int = 8192) -> None:
        self.source = os.path.realpath(source)
        st = os.stat(self.source)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "source is not a directory", self.source)
        # A name missing from the source is remembered as missing for as long as a name found is.
        self.entry_timeout = self.attr_timeout = self.negative_timeout = timeout
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
        os.umask(0)  # modes arrive with the caller's umask applied, by the kernel or by _mode_for

    @property
    def stacked(self) -> bool:
        """Whether the source lives on a stacked filesystem (passthrough then needs depth 2)."""
        return syscalls.fs_magic(self._mount_fd) in _STACKED_MAGICS

    def init(self, conn: ConnectionInfo) -> None:
        # POSIX_ACL: the kernel enforces the source's ACLs (with a mode-only check, an ACL
        # entry denying a user would be ignored, since the server opens files as root).
        # DONT_MASK: then the kernel leaves the umask to us, to skip it under a default ACL.
        conn.want |= abi.InitFlag.POSIX_ACL | abi.InitFlag.DONT_MASK

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
            if inode.busy == 0 and inode.fd >= 0 and self._inodes.get(inode.nodeid) is not inode:
                os.close(inode.fd)  # forgotten while in use
                inode.fd = -1

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

    def _remember(self, fd: int, st: os.stat_result, pin: bool = False) -> Inode:
        """Take ownership of ``fd`` (O_PATH) for the inode it names; count one lookup.
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
                inode.busy += pin
                os.close(fd)
                return inode
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
                inode.busy += pin
                if inode.fd < 0:
                    inode.fd = fd
                    self._lru[inode.nodeid] = None
                    self._evict()
                else:
                    os.close(fd)
                return inode
            if inode is not None:  # the inode number now belongs to another file
                del self._by_key[key]
            inode = Inode(self._next_nodeid, key, kind, fd, handle, lookups=1, busy=int(pin))
            self._next_nodeid += 1
            self._inodes[inode.nodeid] = inode
            self._by_key[key] = inode
            if handle is not None:
                self._lru[inode.nodeid] = None
                self._evict()
            return inode

    def _entry(self, inode: Inode, st: os.stat_result) -> Entry:
        return Entry(inode.nodeid, _attr(st), self.entry_timeout, self.attr_timeout)

    def _lookup_at(self, dirfd: int, name: bytes) -> Entry:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        with self._lock:
            inode = self._by_key.get((st.st_dev, st.st_ino))
            if inode is not None and inode.kind != stat.S_IFMT(st.st_mode):
                inode = None
            # Held open, its number cannot have been reused: the name still means this inode.
            if inode is not None and inode.fd >= 0:
                inode.lookups += 1
                return self._entry(inode, st)
        if inode is not None and inode.handle is not None and self._same_file(dirfd, name, inode):
            # Its descriptor was evicted; the name's handle (taken after the stat, so the stat was
            # of this file too: a file the handle names existed all along) proves it is the same
            # file. It stays without a descriptor until one is needed.
            with self._lock:
                if self._inodes.get(inode.nodeid) is inode:
                    inode.lookups += 1
                    return self._entry(inode, st)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._entry(self._remember(fd, st), st)

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
        return self._entry(self._remember(fd, st), st)

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
        wanted = mode & (stat.S_ISUID | stat.S_ISGID)
        if stat.S_ISREG(st.st_mode) and st.st_mode & wanted != wanted:
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
        with self._lock:
            for nodeid, n in items:
                inode = self._inodes.get(nodeid)
                if inode is None or nodeid == ROOT_ID:
                    continue
                inode.lookups -= n
                if inode.lookups <= 0:
                    del self._inodes[nodeid]
                    if self._by_key.get(inode.key) is inode:
                        del self._by_key[inode.key]
                    self._lru.pop(nodeid, None)
                    if inode.fd >= 0 and inode.busy == 0:
                        os.close(inode.fd)
                        inode.fd = -1

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> Attr:
        if fh is not None and ino != ROOT_ID and fh in self._files:
            return _attr(os.fstat(fh))
        with self._pinned(ino) as fd:
            return _attr(os.fstat(fd))

    def setattr(self, ctx: Context, ino: int, changes: Changes, fh: int | None) -> Attr:
        with self._pinned(ino) as fd:
            path = _proc(fd)
            # An empty SETATTR is chown(f, -1, -1): passed on, so the source updates ctime as it would.
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
            if changes.atime_ns is not None or changes.mtime_ns is not None or changes.atime_now or changes.mtime_now:
                syscalls.utimens(path, changes.atime_ns, changes.mtime_ns, changes.atime_now, changes.mtime_now)
            return _attr(os.fstat(fd))

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
        return StatfsReply(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, s.f_namemax, s.f_frsize)

    # --- namespace ------------------------------------------------------------------------

    def _create_in(self, ctx: Context, parent: int, name: bytes) -> _Pin:
        _check_name(name)
        if self.is_hidden(parent, name):
            raise OSError(errno.EACCES, "hidden name")
        return self._pinned(parent)

    def _mode_for(self, dirfd: int, mode: int, umask: int) -> int:
        """The caller's umask applies to a new object, unless its directory has a default ACL
        (which the source filesystem then applies instead, as it would for the caller)."""
        if not mode & umask:
            return mode
        try:
            os.getxattr(_proc(dirfd), "system.posix_acl_default")
        except OSError:
            return mode & ~umask
        return mode

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
            os.unlink(name, dir_fd=pfd)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        _check_name(name)
        with self._pinned(parent) as pfd:
            os.rmdir(name, dir_fd=pfd)

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        _check_name(name)
        with self._create_in(ctx, newparent, newname) as newfd, self._pinned(parent) as oldfd:
            if flags:
                syscalls.renameat2(oldfd, name, newfd, newname, flags)
            else:
                os.rename(name, newname, src_dir_fd=oldfd, dst_dir_fd=newfd)

    # --- files ---------------------------------------------------------------------------------

    def _opened(self, fd: int, inode: Inode) -> Opened:
        """Record an open file. Its inode stays pinned (its O_PATH descriptor is never evicted)
        until the release: a file unlinked while open cannot be reopened from its handle."""
        with self._lock:
            self._files[fd] = inode
        return Opened(fh=fd, backing_fd=fd)

    def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        self.check_open(ctx, ino, flags)
        inode = self._get(ino)
        pfd = self._acquire_fd(inode)
        try:
            fd = os.open(_proc(pfd), (flags & ~_OPEN_DROP) | os.O_CLOEXEC)
            if flags & os.O_TRUNC and ctx.uid != 0:
                _kill_suid_sgid(fd)
        except BaseException:
            self._release_fd(inode)
            raise
        return self._opened(fd, inode)

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
            inode = self._remember(path_fd, st, pin=True)
        return self._entry(inode, st), self._opened(fd, inode)

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
            inode = self._remember(path_fd, st, pin=True)
        return self._entry(inode, st), self._opened(fd, inode)

    def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> memoryview:
        buf = ctx.buffer(size)
        n = os.preadv(fh, [buf], offset)
        return buf[:n]

    def write(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview, flags: int) -> int:
        return os.pwrite(fh, data, offset)

    def release(self, ctx: Context, ino: int, fh: int, flags: int) -> None:
        with self._lock:
            inode = self._files.pop(fh, None)
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
        return Opened(fh=handle_id)

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int, listing: DirListing) -> None:
        d = self._dirs[fh]
        if offset == 0 or d.entries is None:
            d.entries = self._snapshot(ino, d.fd)
        parent_attr = None
        for index in range(offset, len(d.entries)):
            name, mode = d.entries[index]
            if name in (b".", b".."):
                if parent_attr is None:
                    parent_attr = _attr(os.fstat(d.fd))
                attr = parent_attr
                lookup = None
            else:
                try:
                    st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed since the snapshot
                attr = _attr(st)
                lookup = (lambda n=name: self._lookup_at(d.fd, n)) if listing.plus else None
            if not listing.add(name, index + 1, attr, lookup):
                return

    def _snapshot(self, ino: int, fd: int) -> list[tuple[bytes, int]]:
        os.lseek(fd, 0, os.SEEK_SET)
        entries = [(b".", stat.S_IFDIR), (b"..", stat.S_IFDIR)]
        with os.scandir(fd) as it:
            for e in it:
                name = os.fsencode(e.name)
                if not self.is_hidden(ino, name):
                    entries.append((name, 0))
        return entries

    def releasedir(self, ctx: Context, ino: int, fh: int) -> None:
        with self._lock:
            d = self._dirs.pop(fh, None)
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

    # --- lifecycle ----------------------------------------------------------------------

    def destroy(self) -> None:
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
        return {"source": self.source, "file_handles": self.handles, "descriptors": self.descriptor_counts()}

    def descriptor_counts(self) -> dict[str, int]:
        """Descriptors the mirror holds, by purpose (for status and tests)."""
        with self._lock:
            return {
                "path": sum(1 for i in self._inodes.values() if i.fd >= 0),
                "files": len(self._files),
                "dirs": len(self._dirs),
                "inodes": len(self._inodes),
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


def _kill_suid_sgid(fd: int) -> None:
    """What truncating on open does to a file for a caller without CAP_FSETID: drop setuid, and
    setgid if group-executable. The server truncated it with its own privileges, which keep them."""
    mode = os.fstat(fd).st_mode
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and mode & stat.S_IXGRP:
        kill |= stat.S_ISGID
    if kill:
        os.fchmod(fd, stat.S_IMODE(mode) & ~kill)


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

