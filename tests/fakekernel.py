"""A stand-in for the kernel end of /dev/fuse: the session's real worker loop, fed over a socket.

A SOCK_SEQPACKET socketpair keeps message boundaries as /dev/fuse does (one read, one
request; one write, one reply), so hostile or malformed requests can be thrown at the
unmodified worker without mounting anything.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from dataclasses import dataclass

from fusepass import abi
from fusepass.ops import Operations
from fusepass.session import Session
from fusepass.stats import WorkerStats

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
SENTINEL_UNIQUE = 0xFFFF_FFFF_0000  # even, and far above what the tests use


@dataclass
class Reply:
    length: int
    error: int
    unique: int
    payload: bytes
    received: int  # bytes actually received


class FakeKernel:
    """Run ``fs`` behind one session worker; ``send`` requests and collect the replies."""

    def __init__(self, fs: Operations, timeout: float = 10.0) -> None:
        self.session = Session(fs, "/nonexistent", passthrough="off")
        self.kernel, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._server = server
        self.timeout = timeout
        self.stats = WorkerStats()
        self.worker = threading.Thread(target=self.session._worker, args=(server.fileno(), self.stats), daemon=True)
        self.worker.start()
        self.next_unique = 2

    def close(self) -> None:
        self.kernel.close()  # the worker reads EOF and ends
        self.worker.join(self.timeout)
        self._server.close()

    def __enter__(self) -> FakeKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def message(self, opcode: int, body: bytes = b"", nodeid: int = 1, unique: int | None = None,
                uid: int = 0, gid: int = 0, pid: int = 1) -> tuple[int, bytes]:
        if unique is None:
            unique = self.next_unique
            self.next_unique += 2
        return unique, IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, nodeid, uid, gid, pid, 0, 0) + body

    def send_raw(self, data: bytes) -> None:
        self.kernel.send(data)

    def receive(self) -> Reply:
        ready, _, _ = select.select([self.kernel], [], [], self.timeout)
        if not ready:
            raise TimeoutError("the worker did not answer")
        data = self.kernel.recv(1 << 21)
        if len(data) < OUT_HEADER.size:
            raise AssertionError(f"reply of {len(data)} bytes is shorter than the out-header")
        length, error, unique = OUT_HEADER.unpack_from(data)
        return Reply(length, error, unique, data[OUT_HEADER.size :], len(data))

    def call(self, opcode: int, body: bytes = b"", nodeid: int = 1, **kw: int) -> Reply:
        unique, msg = self.message(opcode, body, nodeid, **kw)
        self.send_raw(msg)
        reply = self.receive()
        assert reply.unique == unique, (reply.unique, unique)
        return reply

    def init(self) -> Reply:
        flags = int(abi.InitFlag.INIT_EXT | abi.InitFlag.BIG_WRITES | abi.InitFlag.MAX_PAGES)
        return self.call(abi.Opcode.INIT, struct.pack("<IIIII44x", 7, 45, 131072, flags & 0xFFFFFFFF, flags >> 32),
                         nodeid=0)

    def replies_until_sentinel(self) -> list[Reply]:
        """Send a GETATTR of the root and return every reply that came before its answer:
        with one worker, exactly the replies to what was sent before it."""
        _, msg = self.message(abi.Opcode.GETATTR, struct.pack("<IIQ", 0, 0, 0), unique=SENTINEL_UNIQUE)
        self.send_raw(msg)
        before: list[Reply] = []
        while True:
            reply = self.receive()
            if reply.unique == SENTINEL_UNIQUE:
                assert reply.error == 0 and len(reply.payload) == abi.ATTR_OUT.size, "the worker stopped serving"
                return before
            before.append(reply)
