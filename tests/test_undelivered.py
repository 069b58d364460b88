"""A reply that never reaches the kernel (the caller was killed, the connection went away) must
take back what it promised: the lookup it counted, the file it opened."""

from __future__ import annotations

import os
import struct

from fakekernel import FakeKernel

from fusepass import Context, abi
from fusepass.examples.memfs import MemFS
from fusepass.session import deliver


class Recording(MemFS):
    """memfs that records its releases."""

    def __init__(self) -> None:
        super().__init__()
        self.released: list[int] = []

    def release(self, ctx: Context, ino: int, fh: int, flags: int) -> None:
        self.released.append(fh)
        super().release(ctx, ino, fh, flags)


def make_file(fs: MemFS) -> int:
    ctx = Context(0, 0, 0, 0, memoryview(bytearray(0)))
    entry, opened = fs.create(ctx, 1, b"f", 0o100644, 0, 0)
    fs.release(ctx, entry.nodeid, opened.fh, 0)
    fs.forget([(entry.nodeid, 1)])  # as if the kernel had dropped it: no lookups held
    return entry.nodeid


def run_undelivered(fs: Recording, opcode: int, body: bytes, nodeid: int) -> None:
    """The reply is written where the kernel no longer takes it (as for a request whose caller
    died): the worker's delivery must run the outcome's undo."""
    k = FakeKernel(fs)
    assert k.init().error == 0
    _, msg = k.message(opcode, body, nodeid)
    outcome = k.send_raw(msg)
    assert outcome is not None
    r, w = os.pipe()
    os.close(r)  # writing now fails (EPIPE), as writing to /dev/fuse fails with ENOENT
    try:
        deliver(w, outcome)
    finally:
        os.close(w)


def test_undelivered_lookup_is_forgotten() -> None:
    fs = Recording()
    ino = make_file(fs)
    assert fs.nodes[ino].lookups == 0
    run_undelivered(fs, abi.Opcode.LOOKUP, b"f\0", 1)
    assert fs.nodes[ino].lookups == 0


def test_undelivered_open_is_released() -> None:
    fs = Recording()
    ino = make_file(fs)
    fs.released.clear()
    run_undelivered(fs, abi.Opcode.OPEN, struct.pack("<II", 0, 0), ino)
    assert fs.released == [ino]
    assert fs.nodes[ino].opens == 0


def test_delivered_lookup_is_counted_once() -> None:
    fs = Recording()
    ino = make_file(fs)
    k = FakeKernel(fs)
    assert k.init().error == 0
    assert k.call(abi.Opcode.LOOKUP, b"f\0").error == 0
    assert fs.nodes[ino].lookups == 1
