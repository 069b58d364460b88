"""Sans-I/O FUSE protocol: request bytes in, one typed request out; reply values in, bytes out.

Nothing here touches a file descriptor. ``Parser.parse`` turns one message read from
``/dev/fuse`` into a frozen dataclass per opcode, or raises ``ProtocolError`` naming what
is wrong; the ``encode_*`` functions build complete reply messages whose length field
always matches the bytes produced.
"""

from __future__ import annotations

import errno as errno_mod
import functools
import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from . import abi

Buffer = bytes | bytearray | memoryview


class ProtocolError(Exception):
    """A malformed request. ``header`` is set when the header itself was readable, so the
    server can still answer that request, with ``errno`` (EIO, or EINVAL for a size beyond
    what was negotiated)."""

    def __init__(self, message: str, header: InHeader | None = None, errno: int = errno_mod.EIO) -> None:
        super().__init__(message)
        self.header = header
        self.errno = errno


class InHeader(NamedTuple):
    """The fuse_in_header fields we use (a tuple: built for every request, so it must be cheap)."""

    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int


_new_tuple = tuple.__new__  # builds an InHeader without NamedTuple's Python-level __new__

# --- requests ---------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Init:
    header: InHeader
    major: int
    minor: int
    max_readahead: int
    flags: int  # the 64-bit word: flags | flags2 << 32


@dataclass(slots=True, frozen=True)
class Destroy:
    header: InHeader


@dataclass(slots=True, frozen=True)
class Lookup:
    header: InHeader
    name: bytes


@dataclass(slots=True, frozen=True)
class Forget:
    """FORGET and BATCH_FORGET alike: (nodeid, nlookup) pairs."""

    header: InHeader
    items: tuple[tuple[int, int], ...]


@dataclass(slots=True, frozen=True)
class Getattr:
    header: InHeader
    fh: int | None


@dataclass(slots=True, frozen=True)
class Setattr:
    header: InHeader
    valid: int
    fh: int | None
    size: int
    lock_owner: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    uid: int
    gid: int


@dataclass(slots=True, frozen=True)
class Readlink:
    header: InHeader


@dataclass(slots=True, frozen=True)
class Symlink:
    header: InHeader
    name: bytes
    target: bytes


@dataclass(slots=True, frozen=True)
class Mknod:
    header: InHeader
    mode: int
    rdev: int
    umask: int
    name: bytes


@dataclass(slots=True, frozen=True)
class Mkdir:
    header: InHeader
    mode: int
    umask: int
    name: bytes


@dataclass(slots=True, frozen=True)
class Unlink:
    header: InHeader
    name: bytes


@dataclass(slots=True, frozen=True)
class Rmdir:
    header: InHeader
    name: bytes


@dataclass(slots=True, frozen=True)
class Rename:
    """RENAME and RENAME2 alike (flags 0 for plain RENAME)."""

    header: InHeader
    newdir: int
    flags: int
    name: bytes
    newname: bytes


@dataclass(slots=True, frozen=True)
class Link:
    header: InHeader
    oldnodeid: int
    newname: bytes


@dataclass(slots=True, frozen=True)
class Open:
    """OPEN and OPENDIR."""

    header: InHeader
    flags: int
    open_flags: int


@dataclass(slots=True, frozen=True)
class Create:
    """CREATE and TMPFILE."""

    header: InHeader
    flags: int
    mode: int
    umask: int
    open_flags: int
    name: bytes


@dataclass(slots=True, frozen=True)
class Read:
    """READ, READDIR and READDIRPLUS."""

    header: InHeader
    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int


@dataclass(slots=True, frozen=True)
class Write:
    header: InHeader
    fh: int
    offset: int
    write_flags: int
    lock_owner: int
    flags: int
    data: memoryview  # a view of the read buffer: valid only while the request is handled


@dataclass(slots=True, frozen=True)
class Statfs:
    header: InHeader


@dataclass(slots=True, frozen=True)
class Release:
    """RELEASE and RELEASEDIR."""

    header: InHeader
    fh: int
    flags: int
    release_flags: int
    lock_owner: int


@dataclass(slots=True, frozen=True)
class Fsync:
    """FSYNC and FSYNCDIR."""

    header: InHeader
    fh: int
    datasync: bool


@dataclass(slots=True, frozen=True)
class Setxattr:
    header: InHeader
    flags: int
    setxattr_flags: int
    name: bytes
    value: bytes


@dataclass(slots=True, frozen=True)
class Getxattr:
    header: InHeader
    size: int
    name: bytes


@dataclass(slots=True, frozen=True)
class Listxattr:
    header: InHeader
    size: int


@dataclass(slots=True, frozen=True)
class Removexattr:
    header: InHeader
    name: bytes


@dataclass(slots=True, frozen=True)
class Flush:
    header: InHeader
    fh: int
    lock_owner: int


@dataclass(slots=True, frozen=True)
class Lock:
    """GETLK, SETLK and SETLKW."""

    header: InHeader
    fh: int
    owner: int
    start: int
    end: int
    type: int
    pid: int
    lk_flags: int


@dataclass(slots=True, frozen=True)
class Access:
    header: InHeader
    mask: int


@dataclass(slots=True, frozen=True)
class Interrupt:
    header: InHeader
    target: int


@dataclass(slots=True, frozen=True)
class Bmap:
    header: InHeader
    block: int
    blocksize: int


@dataclass(slots=True, frozen=True)
class Ioctl:
    header: InHeader
    fh: int
    flags: int
    cmd: int
    arg: int
    out_size: int
    data: bytes


@dataclass(slots=True, frozen=True)
class Poll:
    header: InHeader
    fh: int
    kh: int
    flags: int
    events: int


@dataclass(slots=True, frozen=True)
class NotifyReply:
    header: InHeader
    offset: int
    data: bytes


@dataclass(slots=True, frozen=True)
class Fallocate:
    header: InHeader
    fh: int
    offset: int
    length: int
    mode: int


@dataclass(slots=True, frozen=True)
class Lseek:
    header: InHeader
    fh: int
    offset: int
    whence: int


@dataclass(slots=True, frozen=True)
class CopyFileRange:
    """COPY_FILE_RANGE and COPY_FILE_RANGE_64."""

    header: InHeader
    fh_in: int
    off_in: int
    nodeid_out: int
    fh_out: int
    off_out: int
    length: int
    flags: int


@dataclass(slots=True, frozen=True)
class Syncfs:
    header: InHeader


@dataclass(slots=True, frozen=True)
class Statx:
    header: InHeader
    fh: int | None
    sx_flags: int
    sx_mask: int


@dataclass(slots=True, frozen=True)
class Unknown:
    """An opcode this library does not parse; it is answered with ENOSYS."""

    header: InHeader


Request = (
    Init | Destroy | Lookup | Forget | Getattr | Setattr | Readlink | Symlink | Mknod | Mkdir |
    Unlink | Rmdir | Rename | Link | Open | Create | Read | Write | Statfs | Release | Fsync |
    Setxattr | Getxattr | Listxattr | Removexattr | Flush | Lock | Access | Interrupt | Bmap |
    Ioctl | Poll | NotifyReply | Fallocate | Lseek | CopyFileRange | Syncfs | Statx | Unknown
)


# --- parsing ----------------------------------------------------------------


def _fixed(body: memoryview, st: abi.struct.Struct, h: InHeader) -> tuple[int, ...]:
    if len(body) < st.size:
        raise ProtocolError(
            f"{_opname(h.opcode)}: body is {len(body)} bytes, expected at least {st.size}", h
        )
    return st.unpack_from(body)


def _names(body: memoryview, count: int, h: InHeader) -> list[bytes]:
    """Split ``count`` NUL-terminated names off the start of ``body``."""
    data = bytes(body)
    out: list[bytes] = []
    pos = 0
    for _ in range(count):
        end = data.find(b"\0", pos)
        if end < 0:
            raise ProtocolError(f"{_opname(h.opcode)}: name is not NUL-terminated", h)
        name = data[pos:end]
        out.append(name)
        pos = end + 1
    return out


def _name(body: memoryview, h: InHeader) -> bytes:
    name = _names(body, 1, h)[0]
    if not name:
        raise ProtocolError(f"{_opname(h.opcode)}: empty name", h)
    return name


def _rename_names(h: InHeader, newdir: int, flags: int, b: memoryview) -> Rename:
    name, newname = _names(b, 2, h)
    if not name or not newname:
        raise ProtocolError("RENAME: empty name", h)
    return Rename(h, newdir, flags, name, newname)


_opname = abi.opname


class Parser:
    """Parses requests. Its state is what INIT negotiated that changes a layout (the 16-byte
    SETXATTR header) or bounds a size: ``max_reply``, the largest data reply (READ, READDIR,
    IOCTL out) the kernel can ask for. A request that asks for more is refused before any
    handler runs (EINVAL): a size field never decides how much memory the server takes.

    ``parse`` takes a whole message; the ``parse_*`` methods take one opcode family's header
    and body, each returning its own request type (the dispatcher pairs each with its handler).
    """

    def __init__(self) -> None:
        self.setxattr_ext = False
        self.max_reply = abi.MAX_PAGES * abi.PAGE_SIZE
        O = abi.Opcode
        self.body_parsers: dict[int, Callable[[InHeader, memoryview], Request]] = {
            O.INIT: self.parse_init, O.DESTROY: self.parse_destroy, O.LOOKUP: self.parse_lookup,
            O.FORGET: self.parse_forget, O.BATCH_FORGET: self.parse_batch_forget,
            O.GETATTR: self.parse_getattr, O.SETATTR: self.parse_setattr, O.READLINK: self.parse_readlink,
            O.SYMLINK: self.parse_symlink, O.MKNOD: self.parse_mknod, O.MKDIR: self.parse_mkdir,
            O.UNLINK: self.parse_unlink, O.RMDIR: self.parse_rmdir, O.RENAME: self.parse_rename,
            O.RENAME2: self.parse_rename2, O.LINK: self.parse_link, O.OPEN: self.parse_open,
            O.OPENDIR: self.parse_open, O.CREATE: self.parse_create, O.TMPFILE: self.parse_create,
            O.READ: self.parse_read, O.READDIR: self.parse_read, O.READDIRPLUS: self.parse_read,
            O.WRITE: self.parse_write, O.STATFS: self.parse_statfs, O.RELEASE: self.parse_release,
            O.RELEASEDIR: self.parse_release, O.FSYNC: self.parse_fsync, O.FSYNCDIR: self.parse_fsync,
            O.SETXATTR: self.parse_setxattr, O.GETXATTR: self.parse_getxattr, O.LISTXATTR: self.parse_listxattr,
            O.REMOVEXATTR: self.parse_removexattr, O.FLUSH: self.parse_flush, O.GETLK: self.parse_lock,
            O.SETLK: self.parse_lock, O.SETLKW: self.parse_lock, O.ACCESS: self.parse_access,
            O.INTERRUPT: self.parse_interrupt, O.BMAP: self.parse_bmap, O.IOCTL: self.parse_ioctl,
            O.POLL: self.parse_poll, O.NOTIFY_REPLY: self.parse_notify_reply, O.FALLOCATE: self.parse_fallocate,
            O.LSEEK: self.parse_lseek, O.COPY_FILE_RANGE: self.parse_copy_file_range,
            O.COPY_FILE_RANGE_64: self.parse_copy_file_range, O.SYNCFS: self.parse_syncfs, O.STATX: self.parse_statx,
        }

    def split(self, buf: memoryview) -> tuple[InHeader, memoryview]:
        """The header of a whole message (checked against its length) and its body without extensions."""
        n = len(buf)
        if n < abi.IN_HEADER.size:
            raise ProtocolError(f"message of {n} bytes is shorter than the 40-byte header")
        header = _new_tuple(InHeader, abi.IN_HEADER.unpack_from(buf)[:8])
        if header.length != n:
            raise ProtocolError(f"header says {header.length} bytes but the message has {n}", header)
        if header.total_extlen:
            extlen = header.total_extlen * 8
            if extlen > n - abi.IN_HEADER.size:
                raise ProtocolError(
                    f"extension length {extlen} exceeds the body of {n - abi.IN_HEADER.size} bytes", header
                )
            return header, buf[abi.IN_HEADER.size : n - extlen]
        return header, buf[abi.IN_HEADER.size :]

    def parse(self, buf: Buffer) -> Request:
        """Parse one whole message as read from the device."""
        header, body = self.split(memoryview(buf))
        parse_body = self.body_parsers.get(header.opcode)
        if parse_body is None:
            return Unknown(header)
        return parse_body(header, body)

    def _bounded(self, size: int, limit: int, what: str, h: InHeader) -> int:
        if size > limit:
            raise ProtocolError(f"{_opname(h.opcode)}: {what} {size} exceeds the {limit} bytes negotiated", h,
                                errno_mod.EINVAL)
        return size

    # Each method below parses one opcode family's body.

    def parse_destroy(self, h: InHeader, b: memoryview) -> Destroy:
        return Destroy(h)

    def parse_lookup(self, h: InHeader, b: memoryview) -> Lookup:
        return Lookup(h, _name(b, h))

    def parse_readlink(self, h: InHeader, b: memoryview) -> Readlink:
        return Readlink(h)

    def parse_unlink(self, h: InHeader, b: memoryview) -> Unlink:
        return Unlink(h, _name(b, h))

    def parse_rmdir(self, h: InHeader, b: memoryview) -> Rmdir:
        return Rmdir(h, _name(b, h))

    def parse_statfs(self, h: InHeader, b: memoryview) -> Statfs:
        return Statfs(h)

    def parse_listxattr(self, h: InHeader, b: memoryview) -> Listxattr:
        return Listxattr(h, self._bounded(_fixed(b, abi.GETXATTR_IN, h)[0], abi.XATTR_SIZE_MAX, "size", h))

    def parse_removexattr(self, h: InHeader, b: memoryview) -> Removexattr:
        return Removexattr(h, _name(b, h))

    def parse_access(self, h: InHeader, b: memoryview) -> Access:
        return Access(h, _fixed(b, abi.ACCESS_IN, h)[0])

    def parse_interrupt(self, h: InHeader, b: memoryview) -> Interrupt:
        return Interrupt(h, _fixed(b, abi.INTERRUPT_IN, h)[0])

    def parse_syncfs(self, h: InHeader, b: memoryview) -> Syncfs:
        return Syncfs(h)

    def parse_init(self, h: InHeader, b: memoryview) -> Init:
        major, minor, readahead, flags = _fixed(b, abi.INIT_IN_MIN, h)
        flags2 = 0
        if flags & abi.InitFlag.INIT_EXT and len(b) >= abi.INIT_IN.size:
            flags2 = abi.INIT_IN.unpack_from(b)[4]
        return Init(h, major, minor, readahead, flags | flags2 << 32)

    def parse_forget(self, h: InHeader, b: memoryview) -> Forget:
        return Forget(h, ((h.nodeid, _fixed(b, abi.FORGET_IN, h)[0]),))

    def parse_batch_forget(self, h: InHeader, b: memoryview) -> Forget:
        count = _fixed(b, abi.BATCH_FORGET_IN, h)[0]
        need = abi.BATCH_FORGET_IN.size + count * abi.FORGET_ONE.size
        if len(b) < need:
            raise ProtocolError(f"BATCH_FORGET: {count} items need {need} bytes, body has {len(b)}", h)
        items = tuple(abi.FORGET_ONE.iter_unpack(b[abi.BATCH_FORGET_IN.size : need]))
        return Forget(h, items)

    def parse_getattr(self, h: InHeader, b: memoryview) -> Getattr:
        flags, _, fh = _fixed(b, abi.GETATTR_IN, h)
        return Getattr(h, fh if flags & abi.GETATTR_FH else None)

    def parse_setattr(self, h: InHeader, b: memoryview) -> Setattr:
        (valid, _, fh, size, owner, atime, mtime, ctime, ans, mns, cns, mode, _, uid, gid, _) = _fixed(
            b, abi.SETATTR_IN, h
        )
        return Setattr(
            h, valid, fh if valid & abi.FattrFlag.FH else None, size, owner,
            atime, mtime, ctime, ans, mns, cns, mode, uid, gid,
        )

    def parse_symlink(self, h: InHeader, b: memoryview) -> Symlink:
        name, target = _names(b, 2, h)
        if not name or not target:
            raise ProtocolError("SYMLINK: empty name or target", h)
        return Symlink(h, name, target)

    def parse_mknod(self, h: InHeader, b: memoryview) -> Mknod:
        mode, rdev, umask, _ = _fixed(b, abi.MKNOD_IN, h)
        return Mknod(h, mode, rdev, umask, _name(b[abi.MKNOD_IN.size :], h))

    def parse_mkdir(self, h: InHeader, b: memoryview) -> Mkdir:
        mode, umask = _fixed(b, abi.MKDIR_IN, h)
        return Mkdir(h, mode, umask, _name(b[abi.MKDIR_IN.size :], h))

    def parse_rename(self, h: InHeader, b: memoryview) -> Rename:
        (newdir,) = _fixed(b, abi.RENAME_IN, h)
        return _rename_names(h, newdir, 0, b[abi.RENAME_IN.size :])

    def parse_rename2(self, h: InHeader, b: memoryview) -> Rename:
        newdir, flags, _ = _fixed(b, abi.RENAME2_IN, h)
        return _rename_names(h, newdir, flags, b[abi.RENAME2_IN.size :])

    def parse_link(self, h: InHeader, b: memoryview) -> Link:
        (old,) = _fixed(b, abi.LINK_IN, h)
        return Link(h, old, _name(b[abi.LINK_IN.size :], h))

    def parse_open(self, h: InHeader, b: memoryview) -> Open:
        flags, open_flags = _fixed(b, abi.OPEN_IN, h)
        return Open(h, flags, open_flags)

    def parse_create(self, h: InHeader, b: memoryview) -> Create:
        flags, mode, umask, open_flags = _fixed(b, abi.CREATE_IN, h)
        return Create(h, flags, mode, umask, open_flags, _name(b[abi.CREATE_IN.size :], h))

    def parse_read(self, h: InHeader, b: memoryview) -> Read:
        fh, offset, size, read_flags, owner, flags, _ = _fixed(b, abi.READ_IN, h)
        return Read(h, fh, offset, self._bounded(size, self.max_reply, "size", h), read_flags, owner, flags)

    def parse_write(self, h: InHeader, b: memoryview) -> Write:
        fh, offset, size, write_flags, owner, flags, _ = _fixed(b, abi.WRITE_IN, h)
        data = b[abi.WRITE_IN.size :]
        if len(data) != size:
            raise ProtocolError(f"WRITE: size field says {size} bytes, {len(data)} follow", h)
        return Write(h, fh, offset, write_flags, owner, flags, data)

    def parse_release(self, h: InHeader, b: memoryview) -> Release:
        fh, flags, release_flags, owner = _fixed(b, abi.RELEASE_IN, h)
        return Release(h, fh, flags, release_flags, owner)

    def parse_fsync(self, h: InHeader, b: memoryview) -> Fsync:
        fh, fsync_flags, _ = _fixed(b, abi.FSYNC_IN, h)
        return Fsync(h, fh, bool(fsync_flags & abi.FSYNC_FDATASYNC))

    def parse_setxattr(self, h: InHeader, b: memoryview) -> Setxattr:
        if self.setxattr_ext:
            size, flags, sx_flags, _ = _fixed(b, abi.SETXATTR_IN, h)
            rest = b[abi.SETXATTR_IN.size :]
        else:
            size, flags = _fixed(b, abi.SETXATTR_IN_COMPAT, h)
            sx_flags, rest = 0, b[abi.SETXATTR_IN_COMPAT.size :]
        name = _name(rest, h)
        self._bounded(size, abi.XATTR_SIZE_MAX, "value size", h)
        value = bytes(rest[len(name) + 1 :])
        if len(value) != size:
            raise ProtocolError(f"SETXATTR: size field says {size} bytes, {len(value)} follow", h)
        return Setxattr(h, flags, sx_flags, name, value)

    def parse_getxattr(self, h: InHeader, b: memoryview) -> Getxattr:
        size, _ = _fixed(b, abi.GETXATTR_IN, h)
        return Getxattr(h, self._bounded(size, abi.XATTR_SIZE_MAX, "size", h), _name(b[abi.GETXATTR_IN.size :], h))

    def parse_flush(self, h: InHeader, b: memoryview) -> Flush:
        fh, _, _, owner = _fixed(b, abi.FLUSH_IN, h)
        return Flush(h, fh, owner)

    def parse_lock(self, h: InHeader, b: memoryview) -> Lock:
        fh, owner, start, end, typ, pid, lk_flags, _ = _fixed(b, abi.LK_IN, h)
        return Lock(h, fh, owner, start, end, typ, pid, lk_flags)

    def parse_bmap(self, h: InHeader, b: memoryview) -> Bmap:
        block, blocksize, _ = _fixed(b, abi.BMAP_IN, h)
        return Bmap(h, block, blocksize)

    def parse_ioctl(self, h: InHeader, b: memoryview) -> Ioctl:
        fh, flags, cmd, arg, in_size, out_size = _fixed(b, abi.IOCTL_IN, h)
        self._bounded(out_size, self.max_reply, "out_size", h)
        data = b[abi.IOCTL_IN.size :]
        if len(data) != in_size:
            raise ProtocolError(f"IOCTL: in_size says {in_size} bytes, {len(data)} follow", h)
        return Ioctl(h, fh, flags, cmd, arg, out_size, bytes(data))

    def parse_poll(self, h: InHeader, b: memoryview) -> Poll:
        fh, kh, flags, events = _fixed(b, abi.POLL_IN, h)
        return Poll(h, fh, kh, flags, events)

    def parse_notify_reply(self, h: InHeader, b: memoryview) -> NotifyReply:
        _, offset, size, _, _, _ = _fixed(b, abi.NOTIFY_RETRIEVE_IN, h)
        data = b[abi.NOTIFY_RETRIEVE_IN.size :]
        if len(data) != size:
            raise ProtocolError(f"NOTIFY_REPLY: size says {size} bytes, {len(data)} follow", h)
        return NotifyReply(h, offset, bytes(data))

    def parse_fallocate(self, h: InHeader, b: memoryview) -> Fallocate:
        fh, offset, length, mode, _ = _fixed(b, abi.FALLOCATE_IN, h)
        return Fallocate(h, fh, offset, length, mode)

    def parse_lseek(self, h: InHeader, b: memoryview) -> Lseek:
        fh, offset, whence, _ = _fixed(b, abi.LSEEK_IN, h)
        return Lseek(h, fh, offset, whence)

    def parse_copy_file_range(self, h: InHeader, b: memoryview) -> CopyFileRange:
        return CopyFileRange(h, *_fixed(b, abi.COPY_FILE_RANGE_IN, h))

    def parse_statx(self, h: InHeader, b: memoryview) -> Statx:
        flags, _, fh, sx_flags, sx_mask = _fixed(b, abi.STATX_IN, h)
        return Statx(h, fh if flags & abi.GETATTR_FH else None, sx_flags, sx_mask)


# --- replies ----------------------------------------------------------------


@dataclass(slots=True)
class Attr:
    """What ``stat`` shows for one inode. Times are nanoseconds since the epoch.

    ``ino`` is what ``st_ino`` shows; it need not be the node id the kernel uses, but it
    should stay the same for the life of the file. ``mode`` carries the file type bits
    (``stat.S_IFREG | 0o644``); a mode without a valid type makes the kernel fail the
    request with EIO. ``blksize`` 0 means the kernel's default.
    """

    ino: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    blocks: int = 0
    blksize: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0

    @classmethod
    def from_stat(cls, st: os.stat_result, ino: int | None = None) -> Attr:
        """The attributes of an ``os.stat_result`` (or anything with its ``st_*`` fields),
        with ``ino`` in place of ``st_ino`` if given."""
        return cls(
            ino=st.st_ino if ino is None else ino, mode=st.st_mode, nlink=st.st_nlink, uid=st.st_uid,
            gid=st.st_gid, rdev=st.st_rdev, size=st.st_size, blocks=st.st_blocks, blksize=st.st_blksize,
            atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
        )


#: Attributes as a handler may give them: an ``Attr``, or an ``os.stat_result`` as it stands (cheaper:
#: no copy; ``st_ino`` is what ``stat`` shows).
AttrLike = Attr | os.stat_result


@dataclass(slots=True)
class Entry:
    """A name's answer: the node id the kernel will use, its attributes and how long
    both may be cached (seconds).

    The kernel counts every Entry it receives as one lookup of ``nodeid`` (from LOOKUP,
    MKNOD, MKDIR, SYMLINK, LINK, CREATE, TMPFILE and READDIRPLUS) and later gives the
    same total back through ``Operations.forget``: keep the node, and never give its id
    to another object, until then. ``nodeid`` is never 0 or 1 (the root). The pair
    (``nodeid``, ``generation``) must never name two different objects in one mount.
    """

    nodeid: int
    attr: AttrLike
    entry_timeout: float
    attr_timeout: float
    generation: int = 0

    @classmethod
    def from_stat(
        cls, nodeid: int, st: os.stat_result, entry_timeout: float = 1.0, attr_timeout: float = 1.0,
        generation: int = 0,
    ) -> Entry:
        """An entry for node ``nodeid`` whose attributes are ``st`` (``st_ino`` is what
        ``stat`` shows; ``nodeid`` is what the kernel uses)."""
        return cls(nodeid, Attr.from_stat(st), entry_timeout, attr_timeout, generation)


def name_str(name: bytes) -> str:
    """A name from a request as ``str``: the file system encoding with surrogate escapes
    (``os.fsdecode``), so that any byte string survives ``name_bytes`` unchanged."""
    return os.fsdecode(name)


def name_bytes(name: str | bytes) -> bytes:
    """A file name for a reply (a readdir entry): ``str`` encoded as ``os.fsencode`` does.
    Raises ValueError for what the kernel would refuse: an empty name, or one with "/" or NUL."""
    raw = os.fsencode(name)
    if not raw or b"/" in raw or b"\0" in raw:
        raise ValueError(f"invalid file name {name!r}")
    return raw


_MAX_TIMEOUT = float(1 << 62)  # far beyond any cache lifetime; the kernel saturates it anyway


@functools.lru_cache(maxsize=64)  # a filesystem uses a handful of timeouts, for every reply
def _split_time(seconds: float) -> tuple[int, int]:
    """A cache timeout as (seconds, nanoseconds). Not positive (or NaN): 0; infinite: the maximum."""
    if not seconds > 0:
        return 0, 0
    if seconds >= _MAX_TIMEOUT:
        return 1 << 62, 0
    whole = int(seconds)
    nsec = round((seconds - whole) * 1e9)  # nearest, not truncated: 2.3 s is 2 s + 300000000 ns
    if nsec >= 1_000_000_000:
        return whole + 1, 0
    return whole, nsec


def _attr_fields(a: AttrLike) -> tuple[int, ...]:
    if type(a) is os.stat_result:
        at, ans = divmod(a.st_atime_ns, 1_000_000_000)
        mt, mns = divmod(a.st_mtime_ns, 1_000_000_000)
        ct, cns = divmod(a.st_ctime_ns, 1_000_000_000)
        rdev = a.st_rdev
        return (
            a.st_ino, a.st_size, a.st_blocks, at & _U64, mt & _U64, ct & _U64, ans, mns, cns,
            a.st_mode, a.st_nlink, a.st_uid, a.st_gid, encode_rdev(rdev) if rdev else 0, a.st_blksize, 0,
        )
    assert isinstance(a, Attr)
    at, ans = divmod(a.atime_ns, 1_000_000_000)
    mt, mns = divmod(a.mtime_ns, 1_000_000_000)
    ct, cns = divmod(a.ctime_ns, 1_000_000_000)
    return (
        a.ino, a.size, a.blocks, at & _U64, mt & _U64, ct & _U64, ans, mns, cns,
        a.mode, a.nlink, a.uid, a.gid, encode_rdev(a.rdev) if a.rdev else 0, a.blksize, 0,
    )


def mode_and_ino(a: AttrLike) -> tuple[int, int]:
    """The mode and the inode number ``stat`` shows, of either form of attributes."""
    if type(a) is os.stat_result:
        return a.st_mode, a.st_ino
    assert isinstance(a, Attr)
    return a.mode, a.ino


_U64 = (1 << 64) - 1


def encode_rdev(dev: int) -> int:
    """Convert a userspace ``st_rdev`` into the kernel's 32-bit "new" encoding."""
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_rdev(dev: int) -> int:
    """Convert the kernel's 32-bit device encoding (as MKNOD carries it) to ``st_rdev``."""
    return os.makedev((dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00))


def entry_body(e: Entry) -> bytes:
    ev, evn = _split_time(e.entry_timeout)
    av, avn = _split_time(e.attr_timeout)
    return abi.ENTRY_OUT.pack(e.nodeid, e.generation, ev, av, evn, avn, *_attr_fields(e.attr))


NEGATIVE_ENTRY_ATTR = Attr(ino=0, mode=0)


def negative_entry_body(timeout: float) -> bytes:
    """A LOOKUP answer with node id 0: "no such name", cached for ``timeout`` seconds."""
    ev, evn = _split_time(timeout)
    return abi.ENTRY_OUT.pack(0, 0, ev, 0, evn, 0, *_attr_fields(NEGATIVE_ENTRY_ATTR))


def attr_body(a: AttrLike, timeout: float) -> bytes:
    av, avn = _split_time(timeout)
    return abi.ATTR_OUT.pack(av, avn, 0, *_attr_fields(a))


def open_body(fh: int, open_flags: int, backing_id: int = 0) -> bytes:
    return abi.OPEN_OUT.pack(fh, open_flags, backing_id)


def init_body(
    minor: int, max_readahead: int, flags: int, max_background: int, congestion_threshold: int,
    max_write: int, time_gran: int, max_pages: int, max_stack_depth: int, request_timeout: int = 0,
) -> bytes:
    return abi.INIT_OUT.pack(
        abi.KERNEL_VERSION, minor, max_readahead, flags & 0xFFFFFFFF, max_background,
        congestion_threshold, max_write, time_gran, max_pages, 0, flags >> 32, max_stack_depth, request_timeout,
    )


@dataclass(slots=True, frozen=True)
class StatfsReply:
    """What ``statvfs`` shows: counts of blocks (of ``frsize`` bytes) and inodes, the
    preferred I/O size ``bsize`` and the longest name ``namelen``."""

    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int

    @classmethod
    def from_statvfs(cls, st: os.statvfs_result) -> StatfsReply:
        """The figures of an ``os.statvfs_result``, e.g. of the directory a filesystem mirrors."""
        return cls(st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree, st.f_bsize, st.f_namemax,
                   st.f_frsize)


def statfs_body(s: StatfsReply) -> bytes:
    return abi.STATFS_OUT.pack(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize, 0)


def statx_body(st: StatxReply, timeout: float) -> bytes:
    av, avn = _split_time(timeout)
    times: list[int] = []
    for ns in (st.atime_ns, st.btime_ns, st.ctime_ns, st.mtime_ns):
        sec, nsec = divmod(ns, 1_000_000_000)
        times += (sec, nsec, 0)
    return abi.STATX_OUT.pack(
        av, avn, 0, st.mask, st.blksize, st.attributes, st.nlink, st.uid, st.gid, st.mode & 0xFFFF, 0,
        st.ino, st.size, st.blocks, st.attributes_mask, *times,
        st.rdev_major, st.rdev_minor, st.dev_major, st.dev_minor,
    )


@dataclass(slots=True, frozen=True)
class StatxReply:
    mask: int
    blksize: int
    attributes: int
    nlink: int
    uid: int
    gid: int
    mode: int
    ino: int
    size: int
    blocks: int
    attributes_mask: int
    atime_ns: int
    btime_ns: int
    ctime_ns: int
    mtime_ns: int
    rdev_major: int
    rdev_minor: int
    dev_major: int
    dev_minor: int


def lock_body(start: int, end: int, typ: int, pid: int) -> bytes:
    return abi.LK_OUT.pack(start, end, typ, pid)


def dirent_size(name: bytes, plus: bool) -> int:
    base = abi.DIRENTPLUS.size if plus else abi.DIRENT.size
    return (base + len(name) + 7) & ~7


def pack_dirent(buf: bytearray | memoryview, pos: int, ino: int, next_off: int, dtype: int, name: bytes) -> int:
    """Write one READDIR record at ``pos``; return the position after it (8-aligned)."""
    abi.DIRENT.pack_into(buf, pos, ino, next_off, len(name), dtype)
    start = pos + abi.DIRENT.size
    end = start + len(name)
    buf[start:end] = name
    padded = (end + 7) & ~7
    buf[end:padded] = bytes(padded - end)
    return padded


_DIRENT_PADS = tuple(bytes((-(abi.DIRENT.size + n)) % 8) for n in range(8))


def dirent_records(entries: Sequence[tuple[bytes, int, int]]) -> tuple[bytes, list[int]]:
    """A whole listing as READDIR records (what ``pack_dirent`` writes), packed ahead of time:
    ``entries`` are (name, inode number, S_IFMT or 0), entry i's next offset is i + 1. Returns the
    records and where each ends. One pass, no call per entry: listings are long."""
    pack, pads = abi.DIRENT.pack, _DIRENT_PADS
    records = [pack(number, i, len(name), kind >> 12) + name + pads[len(name) & 7]
               for i, (name, number, kind) in enumerate(entries, 1)]
    return b"".join(records), list(itertools.accumulate(map(len, records)))


def pack_direntplus(
    buf: bytearray | memoryview, pos: int, entry_out: bytes, ino: int, next_off: int, dtype: int, name: bytes
) -> int:
    """Write one READDIRPLUS record (entry then dirent then name) at ``pos``."""
    buf[pos : pos + abi.ENTRY_OUT.size] = entry_out
    return pack_dirent(buf, pos + abi.ENTRY_OUT.size, ino, next_off, dtype, name)


# --- whole messages ---------------------------------------------------------


def encode_reply(unique: int, body: Buffer = b"") -> bytes:
    """A successful reply: the out-header followed by ``body``."""
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(body), 0, unique) + body


def reply_header(unique: int, body_len: int) -> bytes:
    """The header alone, for writev() of a body that stays where it is."""
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size + body_len, 0, unique)


def encode_error(unique: int, err: int) -> bytes:
    """An errno reply. Values the kernel would refuse become EIO."""
    if not 0 < err <= abi.MAX_ERRNO:
        err = errno_mod.EIO
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -err, unique)


def encode_notify(code: abi.NotifyCode, body: bytes) -> bytes:
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(body), int(code), 0) + body


def notify_inval_inode(nodeid: int, offset: int = 0, length: int = 0) -> bytes:
    return encode_notify(abi.NotifyCode.INVAL_INODE, abi.NOTIFY_INVAL_INODE_OUT.pack(nodeid, offset, length))


def notify_inval_entry(parent: int, name: bytes, expire_only: bool = False) -> bytes:
    flags = abi.EXPIRE_ONLY if expire_only else 0
    body = abi.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), flags) + name + b"\0"
    return encode_notify(abi.NotifyCode.INVAL_ENTRY, body)


def notify_delete(parent: int, child: int, name: bytes) -> bytes:
    body = abi.NOTIFY_DELETE_OUT.pack(parent, child, len(name), 0) + name + b"\0"
    return encode_notify(abi.NotifyCode.DELETE, body)


def notify_inc_epoch() -> bytes:
    return encode_notify(abi.NotifyCode.INC_EPOCH, b"")


def notify_store(nodeid: int, offset: int, data: bytes) -> bytes:
    return encode_notify(abi.NotifyCode.STORE, abi.NOTIFY_STORE_OUT.pack(nodeid, offset, len(data), 0) + data)


def notify_retrieve(notify_unique: int, nodeid: int, offset: int, size: int) -> bytes:
    body = abi.NOTIFY_RETRIEVE_OUT.pack(notify_unique, nodeid, offset, size, 0)
    return encode_notify(abi.NotifyCode.RETRIEVE, body)


def join_names(names: Sequence[bytes]) -> bytes:
    """The LISTXATTR wire form: every name followed by a NUL."""
    return b"".join(n + b"\0" for n in names)
