"""An in-memory filesystem: files, directories, symlinks, hard links, rename, xattrs, chmod/chown/utimens.

Run: ``python -m fusepass.examples.memfs MOUNTPOINT`` (foreground; Ctrl-C unmounts).
Everything lives in this process and is gone when it exits.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from fusepass import Attr, Changes, Context, DirListing, Entry, MountOptions, Opened, Operations, StatfsReply
from fusepass.ops import ROOT_ID
from fusepass.serve import run_foreground

XATTR_CREATE, XATTR_REPLACE = 1, 2
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


@dataclass(slots=True)
class Node:
    ino: int
    mode: int
    uid: int
    gid: int
    rdev: int = 0
    nlink: int = 1
    data: bytearray = field(default_factory=bytearray)
    target: bytes = b""
    children: dict[bytes, int] = field(default_factory=dict)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    lookups: int = 0
    opens: int = 0

    def attr(self) -> Attr:
        size = len(self.target) if stat.S_ISLNK(self.mode) else len(self.data)
        return Attr(
            ino=self.ino, mode=self.mode, nlink=self.nlink, uid=self.uid, gid=self.gid, rdev=self.rdev,
            size=size, blocks=(size + 511) // 512, blksize=4096,
            atime_ns=self.atime_ns, mtime_ns=self.mtime_ns, ctime_ns=self.ctime_ns,
        )


class MemFS(Operations):
    """All state behind one lock: handlers run on several worker threads."""

    entry_timeout = 1.0
    attr_timeout = 1.0
    readdirplus = True
    max_file_size = 1 << 30  # it all lives in this process's memory

    def __init__(self) -> None:
        self.lock = threading.RLock()
        now = time.time_ns()
        root = Node(ROOT_ID, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), nlink=2,
                    atime_ns=now, mtime_ns=now, ctime_ns=now)
        root.children[b".."] = ROOT_ID
        self.nodes: dict[int, Node] = {ROOT_ID: root}
        self.next_ino = ROOT_ID + 1

    # helpers -------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise OSError(errno.ENOENT, "stale node") from None

    def _dir(self, ino: int) -> Node:
        node = self._node(ino)
        if not stat.S_ISDIR(node.mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        return node

    def _child(self, parent: int, name: bytes) -> Node:
        ino = self._dir(parent).children.get(name)
        if ino is None or name == b"..":
            raise OSError(errno.ENOENT, "no such entry")
        return self.nodes[ino]

    def _entry(self, node: Node) -> Entry:
        node.lookups += 1
        return Entry(node.ino, node.attr(), self.entry_timeout, self.attr_timeout)

    def _check_name(self, name: bytes) -> None:
        if len(name) > 255:
            raise OSError(errno.ENAMETOOLONG, "name too long")

    def _new(self, ctx: Context, parent: int, name: bytes, mode: int, **kw: object) -> Entry:
        self._check_name(name)
        pnode = self._dir(parent)
        if name in pnode.children:
            raise OSError(errno.EEXIST, "exists")
        now = time.time_ns()
        gid = pnode.gid if pnode.mode & stat.S_ISGID else ctx.gid
        if stat.S_ISDIR(mode) and pnode.mode & stat.S_ISGID:
            mode |= stat.S_ISGID
        node = Node(self.next_ino, mode, ctx.uid, gid, atime_ns=now, mtime_ns=now, ctime_ns=now, **kw)  # type: ignore[arg-type]
        self.next_ino += 1
        if stat.S_ISDIR(mode):
            node.nlink = 2
            node.children[b".."] = parent
            pnode.nlink += 1
        self.nodes[node.ino] = node
        pnode.children[name] = node.ino
        pnode.mtime_ns = pnode.ctime_ns = now
        return self._entry(node)

    def _maybe_free(self, node: Node) -> None:
        if node.nlink == 0 and node.lookups == 0 and node.opens == 0 and node.ino != ROOT_ID:
            self.nodes.pop(node.ino, None)

    def _unlink_node(self, pnode: Node, name: bytes, node: Node, now: int) -> None:
        del pnode.children[name]
        if stat.S_ISDIR(node.mode):
            node.nlink = 0
            pnode.nlink -= 1
        else:
            node.nlink -= 1
        node.ctime_ns = pnode.mtime_ns = pnode.ctime_ns = now
        self._maybe_free(node)

    # names and attributes ----------------------------------------------------

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        with self.lock:
            if name == b".":
                return self._entry(self._dir(parent))
            if name == b"..":
                return self._entry(self._node(self._dir(parent).children[b".."]))
            return self._entry(self._child(parent, name))

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        with self.lock:
            for ino, n in items:
                node = self.nodes.get(ino)
                if node is not None:
                    node.lookups = max(0, node.lookups - n)
                    self._maybe_free(node)

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> Attr:
        with self.lock:
            return self._node(ino).attr()

    def setattr(self, ctx: Context, ino: int, changes: Changes, fh: int | None) -> Attr:
        with self.lock:
            node = self._node(ino)
            if changes.size is not None:  # validate first: a refused change applies nothing
                if not stat.S_ISREG(node.mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                if changes.size > self.max_file_size:
                    raise OSError(errno.EFBIG, "file too large for memory")
            now = time.time_ns()
            if changes.mode is not None:
                node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(changes.mode)
            if changes.uid is not None:
                node.uid = changes.uid
            if changes.gid is not None:
                node.gid = changes.gid
            if changes.size is not None:
                if changes.size < len(node.data):
                    del node.data[changes.size:]
                else:
                    node.data.extend(bytes(changes.size - len(node.data)))
                node.mtime_ns = now
            if changes.atime_now:
                node.atime_ns = now
            elif changes.atime_ns is not None:
                node.atime_ns = changes.atime_ns
            if changes.mtime_now:
                node.mtime_ns = now
            elif changes.mtime_ns is not None:
                node.mtime_ns = changes.mtime_ns
            node.ctime_ns = changes.ctime_ns if changes.ctime_ns is not None else now
            return node.attr()

    def readlink(self, ctx: Context, ino: int) -> bytes:
        with self.lock:
            node = self._node(ino)
            if not stat.S_ISLNK(node.mode):
                raise OSError(errno.EINVAL, "not a symlink")
            return node.target

    def statfs(self, ctx: Context, ino: int) -> StatfsReply:
        with self.lock:
            used = sum(len(n.data) for n in self.nodes.values()) // 4096
            return StatfsReply(blocks=1 << 20, bfree=(1 << 20) - used, bavail=(1 << 20) - used,
                               files=1 << 20, ffree=(1 << 20) - len(self.nodes), bsize=4096, namelen=255, frsize=4096)

    # namespace ------------------------------------------------------------------

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int) -> Entry:
        with self.lock:
            return self._new(ctx, parent, name, mode, rdev=rdev)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        with self.lock:
            return self._new(ctx, parent, name, stat.S_IFDIR | (mode & 0o7777))

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        with self.lock:
            return self._new(ctx, parent, name, stat.S_IFLNK | 0o777, target=target)

    def link(self, ctx: Context, ino: int, newparent: int, newname: bytes) -> Entry:
        with self.lock:
            self._check_name(newname)
            node = self._node(ino)
            if stat.S_ISDIR(node.mode):
                raise OSError(errno.EPERM, "hard links to directories are not allowed")
            pnode = self._dir(newparent)
            if newname in pnode.children:
                raise OSError(errno.EEXIST, "exists")
            pnode.children[newname] = ino
            node.nlink += 1
            node.ctime_ns = pnode.mtime_ns = pnode.ctime_ns = time.time_ns()
            return self._entry(node)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        with self.lock:
            node = self._child(parent, name)
            if stat.S_ISDIR(node.mode):
                raise OSError(errno.EISDIR, "is a directory")
            self._unlink_node(self.nodes[parent], name, node, time.time_ns())

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        with self.lock:
            node = self._child(parent, name)
            if not stat.S_ISDIR(node.mode):
                raise OSError(errno.ENOTDIR, "not a directory")
            if len(node.children) > 1:
                raise OSError(errno.ENOTEMPTY, "directory not empty")
            self._unlink_node(self.nodes[parent], name, node, time.time_ns())

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        with self.lock:
            self._check_name(newname)
            src_dir, dst_dir = self._dir(parent), self._dir(newparent)
            node = self._child(parent, name)
            target_ino = dst_dir.children.get(newname)
            if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
                raise OSError(errno.EINVAL, "unsupported rename flags")
            if stat.S_ISDIR(node.mode) and self._is_ancestor(node.ino, newparent):
                raise OSError(errno.EINVAL, "cannot move a directory into itself")
            now = time.time_ns()
            if flags & RENAME_EXCHANGE:
                if target_ino is None:
                    raise OSError(errno.ENOENT, "exchange target does not exist")
                target = self.nodes[target_ino]
                if stat.S_ISDIR(target.mode) and self._is_ancestor(target_ino, parent):
                    raise OSError(errno.EINVAL, "cannot move a directory into itself")
                src_dir.children[name], dst_dir.children[newname] = target_ino, node.ino
                for moved, new_dir, old_dir in ((node, dst_dir, src_dir), (target, src_dir, dst_dir)):
                    if stat.S_ISDIR(moved.mode) and new_dir is not old_dir:
                        moved.children[b".."] = new_dir.ino
                        new_dir.nlink += 1
                        old_dir.nlink -= 1
                    moved.ctime_ns = now
            else:
                if target_ino is not None:
                    if flags & RENAME_NOREPLACE:
                        raise OSError(errno.EEXIST, "target exists")
                    if target_ino == node.ino:
                        return
                    target = self.nodes[target_ino]
                    if stat.S_ISDIR(node.mode) != stat.S_ISDIR(target.mode):
                        raise OSError(errno.EISDIR if stat.S_ISDIR(target.mode) else errno.ENOTDIR, "type mismatch")
                    if stat.S_ISDIR(target.mode) and len(target.children) > 1:
                        raise OSError(errno.ENOTEMPTY, "target directory not empty")
                    self._unlink_node(dst_dir, newname, target, now)
                del src_dir.children[name]
                dst_dir.children[newname] = node.ino
                if stat.S_ISDIR(node.mode) and src_dir is not dst_dir:
                    node.children[b".."] = dst_dir.ino
                    dst_dir.nlink += 1
                    src_dir.nlink -= 1
                node.ctime_ns = now
            src_dir.mtime_ns = src_dir.ctime_ns = dst_dir.mtime_ns = dst_dir.ctime_ns = now

    def _is_ancestor(self, ino: int, of: int) -> bool:
        cur = of
        while True:
            if cur == ino:
                return True
            if cur == ROOT_ID:
                return False
            cur = self.nodes[cur].children[b".."]

    # files ---------------------------------------------------------------------

    def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        with self.lock:
            node = self._node(ino)
            if flags & os.O_TRUNC and stat.S_ISREG(node.mode):
                node.data.clear()
                node.mtime_ns = node.ctime_ns = time.time_ns()
            node.opens += 1
            return Opened(fh=ino)

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int, flags: int) -> tuple[Entry, Opened]:
        with self.lock:
            entry = self._new(ctx, parent, name, stat.S_IFREG | (mode & 0o7777))
            self.nodes[entry.nodeid].opens += 1
            return entry, Opened(fh=entry.nodeid)

    def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> bytes:
        with self.lock:
            node = self._node(ino)
            node.atime_ns = time.time_ns()
            return bytes(node.data[offset:offset + size])

    def write(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview, flags: int) -> int:
        with self.lock:
            node = self._node(ino)
            end = offset + len(data)
            if end > self.max_file_size:
                raise OSError(errno.EFBIG, "file too large for memory")
            if end > len(node.data):
                node.data.extend(bytes(end - len(node.data)))
            node.data[offset:end] = data
            node.mtime_ns = node.ctime_ns = time.time_ns()
            if node.mode & (stat.S_ISUID | stat.S_ISGID):
                node.mode &= ~(stat.S_ISUID | stat.S_ISGID)
            return len(data)

    def flush(self, ctx: Context, ino: int, fh: int, lock_owner: int) -> None:
        pass

    def fsync(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        pass

    def release(self, ctx: Context, ino: int, fh: int, flags: int) -> None:
        with self.lock:
            node = self.nodes.get(ino)
            if node is not None:
                node.opens -= 1
                self._maybe_free(node)

    # directories ------------------------------------------------------------------

    def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        with self.lock:
            self._dir(ino)
            return Opened(fh=ino)

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int, listing: DirListing) -> None:
        with self.lock:
            node = self._dir(ino)
            names = [(b".", ino), (b"..", node.children[b".."])] + [
                (n, i) for n, i in node.children.items() if n != b".."
            ]
            for index in range(offset, len(names)):
                name, child_ino = names[index]
                child = self.nodes[child_ino]
                if not listing.add(name, index + 1, child.attr(), functools.partial(self._entry, child)):
                    break

    # extended attributes -----------------------------------------------------------

    def setxattr(self, ctx: Context, ino: int, name: bytes, value: bytes, flags: int) -> None:
        with self.lock:
            node = self._node(ino)
            if flags & XATTR_CREATE and name in node.xattrs:
                raise OSError(errno.EEXIST, "attribute exists")
            if flags & XATTR_REPLACE and name not in node.xattrs:
                raise OSError(errno.ENODATA, "no such attribute")
            node.xattrs[name] = value
            node.ctime_ns = time.time_ns()

    def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes:
        with self.lock:
            try:
                return self._node(ino).xattrs[name]
            except KeyError:
                raise OSError(errno.ENODATA, "no such attribute") from None

    def listxattr(self, ctx: Context, ino: int) -> list[bytes]:
        with self.lock:
            return list(self._node(ino).xattrs)

    def removexattr(self, ctx: Context, ino: int, name: bytes) -> None:
        with self.lock:
            node = self._node(ino)
            if node.xattrs.pop(name, None) is None:
                raise OSError(errno.ENODATA, "no such attribute")
            node.ctime_ns = time.time_ns()


def main() -> int:
    return run_foreground(lambda args: MemFS(), description=__doc__.splitlines()[0],
                          defaults=MountOptions(fsname="memfs", subtype="memfs", default_permissions=True))


if __name__ == "__main__":
    raise SystemExit(main())
