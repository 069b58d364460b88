"""A stand-in for the kernel: request bytes into a ``Dispatcher``, reply bytes out.

No thread, socket, descriptor or mount: each message goes through ``Dispatcher.handle``
exactly as a worker would pass it, and the reply parts it returns are read back as the
kernel would read them. Used by the hostile-input tests, the negotiation tests and the
fuzzers.
"""

from __future__ import annotations

import contextlib
import queue
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fusepass import abi
from fusepass.dispatch import PENDING, Dispatcher, Outcome, Pending, Scratch
from fusepass.ops import Operations

if TYPE_CHECKING:
    from fusepass.aio import LoopRunner

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ALL_6_18 = 0x5FD73FFFFFB  # the INIT flags Linux 6.18.44 offered
#: The largest reply the kernel accepts: a READ of max_pages pages (or a WRITE-sized one), plus headers.
MAX_REPLY = abi.MAX_WRITE + abi.PAGE_SIZE


@dataclass
class Reply:
    length: int
    error: int
    unique: int
    payload: bytes
    received: int  # bytes actually in the reply


def init_body(minor: int = abi.KERNEL_MINOR_VERSION, flags: int = ALL_6_18, readahead: int = 131072,
              major: int = abi.KERNEL_VERSION) -> bytes:
    return struct.pack("<IIIII44x", major, minor, readahead, flags & 0xFFFFFFFF, flags >> 32)


class FakeKernel:
    """Drive a Dispatcher serving ``fs`` with bytes. ``later`` collects the Outcomes of requests
    coroutines answered (given a ``runner``), as the scratch's ``deliver`` receives them."""

    def __init__(self, fs: Operations, **dispatcher_kw: Any) -> None:
        dispatcher_kw.setdefault("passthrough", "off")
        self.notifications: list[bytes] = []
        dispatcher_kw.setdefault("send_notification", self.notifications.append)
        self.dispatcher = Dispatcher(fs, **dispatcher_kw)
        self.later: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self.scratch = Scratch(deliver=self.later.put)
        self.next_unique = 2

    @property
    def stats(self) -> Any:
        return self.scratch.stats

    def message(self, opcode: int, body: bytes = b"", nodeid: int = 1, unique: int | None = None,
                uid: int = 0, gid: int = 0, pid: int = 1) -> tuple[int, bytes]:
        if unique is None:
            unique = self.next_unique
            self.next_unique += 2
        return unique, IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, nodeid, uid, gid, pid, 0, 0) + body

    def send_raw(self, data: bytes) -> Outcome | Pending | None:
        """One message as the device would deliver it; the dispatcher's outcome as it is."""
        return self.dispatcher.handle(memoryview(bytearray(data)), self.scratch)

    def send(self, data: bytes) -> list[Reply]:
        """One message; the replies it produced at once (none or one), read back as the kernel would."""
        outcome = self.send_raw(data)
        if outcome is None or outcome is PENDING:
            return []
        return [read_reply(outcome)]

    def call(self, opcode: int, body: bytes = b"", nodeid: int = 1, **kw: int) -> Reply:
        """One request and its reply, waiting for it if a coroutine answers it."""
        unique, msg = self.message(opcode, body, nodeid, **kw)
        outcome = self.send_raw(msg)
        assert outcome is not None, "no reply"
        reply = self.reply_later() if outcome is PENDING else read_reply(outcome)
        assert reply.unique == unique, (reply.unique, unique)
        return reply

    def init(self, **kw: int) -> Reply:
        return self.call(abi.Opcode.INIT, init_body(**kw), nodeid=0)

    def reply_later(self, timeout: float = 10.0) -> Reply:
        """The next reply a coroutine produced, as the kernel reads it."""
        return read_reply(self.later.get(timeout=timeout))

    def still_serving(self) -> bool:
        """Whether a GETATTR of the root is still answered as it should be."""
        reply = self.call(abi.Opcode.GETATTR, struct.pack("<IIQ", 0, 0, 0))
        return reply.error == 0 and len(reply.payload) == abi.ATTR_OUT.size


def read_reply(outcome: Outcome) -> Reply:
    """An Outcome's reply parts as the kernel reads them."""
    reply = b"".join(bytes(part) for part in outcome.reply)
    if len(reply) < OUT_HEADER.size:
        raise AssertionError(f"reply of {len(reply)} bytes is shorter than the out-header")
    length, error, unique = OUT_HEADER.unpack_from(reply)
    return Reply(length, error, unique, reply[OUT_HEADER.size :], len(reply))


@contextlib.contextmanager
def loop_runner() -> Iterator[LoopRunner]:
    """A runner for coroutine handlers: a private event loop on a thread of its own."""
    from fusepass.aio import LoopRunner

    runner = LoopRunner()
    runner.open()
    try:
        yield runner
    finally:
        runner.close()
