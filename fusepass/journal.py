"""What a successor server needs to carry on a connection, kept so that a crash at any instant cannot corrupt it.

The state is what the kernel holds of the server: the INIT request it answered (negotiated
again, identically, without a reply), the node ids it has looked up with their lookup counts
and what each names (opaque bytes the filesystem gives: the mirror's file handle), the open
file and directory handles, and the backing ids registered on the connection.

One thing no record can keep: a file that loses its last name while it is open through the mount
(unlinked, renamed over, or made with O_TMPFILE) lives only as long as a descriptor of it, and a
server's descriptors die with it. The server gives one to the supervisor first (``keep``: over a
socket, SCM_RIGHTS, held by a ``Keeper``), and lets it go once the file's last open is released:
the successor finds the file by its handle again, because the supervisor's descriptor keeps it alive.

It lives in two files (memory files the supervisor holds, so they outlive any server) as
records appended one ``pwrite`` each, every record with its length and a CRC, so that a write
torn by a kill is recognised and ignored (a record is written before the reply that depends on
it: a crash can leave the state ahead of the kernel, which only leaks, never behind it). When
the log grows, the live state is written as a snapshot into the other file, whose header (a
generation number) is written last: the file with the highest valid generation is current.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TypeVar

_V = TypeVar("_V")

MAGIC = b"FPJ1"
RESEND_BIT = 1 << 63  # abi.UNIQUE_RESEND
_HEADER = struct.Struct("<4sQI")  # magic, generation, crc32 of the two
_RECORD = struct.Struct("<HBI")  # payload length, kind, crc32 of kind and payload
_NODE = struct.Struct("<QQ")  # nodeid, lookups; identity follows
_COUNT = struct.Struct("<QQ")  # nodeid, n
_OPEN = struct.Struct("<QQIBQ")  # fh, nodeid, open flags, is a directory, the request's unique
_RELEASE = struct.Struct("<QB")  # fh, is a directory
_BACKING = struct.Struct("<Qi")  # nodeid, backing id
_ID = struct.Struct("<Q")
_COUNTED = struct.Struct("<QQQ")  # the request's unique, nodeid, n
_APPEND = struct.Struct("<QQ")  # the request's unique, the file's size before its O_APPEND write

(INIT, NODE, LOOKUP, FORGET, OPEN, RELEASE, BACKING, UNBACKED, INTENT, COUNTED, UNCOUNTED, APPEND, KEPT,
 UNKEPT, MAX_BACKING, RELEASED) = range(1, 17)
#: Changes begun that are remembered (the kernel's uniques never repeat: only the latest matter).
KEEP_INTENTS = 4096
#: The log is compacted when it is this many times the size of the live state (and at least MIN_COMPACT).
COMPACT_RATIO = 4
MIN_COMPACT = 1 << 20


@dataclass(slots=True)
class State:
    """The connection's state as the records describe it."""

    init: bytes | None = None  # the INIT request's body
    nodes: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # nodeid -> (lookups, identity)
    files: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # fh -> (nodeid, open flags, unique)
    dirs: dict[int, tuple[int, int]] = field(default_factory=dict)  # fh -> (nodeid, unique)
    backing: dict[int, int] = field(default_factory=dict)  # nodeid -> backing id
    max_nodeid: int = 0  # the highest node id ever handed out: never reused
    max_backing: int = 0  # the highest backing id ever recorded (``BackingRegistry.restore`` looks past it)
    #: Requests (by unique, without the resend bit) whose change was begun: if one comes again,
    #: resent, its change may have been made already.
    intents: OrderedDict[int, None] = field(default_factory=OrderedDict)
    #: The lookups each recent request counted (by unique, without the resend bit): if it comes again,
    #: resent, none of them reached the kernel (it would not resend a request it had the reply to).
    counted: OrderedDict[int, list[tuple[int, int]]] = field(default_factory=OrderedDict)
    #: Where recent O_APPEND writes began (by unique, without the resend bit): a resent one may be made.
    appends: OrderedDict[int, int] = field(default_factory=OrderedDict)
    #: Recent RELEASE and RELEASEDIR requests carried out (by unique, without the resend bit): one
    #: resent was made already, though its handle's number may be another open's since.
    released: OrderedDict[int, None] = field(default_factory=OrderedDict)
    #: Nodes whose file the supervisor holds a descriptor of (``Journal.keep``).
    kept: set[int] = field(default_factory=set)

    def apply(self, kind: int, payload: bytes) -> None:
        if kind == NODE:
            nodeid, lookups = _NODE.unpack_from(payload)
            self.nodes[nodeid] = (lookups, payload[_NODE.size:])
            self.max_nodeid = max(self.max_nodeid, nodeid)
        elif kind in (LOOKUP, FORGET):
            nodeid, n = _COUNT.unpack(payload)
            node = self.nodes.get(nodeid)
            if node is not None:
                count = node[0] + (n if kind == LOOKUP else -n)
                if count > 0:
                    self.nodes[nodeid] = (count, node[1])
                else:
                    del self.nodes[nodeid]
        elif kind == OPEN:
            fh, nodeid, flags, is_dir, unique = _OPEN.unpack(payload)
            if is_dir:
                self.dirs[fh] = (nodeid, unique)
            else:
                self.files[fh] = (nodeid, flags, unique)
        elif kind == RELEASE:
            fh, is_dir = _RELEASE.unpack(payload)
            (self.dirs if is_dir else self.files).pop(fh, None)
        elif kind == BACKING:
            nodeid, backing_id = _BACKING.unpack(payload)
            self.backing[nodeid] = backing_id
            self.max_backing = max(self.max_backing, backing_id)
        elif kind == MAX_BACKING:
            self.max_backing = max(self.max_backing, _ID.unpack(payload)[0])
        elif kind == UNBACKED:
            self.backing.pop(_ID.unpack(payload)[0], None)
        elif kind == INTENT:
            _remember(self.intents, _ID.unpack(payload)[0], None)
        elif kind == RELEASED:
            _remember(self.released, _ID.unpack(payload)[0], None)
        elif kind == COUNTED:
            unique, nodeid, n = _COUNTED.unpack(payload)
            self.counted.setdefault(unique, []).append((nodeid, n))
            if len(self.counted) > KEEP_INTENTS:
                self.counted.popitem(last=False)
        elif kind == UNCOUNTED:
            self.counted.pop(_ID.unpack(payload)[0], None)
        elif kind == APPEND:
            unique, size = _APPEND.unpack(payload)
            _remember(self.appends, unique, size)
        elif kind == KEPT:
            self.kept.add(_ID.unpack(payload)[0])
        elif kind == UNKEPT:
            self.kept.discard(_ID.unpack(payload)[0])
        elif kind == INIT:
            self.init = payload

    def records(self) -> list[tuple[int, bytes]]:
        """The state as records (a snapshot)."""
        out: list[tuple[int, bytes]] = []
        if self.init is not None:
            out.append((INIT, self.init))
        # A node handed out and forgotten since must never be handed out again: the highest id
        # survives as a node of no lookups, which replaying drops again.
        out.append((NODE, _NODE.pack(self.max_nodeid, 0)))
        out.append((FORGET, _COUNT.pack(self.max_nodeid, 0)))
        out.append((MAX_BACKING, _ID.pack(self.max_backing)))
        for nodeid, (lookups, identity) in self.nodes.items():
            out.append((NODE, _NODE.pack(nodeid, lookups) + identity))
        for fh, (nodeid, flags, unique) in self.files.items():
            out.append((OPEN, _OPEN.pack(fh, nodeid, flags, 0, unique)))
        for fh, (nodeid, unique) in self.dirs.items():
            out.append((OPEN, _OPEN.pack(fh, nodeid, 0, 1, unique)))
        for nodeid, backing_id in self.backing.items():
            out.append((BACKING, _BACKING.pack(nodeid, backing_id)))
        out += [(INTENT, _ID.pack(unique)) for unique in self.intents]
        out += [(RELEASED, _ID.pack(unique)) for unique in self.released]
        out += [(COUNTED, _COUNTED.pack(unique, nodeid, n)) for unique, items in self.counted.items()
                for nodeid, n in items]
        out += [(APPEND, _APPEND.pack(unique, size)) for unique, size in self.appends.items()]
        out += [(KEPT, _ID.pack(nodeid)) for nodeid in self.kept]
        return out


def _remember(recent: OrderedDict[int, _V], unique: int, value: _V) -> None:
    """Add ``unique`` (with ``value``) to a bounded record of recent requests (only the latest can come again)."""
    recent[unique] = value
    if len(recent) > KEEP_INTENTS:
        recent.popitem(last=False)


def _record(kind: int, payload: bytes) -> bytes:
    return _RECORD.pack(len(payload), kind, zlib.crc32(payload, kind)) + payload


def _header(generation: int) -> bytes:
    return _HEADER.pack(MAGIC, generation, zlib.crc32(MAGIC + generation.to_bytes(8, "little")))


def _read(fd: int) -> tuple[int, State, int]:
    """(generation, state, end of the last whole record) of one file; generation 0 if it holds none."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0) if size else b""
    state = State()
    if len(data) < _HEADER.size:
        return 0, state, _HEADER.size
    magic, generation, crc = _HEADER.unpack_from(data)
    if magic != MAGIC or crc != zlib.crc32(MAGIC + generation.to_bytes(8, "little")):
        return 0, state, _HEADER.size
    pos = _HEADER.size
    while pos + _RECORD.size <= len(data):
        length, kind, crc = _RECORD.unpack_from(data, pos)
        payload = data[pos + _RECORD.size : pos + _RECORD.size + length]
        if len(payload) != length or zlib.crc32(payload, kind) != crc:
            break  # torn by a crash: nothing after it was written
        state.apply(kind, payload)
        pos += _RECORD.size + length
    return generation, state, pos


class Journal:
    """The state of one connection, on the two files ``fds`` (memfds the supervisor holds);
    ``keeper``: the server's end of the supervisor's ``Keeper`` socket (-1: none).

    ``Journal(fds)`` reads what a predecessor left (``state``; empty on a fresh mount), then
    writes it again as a snapshot, so that every server starts with a short log. Every method
    that records is thread-safe and makes one ``pwrite``.
    """

    def __init__(self, fds: tuple[int, int], keeper: int = -1) -> None:
        self.fds = fds
        self._keeper = socket.socket(fileno=keeper) if keeper >= 0 else None
        self._lock = threading.Lock()
        self._serving = threading.local()  # .unique: the request this thread serves (``serving``)
        found = [_read(fd) for fd in fds]
        best = max(range(2), key=lambda i: found[i][0])
        self.generation, self.state, _ = found[best]
        self.resumed = self.generation > 0
        self._active = best
        self._end = 0
        self.records_written = 0
        self._compact_at = MIN_COMPACT
        with self._lock:
            self._compact()

    # --- recording ----------------------------------------------------------------

    def init(self, body: bytes) -> None:
        self._append(INIT, bytes(body))

    def serving(self, unique: int) -> None:
        """This thread now serves request ``unique``: the lookups it records are that request's."""
        self._serving.unique = unique & ~RESEND_BIT

    def node(self, nodeid: int, identity: bytes) -> None:
        """A node id handed out for the first time, with one lookup."""
        self._append(NODE, _NODE.pack(nodeid, 1) + identity, self._counted(nodeid, 1))

    def lookup(self, nodeid: int, n: int = 1) -> None:
        self._append(LOOKUP, _COUNT.pack(nodeid, n), self._counted(nodeid, n))

    def uncount(self, unique: int) -> list[tuple[int, int]]:
        """The lookups (nodeid, n) a predecessor counted for request ``unique`` (without the resend
        bit), which the kernel resent: none reached it, so the caller forgets them. They are taken
        out of the journal first (a crash in between leaves a lookup too many, a leak, never one
        too few)."""
        with self._lock:
            items = self.state.counted.get(unique)
        if items:
            self._append(UNCOUNTED, _ID.pack(unique))
        return items or []

    def _counted(self, nodeid: int, n: int) -> tuple[int, bytes] | None:
        """The COUNTED record of a lookup counted for the request this thread serves, if any."""
        unique = getattr(self._serving, "unique", 0)
        return (COUNTED, _COUNTED.pack(unique, nodeid, n)) if unique else None

    def forget(self, nodeid: int, n: int) -> None:
        self._append(FORGET, _COUNT.pack(nodeid, n))

    def opened(self, fh: int, nodeid: int, flags: int, unique: int, is_dir: bool = False) -> None:
        """``unique``: the request that opened it (the resend bit is dropped)."""
        self._append(OPEN, _OPEN.pack(fh, nodeid, flags & 0xFFFFFFFF, is_dir, unique & ~RESEND_BIT))

    def opens_of(self, unique: int) -> list[tuple[int, int, bool]]:
        """(fh, nodeid, is a directory) of what request ``unique`` opened (without the resend bit)."""
        with self._lock:
            files = [(fh, nodeid, False) for fh, (nodeid, _, u) in self.state.files.items() if u == unique]
            return files + [(fh, nodeid, True) for fh, (nodeid, u) in self.state.dirs.items() if u == unique]

    def released(self, fh: int, unique: int, is_dir: bool = False) -> None:
        """Handle ``fh`` is released, by request ``unique`` (the resend bit is dropped)."""
        self._append(RELEASE, _RELEASE.pack(fh, is_dir), (RELEASED, _ID.pack(unique & ~RESEND_BIT)))

    def released_already(self, unique: int) -> bool:
        """Whether release request ``unique`` (without the resend bit) was carried out, here or by a predecessor."""
        return unique in self.state.released

    def backing(self, nodeid: int, backing_id: int) -> None:
        self._append(BACKING, _BACKING.pack(nodeid, backing_id))

    def unbacked(self, nodeid: int) -> None:
        self._append(UNBACKED, _ID.pack(nodeid))

    def intent(self, unique: int) -> None:
        """A change (a creation, removal, rename) is about to be made for request ``unique``."""
        self._append(INTENT, _ID.pack(unique))

    def keep(self, nodeid: int, fd: int) -> None:
        """Give the supervisor a descriptor of node ``nodeid``'s file, which is about to lose its last
        name while open: it then outlives this server (recorded first: a successor may let go of one
        never given, which does nothing, but never forgets one it holds)."""
        self._append(KEPT, _ID.pack(nodeid))
        if self._keeper is not None:
            socket.send_fds(self._keeper, [b"K" + _ID.pack(nodeid)], [fd])

    def let_go(self, nodeid: int) -> None:
        """The supervisor may close what it holds of node ``nodeid`` (its last open was released)."""
        self._append(UNKEPT, _ID.pack(nodeid))
        if self._keeper is not None:
            self._keeper.send(b"D" + _ID.pack(nodeid))

    def appending(self, unique: int, size: int) -> None:
        """Request ``unique`` (resend bit dropped) is about to append to a file now ``size`` bytes long."""
        self._append(APPEND, _APPEND.pack(unique & ~RESEND_BIT, size))

    def appended_at(self, unique: int) -> int | None:
        """Where a predecessor's O_APPEND write for request ``unique`` began, if it began one."""
        with self._lock:
            return self.state.appends.get(unique & ~RESEND_BIT)

    def in_doubt(self, unique: int) -> bool:
        """Whether a predecessor began the change of request ``unique`` (without the resend bit)."""
        return unique in self.state.intents

    def _append(self, kind: int, payload: bytes, also: tuple[int, bytes] | None = None) -> None:
        """One record, and ``also`` (kind, payload), one that goes with it, in the same ``pwrite``."""
        record = _record(kind, payload) + (_record(*also) if also else b"")
        with self._lock:
            self.state.apply(kind, payload)
            if also:
                self.state.apply(*also)
            os.pwrite(self.fds[self._active], record, self._end)
            self._end += len(record)
            self.records_written += 1
            if self._end > self._compact_at:
                self._compact()

    # --- compaction ---------------------------------------------------------------

    def _compact(self) -> None:
        """Write the live state into the other file, then its header: from then on it is current
        (lock held)."""
        other = 1 - self._active
        fd = self.fds[other]
        snapshot = b"".join(_record(kind, payload) for kind, payload in self.state.records())
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"\0" * _HEADER.size + snapshot, 0)
        self.generation += 1
        os.pwrite(fd, _header(self.generation), 0)
        old, self._active = self.fds[self._active], other
        os.ftruncate(old, 0)
        self._end = _HEADER.size + len(snapshot)
        self._compact_at = max(MIN_COMPACT, COMPACT_RATIO * self._end)

    @property
    def size(self) -> int:
        """Bytes of the current file."""
        return self._end


def create_files() -> tuple[int, int]:
    """Two empty memory files for a new connection's journal (inherited by the servers forked)."""
    return (os.memfd_create("fusepass-journal-0", 0), os.memfd_create("fusepass-journal-1", 0))


class Keeper:
    """The supervisor's side of ``Journal.keep``: the descriptors servers give it, by node, each
    held until a server lets it go. A descriptor in flight is safe too: the socket's queue holds it
    (so a server never waits for the supervisor), and ``take`` collects what has come."""

    def __init__(self) -> None:
        self._socket, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._socket.setblocking(False)
        #: The servers' end (each server inherits it; the supervisor keeps it open for the next one).
        self.server_fd = server.detach()
        self.held: dict[int, int] = {}  # nodeid -> descriptor

    def fileno(self) -> int:
        return self._socket.fileno()

    def take(self) -> None:
        """Collect every message queued: keep what is given, close what is let go."""
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._socket, 16, 1, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            nodeid = _ID.unpack_from(message, 1)[0] if len(message) == 1 + _ID.size else None
            if message[:1] == b"K" and nodeid is not None and fds:
                old = self.held.pop(nodeid, None)
                self.held[nodeid] = fds.pop()
                if old is not None:
                    os.close(old)
            elif message[:1] == b"D" and nodeid is not None and nodeid in self.held:
                os.close(self.held.pop(nodeid))
            for fd in fds:  # nothing else comes with a descriptor
                os.close(fd)

    def close(self) -> None:
        """Close what it holds and its end (the servers' end stays: in a forked server, this drops the
        supervisor's copies)."""
        for fd in self.held.values():
            os.close(fd)
        self._socket.close()
