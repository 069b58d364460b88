"""A memory filesystem written for fusepy, the way its own example is: paths as dict keys."""

import logging
import sys
from collections import defaultdict
from errno import ENOENT, ENOTEMPTY
from stat import S_IFDIR, S_IFLNK, S_IFREG
from time import time

from fuse import FUSE, FuseOSError, LoggingMixIn, Operations


class Memory(LoggingMixIn, Operations):
    def __init__(self):
        self.files = {}
        self.data = defaultdict(bytes)
        self.fd = 0
        now = time()
        self.files["/"] = dict(st_mode=(S_IFDIR | 0o755), st_ctime=now, st_mtime=now, st_atime=now, st_nlink=2)

    def chmod(self, path, mode):
        self.files[path]["st_mode"] &= 0o770000
        self.files[path]["st_mode"] |= mode
        return 0

    def chown(self, path, uid, gid):
        self.files[path]["st_uid"] = uid
        self.files[path]["st_gid"] = gid

    def create(self, path, mode):
        self.files[path] = dict(st_mode=(S_IFREG | mode), st_nlink=1, st_size=0, st_ctime=time(),
                                st_mtime=time(), st_atime=time())
        self.fd += 1
        return self.fd

    def getattr(self, path, fh=None):
        if path not in self.files:
            raise FuseOSError(ENOENT)
        return self.files[path]

    def getxattr(self, path, name, position=0):
        attrs = self.files[path].get("attrs", {})
        try:
            return attrs[name]
        except KeyError:
            return b""

    def listxattr(self, path):
        return self.files[path].get("attrs", {}).keys()

    def mkdir(self, path, mode):
        self.files[path] = dict(st_mode=(S_IFDIR | mode), st_nlink=2, st_size=0, st_ctime=time(),
                                st_mtime=time(), st_atime=time())
        self.files["/"]["st_nlink"] += 1

    def open(self, path, flags):
        self.fd += 1
        return self.fd

    def read(self, path, size, offset, fh):
        return self.data[path][offset:offset + size]

    def readdir(self, path, fh):
        prefix = path.rstrip("/") + "/"
        return [".", ".."] + [x[len(prefix):] for x in self.files
                              if x.startswith(prefix) and x != "/" and "/" not in x[len(prefix):]]

    def readlink(self, path):
        return self.data[path].decode()

    def removexattr(self, path, name):
        attrs = self.files[path].get("attrs", {})
        try:
            del attrs[name]
        except KeyError:
            pass

    def rename(self, old, new):
        self.data[new] = self.data.pop(old)
        self.files[new] = self.files.pop(old)

    def rmdir(self, path):
        if any(x.startswith(path + "/") for x in self.files):
            raise FuseOSError(ENOTEMPTY)
        self.files.pop(path)
        self.files["/"]["st_nlink"] -= 1

    def setxattr(self, path, name, value, options, position=0):
        attrs = self.files[path].setdefault("attrs", {})
        attrs[name] = value

    def statfs(self, path):
        return dict(f_bsize=512, f_blocks=4096, f_bavail=2048)

    def symlink(self, target, source):
        self.files[target] = dict(st_mode=(S_IFLNK | 0o777), st_nlink=1, st_size=len(source))
        self.data[target] = source.encode()

    def truncate(self, path, length, fh=None):
        self.data[path] = self.data[path][:length].ljust(length, b"\x00")
        self.files[path]["st_size"] = length

    def unlink(self, path):
        self.files.pop(path)
        self.data.pop(path, None)

    def utimens(self, path, times=None):
        now = time()
        atime, mtime = times if times else (now, now)
        self.files[path]["st_atime"] = atime
        self.files[path]["st_mtime"] = mtime

    def write(self, path, data, offset, fh):
        self.data[path] = self.data[path][:offset].ljust(offset, b"\x00") + data + self.data[path][offset + len(data):]
        self.files[path]["st_size"] = len(self.data[path])
        return len(data)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    FUSE(Memory(), sys.argv[1], foreground=True, allow_other=False)
