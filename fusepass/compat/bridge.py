"""The engine behind the fusepy and mfusepy modules: a fusepy-style ``Operations`` object served
through ``fusepass.pathfs``, with the conventions of libfuse's high-level API that those
programs rely on (dictionaries of ``st_*`` keys, negative errno return values, ``fh`` set by
``open``, EINVAL for an unexpected exception) and the ``FUSE(...)`` call that mounts and serves.

A ``Flavour`` holds what differs between fusepy 3.0.1 and mfusepy 3.1.1: how a handler is
called (through ``operations(name, *args)`` or directly), which handlers count as provided,
and the few signatures that changed.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .. import abi
from ..mount import MountOptions
from ..ops import Attr, ConnectionInfo, Opened, StatfsReply
from ..pathfs import DirEntry, OpenResult, PathFS, PathOperations, context
from ..serve import parse_mount_options, serve
from ..session import Session

log = logging.getLogger("fuse")


class Unsupported(RuntimeError):
    """The program relies on something fusepass does not do; the message names it."""


class FuseOSError(OSError):
    """Raise it with an errno to fail a request: ``raise FuseOSError(errno.ENOENT)``."""

    def __init__(self, errno: int) -> None:  # noqa: A002 - fusepy's signature
        super().__init__(errno, os.strerror(errno))


class fuse_file_info:  # noqa: N801 - libfuse's name, as fusepy and mfusepy export it
    """What a ``raw_fi`` program receives instead of ``fh``: set ``fh``, ``direct_io``,
    ``keep_cache``, ``nonseekable`` in ``open``/``create``; the same object comes back to
    every later call on that open file."""

    def __init__(self, flags: int = 0) -> None:
        self.flags = flags
        self.fh = 0
        self.fh_old = self.writepage = self.direct_io = self.keep_cache = self.flush = 0
        self.nonseekable = self.flock_release = self.cache_readdir = self.noflush = 0
        self.parallel_direct_writes = self.padding = self.padding2 = self.lock_owner = self.poll_events = 0


def fuse_get_context() -> tuple[int, int, int]:
    """(uid, gid, pid) of the process whose request is being served; zeros outside a request."""
    ctx = context()
    return (ctx.uid, ctx.gid, ctx.pid) if ctx is not None else (0, 0, 0)


_running: list[Session] = []  # the sessions FUSE(...) is serving in this process


def fuse_exit() -> None:
    """Unmount and make the ``FUSE(...)`` call return, as SIGINT would."""
    for session in list(_running):
        threading.Thread(target=session.stop, daemon=True).start()


#: Set by the launcher: the descriptor on which the first mount reports readiness.
ready_fd: int | None = None


@dataclass(frozen=True)
class Flavour:
    """What differs between the libraries: see the module docstring."""

    name: str
    base: type  # the library's Operations class: its defaults are what "not overridden" means
    call_through: bool  # fusepy calls ``operations(name, *args)``; mfusepy calls the method
    skips_defaults: bool  # mfusepy registers only the handlers a subclass overrides
    ops: frozenset[str]  # the handlers the library's fuse_operations table has

    def provided(self, operations: object, name: str) -> bool:
        value = getattr(operations, name, None)
        if value is None:
            return False
        return not (self.skips_defaults and getattr(value, "libfuse_ignore", False))


# What a program may implement that fusepass cannot serve: refused at FUSE(...), by name.
_UNSERVED = ("ioctl", "lock", "bmap", "poll", "flock", "read_buf", "write_buf")
# Handlers whose int return value is libfuse's status: negative means -errno.
_STATUS_OPS = frozenset({
    "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link", "chmod", "chown", "truncate", "write",
    "flush", "release", "fsync", "setxattr", "removexattr", "releasedir", "fsyncdir", "access", "utimens",
    "fallocate",
})
# Mount options libfuse takes that change nothing here: fusepass already behaves so, or they only tune.
_HARMLESS = frozenset({
    "hard_remove", "intr", "intr_signal", "readdir_ino", "auto_cache", "big_writes", "large_read", "nonempty",
    "max_write", "max_readahead", "max_background", "congestion_threshold", "async_read", "sync_read",
    "atomic_o_trunc", "splice_move", "splice_read", "splice_write", "no_splice_move", "no_splice_read",
    "no_splice_write", "no_remote_lock", "no_remote_posix_lock", "no_remote_flock", "remember", "noforget",
    "nopath", "no_rofd_flush", "parallel_direct_write", "fmask", "dmask", "modules", "clone_fd",
    "max_idle_threads", "max_threads",
})


class Bridge(PathOperations):
    """A fusepy-style ``operations`` object as a ``PathOperations``."""

    def __init__(self, operations: Any, flavour: Flavour, *, raw_fi: bool, encoding: str, errors: str,
                 config: dict[str, str | bool]) -> None:
        self.operations = operations
        self.flavour = flavour
        self.raw_fi = raw_fi
        self.encoding, self.errors = encoding, errors
        self.use_ns = bool(getattr(operations, "use_ns", False))
        self.passthrough = bool(getattr(operations, "use_passthrough", False))
        self.critical: BaseException | None = None
        self._files: dict[int, fuse_file_info] = {}
        self._next = 1
        self._lock = threading.Lock()
        self._call = self._through if flavour.call_through else self._direct
        self._fsenc = (encoding.lower().replace("-", ""), errors) == ("utf8", "surrogateescape")
        self.entry_timeout = float(config.get("entry_timeout", 1.0))
        self.attr_timeout = float(config.get("attr_timeout", 1.0))
        self.negative_timeout = float(config.get("negative_timeout", 0.0))
        self.use_ino = bool(config.get("use_ino", False))
        self.direct_io = bool(config.get("direct_io", False))
        self.kernel_cache = bool(config.get("kernel_cache", False))
        self.uid = int(config["uid"]) if "uid" in config else None
        self.gid = int(config["gid"]) if "gid" in config else None
        self.umask = int(str(config["umask"]), 8) if "umask" in config else None
        for name in _UNSERVED:
            if self._overrides(name):
                raise Unsupported(f"the program implements {name}(), which fusepass does not serve")
        self._provided = {name for name in flavour.ops if flavour.provided(operations, name)}
        # mfusepy passes create the open flags too, unless it is declared create(path, mode).
        self._create_flags = flavour.name == "mfusepy" and "create" in self._provided and \
            len(inspect.signature(operations.create).parameters) != 2
        if flavour.name == "mfusepy" and self._overrides("readdir_with_offset"):
            self._provided.add("readdir")

    def _overrides(self, name: str) -> bool:
        value = getattr(type(self.operations), name, None)
        return value is not None and value is not getattr(self.flavour.base, name, None) and \
            self.flavour.provided(self.operations, name)

    def implements(self, name: str) -> bool:
        if name in ("open", "release", "opendir", "releasedir"):
            return True  # the bridge keeps their handles whether or not the program has them
        return name in self._provided

    # --- calling the program --------------------------------------------------------------

    def _through(self, name: str, *args: Any) -> Any:
        return self.operations(name, *args)

    def _direct(self, name: str, *args: Any) -> Any:
        return getattr(self.operations, name)(*args)

    def call(self, name: str, *args: Any) -> Any:
        """Call handler ``name`` the library's way, with the library's error conventions."""
        try:
            result = self._call(name, *args)
        except OSError as e:
            if isinstance(e.errno, int) and e.errno > 0:
                raise
            log.error("FUSE operation %s raised an OSError with errno %r, returning errno.EINVAL.", name, e.errno,
                      exc_info=True)
            raise OSError(errno.EINVAL, "invalid errno") from e
        except Exception as e:
            log.error("Uncaught exception from FUSE operation %s, returning errno.EINVAL.", name, exc_info=True)
            raise OSError(errno.EINVAL, f"{type(e).__name__} in {name}") from e
        except BaseException as e:
            self.critical = e
            log.critical("Uncaught critical exception from FUSE operation %s, aborting.", name, exc_info=True)
            fuse_exit()
            raise OSError(errno.EFAULT, "aborting") from None
        if name in _STATUS_OPS and isinstance(result, int) and result < 0:
            raise OSError(-result, os.strerror(-result))
        return result

    def _path(self, path: str) -> str:
        if self._fsenc:
            return path
        try:
            return os.fsencode(path).decode(self.encoding, self.errors)
        except UnicodeError as e:  # what libfuse's bindings answer when a name does not decode
            raise OSError(errno.EINVAL, f"name is not {self.encoding}") from e

    def _encode(self, name: str) -> bytes:
        return name.encode(self.encoding, self.errors)

    def _fh(self, fh: int | None) -> Any:
        """What the program gets for an open file: its fh, or with ``raw_fi`` the whole record."""
        if fh is None:
            return None
        fi = self._files.get(fh)
        if fi is None:
            return 0
        return fi if self.raw_fi else fi.fh

    # --- lifecycle ------------------------------------------------------------------------

    def init(self, conn: ConnectionInfo) -> None:
        try:
            if self.flavour.name == "mfusepy" and self._overrides("init_with_config"):
                self._init_with_config(conn)
            elif self.flavour.provided(self.operations, "init"):
                self._call("init", "/")
        except BaseException as e:  # libfuse's init cannot fail: the program's error ends the mount
            self.critical = e
            log.critical("Uncaught critical exception from FUSE operation init, aborting.", exc_info=True)
            fuse_exit()

    def _init_with_config(self, conn: ConnectionInfo) -> None:
        info = ConnInfo(conn)
        config = Config(self)
        self._call("init_with_config", info, config)
        config.apply(self)
        if info.want != info.initial_want:
            log.warning("fusepass ignores changes to fuse_conn_info.want made in init_with_config")

    def destroy(self) -> None:
        if self.flavour.provided(self.operations, "destroy"):
            self.call("destroy", "/")

    # --- attributes -----------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None) -> Attr:
        return self._attr(self.call("getattr", self._path(path), self._fh(fh)))

    def _attr(self, attrs: dict[str, Any]) -> Attr:
        def t(key: str) -> int:
            value = attrs.get(key, 0)
            if self.use_ns:
                return int(value)
            sec = int(value)
            return sec * 1_000_000_000 + int((value - sec) * 1e9)

        mode = int(attrs.get("st_mode", 0))
        if self.umask is not None:
            mode = (mode & ~0o7777) | (0o7777 & ~self.umask)
        return Attr(
            ino=int(attrs.get("st_ino", 0)) if self.use_ino else 0, mode=mode, nlink=int(attrs.get("st_nlink", 0)),
            uid=self.uid if self.uid is not None else int(attrs.get("st_uid", 0)),
            gid=self.gid if self.gid is not None else int(attrs.get("st_gid", 0)),
            rdev=int(attrs.get("st_rdev", 0)), size=int(attrs.get("st_size", 0)),
            blocks=int(attrs.get("st_blocks", 0)), blksize=int(attrs.get("st_blksize", 0)),
            atime_ns=t("st_atime"), mtime_ns=t("st_mtime"), ctime_ns=t("st_ctime"),
        )

    def chmod(self, path: str, mode: int, fh: int | None) -> None:
        self.call("chmod", self._path(path), mode)

    def chown(self, path: str, uid: int, gid: int, fh: int | None) -> None:
        self.call("chown", self._path(path), uid, gid)

    def truncate(self, path: str, length: int, fh: int | None) -> None:
        if fh is not None and self.flavour.name == "fusepy":
            self.call("truncate", self._path(path), length, self._fh(fh))  # fusepy's ftruncate
        else:
            self.call("truncate", self._path(path), length)

    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None, fh: int | None) -> None:
        if atime_ns is None or mtime_ns is None:
            now = self.getattr(path, fh)
            atime_ns = now.atime_ns if atime_ns is None else atime_ns
            mtime_ns = now.mtime_ns if mtime_ns is None else mtime_ns
        times = (atime_ns, mtime_ns) if self.use_ns else (atime_ns / 1e9, mtime_ns / 1e9)
        self.call("utimens", self._path(path), times)

    def readlink(self, path: str) -> str:
        return os.fsdecode(self._encode(self.call("readlink", self._path(path))))

    def access(self, path: str, mode: int) -> None:
        self.call("access", self._path(path), mode)

    def statfs(self, path: str) -> StatfsReply:
        d = self.call("statfs", self._path(path))
        return StatfsReply(*(int(d.get(k, 0)) for k in (
            "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_bsize", "f_namemax", "f_frsize")))

    # --- namespace ------------------------------------------------------------------------

    def mknod(self, path: str, mode: int, rdev: int) -> None:
        self.call("mknod", self._path(path), mode, rdev)

    def mkdir(self, path: str, mode: int) -> None:
        self.call("mkdir", self._path(path), mode)

    def symlink(self, path: str, target: str) -> None:
        self.call("symlink", self._path(path), self._path(target))

    def link(self, path: str, existing: str) -> None:
        self.call("link", self._path(path), self._path(existing))

    def unlink(self, path: str) -> None:
        self.call("unlink", self._path(path))

    def rmdir(self, path: str) -> None:
        self.call("rmdir", self._path(path))

    def rename(self, old: str, new: str, flags: int) -> None:
        if flags:
            raise OSError(errno.EINVAL, "renameat2 flags: the fusepy API has no way to pass them")
        self.call("rename", self._path(old), self._path(new))

    # --- files ----------------------------------------------------------------------------

    def _keep(self, fi: fuse_file_info) -> Opened:
        with self._lock:
            key = self._next
            self._next += 1
            self._files[key] = fi
        return Opened(
            fh=key, backing_fd=fi.fh if self.passthrough and fi.fh > 0 else None,
            direct_io=bool(fi.direct_io) or self.direct_io, keep_cache=bool(fi.keep_cache) or self.kernel_cache,
            nonseekable=bool(fi.nonseekable),
        )

    def open(self, path: str, flags: int) -> OpenResult:
        fi = fuse_file_info(flags)
        if self.flavour.provided(self.operations, "open"):
            if self.raw_fi:
                self.call("open", self._path(path), fi)
            else:
                fi.fh = self.call("open", self._path(path), flags) or 0
        return self._keep(fi)

    def create(self, path: str, mode: int, flags: int) -> OpenResult:
        fi = fuse_file_info(flags)
        p = self._path(path)
        if self.raw_fi:
            self.call("create", p, mode, fi)
        elif self._create_flags:
            fi.fh = self.call("create", p, mode, flags) or 0
        else:
            fi.fh = self.call("create", p, mode) or 0
        return self._keep(fi)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        data = self.call("read", self._path(path), size, offset, self._fh(fh))
        if not data:
            return b""
        if len(data) > size:
            log.error("FUSE operation read returned %d bytes, more than the %d asked; returning errno.EINVAL.",
                      len(data), size)
            raise OSError(errno.EINVAL, "read returned too much")
        return bytes(data)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return int(self.call("write", self._path(path), data, offset, self._fh(fh)))

    def flush(self, path: str, fh: int) -> None:
        self.call("flush", self._path(path), self._fh(fh))

    def release(self, path: str, fh: int) -> None:
        try:
            if self.flavour.provided(self.operations, "release"):
                self.call("release", self._path(path), self._fh(fh))
        finally:
            with self._lock:
                self._files.pop(fh, None)

    def fsync(self, path: str, datasync: bool, fh: int) -> None:
        self.call("fsync", self._path(path), int(datasync), self._fh(fh))

    def fallocate(self, path: str, mode: int, offset: int, length: int, fh: int) -> None:
        self.call("fallocate", self._path(path), mode, offset, length, self._fh(fh))

    # --- directories ----------------------------------------------------------------------

    def opendir(self, path: str) -> int:
        if self.flavour.provided(self.operations, "opendir"):
            return int(self.call("opendir", self._path(path)) or 0)
        return 0

    def readdir(self, path: str, fh: int) -> Iterator[DirEntry]:
        if self.flavour.name == "mfusepy" and self._overrides("readdir_with_offset"):
            items: Iterable[Any] = self.call("readdir_with_offset", self._path(path), 0, fh)
        else:
            items = self.call("readdir", self._path(path), fh)
        try:
            for item in items:
                if isinstance(item, str):
                    yield os.fsdecode(self._encode(item))
                    continue
                name, attrs = item[0], item[1]
                if isinstance(attrs, dict):
                    st: Attr | None = Attr(int(attrs.get("st_ino", 0)) if self.use_ino else 0,
                                           int(attrs.get("st_mode", 0)))
                elif isinstance(attrs, int) and self.flavour.name == "mfusepy":
                    st = Attr(0, attrs)
                else:
                    st = None
                yield os.fsdecode(self._encode(name)), st
        except OSError:
            raise
        except Exception as e:
            log.error("Uncaught exception from FUSE operation readdir, returning errno.EINVAL.", exc_info=True)
            raise OSError(errno.EINVAL, f"{type(e).__name__} in readdir") from e

    def releasedir(self, path: str, fh: int) -> None:
        if self.flavour.provided(self.operations, "releasedir"):
            self.call("releasedir", self._path(path), fh)

    def fsyncdir(self, path: str, datasync: bool, fh: int) -> None:
        self.call("fsyncdir", self._path(path), int(datasync), fh)

    # --- extended attributes --------------------------------------------------------------

    def getxattr(self, path: str, name: str) -> bytes:
        return bytes(self.call("getxattr", self._path(path), self._path(name)))

    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        self.call("setxattr", self._path(path), self._path(name), value, flags)

    def listxattr(self, path: str) -> list[str]:
        return [os.fsdecode(self._encode(n)) for n in self.call("listxattr", self._path(path)) or ()]

    def removexattr(self, path: str, name: str) -> None:
        self.call("removexattr", self._path(path), self._path(name))


class ConnInfo:
    """mfusepy's ``fuse_conn_info`` as ``init_with_config`` sees it (read-only here)."""

    def __init__(self, conn: ConnectionInfo) -> None:
        self.proto_major = abi.KERNEL_VERSION
        self.proto_minor = conn.proto_minor
        self.max_write = conn.max_write
        self.max_read = 0
        self.max_readahead = conn.max_readahead
        self.capable = int(conn.kernel_flags) & 0xFFFFFFFF
        self.want = self.initial_want = int(conn.want) & 0xFFFFFFFF
        self.max_background = conn.max_background
        self.congestion_threshold = conn.congestion_threshold
        self.time_gran = conn.time_gran


class Config:
    """mfusepy's ``fuse_config``: what ``init_with_config`` may set, with libfuse's defaults."""

    _APPLIED = ("entry_timeout", "attr_timeout", "negative_timeout", "use_ino", "direct_io", "kernel_cache")

    def __init__(self, bridge: Bridge) -> None:
        self.set_gid = int(bridge.gid is not None)
        self.gid = bridge.gid or 0
        self.set_uid = int(bridge.uid is not None)
        self.uid = bridge.uid or 0
        self.set_mode = int(bridge.umask is not None)
        self.umask = bridge.umask or 0
        self.entry_timeout, self.attr_timeout = bridge.entry_timeout, bridge.attr_timeout
        self.negative_timeout = bridge.negative_timeout
        self.use_ino, self.direct_io = int(bridge.use_ino), int(bridge.direct_io)
        self.kernel_cache = int(bridge.kernel_cache)
        self.intr = self.intr_signal = self.remember = self.hard_remove = self.readdir_ino = 0
        self.auto_cache = self.ac_attr_timeout_set = self.nullpath_ok = self.show_help = self.debug = 0
        self.no_rofd_flush = self.parallel_direct_writes = self.flags = self.fmask = self.dmask = 0
        self.ac_attr_timeout = 0.0
        self.modules = None

    def apply(self, bridge: Bridge) -> None:
        bridge.entry_timeout, bridge.attr_timeout = float(self.entry_timeout), float(self.attr_timeout)
        bridge.negative_timeout = float(self.negative_timeout)
        bridge.use_ino, bridge.direct_io = bool(self.use_ino), bool(self.direct_io)
        bridge.kernel_cache = bool(self.kernel_cache)
        bridge.uid = self.uid if self.set_uid else None
        bridge.gid = self.gid if self.set_gid else None
        bridge.umask = self.umask if self.set_mode else None


# --- FUSE(...) ------------------------------------------------------------------------------


def mount_and_serve(operations: Any, mountpoint: str, flavour: Flavour, raw_fi: bool, encoding: str, errors: str,
                    kwargs: dict[str, Any]) -> None:
    """What ``FUSE(operations, mountpoint, ...)`` does: mount, serve until unmounted, return.
    Raises the program's critical exception, or RuntimeError if the mount failed."""
    global ready_fd
    foreground = bool(kwargs.pop("foreground", False))
    debug = bool(kwargs.pop("debug", False))
    threads = 1 if kwargs.pop("nothreads", False) else 4
    kwargs.setdefault("fsname", type(operations).__name__)
    options, config = mount_options(kwargs)
    bridge = Bridge(operations, flavour, raw_fi=raw_fi, encoding=encoding, errors=errors, config=config)
    session = Session(PathFS(bridge), mountpoint, options, threads=threads,
                      passthrough="auto" if bridge.passthrough else "off", debug=debug)
    if debug:
        logging.basicConfig(level=logging.DEBUG)
    fd, ready_fd = ready_fd, None
    if not (foreground or debug):
        fd = _daemonize(fd)
    _running.append(session)
    try:
        status = serve(session, fd, "fuse")
    finally:
        _running.remove(session)
    if bridge.critical is not None:
        raise bridge.critical
    if status:
        raise RuntimeError(status)


def mount_options(kwargs: dict[str, Any]) -> tuple[MountOptions, dict[str, str | bool]]:
    """libfuse's ``-o`` options as fusepass's mount options and the high-level layer's settings.
    An option fusepass cannot honour raises Unsupported, naming it."""
    options = MountOptions(fsname="", subtype="", nosuid=True, nodev=True)
    config: dict[str, str | bool] = {}
    for key, value in kwargs.items():
        if value is False:
            continue
        text = key if value is True else f"{key}={value}"
        if not parse_mount_options(text, options):
            continue
        if key in ("attr_timeout", "entry_timeout", "negative_timeout", "uid", "gid", "umask") and value is not True:
            config[key] = str(value)
        elif key in ("use_ino", "direct_io", "kernel_cache") and value is True:
            config[key] = True
        elif key in _HARMLESS:
            continue
        elif key == "auto_unmount":
            log.warning("fusepass has no auto_unmount: if this process is killed, unmount with fusepass umount")
        else:
            raise Unsupported(f"the libfuse option {text!r} is not supported by fusepass")
    options.subtype = options.subtype or options.fsname
    return options, config


def _daemonize(fd: int | None) -> int:
    """Go to the background as libfuse does without ``foreground=True``: the parent process
    exits once the mount answers (or fails), the child serves it. Returns the child's readiness pipe."""
    r, w = os.pipe()
    if os.fork():
        os.close(w)
        with contextlib.suppress(OSError):
            line = os.read(r, 4096)
            if fd is not None:
                os.write(fd, line)
        os._exit(0 if line == b"ready\n" else 1)
    os.close(r)
    if fd is not None:
        os.close(fd)
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1):
        os.dup2(null, std)
    os.close(null)
    return w


def use_ns_warning(operations: object) -> None:
    if not getattr(operations, "use_ns", False):
        warnings.warn(
            'Time as floating point seconds for utimens is deprecated!\nTo enable time as nanoseconds set the '
            'property "use_ns" to True in your operations class or set your fusepy requirements to <4.',
            DeprecationWarning, stacklevel=3)
