"""A loopback written for mfusepy: every handler one os call on the same path under ROOT.
``use_passthrough`` is fusepass's opt-in (mfusepy ignores it): the fh open returns is the file."""

import errno
import os
import sys

import mfusepy as fuse


class Loopback(fuse.Operations):
    use_ns = True
    use_passthrough = True

    def __init__(self, root):
        self.root = os.path.realpath(root)

    def _p(self, path):
        return self.root + path

    def access(self, path, amode):
        if not os.access(self._p(path), amode):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    def chmod(self, path, mode):
        os.chmod(self._p(path), mode)
        return 0

    def chown(self, path, uid, gid):
        os.chown(self._p(path), uid, gid)
        return 0

    def create(self, path, mode, fi=None):
        return os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def getattr(self, path, fh=None):
        st = os.lstat(self._p(path))
        attrs = {key: getattr(st, key) for key in ("st_gid", "st_mode", "st_nlink", "st_size", "st_uid", "st_ino")}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)  # use_ns
        return attrs

    def link(self, target, source):
        return os.link(self._p(source), self._p(target))

    def mkdir(self, path, mode):
        return os.mkdir(self._p(path), mode)

    def mknod(self, path, mode, dev):
        return os.mknod(self._p(path), mode, dev)

    def open(self, path, flags):
        return os.open(self._p(path), flags)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._p(path))

    def readlink(self, path):
        return os.readlink(self._p(path))

    def release(self, path, fh):
        return os.close(fh)

    def rename(self, old, new):
        return os.rename(self._p(old), self._p(new))

    def rmdir(self, path):
        return os.rmdir(self._p(path))

    def statfs(self, path):
        stv = os.statvfs(self._p(path))
        return {key: getattr(stv, key) for key in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag", "f_frsize",
            "f_namemax")}

    def symlink(self, target, source):
        return os.symlink(source, self._p(target))

    def truncate(self, path, length, fh=None):
        with open(self._p(path), "r+b") as f:
            f.truncate(length)

    def unlink(self, path):
        return os.unlink(self._p(path))

    def utimens(self, path, times=None):
        return os.utime(self._p(path), ns=times)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)


if __name__ == "__main__":
    fuse.FUSE(Loopback(sys.argv[1]), sys.argv[2], foreground=True, nothreads=False)
