"""mfusepy handlers that fail: FuseOSError, a negative return, an unexpected exception."""

import errno
import stat
import sys

import mfusepy as fuse


class Raising(fuse.Operations):
    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path in ("/denied", "/negative", "/buggy", "/ok"):
            return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_size": 2}
        raise fuse.FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        return [".", "..", "denied", "negative", "buggy", "ok"]

    def open(self, path, flags):
        if path == "/denied":
            raise fuse.FuseOSError(errno.EACCES)
        if path == "/buggy":
            raise KeyError("a bug in the filesystem")
        return 0

    def read(self, path, size, offset, fh):
        return b"ok"[offset:offset + size]

    def unlink(self, path):
        return -errno.EPERM if path == "/negative" else -errno.EROFS

    def mkdir(self, path, mode):
        raise ValueError("not written yet")  # any exception but an OSError: the caller sees EINVAL


if __name__ == "__main__":
    fuse.FUSE(Raising(), sys.argv[1], foreground=True)
