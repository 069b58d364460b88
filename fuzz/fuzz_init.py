"""Coverage-guided fuzzing (atheris) of INIT negotiation across protocol versions and flag words.

Run:     python fuzz/fuzz_init.py -max_total_time=3600 -rss_limit_mb=200
Replay:  python fuzz/fuzz_init.py crash-<hash>

Each input is one INIT request (any major, minor, readahead and 64-bit flag word, in the old
16-byte or the extended layout), a filesystem whose ``init`` asks for arbitrary flags and
limits, a passthrough mode and whether the process may pass through. The reply must keep the
rules: refused (EPROTO) exactly when the kernel is too old or passthrough "on" cannot be had;
otherwise our minor at most the kernel's, only flags it offered and knows at that minor,
passthrough only where allowed, limits within the buffers, and requests parsed afterwards
bounded by what was agreed.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from fakekernel import FakeKernel

from fusepass import abi
from fusepass.backing import BackingRegistry
from fusepass.dispatch import REPLY_BUFFER
from fusepass.ops import Attr, ConnectionInfo, Context, Operations

F = abi.InitFlag
MODES = ("auto", "on", "off")


class Unused:
    def backing_open(self, fd: int) -> object:
        raise AssertionError("no backing file is registered at INIT")

    def backing_close(self, backing_id: int) -> None:
        raise AssertionError("no backing file is closed at INIT")


class Wishful(Operations):
    """A filesystem that asks INIT for arbitrary flags and limits."""

    def __init__(self, want: int, max_write: int, max_pages: int, readdirplus: bool) -> None:
        self.wish = (want, max_write, max_pages)
        self.readdirplus = readdirplus

    def init(self, conn: ConnectionInfo) -> None:
        conn.want, conn.max_write, conn.max_pages = self.wish

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> Attr:
        return Attr(ino=ino, mode=0o40755, nlink=2)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    major = fdp.PickValueInList([7, 7, 7, 6, 8, fdp.ConsumeIntInRange(0, 2**32 - 1)])
    minor = fdp.ConsumeIntInRange(0, 60)
    flags = fdp.ConsumeIntInRange(0, 2**64 - 1)
    readahead = fdp.ConsumeIntInRange(0, 2**32 - 1)
    extended = fdp.ConsumeBool()
    fs = Wishful(fdp.ConsumeIntInRange(0, 2**64 - 1), fdp.ConsumeIntInRange(0, 2**32 - 1),
                 fdp.ConsumeIntInRange(0, 2**16 - 1), fdp.ConsumeBool())
    mode = fdp.PickValueInList(list(MODES))
    may = fdp.ConsumeBool()
    k = FakeKernel(fs, passthrough=mode, may_pass_through=may, registry=BackingRegistry(Unused()))
    if extended:
        body = struct.pack("<IIIII44x", major, minor, readahead, flags & 0xFFFFFFFF, flags >> 32)
    else:
        body = struct.pack("<IIII", major, minor, readahead, flags & 0xFFFFFFFF)
        flags &= 0xFFFFFFFF
    if extended and not flags & F.INIT_EXT:
        flags &= 0xFFFFFFFF  # flags2 counts only with INIT_EXT
    reply = k.call(abi.Opcode.INIT, body, nodeid=0)
    too_old = major != 7 or minor < abi.MIN_KERNEL_MINOR_VERSION
    if reply.error:
        assert reply.error == -errno.EPROTO, reply
        assert too_old or mode == "on", "refused a kernel that can be served"
        assert k.dispatcher.failure
        return
    assert not too_old, "served a kernel that is too old"
    out = struct.unpack("<IIIIHHIIHHIIH22x", reply.payload)
    got_minor, got_readahead, got_flags, max_write, max_pages, flags2, depth = (
        out[1], out[2], out[3], out[6], out[8], out[10], out[11])
    granted = got_flags | flags2 << 32
    assert out[0] == 7 and got_minor == min(minor, abi.KERNEL_MINOR_VERSION)
    assert granted & ~flags == 0, "asked for a flag the kernel did not offer"
    for flag, since in abi.INIT_FLAG_MINOR.items():
        assert not (granted & flag and got_minor < since), f"{flag!r} at minor {got_minor}"
    assert got_readahead <= readahead
    assert abi.PAGE_SIZE <= max_write <= abi.MAX_WRITE and 1 <= max_pages <= abi.MAX_PAGES
    if granted & F.PASSTHROUGH:
        assert may and mode != "off" and not granted & F.WRITEBACK_CACHE and depth in (1, 2)
        assert k.dispatcher.registry.available
    else:
        assert depth == 0 and not k.dispatcher.registry.available
        assert mode != "on", "passthrough on was accepted without passthrough"
    assert k.dispatcher.parser.max_reply <= REPLY_BUFFER
    assert k.still_serving()


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)
    atheris.instrument_all()  # every module loaded (an editable install bypasses the import hook)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
