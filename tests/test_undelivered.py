"""A reply that never reaches the kernel (the caller was killed, the connection went away) must
take back what it promised: the lookup it counted, the file it opened."""

from __future__ import annotations

import struct
import threading

from fakekernel import FakeKernel

from fusepass import Context, Entry, Opened, abi
from fusepass.examples.memfs import MemFS


class Gated(MemFS):
    """memfs whose LOOKUP and OPEN wait for the test to let them finish."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.released: list[int] = []

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        self.entered.set()
        self.gate.wait(10)
        return super().lookup(ctx, parent, name)

    def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        self.entered.set()
        self.gate.wait(10)
        return super().open(ctx, ino, flags)

    def release(self, ctx: Context, ino: int, fh: int, flags: int) -> None:
        self.released.append(fh)
        super().release(ctx, ino, fh, flags)


def make_file(fs: MemFS) -> int:
    ctx = Context(0, 0, 0, 0, memoryview(bytearray(0)))
    entry, opened = fs.create(ctx, 1, b"f", 0o100644, 0, 0)
    fs.release(ctx, entry.nodeid, opened.fh, 0)
    fs.forget([(entry.nodeid, 1)])  # as if the kernel had dropped it: no lookups held
    return entry.nodeid


def run_undelivered(fs: Gated, opcode: int, body: bytes, nodeid: int) -> None:
    k = FakeKernel(fs)
    assert k.init().error == 0
    _, msg = k.message(opcode, body, nodeid)
    k.send_raw(msg)
    assert fs.entered.wait(10)
    k.kernel.close()  # the "kernel" is gone before the reply is written
    fs.gate.set()
    k.worker.join(10)
    assert not k.worker.is_alive()
    k._server.close()


def test_undelivered_lookup_is_forgotten() -> None:
    fs = Gated()
    ino = make_file(fs)
    assert fs.nodes[ino].lookups == 0
    run_undelivered(fs, abi.Opcode.LOOKUP, b"f\0", 1)
    assert fs.nodes[ino].lookups == 0


def test_undelivered_open_is_released() -> None:
    fs = Gated()
    ino = make_file(fs)
    fs.released.clear()
    run_undelivered(fs, abi.Opcode.OPEN, struct.pack("<II", 0, 0), ino)
    assert fs.released == [ino]
    assert fs.nodes[ino].opens == 0


def test_delivered_lookup_is_counted_once() -> None:
    fs = Gated()
    ino = make_file(fs)
    fs.gate.set()
    with FakeKernel(fs) as k:
        assert k.init().error == 0
        assert k.call(abi.Opcode.LOOKUP, b"f\0").error == 0
    assert fs.nodes[ino].lookups == 1
