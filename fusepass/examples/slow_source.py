"""A read-only view of a slow object store: file contents come from an asyncio source that
answers each request after a delay, and many readers are served at once.

Run: ``python -m fusepass.examples.slow_source MOUNTPOINT [--objects N] [--size BYTES]
[--latency SECONDS]``, then read many files together, e.g. ``cat MOUNTPOINT/* > /dev/null``
in a few shells, or ``for f in MOUNTPOINT/*; do cat "$f" > /dev/null & done; wait``.

The store stands in for one behind a network (an object store, an HTTP API): its ``get`` is a
coroutine that awaits ``latency`` before it answers. The filesystem's ``read`` awaits it, so a
thousand readers cost a thousand awaiting coroutines on the session's event loop, not a
thousand threads; ``getattr`` and ``readdir`` answer from the store's index in memory and stay
plain methods, on the worker threads. Files are opened ``direct_io``: every read goes to the
store, as it must for a source that may change.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import stat

from fusepass import Attr, MountOptions, Opened
from fusepass.pathfs import PathFS, PathOperations
from fusepass.serve import run_foreground


def contents(key: str, offset: int, size: int) -> bytes:
    """Bytes ``offset`` .. ``offset + size`` of the object ``key``: its name and a newline, repeated."""
    pattern = f"{key}\n".encode()
    start = offset % len(pattern)
    return (pattern * ((start + size) // len(pattern) + 1))[start:start + size]


class SlowStore:
    """An object store with ``latency`` seconds of delay per request (simulated: it sleeps).
    Its objects are ``object-0`` .. ``object-{N-1}`` of ``size`` bytes each."""

    def __init__(self, objects: int, size: int, latency: float) -> None:
        self.sizes = {f"object-{i}": size for i in range(objects)}
        self.latency = latency

    async def get(self, key: str, offset: int, size: int) -> bytes:
        await asyncio.sleep(self.latency)
        length = self.sizes[key]
        return contents(key, offset, max(0, min(size, length - offset)))


class SlowSource(PathOperations):
    entry_timeout = attr_timeout = 60.0  # names and sizes do not change

    def __init__(self, store: SlowStore) -> None:
        self.store = store

    def getattr(self, path: str, fh: int | None) -> Attr:
        if path == "/":
            return Attr(ino=1, mode=stat.S_IFDIR | 0o555, nlink=2)
        size = self.store.sizes.get(path[1:])
        if size is None:
            raise OSError(errno.ENOENT, "no such object", path)
        return Attr(ino=0, mode=stat.S_IFREG | 0o444, size=size)

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *self.store.sizes]

    def open(self, path: str, flags: int) -> Opened:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, "read-only", path)
        return Opened(direct_io=True)

    # The base class declares the plain form; mypy sees a coroutine override as another type.
    async def read(self, path: str, size: int, offset: int, fh: int) -> bytes:  # type: ignore[override]
        if offset >= self.store.sizes[path[1:]]:
            return b""  # end of file: no need to ask the store
        return await self.store.get(path[1:], offset, size)


def main() -> int:
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--objects", type=int, default=1000, help="how many objects the store holds")
        parser.add_argument("--size", type=int, default=65536, help="bytes per object")
        parser.add_argument("--latency", type=float, default=0.1, help="seconds the store takes per request")

    return run_foreground(lambda args: PathFS(SlowSource(SlowStore(args.objects, args.size, args.latency))),
                          description=__doc__.splitlines()[0], configure=configure,
                          defaults=MountOptions(fsname="slow_source", subtype="slow_source"))


if __name__ == "__main__":
    raise SystemExit(main())
