"""mfusepy 3.1.1's API on fusepass: ``FUSE``, ``Operations``, ``FuseOSError``, ``LoggingMixIn``,
``log_callback``, ``overrides``, ``fuse_get_context``, ``fuse_exit``.

As in mfusepy, ``FUSE`` calls handlers as methods (``__call__`` is ignored, with a warning),
only the handlers a subclass overrides are provided (so the kernel's own fallbacks apply to
the rest), paths are decoded with surrogate escapes, ``create`` may take ``flags``, and
``readdir_with_offset`` and ``init_with_config`` are honoured.
"""

from __future__ import annotations

import errno
import functools
import logging
import warnings
from collections.abc import Callable, Iterable
from stat import S_IFDIR
from typing import Any, TypeVar

from .bridge import Flavour, FuseOSError, fuse_exit, fuse_file_info, fuse_get_context, mount_and_serve, use_ns_warning

__all__ = ["ENOATTR", "ENOTSUP", "FUSE", "FuseOSError", "LoggingMixIn", "Operations", "fuse_exit", "fuse_file_info",
           "fuse_get_context", "log_callback", "overrides"]

ENOTSUP = errno.ENOTSUP
ENOATTR = getattr(errno, "ENOATTR", errno.ENODATA)
F = TypeVar("F", bound=Callable[..., Any])


class FUSE:
    """Mount ``operations`` at ``mountpoint`` and serve it until it is unmounted.

    Keyword options are libfuse's: ``foreground``, ``debug``, ``nothreads`` and every ``-o``
    option. ``raw_fi=True`` hands handlers a ``fuse_file_info`` instead of ``fh``; ``encoding``
    and ``errors`` say how paths are decoded.
    """

    OPTIONS = (("foreground", "-f"), ("debug", "-d"), ("nothreads", "-s"))

    def __init__(self, operations: Any, mountpoint: str, raw_fi: bool = False, encoding: str = "utf-8",
                 errors: str = "surrogateescape", **kwargs: Any) -> None:
        self.operations = operations
        self.raw_fi = raw_fi
        self.encoding = encoding
        self.errors = errors
        self.use_ns = getattr(operations, "use_ns", False)
        use_ns_warning(operations)
        if callable(operations):
            warnings.warn("The call operator on the Operations object is ignored since mfusepy 3.0! Use decorators "
                          "to wrap methods or if really necessary overwrite __getattribute__ instead.",
                          DeprecationWarning, stacklevel=2)
        try:
            mount_and_serve(operations, mountpoint, MFUSEPY, raw_fi, encoding, errors, kwargs)
        finally:
            del self.operations


def _default(method: F) -> F:
    """A default handler: not provided unless a subclass overrides it."""
    method.libfuse_ignore = True  # type: ignore[attr-defined]
    return method


class Operations:
    """Subclass and override; raise ``FuseOSError(errno)`` (or return ``-errno`` where the
    handler returns an int) to fail a request. Handlers you do not override are not provided."""

    @_default
    def access(self, path: str, amode: int) -> int:
        return 0

    @_default
    def bmap(self, path: str, blocksize: int, idx: Any) -> int:
        return 0

    @_default
    def chmod(self, path: str, mode: int) -> int:
        raise FuseOSError(errno.EROFS)

    @_default
    def chown(self, path: str, uid: int, gid: int) -> int:
        raise FuseOSError(errno.EROFS)

    @_default
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        """Return a file handle; declared ``create(path, mode, flags)`` it also gets the open flags."""
        raise FuseOSError(errno.EROFS)

    @_default
    def destroy(self, path: str) -> None:
        """Called when the filesystem goes away; ``path`` is "/"."""

    @_default
    def flush(self, path: str, fh: int) -> int:
        return 0

    @_default
    def fsync(self, path: str, datasync: int, fh: int) -> int:
        return 0

    @_default
    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        return 0

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        """A dict with the keys of ``struct stat``; the default is an empty root directory."""
        if path != "/":
            raise FuseOSError(errno.ENOENT)
        return {"st_mode": S_IFDIR | 0o755, "st_nlink": 2}

    @_default
    def init(self, path: str) -> None:
        """Called once the mount is up (``path`` is "/")."""

    @_default
    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        """As ``init``, with libfuse's connection and configuration records (timeouts, use_ino...)."""

    @_default
    def ioctl(self, path: str, cmd: int, arg: Any, fh: int, flags: int, data: Any) -> int:
        raise FuseOSError(errno.ENOTTY)

    @_default
    def link(self, target: str, source: str) -> int:
        """Make ``target`` a hard link to ``source``."""
        raise FuseOSError(errno.EROFS)

    @_default
    def listxattr(self, path: str) -> Iterable[str]:
        return []

    @_default
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        raise FuseOSError(ENOTSUP)

    @_default
    def lock(self, path: str, fh: int, cmd: int, lock: Any) -> int:
        raise FuseOSError(errno.ENOSYS)

    @_default
    def mkdir(self, path: str, mode: int) -> int:
        raise FuseOSError(errno.EROFS)

    @_default
    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise FuseOSError(errno.EROFS)

    @_default
    def open(self, path: str, flags: int) -> int:
        return 0

    @_default
    def opendir(self, path: str) -> int:
        return 0

    @_default
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        raise FuseOSError(errno.EIO)

    @_default
    def readdir(self, path: str, fh: int) -> Iterable[Any]:
        """Names, or (name, attrs dict or st_mode int, 0) tuples."""
        return [".", ".."]

    @_default
    def readdir_with_offset(self, path: str, offset: int, fh: int) -> Iterable[Any]:
        """As ``readdir``, resuming at ``offset``."""
        return [".", ".."]

    @_default
    def readlink(self, path: str) -> str:
        raise FuseOSError(errno.ENOENT)

    @_default
    def release(self, path: str, fh: int) -> int:
        return 0

    @_default
    def releasedir(self, path: str, fh: int) -> int:
        return 0

    @_default
    def removexattr(self, path: str, name: str) -> int:
        raise FuseOSError(ENOTSUP)

    @_default
    def rename(self, old: str, new: str) -> int:
        raise FuseOSError(errno.EROFS)

    @_default
    def rmdir(self, path: str) -> int:
        raise FuseOSError(errno.EROFS)

    @_default
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        raise FuseOSError(ENOTSUP)

    @_default
    def statfs(self, path: str) -> dict[str, int]:
        return {}

    @_default
    def symlink(self, target: str, source: str) -> int:
        """Make ``target`` a symbolic link whose content is ``source``."""
        raise FuseOSError(errno.EROFS)

    @_default
    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        raise FuseOSError(errno.EROFS)

    @_default
    def unlink(self, path: str) -> int:
        raise FuseOSError(errno.EROFS)

    @_default
    def utimens(self, path: str, times: tuple[Any, Any] | None = None) -> int:
        return 0

    @_default
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        raise FuseOSError(errno.EROFS)

    @_default
    def poll(self, path: str, fh: int, ph: Any, reventsp: Any) -> int:
        raise FuseOSError(errno.ENOSYS)

    @_default
    def write_buf(self, path: str, buf: Any, offset: int, fh: int) -> int:
        raise FuseOSError(errno.ENOSYS)

    @_default
    def read_buf(self, path: str, bufpp: Any, size: int, offset: int, fh: int) -> int:
        raise FuseOSError(errno.ENOSYS)

    @_default
    def flock(self, path: str, fh: int, op: int) -> int:
        raise FuseOSError(errno.ENOSYS)

    @_default
    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        raise FuseOSError(errno.ENOSYS)


callback_logger = logging.getLogger("fuse.log-mixin")


def _log_call(method: Callable[..., Any], *args: Any) -> Any:
    callback_logger.debug("-> %s %s", method.__name__, repr(args))
    ret: Any = "[Unhandled Exception]"
    try:
        ret = method(*args)
        return ret
    except OSError as e:
        ret = str(e)
        raise
    finally:
        callback_logger.debug("<- %s %s", method.__name__, repr(ret))


class LoggingMixIn:
    """Log every provided handler's call and result at DEBUG level on "fuse.log-mixin"."""

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if (not name.startswith("_") and callable(value) and hasattr(Operations, name)
                and not getattr(value, "libfuse_ignore", False)):
            return functools.partial(_log_call, value)
        return value


def log_callback(method: F) -> F:
    """Log the decorated handler's calls as LoggingMixIn does."""
    @functools.wraps(method)
    def logged(*args: Any) -> Any:
        return _log_call(method, *args)
    return logged  # type: ignore[return-value]


def overrides(parent_class: type) -> Callable[[F], F]:
    """Check that the decorated method overrides one of ``parent_class``."""
    def check(method: F) -> F:
        assert method.__name__ in dir(parent_class), f"{method.__name__} overrides nothing in {parent_class}"
        assert callable(getattr(parent_class, method.__name__))
        return method
    return check


_OPS = frozenset({
    "getattr", "readlink", "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link", "chmod", "chown",
    "truncate", "open", "read", "write", "statfs", "flush", "release", "fsync", "setxattr", "getxattr",
    "listxattr", "removexattr", "opendir", "readdir", "releasedir", "fsyncdir", "init", "destroy", "access",
    "create", "utimens", "fallocate",
})
MFUSEPY = Flavour("mfusepy", Operations, call_through=False, skips_defaults=True, ops=_OPS)
