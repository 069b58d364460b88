"""An inode-API filesystem whose handlers mix plain and ``async def``, for the asyncio tests.

Files ``f0`` .. ``f{N-1}`` (``--files N``) hold ``b"file I\\n"``; nothing is cached by the kernel and
they are opened ``direct_io``, so every stat and read reaches the server. Coroutines: lookup,
getattr, read, getxattr, mkdir (each awaits ``--delay`` seconds first); plain: opendir, readdir,
open, setxattr, unlink, forget.

Names that trigger behaviour: LOOKUP of ``boom`` raises RuntimeError, of ``errno-N`` OSError(N).
GETXATTR of ``user.boom`` / ``user.errno.N``: the same; ``user.block``: reports ``event started
block``, awaits forever, reports ``event cancelled block`` when its task is cancelled;
``user.slow``: reports ``event started slow``, awaits the ``release`` command, returns
b"slow-done"; ``user.gate``: awaits until ``--gate N`` of them are awaiting, returns b"gate-open".
MKDIR: starts an invalidation of the root's entry ``f0`` from the loop (which the kernel holds up
while it holds the root for this mkdir), reports ``event mkdir started``, awaits ``release``.

Control commands: ``peak`` (the most requests coroutines served at once), ``running``,
``waiting`` (workers waiting for room), ``threads`` (threads of this process), ``forgets``
(lookups given back), ``release``, ``notified`` (how the mkdir's invalidation ended: "pending"
or "done" or the error), ``rewrite I TEXT`` (new contents for fI, then invalidate its
cached data from the loop), ``store I TEXT`` / ``retrieve I`` (the kernel's page cache of fI,
from the loop), ``stats PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import stat
import sys
import threading
from collections.abc import Coroutine
from typing import Any

from _control import Control
from faulty import _misbehave

from fusepass import Attr, Context, DirListing, Entry, MountOptions, Opened, Operations
from fusepass.aio import AsyncNotifier
from fusepass.ops import ConnectionInfo
from fusepass.serve import run_foreground

FIRST_FILE = 2


class SlowFS(Operations):
    entry_timeout = attr_timeout = 0.0

    def __init__(self, control: Control, files: int, delay: float, gate: int) -> None:
        self.control = control
        self.delay = delay
        self.gate_size = gate
        self.data = {FIRST_FILE + i: b"file %d\n" % i for i in range(files)}
        self.xattrs: dict[tuple[int, bytes], bytes] = {}
        self.lock = threading.Lock()
        self.forgotten = 0
        self.notified = "none"
        self.notifier: AsyncNotifier | None = None
        # Made on the loop at the first request that needs them (the loop runs only then).
        self._released: asyncio.Event | None = None
        self._gate: asyncio.Event | None = None
        self._at_gate = 0
        control.commands.update(
            peak=lambda: self._in_flight().peak, running=lambda: self._in_flight().running,
            waiting=lambda: self._in_flight().waiting, threads=lambda: len(os.listdir("/proc/self/task")),
            forgets=lambda: self.forgotten, release=lambda: self._on_loop(self._release()),
            notified=lambda: self.notified, rewrite=lambda i, text: self._on_loop(self._rewrite(int(i), text)),
            store=lambda i, text: self._on_loop(self._store(int(i), text)),
            retrieve=lambda i: self._on_loop(self._retrieve(int(i))),
        )

    def init(self, conn: ConnectionInfo) -> None:
        assert conn.notifier is not None
        self.notifier = AsyncNotifier(conn.notifier)

    # --- plain handlers ---------------------------------------------------------------------

    def forget(self, items: Any) -> None:
        with self.lock:
            self.forgotten += sum(n for _, n in items)

    def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        return Opened(fh=0)

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int, listing: DirListing) -> None:
        for i, ino_ in enumerate(sorted(self.data)[offset:], start=offset):
            if not listing.add(b"f%d" % (ino_ - FIRST_FILE), i + 1, Attr(ino=ino_, mode=stat.S_IFREG)):
                break

    def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        return Opened(fh=ino, direct_io=True)

    def setxattr(self, ctx: Context, ino: int, name: bytes, value: bytes, flags: int) -> None:
        with self.lock:
            self.xattrs[(ino, name)] = bytes(value)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        with self.lock:
            self.data.pop(self._ino(name), None)

    # --- coroutine handlers -----------------------------------------------------------------

    async def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        _misbehave(name, b"boom", b"errno-")
        await asyncio.sleep(self.delay)
        ino = self._ino(name)
        return Entry(ino, self._attr(ino), 0.0, 0.0)

    async def getattr(self, ctx: Context, ino: int, fh: int | None) -> Attr:
        await asyncio.sleep(self.delay)
        return self._attr(ino)

    async def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> bytes:
        await asyncio.sleep(self.delay)
        return self.data.get(ino, b"")[offset:offset + size]

    async def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes:
        _misbehave(name, b"user.boom", b"user.errno.")
        if name == b"user.block":
            self.control.event("started block")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.control.event("cancelled block")
                raise
        if name == b"user.slow":
            self.control.event("started slow")
            await self._released_event().wait()
            return b"slow-done"
        if name == b"user.gate":
            if self._gate is None:
                self._gate = asyncio.Event()
            self._at_gate += 1
            if self._at_gate == self.gate_size:
                self._gate.set()
            await self._gate.wait()
            return b"gate-open"
        await asyncio.sleep(self.delay)
        with self.lock:
            value = self.xattrs.get((ino, name))
        if value is None:
            raise OSError(errno.ENODATA, "no such attribute")
        return value

    async def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        assert self.notifier is not None
        self.notified = "pending"
        self.notifier.invalidate_entry(1, b"f0").add_done_callback(self._invalidated)
        self.control.event("mkdir started")
        await self._released_event().wait()
        raise OSError(errno.EROFS, "no directories here")

    # --- helpers ----------------------------------------------------------------------------

    def _ino(self, name: bytes) -> int:
        if not name.startswith(b"f") or not name[1:].isdigit() or FIRST_FILE + int(name[1:]) not in self.data:
            raise OSError(errno.ENOENT, "no such file")
        return FIRST_FILE + int(name[1:])

    def _attr(self, ino: int) -> Attr:
        if ino == 1:
            return Attr(ino=1, mode=stat.S_IFDIR | 0o755, nlink=2)
        with self.lock:
            data = self.data.get(ino)
        if data is None:
            raise OSError(errno.ENOENT, "no such file")
        return Attr(ino=ino, mode=stat.S_IFREG | 0o644, size=len(data))

    def _invalidated(self, done: asyncio.Future[None]) -> None:
        error = done.exception()
        self.notified = "done" if error is None else repr(error)
        self.control.event("notified")

    def _released_event(self) -> asyncio.Event:
        if self._released is None:
            self._released = asyncio.Event()
        return self._released

    def _in_flight(self) -> Any:
        assert self.control.session is not None and self.control.session.in_flight is not None
        return self.control.session.in_flight

    def _on_loop(self, job: Coroutine[Any, Any, object]) -> object:
        """Run ``job`` on the session's loop (a control command runs on the control thread)."""
        assert self.control.session is not None and self.control.session.runner is not None
        loop = self.control.session.runner.loop
        assert loop is not None
        return asyncio.run_coroutine_threadsafe(job, loop).result(20)

    async def _release(self) -> str:
        self._released_event().set()
        return "released"

    async def _rewrite(self, i: int, text: str) -> str:
        assert self.notifier is not None
        with self.lock:
            self.data[FIRST_FILE + i] = text.encode()
        await self.notifier.invalidate_inode(FIRST_FILE + i)
        return "rewritten"

    async def _store(self, i: int, text: str) -> str:
        assert self.notifier is not None
        await self.notifier.store(FIRST_FILE + i, 0, text.encode())
        return "stored"

    async def _retrieve(self, i: int) -> str:
        assert self.notifier is not None
        return (await self.notifier.retrieve(FIRST_FILE + i, 0, 4096)).decode() or "(nothing)"


def main() -> int:
    control: list[Control] = []

    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--control", default=None)
        parser.add_argument("--files", type=int, default=1000)
        parser.add_argument("--delay", type=float, default=0.1)
        parser.add_argument("--gate", type=int, default=1000)

    def make(args: argparse.Namespace) -> Operations:
        control.append(Control(args.control))
        return SlowFS(control[0], args.files, args.delay, args.gate)

    return run_foreground(make, configure=configure,
                          defaults=MountOptions(fsname="slow", subtype="slow", default_permissions=True),
                          on_ready=lambda session: control[0].attach(session))


if __name__ == "__main__":
    sys.exit(main())
