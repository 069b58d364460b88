"""An in-memory filesystem on the path-based layer: files, directories, symlinks, hard links,
rename (with RENAME_NOREPLACE and RENAME_EXCHANGE), xattrs, chmod/chown/utimens.

Run: ``python -m fusepass.examples.path_memfs MOUNTPOINT`` (foreground; Ctrl-C unmounts).
The same filesystem as ``fusepass.examples.memfs``, written against paths instead of inodes:
the layer keeps the node table, lookup counts and handles, so this file only keeps files.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from fusepass import Attr, MountOptions, StatfsReply
from fusepass.pathfs import DirEntry, PathFS, PathOperations, context
from fusepass.serve import run_foreground

MAX_FILE_SIZE = 1 << 30  # it all lives in this process's memory
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_inos = itertools.count(2)


@dataclass(slots=True, eq=False)
class Node:
    mode: int
    uid: int
    gid: int
    rdev: int = 0
    nlink: int = 1
    ino: int = field(default_factory=lambda: next(_inos))
    data: bytearray = field(default_factory=bytearray)
    target: str = ""
    children: dict[str, Node] = field(default_factory=dict)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    atime_ns: int = field(default_factory=time.time_ns)
    mtime_ns: int = 0
    ctime_ns: int = 0

    def __post_init__(self) -> None:
        self.mtime_ns = self.ctime_ns = self.atime_ns

    def attr(self) -> Attr:
        size = len(self.target) if stat.S_ISLNK(self.mode) else len(self.data)
        return Attr(ino=self.ino, mode=self.mode, nlink=self.nlink, uid=self.uid, gid=self.gid, rdev=self.rdev,
                    size=size, blocks=(size + 511) // 512, blksize=4096,
                    atime_ns=self.atime_ns, mtime_ns=self.mtime_ns, ctime_ns=self.ctime_ns)


class PathMemFS(PathOperations):
    """All state behind one lock: handlers run on several worker threads."""

    readdirplus = True  # readdir yields every name's attributes

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.root = Node(stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), nlink=2, ino=1)
        self.open_files: dict[int, Node] = {}  # handle -> node, so unlinked files stay readable
        self.handles = itertools.count(1)

    # helpers ----------------------------------------------------------------------------------

    def _find(self, path: str) -> Node:
        node = self.root
        for part in filter(None, path.split("/")):
            if not stat.S_ISDIR(node.mode):
                raise OSError(errno.ENOTDIR, "not a directory", path)
            try:
                node = node.children[part]
            except KeyError:
                raise OSError(errno.ENOENT, "no such file", path) from None
        return node

    def _node(self, path: str, fh: int | None) -> Node:
        return self.open_files[fh] if fh is not None and fh in self.open_files else self._find(path)

    def _parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rpartition("/")
        parent = self._find(head)
        if not stat.S_ISDIR(parent.mode):
            raise OSError(errno.ENOTDIR, "not a directory", head)
        if len(name.encode()) > 255:
            raise OSError(errno.ENAMETOOLONG, "name too long", path)
        return parent, name

    def _add(self, path: str, mode: int, **kw: object) -> Node:
        parent, name = self._parent(path)
        if name in parent.children:
            raise OSError(errno.EEXIST, "file exists", path)
        ctx = context()
        uid, gid = (ctx.uid, ctx.gid) if ctx else (os.getuid(), os.getgid())
        node = Node(mode, uid, gid, **kw)  # type: ignore[arg-type]
        if stat.S_ISDIR(mode):
            node.nlink = 2
            parent.nlink += 1
        parent.children[name] = node
        parent.mtime_ns = parent.ctime_ns = time.time_ns()
        return node

    def _remove(self, parent: Node, name: str) -> None:
        node = parent.children.pop(name)
        if stat.S_ISDIR(node.mode):
            parent.nlink -= 1
            node.nlink = 0
        else:
            node.nlink -= 1
        node.ctime_ns = parent.mtime_ns = parent.ctime_ns = time.time_ns()

    # attributes -------------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None) -> Attr:
        with self.lock:
            return self._node(path, fh).attr()

    def chmod(self, path: str, mode: int, fh: int | None) -> None:
        with self.lock:
            node = self._node(path, fh)
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
            node.ctime_ns = time.time_ns()

    def chown(self, path: str, uid: int, gid: int, fh: int | None) -> None:
        with self.lock:
            node = self._node(path, fh)
            node.uid = node.uid if uid == -1 else uid
            node.gid = node.gid if gid == -1 else gid
            node.ctime_ns = time.time_ns()

    def truncate(self, path: str, length: int, fh: int | None) -> None:
        with self.lock:
            node = self._node(path, fh)
            if not stat.S_ISREG(node.mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            if length > MAX_FILE_SIZE:
                raise OSError(errno.EFBIG, "file too large for memory", path)
            if length < len(node.data):
                del node.data[length:]
            else:
                node.data.extend(bytes(length - len(node.data)))
            node.mtime_ns = node.ctime_ns = time.time_ns()

    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None, fh: int | None) -> None:
        with self.lock:
            node = self._node(path, fh)
            node.atime_ns = node.atime_ns if atime_ns is None else atime_ns
            node.mtime_ns = node.mtime_ns if mtime_ns is None else mtime_ns
            node.ctime_ns = time.time_ns()

    def readlink(self, path: str) -> str:
        with self.lock:
            node = self._find(path)
            if not stat.S_ISLNK(node.mode):
                raise OSError(errno.EINVAL, "not a symbolic link", path)
            return node.target

    def statfs(self, path: str) -> StatfsReply:
        with self.lock:
            nodes = list(self._walk(self.root))
        used = sum(len(n.data) for n in nodes) // 4096
        total = 1 << 20
        return StatfsReply(blocks=total, bfree=total - used, bavail=total - used, files=total,
                           ffree=total - len(nodes), bsize=4096, namelen=255, frsize=4096)

    def _walk(self, node: Node) -> Iterator[Node]:
        yield node
        for child in node.children.values():
            yield from self._walk(child)

    # namespace --------------------------------------------------------------------------------

    def mknod(self, path: str, mode: int, rdev: int) -> None:
        with self.lock:
            self._add(path, mode, rdev=rdev)

    def mkdir(self, path: str, mode: int) -> None:
        with self.lock:
            self._add(path, stat.S_IFDIR | stat.S_IMODE(mode))

    def symlink(self, path: str, target: str) -> None:
        with self.lock:
            self._add(path, stat.S_IFLNK | 0o777, target=target)

    def link(self, path: str, existing: str) -> None:
        with self.lock:
            node = self._find(existing)
            parent, name = self._parent(path)
            if name in parent.children:
                raise OSError(errno.EEXIST, "file exists", path)
            parent.children[name] = node
            node.nlink += 1
            node.ctime_ns = parent.mtime_ns = parent.ctime_ns = time.time_ns()

    def unlink(self, path: str) -> None:
        with self.lock:
            parent, name = self._parent(path)
            if stat.S_ISDIR(self._find(path).mode):
                raise OSError(errno.EISDIR, "is a directory", path)
            self._remove(parent, name)

    def rmdir(self, path: str) -> None:
        with self.lock:
            parent, name = self._parent(path)
            node = self._find(path)
            if not stat.S_ISDIR(node.mode):
                raise OSError(errno.ENOTDIR, "not a directory", path)
            if node.children:
                raise OSError(errno.ENOTEMPTY, "directory not empty", path)
            self._remove(parent, name)

    def rename(self, old: str, new: str, flags: int) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise OSError(errno.EINVAL, "unsupported rename flags")
        with self.lock:
            src, name = self._parent(old)
            dst, newname = self._parent(new)
            node = self._find(old)
            target = dst.children.get(newname)
            if stat.S_ISDIR(node.mode) and (new + "/").startswith(old + "/"):
                raise OSError(errno.EINVAL, "cannot move a directory into itself", new)
            now = time.time_ns()
            if flags & RENAME_EXCHANGE:
                if target is None:
                    raise OSError(errno.ENOENT, "no such file", new)
                if stat.S_ISDIR(target.mode) and (old + "/").startswith(new + "/"):
                    raise OSError(errno.EINVAL, "cannot move a directory into itself", old)
                src.children[name], dst.children[newname] = target, node
                for moved, into, out in ((node, dst, src), (target, src, dst)):
                    if stat.S_ISDIR(moved.mode):
                        into.nlink += 1
                        out.nlink -= 1
            else:
                if target is node:
                    return
                if target is not None:
                    if flags & RENAME_NOREPLACE:
                        raise OSError(errno.EEXIST, "file exists", new)
                    if stat.S_ISDIR(node.mode) != stat.S_ISDIR(target.mode):
                        raise OSError(errno.EISDIR if stat.S_ISDIR(target.mode) else errno.ENOTDIR, "type mismatch")
                    if target.children:
                        raise OSError(errno.ENOTEMPTY, "directory not empty", new)
                    self._remove(dst, newname)
                del src.children[name]
                dst.children[newname] = node
                if stat.S_ISDIR(node.mode):
                    src.nlink -= 1
                    dst.nlink += 1
            node.ctime_ns = src.mtime_ns = src.ctime_ns = dst.mtime_ns = dst.ctime_ns = now

    # files ------------------------------------------------------------------------------------

    def _handle(self, node: Node) -> int:
        fh = next(self.handles)
        self.open_files[fh] = node
        return fh

    def open(self, path: str, flags: int) -> int:
        with self.lock:
            return self._handle(self._find(path))

    def create(self, path: str, mode: int, flags: int) -> int:
        with self.lock:
            return self._handle(self._add(path, stat.S_IFREG | stat.S_IMODE(mode)))

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self.lock:
            node = self.open_files[fh]
            node.atime_ns = time.time_ns()
            return bytes(node.data[offset:offset + size])

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self.lock:
            node = self.open_files[fh]
            end = offset + len(data)
            if end > MAX_FILE_SIZE:
                raise OSError(errno.EFBIG, "file too large for memory", path)
            if end > len(node.data):
                node.data.extend(bytes(end - len(node.data)))
            node.data[offset:end] = data
            node.mtime_ns = node.ctime_ns = time.time_ns()
            node.mode &= ~(stat.S_ISUID | stat.S_ISGID)
            return len(data)

    def release(self, path: str, fh: int) -> None:
        with self.lock:
            del self.open_files[fh]

    def readdir(self, path: str, fh: int) -> Sequence[DirEntry]:
        with self.lock:
            node = self._find(path)
            if not stat.S_ISDIR(node.mode):
                raise OSError(errno.ENOTDIR, "not a directory", path)
            return [(".", node.attr()), ("..", node.attr())] + [(n, c.attr()) for n, c in node.children.items()]

    # extended attributes ----------------------------------------------------------------------

    def getxattr(self, path: str, name: str) -> bytes:
        with self.lock:
            try:
                return self._find(path).xattrs[name]
            except KeyError:
                raise OSError(errno.ENODATA, "no such attribute", path) from None

    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        with self.lock:
            node = self._find(path)
            if flags & os.XATTR_CREATE and name in node.xattrs:
                raise OSError(errno.EEXIST, "attribute exists", path)
            if flags & os.XATTR_REPLACE and name not in node.xattrs:
                raise OSError(errno.ENODATA, "no such attribute", path)
            node.xattrs[name] = value
            node.ctime_ns = time.time_ns()

    def listxattr(self, path: str) -> list[str]:
        with self.lock:
            return list(self._find(path).xattrs)

    def removexattr(self, path: str, name: str) -> None:
        with self.lock:
            if self._find(path).xattrs.pop(name, None) is None:
                raise OSError(errno.ENODATA, "no such attribute", path)


def main() -> int:
    return run_foreground(lambda args: PathFS(PathMemFS()), description=__doc__.splitlines()[0],
                          defaults=MountOptions(fsname="path_memfs", subtype="path_memfs", default_permissions=True))


if __name__ == "__main__":
    raise SystemExit(main())
