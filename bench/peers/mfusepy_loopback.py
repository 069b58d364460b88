"""A loopback filesystem on mfusepy: the benchmark's mfusepy peer.

mfusepy's sdists ship no examples, so the benchmark brings this one, shaped like mfusepy's own
``examples/loopback.py`` (path-based operations mapped one to one onto ``os`` calls, nanosecond times,
libfuse's multithreaded loop) with two differences that only make the peer faster: ``flush`` does not
fsync, and there is no per-call debug logging. Run inside the benchmark venv::

    python mfusepy_loopback.py SOURCE MOUNTPOINT
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import mfusepy as fuse

_STAT_KEYS = ("st_atime_ns", "st_ctime_ns", "st_mtime_ns", "st_gid", "st_mode", "st_nlink", "st_size", "st_uid",
              "st_blocks")
_STATVFS_KEYS = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                 "f_frsize", "f_namemax")


class Loopback(fuse.Operations):
    use_ns = True

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def _p(self, path: str) -> str:
        return self.root + path

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._p(path), amode):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._p(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._p(path), uid, gid, follow_symlinks=False)
        return 0

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        return os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def flush(self, path: str, fh: int) -> int:
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        (os.fdatasync if datasync else os.fsync)(fh)
        return 0

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        st = os.fstat(fh) if fh is not None else os.lstat(self._p(path))
        return {key.removesuffix("_ns"): getattr(st, key) for key in _STAT_KEYS}

    def link(self, target: str, source: str) -> int:
        os.link(self._p(source), self._p(target))
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._p(path), mode)
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        os.mknod(self._p(path), mode, dev)
        return 0

    def open(self, path: str, flags: int) -> int:
        return os.open(self._p(path), flags)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._p(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._p(path))

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def rename(self, old: str, new: str) -> int:
        os.rename(self._p(old), self._p(new))
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._p(path))
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._p(path))
        return {key: getattr(st, key) for key in _STATVFS_KEYS}

    def symlink(self, target: str, source: str) -> int:
        os.symlink(source, self._p(target))
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._p(path), length)
        return 0

    def unlink(self, path: str) -> int:
        os.unlink(self._p(path))
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        if times is None:
            os.utime(self._p(path), follow_symlinks=False)
        else:
            os.utime(self._p(path), ns=times, follow_symlinks=False)
        return 0

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: mfusepy_loopback.py SOURCE MOUNTPOINT", file=sys.stderr)
        return 2
    fuse.FUSE(Loopback(argv[0]), argv[1], foreground=True, fsname="mfusepy-loopback", default_permissions=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
