"""mfusepy with use_ns: times in nanoseconds, both ways."""

import errno
import stat
import sys
import time

import mfusepy as fuse


class Times(fuse.Operations):
    use_ns = True

    def __init__(self):
        now = time.time_ns()
        self.times = {"/f": (now, now)}

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path not in self.times:
            raise fuse.FuseOSError(errno.ENOENT)
        atime, mtime = self.times[path]
        return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_atime": atime, "st_mtime": mtime,
                "st_ctime": mtime}

    def readdir_with_offset(self, path, offset, fh):  # mfusepy's resumable listing
        names = [".", ".."] + sorted(p[1:] for p in self.times)
        for cookie, name in enumerate(names[offset:], offset + 1):
            yield name, {"st_mode": stat.S_IFREG}, cookie

    def utimens(self, path, times=None):
        self.times[path] = times if times else (time.time_ns(), time.time_ns())
        return 0


if __name__ == "__main__":
    fuse.FUSE(Times(), sys.argv[1], foreground=True)
