"""A read-only filesystem for mfusepy that uses raw_fi: open keeps per-open state in fi."""

import errno
import stat
import sys

import mfusepy as fuse

FILES = {"/a": b"alpha\n", "/b": b"bravo bravo\n"}


class RawFi(fuse.Operations):
    use_ns = True

    def __init__(self):
        self.opens = 0

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path in ("/opens", "/whoami"):
            return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": 64}
        if path not in FILES:
            raise fuse.FuseOSError(errno.ENOENT)
        return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": len(FILES[path])}

    def readdir(self, path, fh):  # (name, attrs, 0) tuples; mfusepy also takes the mode alone
        return [(".", {"st_mode": stat.S_IFDIR}, 0), ("..", stat.S_IFDIR, 0)] + [
            (name, {"st_mode": stat.S_IFREG | 0o444}, 0) for name in ("a", "b", "opens", "whoami")]

    def open(self, path, fi):
        if fi.flags & 3 != 0:
            raise fuse.FuseOSError(errno.EROFS)
        self.opens += 1
        fi.fh = self.opens
        fi.direct_io = path in ("/opens", "/whoami")  # their size is a guess: read until the end
        return 0

    def read(self, path, size, offset, fi):
        if path == "/opens":
            return f"open {fi.fh} of {self.opens}\n".encode()[offset:offset + size]
        if path == "/whoami":
            return "uid={} gid={} pid={}\n".format(*fuse.fuse_get_context()).encode()[offset:offset + size]
        return FILES[path][offset:offset + size]


if __name__ == "__main__":
    fuse.FUSE(RawFi(), sys.argv[1], foreground=True, raw_fi=True)
