"""Coroutine handlers in the dispatcher, without a mount: the request is parsed at once, its
coroutine runs on the runner's loop and the reply arrives later through the scratch's ``deliver``;
INTERRUPT cancels the task (EINTR) and nothing the reply would have promised stays registered;
errors become errnos; plain and coroutine handlers mix in one filesystem."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import struct
import threading
from collections.abc import Iterator

import pytest
from fakekernel import FakeKernel, init_body, loop_runner
from test_backing_registry import FakeDevice

from fusepass import Attr, Context, DirListing, Entry, Opened, Operations, abi
from fusepass.aio import LoopRunner
from fusepass.backing import BackingRegistry
from fusepass.dispatch import PENDING, Dispatcher, coroutine_handlers
from fusepass.ops import ConnectionInfo

pytestmark = pytest.mark.timeout(30)
O = abi.Opcode
FILE = 2


class Mixed(Operations):
    """Plain lookup, opendir and setxattr; everything else a coroutine. ``step`` releases an awaiting
    open or getxattr; ``events`` tells the test (on its thread) what the handlers did."""

    negative_timeout = 5.0

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.step: asyncio.Event | None = None
        self.events: dict[str, threading.Event] = {k: threading.Event() for k in
                                                    ("awaiting", "cancelled", "released", "ran")}
        self.released: list[int] = []
        self.fd = os.open("/dev/null", os.O_RDONLY)

    def _awaiting(self) -> asyncio.Event:
        self.loop = asyncio.get_running_loop()
        self.step = asyncio.Event()
        self.events["awaiting"].set()
        return self.step

    def proceed(self) -> None:
        assert self.loop is not None and self.step is not None
        self.loop.call_soon_threadsafe(self.step.set)

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        if name != b"f":
            raise OSError(errno.ENOENT, "no such file")
        return Entry(FILE, Attr(ino=FILE, mode=stat.S_IFREG | 0o644), 1.0, 1.0)

    async def getattr(self, ctx: Context, ino: int, fh: int | None) -> Attr:
        await asyncio.sleep(0)
        return Attr(ino=ino, mode=(stat.S_IFDIR | 0o755) if ino == 1 else (stat.S_IFREG | 0o644), size=ino * 10)

    async def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes:
        self.events["ran"].set()
        if name == b"user.block":
            try:
                await self._awaiting().wait()
            except asyncio.CancelledError:
                self.events["cancelled"].set()
                raise
        if name.startswith(b"user.errno."):
            raise OSError(int(name[11:]), "injected")
        if name == b"user.boom":
            raise RuntimeError("injected failure")
        return b"value of " + name

    def setxattr(self, ctx: Context, ino: int, name: bytes, value: bytes, flags: int) -> None:
        pass

    async def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        await self._awaiting().wait()
        return Opened(fh=7, backing_fd=self.fd)

    async def release(self, ctx: Context, ino: int, fh: int, flags: int) -> None:
        await asyncio.sleep(0)
        self.released.append(fh)
        self.events["released"].set()

    def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        return Opened(fh=3)

    async def readdir(self, ctx: Context, ino: int, fh: int, offset: int, listing: DirListing) -> None:
        await asyncio.sleep(0)
        for i, name in enumerate((b"a", b"b", b"c")[offset:], start=offset):
            if not listing.add(name, i + 1, Attr(ino=10 + i, mode=stat.S_IFREG)):
                break


@pytest.fixture
def runner() -> Iterator[LoopRunner]:
    with loop_runner() as r:
        yield r


@pytest.fixture
def fs() -> Iterator[Mixed]:
    fs = Mixed()
    yield fs
    os.close(fs.fd)


@pytest.fixture
def kernel(fs: Mixed, runner: LoopRunner) -> FakeKernel:
    k = FakeKernel(fs, runner=runner)
    assert k.init().error == 0
    return k


def getxattr(name: bytes, size: int = 100) -> bytes:
    return abi.GETXATTR_IN.pack(size, 0) + name + b"\0"


def test_a_coroutine_handlers_reply_comes_later_through_deliver(kernel: FakeKernel) -> None:
    unique, msg = kernel.message(O.GETATTR, abi.GETATTR_IN.pack(0, 0, 0), nodeid=FILE)
    assert kernel.send_raw(msg) is PENDING
    reply = kernel.reply_later()
    assert (reply.unique, reply.error, reply.length) == (unique, 0, reply.received)
    assert abi.ATTR_OUT.unpack_from(reply.payload)[3:5] == (FILE, FILE * 10)  # ino, size
    summary = kernel.dispatcher.runner_stats
    assert summary.count[O.GETATTR] == 1 and kernel.stats.count[O.GETATTR] == 0  # counted where it settled


def test_a_plain_handler_answers_at_once_while_a_coroutine_waits(kernel: FakeKernel, fs: Mixed) -> None:
    blocked, msg = kernel.message(O.GETXATTR, getxattr(b"user.block"), nodeid=FILE)
    assert kernel.send(msg) == []
    assert fs.events["awaiting"].wait(10)
    assert kernel.call(O.LOOKUP, b"f\0").error == 0  # plain: answered at once, on this thread
    fs.proceed()
    reply = kernel.reply_later()
    assert (reply.unique, reply.error, reply.payload) == (blocked, 0, b"value of user.block")


def test_interrupt_cancels_the_task_and_the_caller_gets_eintr(kernel: FakeKernel, fs: Mixed) -> None:
    unique, msg = kernel.message(O.GETXATTR, getxattr(b"user.block"), nodeid=FILE)
    assert kernel.send(msg) == []
    assert fs.events["awaiting"].wait(10)
    assert kernel.send(kernel.message(O.INTERRUPT, abi.INTERRUPT_IN.pack(unique))[1]) == []
    reply = kernel.reply_later()
    assert (reply.unique, reply.error, reply.payload) == (unique, -errno.EINTR, b"")
    assert fs.events["cancelled"].is_set()
    assert kernel.dispatcher.runner_stats.expected[O.GETXATTR] == 1  # EINTR: the caller gave up
    assert kernel.still_serving()


def test_an_interrupt_that_comes_first_means_the_coroutine_never_runs(kernel: FakeKernel, fs: Mixed) -> None:
    unique = kernel.next_unique
    kernel.send(kernel.message(O.INTERRUPT, abi.INTERRUPT_IN.pack(unique))[1])
    _, msg = kernel.message(O.GETXATTR, getxattr(b"user.ok"), nodeid=FILE, unique=unique)
    (reply,) = kernel.send(msg)  # answered at once
    assert (reply.unique, reply.error) == (unique, -errno.EINTR)
    assert not fs.events["ran"].is_set()
    assert kernel.later.empty()


@pytest.mark.parametrize("code", [errno.EACCES, errno.ENOSPC, errno.ENOTRECOVERABLE], ids=errno.errorcode.get)
def test_a_coroutine_raising_oserror_gives_exactly_that_errno(kernel: FakeKernel, code: int) -> None:
    unique, msg = kernel.message(O.GETXATTR, getxattr(b"user.errno.%d" % code), nodeid=FILE)
    kernel.send(msg)
    reply = kernel.reply_later()
    assert (reply.unique, reply.error) == (unique, -code)


def test_a_coroutine_raising_anything_else_is_eio_logged_and_serving_goes_on(
    kernel: FakeKernel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="fusepass"):
        unique, msg = kernel.message(O.GETXATTR, getxattr(b"user.boom"), nodeid=FILE)
        kernel.send(msg)
        reply = kernel.reply_later()
    assert (reply.unique, reply.error) == (unique, -errno.EIO)
    assert "handler for GETXATTR raised" in caplog.text and "RuntimeError: injected failure" in caplog.text
    kernel.send(kernel.message(O.GETXATTR, getxattr(b"user.fine"), nodeid=FILE)[1])
    assert kernel.reply_later().payload == b"value of user.fine"


def test_a_coroutine_readdir_fills_its_own_buffer(kernel: FakeKernel) -> None:
    kernel.send(kernel.message(O.READDIR, abi.READ_IN.pack(3, 0, 4096, 0, 0, 0, 0))[1])
    reply = kernel.reply_later()
    assert reply.error == 0
    names = []
    pos = 0
    while pos < len(reply.payload):
        ino, off, namelen, typ = struct.unpack_from("<QQII", reply.payload, pos)
        names.append(reply.payload[pos + 24:pos + 24 + namelen])
        pos += (24 + namelen + 7) & ~7
    assert names == [b"a", b"b", b"c"]


def test_a_coroutine_lookup_miss_is_a_negative_entry(runner: LoopRunner) -> None:
    class Missing(Operations):
        negative_timeout = 5.0

        async def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
            raise OSError(errno.ENOENT, "no such file")

    k = FakeKernel(Missing(), runner=runner)
    assert k.init().error == 0
    k.send(k.message(O.LOOKUP, b"nothing\0")[1])
    reply = k.reply_later()
    assert reply.error == 0 and abi.ENTRY_OUT.unpack_from(reply.payload)[0] == 0  # node id 0: negative
    assert k.dispatcher.runner_stats.errors[O.LOOKUP] == 0


# --- nothing registered survives a cancellation; an undelivered reply is taken back ---------------


@pytest.fixture
def passing_through(fs: Mixed, runner: LoopRunner) -> tuple[FakeKernel, FakeDevice]:
    device = FakeDevice()
    k = FakeKernel(fs, runner=runner, registry=BackingRegistry(device), passthrough="auto", may_pass_through=True)
    assert k.call(O.INIT, init_body(), nodeid=0).error == 0
    assert k.dispatcher.registry.available
    return k, device


def test_an_open_interrupted_while_its_coroutine_waits_registers_no_backing_id(
    passing_through: tuple[FakeKernel, FakeDevice], fs: Mixed
) -> None:
    k, device = passing_through
    unique, msg = k.message(O.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=FILE)
    k.send(msg)
    assert fs.events["awaiting"].wait(10)
    k.send(k.message(O.INTERRUPT, abi.INTERRUPT_IN.pack(unique))[1])
    reply = k.reply_later()
    assert (reply.unique, reply.error) == (unique, -errno.EINTR)
    assert device.opened == [] and k.dispatcher.registry.registered == 0


def test_an_undelivered_open_reply_closes_its_backing_id_and_awaits_the_release(
    passing_through: tuple[FakeKernel, FakeDevice], fs: Mixed
) -> None:
    k, device = passing_through
    k.send(k.message(O.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=FILE)[1])
    assert fs.events["awaiting"].wait(10)
    fs.proceed()
    outcome = k.later.get(timeout=10)
    fh, flags, backing_id = abi.OPEN_OUT.unpack_from(b"".join(bytes(p) for p in outcome.reply), 16)
    assert (fh, backing_id) == (7, 1) and flags & abi.FopenFlag.PASSTHROUGH
    assert k.dispatcher.registry.registered == 1
    outcome.undelivered()  # the kernel refused the reply: the caller is gone
    assert k.dispatcher.registry.registered == 0 and device.live == set()
    assert fs.events["released"].wait(10) and fs.released == [7]  # the coroutine release ran on the loop


def test_a_coroutine_release_closes_the_backing_id_after_it(passing_through: tuple[FakeKernel, FakeDevice],
                                                            fs: Mixed) -> None:
    k, device = passing_through
    k.send(k.message(O.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=FILE)[1])
    assert fs.events["awaiting"].wait(10)
    fs.proceed()
    assert k.reply_later().error == 0 and k.dispatcher.registry.registered == 1
    k.send(k.message(O.RELEASE, abi.RELEASE_IN.pack(7, os.O_RDONLY, 0, 0), nodeid=FILE)[1])
    assert k.reply_later().error == 0
    assert fs.released == [7] and k.dispatcher.registry.registered == 0 and device.live == set()


# --- what the dispatcher refuses ------------------------------------------------------------------


def test_coroutine_handlers_are_found_and_need_a_runner(fs: Mixed) -> None:
    assert coroutine_handlers(fs) == ["getattr", "getxattr", "open", "readdir", "release"]
    with pytest.raises(ValueError, match="need a runner"):
        Dispatcher(fs)


@pytest.mark.parametrize("name", ["init", "forget"])
def test_handlers_called_outside_a_request_must_be_plain(runner: LoopRunner, name: str) -> None:
    async def handler(self: Operations, arg: object) -> None:
        pass

    fs = type("Wrong", (Operations,), {name: handler})()
    with pytest.raises(TypeError, match=f"{name} must be plain"):
        Dispatcher(fs, runner=runner)


def test_a_plain_filesystem_needs_no_runner() -> None:
    class Plain(Operations):
        def init(self, conn: ConnectionInfo) -> None:
            pass

    assert coroutine_handlers(Plain()) == []
    assert FakeKernel(Plain()).init().error == 0
