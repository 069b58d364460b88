"""A file the kernel may cache for an hour, kept true by telling the kernel when it changes.

Run: ``python -m fusepass.examples.counter MOUNTPOINT``. ``MOUNTPOINT/count`` holds a number;
writing anything to ``MOUNTPOINT/bump`` adds one. The names, attributes and data of
``count`` are cached for an hour (``keep_cache``: even a new open reuses the cached data),
so each bump drops what the kernel holds of ``count`` with ``PathFS.invalidate``. The same
call serves a filesystem whose files change behind the mount's back.
"""

from __future__ import annotations

import errno
import stat
import threading

from fusepass import Attr, MountOptions, Opened
from fusepass.pathfs import PathFS, PathOperations
from fusepass.serve import run_foreground


class Counter(PathOperations):
    entry_timeout = attr_timeout = 3600.0

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def _text(self) -> bytes:
        return f"{self.count}\n".encode()

    def getattr(self, path: str, fh: int | None) -> Attr:
        if path == "/":
            return Attr(ino=1, mode=stat.S_IFDIR | 0o755, nlink=2)
        with self.lock:
            if path == "/count":
                return Attr(ino=2, mode=stat.S_IFREG | 0o444, size=len(self._text()))
        if path == "/bump":
            return Attr(ino=3, mode=stat.S_IFREG | 0o222)
        raise OSError(errno.ENOENT, "no such file", path)

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", "count", "bump"]

    def open(self, path: str, flags: int) -> Opened:
        return Opened(keep_cache=path == "/count")

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self.lock:
            return self._text()[offset:offset + size]

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self.lock:
            self.count += 1
        # From the handler of another file (bump): the kernel holds nothing of count meanwhile.
        assert self.layer is not None
        self.layer.invalidate("/count")
        return len(data)

    def truncate(self, path: str, length: int, fh: int | None) -> None:
        pass  # "echo > bump" truncates it first; bump keeps nothing


def main() -> int:
    return run_foreground(lambda args: PathFS(Counter()), description=__doc__.splitlines()[0],
                          defaults=MountOptions(fsname="counter", subtype="counter"))


if __name__ == "__main__":
    raise SystemExit(main())
