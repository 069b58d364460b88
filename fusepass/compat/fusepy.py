"""fusepy 3.0.1's API on fusepass: ``FUSE``, ``Operations``, ``FuseOSError``, ``LoggingMixIn``,
``fuse_get_context``, ``fuse_exit``.

As in fusepy, ``FUSE`` calls every handler through ``operations(name, path, ...)`` (so a
``__call__`` override sees them all), every handler of the ``Operations`` base class counts as
provided (its defaults answer EROFS, ENOTSUP or success as fusepy's do), paths are decoded
strictly, and a handler that raises anything but an OSError fails the request with EINVAL.
"""

from __future__ import annotations

import errno
import logging
from stat import S_IFDIR
from typing import Any

from .bridge import Flavour, FuseOSError, fuse_exit, fuse_file_info, fuse_get_context, mount_and_serve, use_ns_warning

__all__ = ["ENOTSUP", "FUSE", "FuseOSError", "LoggingMixIn", "Operations", "fuse_exit", "fuse_file_info",
           "fuse_get_context"]

ENOTSUP = errno.ENOTSUP


class FUSE:
    """Mount ``operations`` at ``mountpoint`` and serve it until it is unmounted.

    Keyword options are libfuse's: ``foreground``, ``debug``, ``nothreads`` and every ``-o``
    option (``allow_other=True``, ``fsname="x"``, ``ro=True``, ``attr_timeout=5``, ...).
    Without ``foreground=True`` the process goes to the background once the mount answers.
    ``raw_fi=True`` hands handlers a ``fuse_file_info`` instead of ``fh``.
    """

    OPTIONS = (("foreground", "-f"), ("debug", "-d"), ("nothreads", "-s"))

    def __init__(self, operations: Any, mountpoint: str, raw_fi: bool = False, encoding: str = "utf-8",
                 **kwargs: Any) -> None:
        self.operations = operations
        self.raw_fi = raw_fi
        self.encoding = encoding
        self.use_ns = getattr(operations, "use_ns", False)
        use_ns_warning(operations)
        try:
            mount_and_serve(operations, mountpoint, FUSEPY, raw_fi, encoding, "strict", kwargs)
        finally:
            del self.operations


class Operations:
    """Subclass and override; raise ``FuseOSError(errno)`` to fail a request. The defaults are
    a read-only empty root directory."""

    def __call__(self, op: str, *args: Any) -> Any:
        if not hasattr(self, op):
            raise FuseOSError(errno.EFAULT)
        return getattr(self, op)(*args)

    def access(self, path: str, amode: int) -> int:
        return 0

    bmap = None

    def chmod(self, path: str, mode: int) -> int:
        raise FuseOSError(errno.EROFS)

    def chown(self, path: str, uid: int, gid: int) -> int:
        raise FuseOSError(errno.EROFS)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        """Return a file handle (with ``raw_fi``, set ``fi.fh`` and return 0)."""
        raise FuseOSError(errno.EROFS)

    def destroy(self, path: str) -> None:
        """Called when the filesystem goes away; ``path`` is "/"."""

    def flush(self, path: str, fh: Any) -> int:
        return 0

    def fsync(self, path: str, datasync: int, fh: Any) -> int:
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        return 0

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        """A dict with the keys of ``struct stat`` (``st_mode``, ``st_size``, ``st_mtime``...)."""
        if path != "/":
            raise FuseOSError(errno.ENOENT)
        return {"st_mode": S_IFDIR | 0o755, "st_nlink": 2}

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        raise FuseOSError(ENOTSUP)

    def init(self, path: str) -> None:
        """Called once the mount is up (``path`` is "/"): start threads here, not in __init__."""

    def ioctl(self, path: str, cmd: int, arg: Any, fip: Any, flags: int, data: Any) -> int:
        raise FuseOSError(errno.ENOTTY)

    def link(self, target: str, source: str) -> int:
        """Make ``target`` a hard link to ``source``."""
        raise FuseOSError(errno.EROFS)

    def listxattr(self, path: str) -> list[str]:
        return []

    lock = None

    def mkdir(self, path: str, mode: int) -> int:
        raise FuseOSError(errno.EROFS)

    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise FuseOSError(errno.EROFS)

    def open(self, path: str, flags: int) -> int:
        """Return a file handle (with ``raw_fi`` the signature is ``open(path, fi)``: set ``fi.fh``)."""
        return 0

    def opendir(self, path: str) -> int:
        return 0

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        raise FuseOSError(errno.EIO)

    def readdir(self, path: str, fh: int) -> list[Any]:
        """Names, or (name, attrs dict, offset) tuples."""
        return [".", ".."]

    def readlink(self, path: str) -> str:
        raise FuseOSError(errno.ENOENT)

    def release(self, path: str, fh: Any) -> int:
        return 0

    def releasedir(self, path: str, fh: int) -> int:
        return 0

    def removexattr(self, path: str, name: str) -> int:
        raise FuseOSError(ENOTSUP)

    def rename(self, old: str, new: str) -> int:
        raise FuseOSError(errno.EROFS)

    def rmdir(self, path: str) -> int:
        raise FuseOSError(errno.EROFS)

    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        raise FuseOSError(ENOTSUP)

    def statfs(self, path: str) -> dict[str, int]:
        """A dict with the keys of ``struct statvfs`` (``f_bsize``, ``f_blocks``...)."""
        return {}

    def symlink(self, target: str, source: str) -> int:
        """Make ``target`` a symbolic link whose content is ``source``."""
        raise FuseOSError(errno.EROFS)

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        raise FuseOSError(errno.EROFS)

    def unlink(self, path: str) -> int:
        raise FuseOSError(errno.EROFS)

    def utimens(self, path: str, times: tuple[Any, Any] | None = None) -> int:
        """``times`` is (atime, mtime): nanoseconds with ``use_ns``, float seconds without."""
        return 0

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        raise FuseOSError(errno.EROFS)


class LoggingMixIn:
    """Log every call and its result at DEBUG level on the logger "fuse.log-mixin"."""

    log = logging.getLogger("fuse.log-mixin")

    def __call__(self, op: str, path: str, *args: Any) -> Any:
        self.log.debug("-> %s %s %s", op, path, repr(args))
        ret: Any = "[Unhandled Exception]"
        try:
            ret = getattr(self, op)(path, *args)
            return ret
        except OSError as e:
            ret = str(e)
            raise
        finally:
            self.log.debug("<- %s %s", op, repr(ret))


_OPS = frozenset({
    "getattr", "readlink", "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link", "chmod", "chown",
    "truncate", "open", "read", "write", "statfs", "flush", "release", "fsync", "setxattr", "getxattr",
    "listxattr", "removexattr", "opendir", "readdir", "releasedir", "fsyncdir", "init", "destroy", "access",
    "create", "utimens",
})
FUSEPY = Flavour("fusepy", Operations, call_through=True, skips_defaults=False, ops=_OPS)
