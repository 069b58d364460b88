"""Coroutine handlers in the path layer: PathFS's handlers become coroutines exactly where a path
handler they call is one, keep the node table as the plain ones do, and give each task its own
``context()``; then the slow-source example through a real mount, many readers at once."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from conftest import ServerProcess, python_module
from fakekernel import FakeKernel, loop_runner

from fusepass import Attr, abi, control
from fusepass.aio import LoopRunner
from fusepass.dispatch import coroutine_handlers
from fusepass.examples.slow_source import contents
from fusepass.pathfs import PathFS, PathOperations, context

pytestmark = pytest.mark.timeout(60)
O = abi.Opcode
DIR = Attr(ino=1, mode=stat.S_IFDIR | 0o755, nlink=2)


class Paths(PathOperations):
    """Names ``/a`` .. ``/e``; getattr and chmod are coroutines, truncate, open and release plain."""

    use_ino = False
    names = ("a", "b", "c", "d", "e")

    def __init__(self, gate: int = 0) -> None:
        self.calls: list[tuple[str, object]] = []
        self.gate = gate
        self.waiting = 0
        self.opened: asyncio.Event | None = None
        self.seen: dict[str, int | None] = {}
        self.blocking = threading.Event()
        self.cancelled = threading.Event()

    async def getattr(self, path: str, fh: int | None) -> Attr:
        await asyncio.sleep(0)
        if path == "/":
            return DIR
        if path == "/missing-later":  # made by create, then gone: the entry cannot be made
            raise OSError(errno.ENOENT, "gone")
        if path[1:] not in self.names and path != "/new":
            raise OSError(errno.ENOENT, "no such file", path)
        return Attr(ino=0, mode=stat.S_IFREG | 0o644, size=len(path))

    async def chmod(self, path: str, mode: int, fh: int | None) -> None:
        await asyncio.sleep(0)
        self.calls.append(("chmod", mode))

    def truncate(self, path: str, length: int, fh: int | None) -> None:
        self.calls.append(("truncate", length))

    async def readdir(self, path: str, fh: int) -> AsyncIterator[str]:
        for name in (".", "..", *self.names):
            await asyncio.sleep(0)
            yield name

    async def getxattr(self, path: str, name: str) -> bytes:
        ctx = context()
        assert ctx is not None
        if name == "user.gate":  # returns once ``gate`` of them are waiting
            if self.opened is None:
                self.opened = asyncio.Event()
            self.waiting += 1
            if self.waiting == self.gate:
                self.opened.set()
            await self.opened.wait()
            self.seen[path] = ctx.uid  # the caller of this task, after the others ran meanwhile
            return b"open"
        if name == "user.block":
            self.blocking.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        raise RuntimeError("injected failure")

    async def create(self, path: str, mode: int, flags: int) -> int:
        self.calls.append(("create", path))
        return 42

    def release(self, path: str, fh: int) -> None:
        self.calls.append(("release", fh))


@pytest.fixture
def runner() -> Iterator[LoopRunner]:
    with loop_runner() as r:
        yield r


def mounted(fs: PathOperations, runner: LoopRunner) -> FakeKernel:
    k = FakeKernel(PathFS(fs), runner=runner)
    assert k.init().error == 0
    return k


def lookup(k: FakeKernel, name: str) -> int:
    reply = k.call(O.LOOKUP, name.encode() + b"\0")
    assert reply.error == 0, reply
    return abi.ENTRY_OUT.unpack_from(reply.payload)[0]


def test_handlers_are_coroutines_exactly_where_a_path_handler_they_call_is() -> None:
    handlers = coroutine_handlers(PathFS(Paths()))
    # getattr makes lookup, getattr, setattr, link's, mknod's ... coroutines; create, readdir and
    # getxattr are coroutines themselves; open and release stay plain.
    assert {"lookup", "getattr", "setattr", "create", "readdir", "getxattr"} <= set(handlers)
    assert not {"open", "release", "read", "opendir"} & set(handlers)

    class Plain(PathOperations):
        def getattr(self, path: str, fh: int | None) -> Attr:
            return DIR

    assert coroutine_handlers(PathFS(Plain())) == []


def test_a_thousand_path_requests_are_in_flight_at_once(runner: LoopRunner) -> None:
    fs = Paths(gate=1000)
    k = mounted(fs, runner)
    nodes = {name: lookup(k, name) for name in fs.names}
    uniques = []
    for i in range(1000):
        name = fs.names[i % 5]
        unique, msg = k.message(O.GETXATTR, abi.GETXATTR_IN.pack(100, 0) + b"user.gate\0", nodeid=nodes[name],
                                uid=1000 + i % 5)
        assert k.send(msg) == []
        uniques.append(unique)
    replies = [k.reply_later() for _ in range(1000)]
    assert sorted(r.unique for r in replies) == uniques and {r.payload for r in replies} == {b"open"}
    assert fs.seen == {f"/{name}": 1000 + i for i, name in enumerate(fs.names)}  # context() per task


def test_an_async_generator_readdir_lists_every_name(runner: LoopRunner) -> None:
    k = mounted(Paths(), runner)
    fh = abi.OPEN_OUT.unpack_from(k.call(O.OPENDIR, abi.OPEN_IN.pack(0, 0)).payload)[0]
    reply = k.call(O.READDIR, abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
    names, pos = [], 0
    while pos < len(reply.payload):
        namelen = int.from_bytes(reply.payload[pos + 16:pos + 20], "little")
        names.append(reply.payload[pos + 24:pos + 24 + namelen].decode())
        pos += (24 + namelen + 7) & ~7
    assert names == [".", "..", "a", "b", "c", "d", "e"]


def test_setattr_awaits_its_coroutine_calls_and_makes_the_plain_ones_in_order(runner: LoopRunner) -> None:
    fs = Paths()
    k = mounted(fs, runner)
    ino = lookup(k, "c")
    F = abi.FattrFlag
    body = abi.SETATTR_IN.pack(F.MODE | F.SIZE, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0o600, 0, 0, 0, 0)
    reply = k.call(O.SETATTR, body, nodeid=ino)
    assert reply.error == 0
    assert fs.calls == [("chmod", 0o600), ("truncate", 5)]
    assert abi.ATTR_OUT.unpack_from(reply.payload)[3] == ino  # use_ino off: the node id


def test_a_create_whose_entry_cannot_be_made_releases_the_file(runner: LoopRunner) -> None:
    fs = Paths()
    k = mounted(fs, runner)
    reply = k.call(O.CREATE, abi.CREATE_IN.pack(os.O_RDWR, 0o644, 0, 0) + b"missing-later\0")
    assert reply.error == -errno.ENOENT
    assert fs.calls == [("create", "/missing-later"), ("release", 42)]
    assert PathFS.status(k.dispatcher.fs)["open_files"] == 0  # type: ignore[arg-type]


def test_an_interrupt_cancels_a_path_handler_and_errors_reach_the_caller(runner: LoopRunner) -> None:
    fs = Paths()
    k = mounted(fs, runner)
    ino = lookup(k, "a")
    unique, msg = k.message(O.GETXATTR, abi.GETXATTR_IN.pack(100, 0) + b"user.block\0", nodeid=ino)
    k.send(msg)
    assert fs.blocking.wait(10)
    k.send(k.message(O.INTERRUPT, abi.INTERRUPT_IN.pack(unique))[1])
    reply = k.reply_later()
    assert (reply.unique, reply.error) == (unique, -errno.EINTR)
    assert fs.cancelled.is_set()
    assert k.call(O.GETXATTR, abi.GETXATTR_IN.pack(100, 0) + b"user.other\0", nodeid=ino).error == -errno.EIO
    assert k.call(O.LOOKUP, b"nothing\0").error == -errno.ENOENT
    assert lookup(k, "b") > 1  # still serving


# --- the example, mounted ------------------------------------------------------------------------


def test_slow_source_serves_many_readers_at_once(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(python_module("fusepass.examples.slow_source", "--objects", "500", "--size", "3000",
                                        "--latency", "0.1"))
    mnt = Path(server.mountpoint)
    assert sorted(os.listdir(mnt)) == sorted(f"object-{i}" for i in range(500))
    results: dict[int, bytes] = {}
    start = threading.Barrier(500)

    def read(i: int) -> None:
        start.wait()
        results[i] = (mnt / f"object-{i}").read_bytes()

    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(500)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert results == {i: contents(f"object-{i}", 0, 3000) for i in range(500)}
    status = control.query(str(mnt), timeout=5)
    assert status["requests"]["READ"]["count"] >= 500 and status["requests"]["READ"]["errors"] == 0
    assert len(os.listdir(f"/proc/{server.proc.pid}/task")) <= 7  # main, 4 workers, the loop, the status socket
    with pytest.raises(OSError) as info:
        open(mnt / "object-1", "r+b")
    assert info.value.errno == errno.EROFS
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "object-500")
