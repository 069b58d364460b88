"""The path-based layer: write a filesystem as methods on ``str`` paths, the way fusepy and
libfuse's high-level API do, and serve it through the same session as the inode API.

Subclass ``PathOperations`` and override what you support; wrap it in ``PathFS`` to get an
``Operations`` the session serves::

    run_foreground(lambda args: PathFS(MyFilesystem()))

``PathFS`` keeps what the inode API leaves to its author: the table from node ids to paths
(updated on rename, unlink and rmdir), the lookup count of every node and its removal when
the kernel forgets it, the cookies of a directory listing (a listing is read once when a
directory is read from the start, and served by position), and the open-file handles.

Paths are absolute within the mount ("/", "/dir/file"), decoded with ``os.fsdecode`` so that
any name survives the round trip. Handlers report failure by raising ``OSError(errno, ...)``.
They are called from several worker threads at once; the layer's own table is locked, your
state is yours to lock. ``context()`` tells a handler who is asking.

Passthrough is one return value away: ``open`` and ``create`` may return the path (``str``
or ``os.PathLike``) of a real file, which the layer opens with the caller's flags and
registers with the kernel, so that read, write and mmap go to that file inside the kernel.
Where passthrough cannot be had, the layer serves the file's data from that descriptor
(or calls your ``read``/``write`` with it as ``fh``, if you have them).

Any handler may be ``async def`` (``readdir`` may also be an async generator): the requests
that call it are then served on the session's event loop, many at once, while the others stay
on the worker threads (see ``fusepass.aio``). The layer's table is the same for both.
"""

from __future__ import annotations

import contextvars
import dataclasses
import errno
import functools
import inspect
import os
import stat
import threading
import time
from collections.abc import AsyncIterable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from . import abi
from .notify import Notifier
from .ops import ROOT_ID, Attr, Changes, ConnectionInfo, Context, DirListing, Entry, Opened, Operations, StatfsReply
from .protocol import name_bytes, name_str

__all__ = ["DirEntry", "OpenResult", "PathFS", "PathOperations", "Stat", "context"]

#: What ``getattr`` may return: an ``os.stat_result``, an ``Attr``, or anything with the ``st_*`` fields.
Stat = os.stat_result | Attr
#: What ``readdir`` yields: a name, or (name, its stat or None).
DirEntry = str | tuple[str, Stat | None]
#: What ``open``/``create`` return: your handle, an ``Opened`` (full control), or a real file's path.
OpenResult = int | Opened | str | os.PathLike[str]

# The d_ino of a listed name whose stat the filesystem did not give (libfuse's FUSE_UNKNOWN_INO).
UNKNOWN_INO = 0xFFFFFFFF
# Flags of the caller's open that must not reach the re-open of a returned path.
_REOPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_DIRECT

_current = threading.local()  # the request a worker thread serves
_task_context: contextvars.ContextVar[Context | None] = contextvars.ContextVar("fusepass_request", default=None)
T = TypeVar("T")


def context() -> Context | None:
    """The request the calling handler is serving (uid, gid, pid of the caller), or None
    outside a handler. In an ``async def`` handler, the request of its task."""
    ctx = _task_context.get()
    return ctx if ctx is not None else getattr(_current, "ctx", None)


class PathOperations:
    """Base class of a path-based filesystem. Override what you support; a request for
    anything else is answered ENOSYS (and the kernel stops sending most of those).

    Class attributes: ``entry_timeout`` and ``attr_timeout`` (seconds the kernel may cache
    a name and attributes), ``negative_timeout`` (how long "no such file" is cached),
    ``use_ino`` (show the ``st_ino`` you return; otherwise ``stat`` shows the node id),
    ``readdirplus`` (your ``readdir`` yields each name with its whole stat: the kernel then
    gets attributes with the names, and ``ls -l`` needs no lookup per name).
    """

    entry_timeout: float = 1.0
    attr_timeout: float = 1.0
    negative_timeout: float = 0.0
    use_ino: bool = True
    readdirplus: bool = False
    #: The ``PathFS`` serving this filesystem, set when it is wrapped: its ``invalidate`` and
    #: ``invalidate_name`` drop what the kernel cached of a path.
    layer: PathFS | None = None

    def implements(self, name: str) -> bool:
        """Whether handler ``name`` is served; by default, whether a subclass overrides it."""
        return getattr(type(self), name) is not getattr(PathOperations, name)

    # lifecycle
    def init(self, conn: ConnectionInfo) -> None:
        """Called once the kernel connected, before any other request; may still change the
        timeouts and ``use_ino``."""

    def destroy(self) -> None:
        """Called once after the last request."""

    # attributes
    def getattr(self, path: str, fh: int | None) -> Stat:
        """The attributes of ``path`` (``fh``: the handle of an open file, for fstat).
        Also answers every lookup: raise ENOENT for a name that does not exist."""
        raise OSError(errno.ENOSYS, "getattr")

    def chmod(self, path: str, mode: int, fh: int | None) -> None:
        raise OSError(errno.ENOSYS, "chmod")

    def chown(self, path: str, uid: int, gid: int, fh: int | None) -> None:
        """-1 leaves that id alone, as with ``os.chown``."""
        raise OSError(errno.ENOSYS, "chown")

    def truncate(self, path: str, length: int, fh: int | None) -> None:
        """Also how ``open(O_TRUNC)`` empties a file: the layer never passes O_TRUNC to ``open``."""
        raise OSError(errno.ENOSYS, "truncate")

    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None, fh: int | None) -> None:
        """Set the times (nanoseconds since the epoch; "now" arrives as the current time).
        None leaves that time alone."""
        raise OSError(errno.ENOSYS, "utimens")

    def readlink(self, path: str) -> str:
        raise OSError(errno.ENOSYS, "readlink")

    def access(self, path: str, mode: int) -> None:
        """Check ``os.access``-style permission (R_OK, W_OK, X_OK, F_OK); raise EACCES to refuse."""
        raise OSError(errno.ENOSYS, "access")

    def statfs(self, path: str) -> os.statvfs_result | StatfsReply:
        raise OSError(errno.ENOSYS, "statfs")

    # namespace
    def mknod(self, path: str, mode: int, rdev: int) -> None:
        raise OSError(errno.ENOSYS, "mknod")

    def mkdir(self, path: str, mode: int) -> None:
        raise OSError(errno.ENOSYS, "mkdir")

    def symlink(self, path: str, target: str) -> None:
        """Create the symbolic link ``path`` whose content is ``target``."""
        raise OSError(errno.ENOSYS, "symlink")

    def link(self, path: str, existing: str) -> None:
        """Create ``path`` as a hard link to ``existing``."""
        raise OSError(errno.ENOSYS, "link")

    def unlink(self, path: str) -> None:
        raise OSError(errno.ENOSYS, "unlink")

    def rmdir(self, path: str) -> None:
        raise OSError(errno.ENOSYS, "rmdir")

    def rename(self, old: str, new: str, flags: int) -> None:
        """``flags`` are renameat2's (RENAME_NOREPLACE 1, RENAME_EXCHANGE 2); raise EINVAL for
        flags you do not support."""
        raise OSError(errno.ENOSYS, "rename")

    # files
    def open(self, path: str, flags: int) -> OpenResult:
        """Open ``path`` (``flags`` as ``os.open`` takes them, without O_CREAT, O_EXCL, O_TRUNC).

        Return your handle (an int given back to read, write, release...), a real file's path
        to pass it through (the layer opens and closes it; your handle is then its
        descriptor), or an ``Opened`` for full control (its ``backing_fd`` stays yours: close
        it in ``release``). Without ``open`` every open succeeds with handle 0.

        A returned path is opened with the server's credentials: mount with
        ``default_permissions`` so that the kernel checks the caller's, or check them here."""
        raise OSError(errno.ENOSYS, "open")

    def create(self, path: str, mode: int, flags: int) -> OpenResult:
        """Create the regular file ``path`` and open it; returns as ``open``. A returned path
        is opened without O_CREAT and O_EXCL (the file exists by then)."""
        raise OSError(errno.ENOSYS, "create")

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes | bytearray | memoryview:
        """At most ``size`` bytes at ``offset``; fewer only at the end of the file."""
        raise OSError(errno.ENOSYS, "read")

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        """Write ``data`` at ``offset``; return how many bytes were written."""
        raise OSError(errno.ENOSYS, "write")

    def flush(self, path: str, fh: int) -> None:
        """Called at every ``close`` of a descriptor of the open file."""
        raise OSError(errno.ENOSYS, "flush")

    def release(self, path: str, fh: int) -> None:
        """The last close of an open file: free ``fh``. Errors are ignored."""
        raise OSError(errno.ENOSYS, "release")

    def fsync(self, path: str, datasync: bool, fh: int) -> None:
        raise OSError(errno.ENOSYS, "fsync")

    def fallocate(self, path: str, mode: int, offset: int, length: int, fh: int) -> None:
        raise OSError(errno.ENOSYS, "fallocate")

    # directories
    def opendir(self, path: str) -> int:
        """Return a handle for ``readdir`` and ``releasedir``; without it, 0."""
        raise OSError(errno.ENOSYS, "opendir")

    def readdir(self, path: str, fh: int) -> Iterable[DirEntry]:
        """The names in directory ``path``, as ``str`` or (name, stat or None). Called once
        each time the directory is read from its start; the layer keeps the list for the
        rest of that reading, so the offsets the kernel asks for stay consistent. As a
        coroutine it may return the names or yield them (an async generator)."""
        raise OSError(errno.ENOSYS, "readdir")

    def releasedir(self, path: str, fh: int) -> None:
        raise OSError(errno.ENOSYS, "releasedir")

    def fsyncdir(self, path: str, datasync: bool, fh: int) -> None:
        raise OSError(errno.ENOSYS, "fsyncdir")

    # extended attributes
    def getxattr(self, path: str, name: str) -> bytes:
        """Raise ENODATA for an attribute that is not set."""
        raise OSError(errno.ENOSYS, "getxattr")

    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        """``flags``: os.XATTR_CREATE or os.XATTR_REPLACE, or 0."""
        raise OSError(errno.ENOSYS, "setxattr")

    def listxattr(self, path: str) -> Iterable[str]:
        raise OSError(errno.ENOSYS, "listxattr")

    def removexattr(self, path: str, name: str) -> None:
        raise OSError(errno.ENOSYS, "removexattr")


@dataclass(slots=True, eq=False)
class _Node:
    """One node the kernel knows. ``parent``/``name`` is the name its ``path`` is built from;
    ``others`` are the further names a hard link made through the mount gave it."""

    nodeid: int
    path: str
    parent: _Node | None
    name: str
    lookups: int = 0
    children: dict[str, _Node] = field(default_factory=dict)
    others: list[tuple[_Node, str]] = field(default_factory=list)

    def drop_name(self, parent: _Node, name: str) -> None:
        """``name`` in ``parent`` no longer leads here; the path moves to another name if there is one."""
        if parent is self.parent and name == self.name:
            if self.others:
                self.parent, self.name = self.others.pop()
                self.path = _join(self.parent.path, self.name)
        elif (parent, name) in self.others:
            self.others.remove((parent, name))


@dataclass(slots=True)
class _Handle:
    fh: int  # the filesystem's handle
    fd: int  # a descriptor the layer opened (and closes), or -1


@dataclass(slots=True)
class _Dir:
    fh: int
    entries: list[tuple[bytes, Attr, Attr | None]] | None = None  # (name, type and d_ino, full stat)


# The inode handlers, and the path handlers any one of which makes the layer serve it.
_NEEDS: dict[str, tuple[str, ...]] = {
    "lookup": ("getattr",), "getattr": ("getattr",),
    "setattr": ("chmod", "chown", "truncate", "utimens"),
    "readlink": ("readlink",), "access": ("access",), "statfs": ("statfs",),
    "mknod": ("mknod",), "mkdir": ("mkdir",), "symlink": ("symlink",), "link": ("link",),
    "unlink": ("unlink",), "rmdir": ("rmdir",), "rename": ("rename",),
    "open": ("open", "read", "write"), "create": ("create",), "read": ("read", "open"),
    "write": ("write", "open"), "flush": ("flush",), "fsync": ("fsync", "open"), "fallocate": ("fallocate",),
    "opendir": ("readdir",), "readdir": ("readdir",), "fsyncdir": ("fsyncdir",),
    "getxattr": ("getxattr",), "setxattr": ("setxattr",), "listxattr": ("listxattr",),
    "removexattr": ("removexattr",),
}
# The inode handlers, and every path handler each calls: one that is a coroutine makes it one.
_CALLS: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name in ("getattr", "readlink", "access", "statfs", "unlink", "rmdir", "rename", "open",
                                  "read", "write", "flush", "fsync", "fallocate", "release", "opendir", "readdir",
                                  "releasedir", "fsyncdir", "getxattr", "setxattr", "listxattr", "removexattr")},
    "lookup": ("getattr",), "setattr": ("chmod", "chown", "truncate", "utimens", "getattr"),
    "mknod": ("mknod", "getattr"), "mkdir": ("mkdir", "getattr"), "symlink": ("symlink", "getattr"),
    "link": ("link", "getattr"), "create": ("create", "getattr", "release"),
}
_classes: dict[tuple[frozenset[str], frozenset[str]], type[PathFS]] = {}
_classes_lock = threading.Lock()


class PathFS(Operations):
    """Serve a ``PathOperations`` through the inode API. ``PathFS(fs)`` is an ``Operations``
    whose class overrides exactly the handlers ``fs`` can answer, so that the session
    answers the others ENOSYS without calling Python, and whose handlers are coroutines
    exactly where one of the path handlers they call is."""

    def __new__(cls, fs: PathOperations) -> PathFS:
        missing = frozenset(h for h, needs in _NEEDS.items() if not any(fs.implements(n) for n in needs))
        awaiting = {name for name in {n for calls in _CALLS.values() for n in calls}
                    if fs.implements(name) and _is_coroutine(getattr(fs, name))}
        awaited = frozenset(h for h, calls in _CALLS.items() if h not in missing and awaiting.intersection(calls))
        with _classes_lock:
            sub = _classes.get((missing, awaited))
            if sub is None:
                body: dict[str, object] = {name: getattr(Operations, name) for name in missing}
                body.update((name, _COROUTINE_FORMS[name]) for name in awaited)
                sub = _classes[(missing, awaited)] = type(cls.__name__, (cls,), body)
        return super().__new__(sub)

    def __init__(self, fs: PathOperations) -> None:
        self.fs = fs
        self.entry_timeout = fs.entry_timeout
        self.attr_timeout = fs.attr_timeout
        self.negative_timeout = fs.negative_timeout
        self.readdirplus = fs.readdirplus
        self._use_ino = fs.use_ino
        self._has = {name for needs in _NEEDS.values() for name in needs if fs.implements(name)}
        self._has.update(n for n in ("opendir", "release", "releasedir") if fs.implements(n))
        self._lock = threading.Lock()
        root = _Node(ROOT_ID, "/", None, "", lookups=1)
        self._nodes: dict[int, _Node] = {ROOT_ID: root}
        self._next_nodeid = ROOT_ID + 1
        self._handles: dict[int, _Handle] = {}
        self._dirs: dict[int, _Dir] = {}
        self._next_fh = 1
        self._notifier: Notifier | None = None
        fs.layer = self

    # --- telling the kernel what changed --------------------------------------------------

    def nodeid(self, path: str) -> int | None:
        """The node id the kernel knows ``path`` by, or None if it holds none (then it has
        nothing of it cached either)."""
        with self._lock:
            node: _Node | None = self._nodes[ROOT_ID]
            for part in filter(None, path.split("/")):
                node = node.children.get(part) if node is not None else None
            return node.nodeid if node is not None else None

    def invalidate(self, path: str, data: bool = True) -> bool:
        """Drop the attributes the kernel cached for ``path``, and its cached data unless
        ``data`` is False, after ``path`` changed other than through the mount. False if the
        kernel held nothing of it. Not from a handler of ``path`` itself: the kernel may be
        holding that file's lock while it waits for the handler (call it from another
        thread, or from a handler of another file)."""
        nodeid = self.nodeid(path)
        if nodeid is None:
            return False
        return self._notify(lambda n: n.invalidate_inode(nodeid, 0 if data else -1))

    def invalidate_name(self, path: str) -> bool:
        """Make the kernel look ``path`` up again next time (it was removed, renamed or
        replaced other than through the mount). False if the kernel held no such name."""
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self.nodeid(head or "/")
        if parent is None or not name:
            return False
        return self._notify(lambda n: n.invalidate_entry(parent, name_bytes(name)))

    def _notify(self, send: Callable[[Notifier], None]) -> bool:
        if self._notifier is None:
            raise OSError(errno.ENOTCONN, "the filesystem is not mounted yet")
        try:
            send(self._notifier)
        except FileNotFoundError:  # the kernel let go of it meanwhile: nothing cached
            return False
        return True

    # --- the table ------------------------------------------------------------------------

    def _node(self, ino: int) -> _Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise OSError(errno.ESTALE, f"unknown node {ino}") from None

    def _path(self, ino: int) -> str:
        return self._node(ino).path

    def _child_path(self, parent: int, name: bytes) -> tuple[_Node, str, str]:
        pnode = self._node(parent)
        sname = name_str(name)
        return pnode, sname, _join(pnode.path, sname)

    def _attr(self, st: Stat, nodeid: int) -> Attr:
        attr = st if isinstance(st, Attr) else Attr.from_stat(st)
        if not self._use_ino or not attr.ino:
            attr = Attr(nodeid, attr.mode, attr.nlink, attr.uid, attr.gid, attr.rdev, attr.size, attr.blocks,
                        attr.blksize, attr.atime_ns, attr.mtime_ns, attr.ctime_ns)
        return attr

    def _remember(self, pnode: _Node, sname: str, path: str) -> _Node:
        """The node of ``path`` with one more lookup counted (the caller replies with its entry)."""
        with self._lock:
            node = pnode.children.get(sname)
            if node is None:
                node = _Node(self._next_nodeid, path, pnode, sname)
                self._next_nodeid += 1
                pnode.children[sname] = node
                self._nodes[node.nodeid] = node
            node.lookups += 1
            return node

    def _entry_for(self, pnode: _Node, sname: str, path: str) -> Entry:
        st = self.fs.getattr(path, None)
        node = self._remember(pnode, sname, path)
        return Entry(node.nodeid, self._attr(st, node.nodeid), self.entry_timeout, self.attr_timeout)

    def _detach(self, pnode: _Node, sname: str) -> None:
        """``sname`` is gone from ``pnode``: a new file of that name gets a new node."""
        with self._lock:
            node = pnode.children.pop(sname, None)
            if node is not None:
                node.drop_name(pnode, sname)

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        with self._lock:
            for ino, n in items:
                node = self._nodes.get(ino)
                if node is None or ino == ROOT_ID:
                    continue
                node.lookups -= n
                if node.lookups <= 0:
                    del self._nodes[ino]
                    for parent, name in [(node.parent, node.name), *node.others]:
                        if parent is not None and parent.children.get(name) is node:
                            del parent.children[name]

    def status(self) -> dict[str, object]:
        with self._lock:
            return {
                "nodes": len(self._nodes), "lookups": sum(n.lookups for n in self._nodes.values()),
                "open_files": len(self._handles), "open_dirs": len(self._dirs),
                "layer_descriptors": sum(1 for h in self._handles.values() if h.fd >= 0),
            }

    # --- lifecycle ------------------------------------------------------------------------

    def init(self, conn: ConnectionInfo) -> None:
        # Truncation on open arrives as SETATTR, so a path filesystem needs only ``truncate``.
        conn.want &= ~abi.InitFlag.ATOMIC_O_TRUNC
        self._notifier = conn.notifier
        self.fs.init(conn)
        # ``init`` may still choose the cache times (fusepy programs set them there).
        self.entry_timeout = self.fs.entry_timeout
        self.attr_timeout = self.fs.attr_timeout
        self.negative_timeout = self.fs.negative_timeout
        self._use_ino = self.fs.use_ino

    def destroy(self) -> None:
        try:
            self.fs.destroy()
        finally:
            with self._lock:
                handles, self._handles = self._handles, {}
            for h in handles.values():
                if h.fd >= 0:
                    os.close(h.fd)

    # --- names and attributes -------------------------------------------------------------

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        _current.ctx = ctx
        if name in (b".", b".."):
            pnode = self._node(parent)
            node = pnode if name == b"." or pnode.parent is None else pnode.parent
            st = self.fs.getattr(node.path, None)
            with self._lock:
                node.lookups += 1
            return Entry(node.nodeid, self._attr(st, node.nodeid), self.entry_timeout, self.attr_timeout)
        pnode, sname, path = self._child_path(parent, name)
        return self._entry_for(pnode, sname, path)

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> Attr:
        _current.ctx = ctx
        return self._attr(self.fs.getattr(self._path(ino), self._user_fh(fh)), ino)

    def setattr(self, ctx: Context, ino: int, changes: Changes, fh: int | None) -> Attr:
        _current.ctx = ctx
        path = self._path(ino)
        ufh = self._user_fh(fh)
        for change in self._changes(path, changes, ufh):
            change()
        return self._attr(self.fs.getattr(path, ufh), ino)

    def _changes(self, path: str, changes: Changes, ufh: int | None) -> list[Callable[[], object]]:
        """The handler calls a SETATTR makes, in order (ENOSYS first if one is missing)."""
        fs = self.fs
        calls: list[Callable[[], object]] = []
        if changes.mode is not None:
            self._need("chmod")
            mode = changes.mode
            calls.append(lambda: fs.chmod(path, mode, ufh))
        if changes.uid is not None or changes.gid is not None:
            self._need("chown")
            uid = -1 if changes.uid is None else changes.uid
            gid = -1 if changes.gid is None else changes.gid
            calls.append(lambda: fs.chown(path, uid, gid, ufh))
        if changes.size is not None:
            self._need("truncate")
            size = changes.size
            calls.append(lambda: fs.truncate(path, size, ufh))
        if changes.atime_ns is not None or changes.mtime_ns is not None or changes.atime_now or changes.mtime_now:
            self._need("utimens")
            now = time.time_ns()
            atime = now if changes.atime_now else changes.atime_ns
            mtime = now if changes.mtime_now else changes.mtime_ns
            calls.append(lambda: fs.utimens(path, atime, mtime, ufh))
        return calls

    def _need(self, name: str) -> None:
        if name not in self._has:
            raise OSError(errno.ENOSYS, f"the filesystem has no {name}")

    def readlink(self, ctx: Context, ino: int) -> bytes:
        _current.ctx = ctx
        return os.fsencode(self.fs.readlink(self._path(ino)))

    def access(self, ctx: Context, ino: int, mask: int) -> None:
        _current.ctx = ctx
        self.fs.access(self._path(ino), mask)

    def statfs(self, ctx: Context, ino: int) -> StatfsReply:
        _current.ctx = ctx
        st = self.fs.statfs(self._path(ino))
        return st if isinstance(st, StatfsReply) else StatfsReply.from_statvfs(st)

    # --- namespace ------------------------------------------------------------------------

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int) -> Entry:
        _current.ctx = ctx
        pnode, sname, path = self._child_path(parent, name)
        self.fs.mknod(path, mode, rdev)
        return self._entry_for(pnode, sname, path)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        _current.ctx = ctx
        pnode, sname, path = self._child_path(parent, name)
        self.fs.mkdir(path, mode)
        return self._entry_for(pnode, sname, path)

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        _current.ctx = ctx
        pnode, sname, path = self._child_path(parent, name)
        self.fs.symlink(path, os.fsdecode(target))
        return self._entry_for(pnode, sname, path)

    def link(self, ctx: Context, ino: int, newparent: int, newname: bytes) -> Entry:
        # The new name is the same inode to the kernel (it refreshes that inode's link count);
        # the node keeps it as a further name, used if its first one goes.
        _current.ctx = ctx
        node = self._node(ino)
        pnode, sname, path = self._child_path(newparent, newname)
        self.fs.link(path, node.path)
        return self._linked(node, pnode, sname, self.fs.getattr(path, None))

    def _linked(self, node: _Node, pnode: _Node, sname: str, st: Stat) -> Entry:
        with self._lock:
            pnode.children[sname] = node
            node.others.append((pnode, sname))
            node.lookups += 1
        return Entry(node.nodeid, self._attr(st, node.nodeid), self.entry_timeout, self.attr_timeout)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        _current.ctx = ctx
        pnode, sname, path = self._child_path(parent, name)
        self.fs.unlink(path)
        self._detach(pnode, sname)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        _current.ctx = ctx
        pnode, sname, path = self._child_path(parent, name)
        self.fs.rmdir(path)
        self._detach(pnode, sname)

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        _current.ctx = ctx
        src, sname, old = self._child_path(parent, name)
        dst, dname, new = self._child_path(newparent, newname)
        self.fs.rename(old, new, flags)
        self._renamed(src, sname, dst, dname, flags)

    def _renamed(self, src: _Node, sname: str, dst: _Node, dname: str, flags: int) -> None:
        with self._lock:
            moved = src.children.pop(sname, None)
            replaced = dst.children.pop(dname, None)
            if replaced is not None:
                if flags & _RENAME_EXCHANGE:
                    _rename_node(replaced, dst, dname, src, sname)
                else:
                    replaced.drop_name(dst, dname)
            if moved is not None:
                _rename_node(moved, src, sname, dst, dname)

    # --- files ----------------------------------------------------------------------------

    def _user_fh(self, fh: int | None) -> int | None:
        if fh is None:
            return None
        h = self._handles.get(fh)
        return None if h is None else h.fh

    def _handle(self, fh: int) -> _Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise OSError(errno.EBADF, f"unknown file handle {fh}") from None

    def _opened(self, result: OpenResult, flags: int) -> Opened:
        """Keep a handle for ``open``'s or ``create``'s result; the reply the kernel gets."""
        if isinstance(result, Opened):
            h, reply = _Handle(result.fh, -1), dataclasses.replace(result)
        elif isinstance(result, int):
            h, reply = _Handle(result, -1), Opened()
        else:
            fd = os.open(result, (flags & ~_REOPEN_DROP & ~os.O_TRUNC) | os.O_CLOEXEC)
            h, reply = _Handle(fd, fd), Opened(backing_fd=fd)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = h
        reply.fh = fh
        return reply

    def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        _current.ctx = ctx
        path = self._path(ino)
        result: OpenResult = self.fs.open(path, flags) if "open" in self._has else 0
        return self._opened(result, flags)

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int, flags: int) -> tuple[Entry, Opened]:
        _current.ctx = ctx
        pnode, sname, path = self._child_path(parent, name)
        opened = self._created(path, self.fs.create(path, mode, flags), flags)
        try:
            entry = self._entry_for(pnode, sname, path)
        except BaseException:
            self.release(ctx, 0, opened.fh, flags)
            raise
        return entry, opened

    def _created(self, path: str, result: OpenResult, flags: int) -> Opened:
        """The handle of a file ``create`` made; if it cannot be had, the file is released."""
        try:
            return self._opened(result, flags & ~(os.O_CREAT | os.O_EXCL))
        except BaseException:
            if "release" in self._has and not isinstance(result, str | os.PathLike):
                release: Callable[[str, int], object] = self.fs.release
                _aside(release(path, result.fh if isinstance(result, Opened) else result))
            raise

    def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> bytes | bytearray | memoryview:
        _current.ctx = ctx
        h = self._handle(fh)
        if h.fd >= 0 and "read" not in self._has:
            return os.pread(h.fd, size, offset)
        return self.fs.read(self._path(ino), size, offset, h.fh)

    def write(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview, flags: int) -> int:
        _current.ctx = ctx
        h = self._handle(fh)
        if h.fd >= 0 and "write" not in self._has:
            return os.pwrite(h.fd, data, offset)
        return self.fs.write(self._path(ino), bytes(data), offset, h.fh)

    def flush(self, ctx: Context, ino: int, fh: int, lock_owner: int) -> None:
        _current.ctx = ctx
        self.fs.flush(self._path(ino), self._handle(fh).fh)

    def fsync(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        _current.ctx = ctx
        h = self._handle(fh)
        if "fsync" in self._has:
            self.fs.fsync(self._path(ino), datasync, h.fh)
        elif h.fd >= 0:
            (os.fdatasync if datasync else os.fsync)(h.fd)
        else:
            raise OSError(errno.ENOSYS, "fsync")

    def fallocate(self, ctx: Context, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        _current.ctx = ctx
        self.fs.fallocate(self._path(ino), mode, offset, length, self._handle(fh).fh)

    def release(self, ctx: Context, ino: int, fh: int, flags: int) -> None:
        _current.ctx = ctx
        with self._lock:
            h = self._handles.pop(fh, None)
            node = self._nodes.get(ino)
        if h is None:
            return
        try:
            if "release" in self._has:
                self.fs.release(node.path if node is not None else "", h.fh)
        finally:
            if h.fd >= 0:
                os.close(h.fd)

    # --- directories ----------------------------------------------------------------------

    def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        _current.ctx = ctx
        path = self._path(ino)
        ufh = self.fs.opendir(path) if "opendir" in self._has else 0
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._dirs[fh] = _Dir(ufh)
        return Opened(fh=fh)

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int, listing: DirListing) -> None:
        _current.ctx = ctx
        d = self._dirs.get(fh)
        if d is None:
            raise OSError(errno.EBADF, f"unknown directory handle {fh}")
        if offset == 0 or d.entries is None:
            d.entries = [_dirent(item) for item in self.fs.readdir(self._path(ino), d.fh)]
        self._list(ino, d.entries, offset, listing)

    def _list(self, ino: int, entries: list[tuple[bytes, Attr, Attr | None]], offset: int,
              listing: DirListing) -> None:
        """Fill a READDIR(PLUS) reply from the listing kept for the open directory."""
        plus = listing.plus
        pnode = self._node(ino) if plus else None
        for index in range(offset, len(entries)):
            name, attr, full = entries[index]
            lookup = None
            if plus and full is not None and pnode is not None:
                lookup = functools.partial(self._plus_entry, pnode, name, full)
            if not listing.add(name, index + 1, attr, lookup):
                break

    def _plus_entry(self, pnode: _Node, name: bytes, attr: Attr) -> Entry:
        """A READDIRPLUS record's entry: one lookup of the named node, as LOOKUP would count."""
        sname = name_str(name)
        node = self._remember(pnode, sname, _join(pnode.path, sname))
        return Entry(node.nodeid, self._attr(attr, node.nodeid), self.entry_timeout, self.attr_timeout)

    def releasedir(self, ctx: Context, ino: int, fh: int) -> None:
        _current.ctx = ctx
        with self._lock:
            d = self._dirs.pop(fh, None)
            node = self._nodes.get(ino)
        if d is not None and "releasedir" in self._has:
            self.fs.releasedir(node.path if node is not None else "", d.fh)

    def fsyncdir(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        _current.ctx = ctx
        d = self._dirs.get(fh)
        self.fs.fsyncdir(self._path(ino), datasync, d.fh if d is not None else 0)

    # --- extended attributes --------------------------------------------------------------

    def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes:
        _current.ctx = ctx
        return bytes(self.fs.getxattr(self._path(ino), name_str(name)))

    def setxattr(self, ctx: Context, ino: int, name: bytes, value: bytes, flags: int) -> None:
        _current.ctx = ctx
        self.fs.setxattr(self._path(ino), name_str(name), value, flags)

    def listxattr(self, ctx: Context, ino: int) -> list[bytes]:
        _current.ctx = ctx
        return [os.fsencode(n) for n in self.fs.listxattr(self._path(ino))]

    def removexattr(self, ctx: Context, ino: int, name: bytes) -> None:
        _current.ctx = ctx
        self.fs.removexattr(self._path(ino), name_str(name))


_RENAME_EXCHANGE = 2


def _join(parent: str, name: str) -> str:
    return "/" + name if parent == "/" else parent + "/" + name


def _rename_node(node: _Node, old_parent: _Node, old: str, parent: _Node, name: str) -> None:
    """Move ``node``'s name ``old`` to ``name`` in ``parent`` and rewrite the paths below it
    (table lock held)."""
    parent.children[name] = node
    if (old_parent, old) in node.others:
        node.others[node.others.index((old_parent, old))] = (parent, name)
        return
    node.parent, node.name = parent, name
    stack = [node]
    while stack:
        n = stack.pop()
        n.path = _join(n.parent.path, n.name) if n.parent is not None else "/"
        stack.extend(n.children.values())


def _dirent(item: DirEntry | Any) -> tuple[bytes, Attr, Attr | None]:
    """One ``readdir`` item as (name, what a READDIR record needs, the whole stat if given)."""
    if isinstance(item, str | bytes):
        return name_bytes(item), Attr(UNKNOWN_INO, 0), None
    name, st = item[0], item[1]
    if st is None:
        return name_bytes(name), Attr(UNKNOWN_INO, 0), None
    attr = st if isinstance(st, Attr) else Attr.from_stat(st)
    return name_bytes(name), Attr(attr.ino or UNKNOWN_INO, stat.S_IFMT(attr.mode)), attr


def _is_coroutine(handler: object) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.isasyncgenfunction(handler)


async def _resolved(value: T) -> T:
    """What a path handler returned, awaited if it is a coroutine's (typed as its plain form's)."""
    if inspect.isawaitable(value):
        return cast(T, await value)
    return value


_background: set[object] = set()


def _aside(value: object) -> None:
    """Run what a coroutine handler returned where nothing waits for it (a release after a failure)."""
    if inspect.iscoroutine(value):
        import asyncio

        task = asyncio.ensure_future(value)
        _background.add(task)
        task.add_done_callback(_background.discard)


# --- the coroutine forms of PathFS's handlers ----------------------------------------------
# Installed by PathFS.__new__ in place of the plain ones when a path handler they call is a
# coroutine; each awaits what the plain form calls and keeps the table as the plain form does.


async def _lookup(self: PathFS, ctx: Context, parent: int, name: bytes) -> Entry:
    _task_context.set(ctx)
    if name in (b".", b".."):
        pnode = self._node(parent)
        node = pnode if name == b"." or pnode.parent is None else pnode.parent
        st = await _resolved(self.fs.getattr(node.path, None))
        with self._lock:
            node.lookups += 1
        return Entry(node.nodeid, self._attr(st, node.nodeid), self.entry_timeout, self.attr_timeout)
    pnode, sname, path = self._child_path(parent, name)
    return await _entry_for(self, pnode, sname, path)


async def _entry_for(self: PathFS, pnode: _Node, sname: str, path: str) -> Entry:
    st = await _resolved(self.fs.getattr(path, None))
    node = self._remember(pnode, sname, path)
    return Entry(node.nodeid, self._attr(st, node.nodeid), self.entry_timeout, self.attr_timeout)


async def _getattr(self: PathFS, ctx: Context, ino: int, fh: int | None) -> Attr:
    _task_context.set(ctx)
    return self._attr(await _resolved(self.fs.getattr(self._path(ino), self._user_fh(fh))), ino)


async def _setattr(self: PathFS, ctx: Context, ino: int, changes: Changes, fh: int | None) -> Attr:
    _task_context.set(ctx)
    path = self._path(ino)
    ufh = self._user_fh(fh)
    for change in self._changes(path, changes, ufh):
        await _resolved(change())
    return self._attr(await _resolved(self.fs.getattr(path, ufh)), ino)


async def _readlink(self: PathFS, ctx: Context, ino: int) -> bytes:
    _task_context.set(ctx)
    return os.fsencode(await _resolved(self.fs.readlink(self._path(ino))))


async def _access(self: PathFS, ctx: Context, ino: int, mask: int) -> None:
    _task_context.set(ctx)
    access: Callable[[str, int], object] = self.fs.access
    await _resolved(access(self._path(ino), mask))


async def _statfs(self: PathFS, ctx: Context, ino: int) -> StatfsReply:
    _task_context.set(ctx)
    st = await _resolved(self.fs.statfs(self._path(ino)))
    return st if isinstance(st, StatfsReply) else StatfsReply.from_statvfs(st)


def _making(make: Callable[[PathFS, str, Any], object]) -> Callable[..., Coroutine[object, object, Entry]]:
    """The coroutine form of mknod, mkdir and symlink: make the name, then look it up."""

    async def made(self: PathFS, ctx: Context, parent: int, name: bytes, *args: Any) -> Entry:
        _task_context.set(ctx)
        pnode, sname, path = self._child_path(parent, name)
        await _resolved(make(self, path, args))
        return await _entry_for(self, pnode, sname, path)

    return made


async def _link(self: PathFS, ctx: Context, ino: int, newparent: int, newname: bytes) -> Entry:
    _task_context.set(ctx)
    node = self._node(ino)
    pnode, sname, path = self._child_path(newparent, newname)
    link: Callable[[str, str], object] = self.fs.link
    await _resolved(link(path, node.path))
    return self._linked(node, pnode, sname, await _resolved(self.fs.getattr(path, None)))


def _removing(remove: Callable[[PathFS, str], object]) -> Callable[..., Coroutine[object, object, None]]:
    """The coroutine form of unlink and rmdir."""

    async def removed(self: PathFS, ctx: Context, parent: int, name: bytes) -> None:
        _task_context.set(ctx)
        pnode, sname, path = self._child_path(parent, name)
        await _resolved(remove(self, path))
        self._detach(pnode, sname)

    return removed


async def _rename(self: PathFS, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
                  flags: int) -> None:
    _task_context.set(ctx)
    src, sname, old = self._child_path(parent, name)
    dst, dname, new = self._child_path(newparent, newname)
    rename: Callable[[str, str, int], object] = self.fs.rename
    await _resolved(rename(old, new, flags))
    self._renamed(src, sname, dst, dname, flags)


async def _open(self: PathFS, ctx: Context, ino: int, flags: int) -> Opened:
    _task_context.set(ctx)
    result = await _resolved(self.fs.open(self._path(ino), flags))
    return self._opened(result, flags)


async def _create(self: PathFS, ctx: Context, parent: int, name: bytes, mode: int, umask: int,
                  flags: int) -> tuple[Entry, Opened]:
    _task_context.set(ctx)
    pnode, sname, path = self._child_path(parent, name)
    opened = self._created(path, await _resolved(self.fs.create(path, mode, flags)), flags)
    try:
        entry = await _entry_for(self, pnode, sname, path)
    except BaseException:
        release: Callable[[Context, int, int, int], object] = self.release
        await _resolved(release(ctx, 0, opened.fh, flags))
        raise
    return entry, opened


async def _read(self: PathFS, ctx: Context, ino: int, fh: int, offset: int,
                size: int) -> bytes | bytearray | memoryview:
    _task_context.set(ctx)
    return await _resolved(self.fs.read(self._path(ino), size, offset, self._handle(fh).fh))


async def _write(self: PathFS, ctx: Context, ino: int, fh: int, offset: int, data: memoryview, flags: int) -> int:
    _task_context.set(ctx)
    return await _resolved(self.fs.write(self._path(ino), bytes(data), offset, self._handle(fh).fh))


def _on_handle(call: Callable[[PathFS, str, int, Any], object]) -> Callable[..., Coroutine[object, object, None]]:
    """The coroutine form of flush, fsync and fallocate: the path handler gets the open file's handle."""

    async def called(self: PathFS, ctx: Context, ino: int, fh: int, *args: Any) -> None:
        _task_context.set(ctx)
        await _resolved(call(self, self._path(ino), self._handle(fh).fh, args))

    return called


async def _release(self: PathFS, ctx: Context, ino: int, fh: int, flags: int) -> None:
    _task_context.set(ctx)
    with self._lock:
        h = self._handles.pop(fh, None)
        node = self._nodes.get(ino)
    if h is None:
        return
    release: Callable[[str, int], object] = self.fs.release
    try:
        await _resolved(release(node.path if node is not None else "", h.fh))
    finally:
        if h.fd >= 0:
            os.close(h.fd)


async def _opendir(self: PathFS, ctx: Context, ino: int, flags: int) -> Opened:
    _task_context.set(ctx)
    ufh = await _resolved(self.fs.opendir(self._path(ino)))
    with self._lock:
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = _Dir(ufh)
    return Opened(fh=fh)


async def _readdir(self: PathFS, ctx: Context, ino: int, fh: int, offset: int, listing: DirListing) -> None:
    _task_context.set(ctx)
    d = self._dirs.get(fh)
    if d is None:
        raise OSError(errno.EBADF, f"unknown directory handle {fh}")
    if offset == 0 or d.entries is None:
        items: object = self.fs.readdir(self._path(ino), d.fh)
        if isinstance(items, AsyncIterable):
            d.entries = [_dirent(item) async for item in items]
        else:
            d.entries = [_dirent(item) for item in await _resolved(cast(Iterable[DirEntry], items))]
    self._list(ino, d.entries, offset, listing)


async def _releasedir(self: PathFS, ctx: Context, ino: int, fh: int) -> None:
    _task_context.set(ctx)
    with self._lock:
        d = self._dirs.pop(fh, None)
        node = self._nodes.get(ino)
    if d is not None:
        releasedir: Callable[[str, int], object] = self.fs.releasedir
        await _resolved(releasedir(node.path if node is not None else "", d.fh))


async def _fsyncdir(self: PathFS, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
    _task_context.set(ctx)
    d = self._dirs.get(fh)
    fsyncdir: Callable[[str, bool, int], object] = self.fs.fsyncdir
    await _resolved(fsyncdir(self._path(ino), datasync, d.fh if d is not None else 0))


async def _getxattr(self: PathFS, ctx: Context, ino: int, name: bytes) -> bytes:
    _task_context.set(ctx)
    return bytes(await _resolved(self.fs.getxattr(self._path(ino), name_str(name))))


async def _setxattr(self: PathFS, ctx: Context, ino: int, name: bytes, value: bytes, flags: int) -> None:
    _task_context.set(ctx)
    setxattr: Callable[[str, str, bytes, int], object] = self.fs.setxattr
    await _resolved(setxattr(self._path(ino), name_str(name), value, flags))


async def _listxattr(self: PathFS, ctx: Context, ino: int) -> list[bytes]:
    _task_context.set(ctx)
    return [os.fsencode(n) for n in await _resolved(self.fs.listxattr(self._path(ino)))]


async def _removexattr(self: PathFS, ctx: Context, ino: int, name: bytes) -> None:
    _task_context.set(ctx)
    removexattr: Callable[[str, str], object] = self.fs.removexattr
    await _resolved(removexattr(self._path(ino), name_str(name)))


_COROUTINE_FORMS: dict[str, Callable[..., Coroutine[object, object, object]]] = {
    "lookup": _lookup, "getattr": _getattr, "setattr": _setattr, "readlink": _readlink, "access": _access,
    "statfs": _statfs,
    "mknod": _making(lambda self, path, a: self.fs.mknod(path, a[0], a[1])),
    "mkdir": _making(lambda self, path, a: self.fs.mkdir(path, a[0])),
    "symlink": _making(lambda self, path, a: self.fs.symlink(path, os.fsdecode(a[0]))),
    "link": _link, "unlink": _removing(lambda self, path: self.fs.unlink(path)),
    "rmdir": _removing(lambda self, path: self.fs.rmdir(path)), "rename": _rename,
    "open": _open, "create": _create, "read": _read, "write": _write,
    "flush": _on_handle(lambda self, path, ufh, a: self.fs.flush(path, ufh)),
    "fsync": _on_handle(lambda self, path, ufh, a: self.fs.fsync(path, a[0], ufh)),
    "fallocate": _on_handle(lambda self, path, ufh, a: self.fs.fallocate(path, a[2], a[0], a[1], ufh)),
    "release": _release, "opendir": _opendir, "readdir": _readdir, "releasedir": _releasedir,
    "fsyncdir": _fsyncdir, "getxattr": _getxattr, "setxattr": _setxattr, "listxattr": _listxattr,
    "removexattr": _removexattr,
}
