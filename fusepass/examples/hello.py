"""The smallest filesystem: one read-only file, on the path-based layer.

Run: ``python -m fusepass.examples.hello MOUNTPOINT``, then ``cat MOUNTPOINT/hello``.
"""

import errno
import stat

from fusepass import Attr
from fusepass.pathfs import PathFS, PathOperations
from fusepass.serve import run_foreground

HELLO = b"hello, world\n"


class Hello(PathOperations):
    def getattr(self, path: str, fh: int | None) -> Attr:
        if path == "/":
            return Attr(ino=1, mode=stat.S_IFDIR | 0o755, nlink=2)
        if path == "/hello":
            return Attr(ino=2, mode=stat.S_IFREG | 0o444, size=len(HELLO))
        raise OSError(errno.ENOENT, "no such file", path)

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", "hello"]

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return HELLO[offset:offset + size]


if __name__ == "__main__":
    raise SystemExit(run_foreground(lambda args: PathFS(Hello())))
