"""fusepass.examples.slow_source written on pyfuse3 and trio, for ``python -m bench.aio``: the same
objects, contents and latency (a store whose every read awaits it), metadata answered from memory,
files opened direct_io. Run by the benchmark's virtualenv with the repository on PYTHONPATH:
``python bench/peers/pyfuse3_slow_source.py MOUNTPOINT [--objects N] [--size BYTES] [--latency S]
[--max-tasks N]``."""

from __future__ import annotations

import argparse
import errno
import os
import stat
from typing import Any

import pyfuse3
import trio

from fusepass.examples.slow_source import contents

ROOT = pyfuse3.ROOT_INODE


class SlowSource(pyfuse3.Operations):
    def __init__(self, objects: int, size: int, latency: float) -> None:
        super().__init__()
        self.size = size
        self.latency = latency
        self.inodes = {ROOT + 1 + i: f"object-{i}" for i in range(objects)}
        self.names = {name.encode(): ino for ino, name in self.inodes.items()}

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == ROOT:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFDIR | 0o555, 2, 0
        elif inode in self.inodes:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFREG | 0o444, 1, self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.entry_timeout = attr.attr_timeout = 60.0
        attr.st_blksize = 4096
        return attr

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT or name not in self.names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(self.names[name])

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for index, (name, ino) in enumerate(list(self.names.items())[start_id:], start=start_id):
            if not pyfuse3.readdir_reply(token, name, await self.getattr(ino), index + 1):
                break

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if off >= self.size:
            return b""
        await trio.sleep(self.latency)
        return contents(self.inodes[fh], off, min(size, self.size - off))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--max-tasks", type=int, default=99, help="pyfuse3.main's bound on tasks (its default: 99)")
    args = parser.parse_args()
    options = set(pyfuse3.default_options) | {"fsname=slow_source"}
    pyfuse3.init(SlowSource(args.objects, args.size, args.latency), args.mountpoint, options)
    try:
        trio.run(pyfuse3.main, 1, args.max_tasks)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
