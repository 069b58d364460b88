"""A running filesystem: worker threads reading /dev/fuse, dispatching to handlers, writing replies.

Each worker owns one descriptor of the connection (the first one, or a clone made with
FUSE_DEV_IOC_CLONE) and two reusable buffers; it reads a request, parses it with
``protocol``, calls the filesystem's handler, and writes the reply to the descriptor the
request came from. Requests therefore complete out of order across workers. The session
also negotiates INIT, tracks in-flight requests for INTERRUPT, keeps the per-opcode
counters, owns the backing registry, and sends cache notifications.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import abi
from . import mount as mountmod
from . import protocol as P
from .backing import BackingRegistry
from .ops import Changes, ConnectionInfo, Context, DirListing, Entry, Opened, Operations, implemented
from .stats import OpSummary, WorkerStats, summarize

log = logging.getLogger("fusepass")

Body = Any  # a bytes-like reply payload; None means an empty success reply
_END_ERRNOS = (errno.ENODEV, errno.ECONNABORTED, errno.EBADF)
_IN_BUFFER = abi.MAX_WRITE + abi.PAGE_SIZE
_OUT_BUFFER = abi.MAX_PAGES * abi.PAGE_SIZE
_DEFAULT_WANT = (
    abi.InitFlag.ASYNC_READ | abi.InitFlag.ATOMIC_O_TRUNC | abi.InitFlag.BIG_WRITES | abi.InitFlag.MAX_PAGES
    | abi.InitFlag.PARALLEL_DIROPS | abi.InitFlag.AUTO_INVAL_DATA | abi.InitFlag.INIT_EXT
)


class SessionError(RuntimeError):
    """The session could not start or negotiate; the message says why."""


class Session:
    """Serve ``fs`` at ``mountpoint``.

    ``threads``: worker threads (each with its own cloned descriptor).
    ``passthrough``: "auto" (use it where the kernel and privileges allow, serve otherwise),
    "on" (fail at INIT if it cannot be had) or "off".
    ``max_stack_depth``: 1 for backing files on ordinary filesystems, 2 when they live on
    overlayfs or another FUSE mount.
    """

    def __init__(
        self, fs: Operations, mountpoint: str, options: mountmod.MountOptions | None = None, *,
        threads: int = 4, passthrough: str = "auto", max_stack_depth: int = 1, debug: bool = False,
    ) -> None:
        if passthrough not in ("auto", "on", "off"):
            raise ValueError(f"passthrough must be auto, on or off, not {passthrough!r}")
        if not 1 <= max_stack_depth <= 2:
            raise ValueError("max_stack_depth must be 1 or 2")
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self.fs = fs
        self.mountpoint = os.path.abspath(mountpoint)
        self.options = options or mountmod.MountOptions()
        self.threads = threads
        self.passthrough_mode = passthrough
        self.max_stack_depth = max_stack_depth
        self.debug = debug
        self.mount: mountmod.Mount | None = None
        self.conn: ConnectionInfo | None = None
        self.connection_id: int | None = None
        self.registry = BackingRegistry(-1, False, "not negotiated yet")
        self.passthrough_why_not: str | None = "not negotiated yet"
        self.failure: str | None = None
        self.started = time.time()
        self._parser = P.Parser()
        self._fds: list[int] = []
        self._workers: list[threading.Thread] = []
        self._stats: list[WorkerStats] = []
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._alive = 0
        self._lock = threading.Lock()
        self._inflight: dict[int, Context] = {}
        self._early_interrupts: OrderedDict[int, None] = OrderedDict()
        self._retrievals: dict[int, list[Any]] = {}
        self._next_notify = 0
        self._stopping = False
        self._closed = False
        self._table = self._build_table()

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Mount and start the workers. Returns at once; see ``wait_ready``."""
        if self.passthrough_mode == "on" and not mountmod.has_cap_sys_admin():
            raise SessionError("passthrough needs CAP_SYS_ADMIN, which this process does not have")
        self.mount = mountmod.mount(self.mountpoint, self.options)
        self.connection_id = mountmod.connection_id(self.mountpoint)
        try:
            self._fds = [self.mount.fd] + [mountmod.clone_device(self.mount.fd) for _ in range(self.threads - 1)]
        except OSError:
            self._fds = [self.mount.fd]
            log.warning("FUSE_DEV_IOC_CLONE failed; serving with one worker")
        self._alive = len(self._fds)
        for i, fd in enumerate(self._fds):
            stats = WorkerStats()
            self._stats.append(stats)
            t = threading.Thread(target=self._worker, args=(fd, stats), name=f"fusepass-{i}", daemon=True)
            self._workers.append(t)
            t.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until INIT has been answered (the mount can be used); False on timeout.
        Raises SessionError if negotiation failed or the connection ended first."""
        self._ready.wait(timeout)  # set after the INIT reply, or when the last worker ends
        if self.failure:
            raise SessionError(self.failure)
        if self.conn is None and self._finished.is_set():
            raise SessionError("the connection ended before INIT was answered")
        return self._ready.is_set()

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Mount, serve until unmounted, then clean up. In the main thread, SIGINT and
        SIGTERM unmount (a second signal aborts the connection). ``on_ready`` is called once
        INIT has been answered and the signal handlers are in place, so whoever it tells
        may signal at once."""
        if self.mount is None:
            self.start()
        restore = self._install_signal_handlers()
        try:
            if on_ready is not None and self.wait_ready():
                on_ready()
            while not self._finished.wait(0.5):
                pass
        finally:
            for sig, handler in restore:
                signal.signal(sig, handler)
            self.close()
        if self.failure:
            raise SessionError(self.failure)

    def stop(self) -> None:
        """Unmount (lazily if busy). Workers end once the kernel drops the connection."""
        with self._lock:
            if self._stopping or self.mount is None:
                return
            self._stopping = True
        if mountmod.mount_entry(self.mountpoint) is None:
            return
        try:
            self.mount.unmount(lazy=True)
        except OSError as e:
            log.warning("unmount of %s: %s", self.mountpoint, e)

    def abort(self) -> None:
        """Abort the connection: pending and future requests fail with ENOTCONN."""
        if self.connection_id is not None:
            try:
                mountmod.abort_connection(self.connection_id)
            except OSError as e:
                log.warning("abort of connection %s: %s", self.connection_id, e)

    def join(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def close(self) -> None:
        """Release everything after the workers ended (or abort them first)."""
        if self._closed:
            return
        self._closed = True
        if self._workers and not self._finished.is_set():  # no workers: start() failed, nothing to wait for
            self.stop()
            if not self._finished.wait(5):
                self.abort()
                self._finished.wait(5)
        conn = self.connection_id
        if self.mount is not None and conn is not None and mountmod.connection_id(self.mountpoint) == conn:
            # The connection ended but is still mounted (aborted through fusectl): unmount the dead
            # mount point, as libfuse's servers do, instead of leaving ENOTCONN behind.
            try:
                self.mount.unmount(lazy=True)
            except OSError as e:
                log.warning("unmount of %s: %s", self.mountpoint, e)
        self.registry.close_all()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        try:
            self.fs.destroy()
        except Exception:
            log.exception("destroy() raised")

    def __enter__(self) -> Session:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _install_signal_handlers(self) -> list[tuple[signal.Signals, Any]]:
        if threading.current_thread() is not threading.main_thread():
            return []
        signals_seen = [0]

        def on_signal(signum: int, frame: object) -> None:
            signals_seen[0] += 1
            if signals_seen[0] == 1:
                log.info("signal %d: unmounting %s", signum, self.mountpoint)
                threading.Thread(target=self.stop, daemon=True).start()
            else:
                log.warning("second signal: aborting the connection")
                self.abort()

        restore: list[tuple[signal.Signals, Any]] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            restore.append((sig, signal.signal(sig, on_signal)))
        return restore

    # --- status --------------------------------------------------------------

    def op_stats(self) -> dict[str, OpSummary]:
        return summarize(self._stats)

    @property
    def passthrough(self) -> bool:
        return self.registry.available

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot: the schema ``fusepass status --json`` documents."""
        ops = self.op_stats()
        reg = self.registry
        try:
            open_fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            open_fds = -1
        return {
            "mountpoint": self.mountpoint,
            "fsname": self.options.fsname,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "options": _options_dict(self.options),
            "threads": len(self._fds),
            "passthrough": {
                "mode": self.passthrough_mode,
                "negotiated": reg.available,
                "why_not": self.passthrough_why_not,
                "max_stack_depth": self.max_stack_depth,
                "opens": reg.passthrough_opens,
                "served_opens": sum(reg.served_opens.values()),
                "served_reasons": dict(reg.served_opens),
                "backing_ids": reg.registered,
            },
            "requests": {
                name: {"count": o.requests, "errors": o.errors, "total_ms": round(o.total_ns / 1e6, 3),
                       "p50_us": o.p50_ns / 1000, "p99_us": o.p99_ns / 1000}
                for name, o in ops.items()
            },
            "open_fds": open_fds,
            "filesystem": self.fs.status(),
        }

    # --- notifications -------------------------------------------------------

    def _notify(self, message: bytes) -> None:
        if not self._fds:
            raise OSError(errno.ENOTCONN, "the session is not running")
        os.write(self._fds[0], message)

    def invalidate_inode(self, ino: int, offset: int = 0, length: int = 0) -> None:
        """Drop the kernel's cached attributes of ``ino`` and its data from ``offset``
        (``offset`` < 0: attributes only). Do not call it from a handler of ``ino``."""
        self._notify(P.notify_inval_inode(ino, offset, length))

    def invalidate_entry(self, parent: int, name: bytes, expire_only: bool = False) -> None:
        """Drop the kernel's cached lookup of ``name`` in ``parent``."""
        self._notify(P.notify_inval_entry(parent, name, expire_only))

    def notify_delete(self, parent: int, child: int, name: bytes) -> None:
        """Tell the kernel ``name`` in ``parent`` (node ``child``) was deleted."""
        self._notify(P.notify_delete(parent, child, name))

    def retrieve(self, ino: int, offset: int, size: int, timeout: float = 5.0) -> bytes:
        """Ask the kernel for the cached data of ``ino`` at ``offset`` (at most ``size`` bytes);
        returns what its page cache holds there (possibly nothing). Not from a handler."""
        with self._lock:
            self._next_notify += 1
            key = self._next_notify
            waiter: list[Any] = [threading.Event(), b""]
            self._retrievals[key] = waiter
        try:
            self._notify(P.notify_retrieve(key, ino, offset, size))
            if not waiter[0].wait(timeout):
                raise TimeoutError(f"no NOTIFY_REPLY for inode {ino} within {timeout}s")
            return bytes(waiter[1])
        finally:
            with self._lock:
                self._retrievals.pop(key, None)

    def store(self, ino: int, offset: int, data: bytes) -> None:
        """Put ``data`` into the kernel's page cache of ``ino`` (not for passthrough files)."""
        self._notify(P.notify_store(ino, offset, data))

    # --- the worker ----------------------------------------------------------

    def _worker(self, fd: int, stats: WorkerStats) -> None:
        inbuf = bytearray(_IN_BUFFER)
        inview = memoryview(inbuf)
        outbuf = bytearray(_OUT_BUFFER)
        outview = memoryview(outbuf)
        table = self._table
        parse = self._parser.parse
        perf = time.perf_counter_ns
        try:
            while True:
                try:
                    n = os.readv(fd, [inbuf])
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.EAGAIN, errno.EINTR):
                        continue
                    if e.errno not in _END_ERRNOS:
                        log.error("reading %s: %s", mountmod.DEVICE, e)
                    return
                if n == 0:  # end of file: never from /dev/fuse, but from a socket standing in for it
                    return
                t0 = perf()
                try:
                    req = parse(inview[:n])
                except P.ProtocolError as e:
                    self._protocol_error(fd, e, stats)
                    continue
                h = req.header
                opcode = h.opcode
                ctx = Context(h.uid, h.gid, h.pid, h.unique, outview)
                tracked = opcode not in abi.NO_REPLY_OPCODES
                if tracked:
                    self._track(ctx)
                reply: tuple[Any, ...] | None = None
                failed = False
                try:
                    body = table.get(opcode, self._enosys)(req, ctx, outbuf)
                    if tracked:
                        if body is None:  # a handler with nothing to say: an empty success reply
                            body = b""
                        reply = (P.reply_header(h.unique, len(body)), body)
                except OSError as e:
                    failed = True
                    if tracked:
                        reply = (P.encode_error(h.unique, e.errno or errno.EIO),)
                except Exception:
                    failed = True
                    log.error("handler for %s raised:\n%s", _opname(opcode), traceback.format_exc())
                    if tracked:
                        reply = (P.encode_error(h.unique, errno.EIO),)
                # Count before replying, so a caller that saw the reply also sees it counted.
                elapsed = perf() - t0
                stats.record(opcode, failed, elapsed)
                if self.debug:
                    log.debug("%s", _trace(req, reply, elapsed))
                if reply is not None:
                    self._send(fd, reply, ctx)
                if tracked:
                    self._untrack(ctx)
                if opcode == abi.Opcode.INIT:
                    self._raise_readahead()
                    self._ready.set()
        finally:
            with self._lock:
                self._alive -= 1
                last = self._alive == 0
            if last:
                self._ready.set()
                self._finished.set()

    def _raise_readahead(self) -> None:
        """Let the kernel read ahead in requests as large as max_pages allows.

        INIT can only lower the mount's readahead (128 KiB by default), which makes served
        reads arrive in 128 KiB pieces; the bdi's sysfs knob can raise it afterwards (root only).
        """
        if self.conn is None or self.connection_id is None:
            return
        path = f"/sys/class/bdi/0:{self.connection_id}/read_ahead_kb"
        try:
            with open(path, "w") as f:
                f.write(str(self.conn.max_pages * abi.PAGE_SIZE // 1024))
        except OSError as e:
            log.debug("cannot raise readahead through %s: %s", path, e)

    def _send(self, fd: int, parts: tuple[Any, ...], ctx: Context) -> None:
        try:
            os.writev(fd, parts)
        except OSError as e:
            # ENOENT: the request is gone (interrupted, or the opener died); undo what the reply promised.
            if e.errno not in (errno.ENOENT, *_END_ERRNOS):
                log.error("writing a reply of %d bytes: %s", sum(len(p) for p in parts), e)
            for undo in ctx.undo or ():
                try:
                    undo()
                except Exception:
                    log.exception("undoing an undelivered reply failed")

    def _protocol_error(self, fd: int, e: P.ProtocolError, stats: WorkerStats) -> None:
        log.error("malformed request: %s", e)
        h = e.header
        if h is None:
            return
        stats.record(h.opcode if h.opcode < 64 else 0, True, 0)
        if h.opcode not in abi.NO_REPLY_OPCODES:
            try:
                os.write(fd, P.encode_error(h.unique, errno.EIO))
            except OSError:
                pass

    def _track(self, ctx: Context) -> None:
        with self._lock:
            self._inflight[ctx.unique] = ctx
            early = self._early_interrupts.pop(ctx.unique, 0) is None
        if early:
            ctx.interrupt()

    def _untrack(self, ctx: Context) -> None:
        with self._lock:
            self._inflight.pop(ctx.unique, None)

    # --- dispatch ------------------------------------------------------------

    def _build_table(self) -> dict[int, Callable[[Any, Context, bytearray], Body]]:
        O = abi.Opcode
        fs = self.fs
        entry = self._entry_body
        # opcode -> (session method, the fs handler it needs or None if always served)
        plan: dict[int, tuple[Callable[..., Body], str | None]] = {
            O.INIT: (self._op_init, None),
            O.DESTROY: (lambda r, c, b: b"", None),
            O.INTERRUPT: (self._op_interrupt, None),
            O.FORGET: (self._op_forget, None),
            O.NOTIFY_REPLY: (self._op_notify_reply, None),
            O.BATCH_FORGET: (self._op_forget, None),
            O.LOOKUP: (self._op_lookup, "lookup"),
            O.GETATTR: (lambda r, c, b: P.attr_body(fs.getattr(c, r.header.nodeid, r.fh), fs.attr_timeout), "getattr"),
            O.SETATTR: (self._op_setattr, "setattr"),
            O.STATX: (self._op_statx, "statx"),
            O.READLINK: (lambda r, c, b: fs.readlink(c, r.header.nodeid), "readlink"),
            O.SYMLINK: (lambda r, c, b: entry(c, fs.symlink(c, r.header.nodeid, r.name, r.target)), "symlink"),
            O.MKNOD: (
                lambda r, c, b: entry(
                    c, fs.mknod(c, r.header.nodeid, r.name, r.mode, P.decode_rdev(r.rdev), r.umask)
                ),
                "mknod",
            ),
            O.MKDIR: (lambda r, c, b: entry(c, fs.mkdir(c, r.header.nodeid, r.name, r.mode, r.umask)), "mkdir"),
            O.UNLINK: (lambda r, c, b: fs.unlink(c, r.header.nodeid, r.name), "unlink"),
            O.RMDIR: (lambda r, c, b: fs.rmdir(c, r.header.nodeid, r.name), "rmdir"),
            O.RENAME: (self._op_rename, "rename"),
            O.RENAME2: (self._op_rename, "rename"),
            O.LINK: (lambda r, c, b: entry(c, fs.link(c, r.oldnodeid, r.header.nodeid, r.newname)), "link"),
            O.OPEN: (self._op_open, "open"),
            O.CREATE: (self._op_create, "create"),
            O.TMPFILE: (self._op_tmpfile, "tmpfile"),
            O.READ: (lambda r, c, b: fs.read(c, r.header.nodeid, r.fh, r.offset, r.size), "read"),
            O.WRITE: (self._op_write, "write"),
            O.FLUSH: (lambda r, c, b: fs.flush(c, r.header.nodeid, r.fh, r.lock_owner), "flush"),
            O.RELEASE: (self._op_release, None),
            O.FSYNC: (lambda r, c, b: fs.fsync(c, r.header.nodeid, r.fh, r.datasync), "fsync"),
            O.FALLOCATE: (
                lambda r, c, b: fs.fallocate(c, r.header.nodeid, r.fh, r.offset, r.length, r.mode), "fallocate"
            ),
            O.LSEEK: (
                lambda r, c, b: abi.LSEEK_OUT.pack(fs.lseek(c, r.header.nodeid, r.fh, r.offset, r.whence)), "lseek"
            ),
            O.COPY_FILE_RANGE: (self._op_copy_file_range, "copy_file_range"),
            O.COPY_FILE_RANGE_64: (self._op_copy_file_range, "copy_file_range"),
            O.STATFS: (self._op_statfs, None),
            O.ACCESS: (lambda r, c, b: fs.access(c, r.header.nodeid, r.mask), "access"),
            O.OPENDIR: (self._op_opendir, "opendir"),
            O.READDIR: (self._op_readdir, "readdir"),
            O.READDIRPLUS: (self._op_readdir, "readdir"),
            O.RELEASEDIR: (lambda r, c, b: fs.releasedir(c, r.header.nodeid, r.fh), None),
            O.FSYNCDIR: (lambda r, c, b: fs.fsyncdir(c, r.header.nodeid, r.fh, r.datasync), "fsyncdir"),
            O.SETXATTR: (lambda r, c, b: fs.setxattr(c, r.header.nodeid, r.name, r.value, r.flags), "setxattr"),
            O.GETXATTR: (self._op_getxattr, "getxattr"),
            O.LISTXATTR: (self._op_listxattr, "listxattr"),
            O.REMOVEXATTR: (lambda r, c, b: fs.removexattr(c, r.header.nodeid, r.name), "removexattr"),
            O.GETLK: (self._op_getlk, "getlk"),
            O.SETLK: (self._op_setlk, "setlk"),
            O.SETLKW: (self._op_setlk, "setlk"),
        }
        return {op: fn for op, (fn, need) in plan.items() if need is None or implemented(fs, need)}

    def _enosys(self, req: Any, ctx: Context, buf: bytearray) -> Body:
        raise OSError(errno.ENOSYS, "not implemented")

    def _op_init(self, req: P.Init, ctx: Context, buf: bytearray) -> Body:
        if req.major != abi.KERNEL_VERSION or req.minor < abi.MIN_KERNEL_MINOR_VERSION:
            self.failure = (
                f"kernel FUSE protocol {req.major}.{req.minor} is too old: fusepass needs "
                f"{abi.KERNEL_VERSION}.{abi.MIN_KERNEL_MINOR_VERSION} or newer"
            )
            log.error("%s", self.failure)
            raise OSError(errno.EPROTO, self.failure)
        minor = min(req.minor, abi.KERNEL_MINOR_VERSION)
        offered = abi.InitFlag(req.flags)
        want = _DEFAULT_WANT
        if self.fs.readdirplus:
            want |= abi.InitFlag.DO_READDIRPLUS | abi.InitFlag.READDIRPLUS_AUTO
        if implemented(self.fs, "getlk") and implemented(self.fs, "setlk"):
            want |= abi.InitFlag.POSIX_LOCKS
        if implemented(self.fs, "flock"):
            want |= abi.InitFlag.FLOCK_LOCKS
        if self.passthrough_mode != "off":
            want |= abi.InitFlag.PASSTHROUGH
        conn = ConnectionInfo(
            proto_minor=minor, kernel_flags=offered, want=want, max_write=abi.MAX_WRITE,
            max_readahead=req.max_readahead, max_pages=abi.MAX_PAGES, max_stack_depth=self.max_stack_depth,
        )
        self.fs.init(conn)
        want = conn.want
        for flag, since in abi.INIT_FLAG_MINOR.items():
            if minor < since:
                want &= ~flag
        granted = want & offered
        why_not = self._passthrough_refusal(want, granted)
        if why_not:
            granted &= ~abi.InitFlag.PASSTHROUGH
            if self.passthrough_mode == "on":
                self.failure = f"passthrough was required but cannot be had: {why_not}"
                log.error("%s", self.failure)
                raise OSError(errno.EPROTO, self.failure)
            if self.passthrough_mode == "auto":
                log.info("passthrough off: %s", why_not)
        conn.want = granted
        self.conn = conn
        self.passthrough_why_not = why_not
        self.registry = BackingRegistry(self._fds[0] if self._fds else -1, why_not is None, why_not)
        self._parser.setxattr_ext = bool(granted & abi.InitFlag.SETXATTR_EXT)
        return P.init_body(
            minor, min(conn.max_readahead, req.max_readahead), int(granted), conn.max_background,
            conn.congestion_threshold, conn.max_write, conn.time_gran, conn.max_pages,
            conn.max_stack_depth if why_not is None else 0,
        )

    def _passthrough_refusal(self, want: abi.InitFlag, granted: abi.InitFlag) -> str | None:
        F = abi.InitFlag
        if self.passthrough_mode == "off":
            return "switched off (passthrough=off)"
        if not want & F.PASSTHROUGH:
            return "the filesystem turned it off in init()"
        if not granted & F.PASSTHROUGH:
            return "the kernel does not offer FUSE_PASSTHROUGH (needs Linux 6.9+ built with CONFIG_FUSE_PASSTHROUGH)"
        if want & F.WRITEBACK_CACHE:
            return "the filesystem asked for writeback cache, which excludes passthrough"
        if not mountmod.has_cap_sys_admin():
            return "the server lacks CAP_SYS_ADMIN, which the backing ioctls require"
        return None

    def _op_interrupt(self, req: P.Interrupt, ctx: Context, buf: bytearray) -> Body:
        with self._lock:
            target = self._inflight.get(req.target)
            if target is None:
                # Read by another worker that has not registered it yet (or already done).
                self._early_interrupts[req.target] = None
                while len(self._early_interrupts) > 1024:
                    self._early_interrupts.popitem(last=False)
        if target is not None:
            target.interrupt()
        return None

    def _op_notify_reply(self, req: P.NotifyReply, ctx: Context, buf: bytearray) -> Body:
        with self._lock:
            waiter = self._retrievals.get(req.header.unique)
        if waiter is not None:
            waiter[1] = req.data
            waiter[0].set()
        return None

    def _op_forget(self, req: P.Forget, ctx: Context, buf: bytearray) -> Body:
        self.fs.forget(req.items)
        for nodeid, _ in req.items:  # the kernel dropped the inode: its sticky served reason goes too
            self.registry.forget(nodeid)
        return None

    def _op_lookup(self, req: P.Lookup, ctx: Context, buf: bytearray) -> Body:
        try:
            return self._entry_body(ctx, self.fs.lookup(ctx, req.header.nodeid, req.name))
        except OSError as e:
            if e.errno == errno.ENOENT and self.fs.negative_timeout > 0:
                return P.negative_entry_body(self.fs.negative_timeout)
            raise

    def _op_setattr(self, r: P.Setattr, ctx: Context, buf: bytearray) -> Body:
        F = abi.FattrFlag
        v = r.valid
        changes = Changes(
            mode=r.mode if v & F.MODE else None,
            uid=r.uid if v & F.UID else None,
            gid=r.gid if v & F.GID else None,
            size=r.size if v & F.SIZE else None,
            atime_ns=r.atime * 1_000_000_000 + r.atimensec if v & F.ATIME and not v & F.ATIME_NOW else None,
            mtime_ns=r.mtime * 1_000_000_000 + r.mtimensec if v & F.MTIME and not v & F.MTIME_NOW else None,
            ctime_ns=r.ctime * 1_000_000_000 + r.ctimensec if v & F.CTIME else None,
            atime_now=bool(v & F.ATIME_NOW),
            mtime_now=bool(v & F.MTIME_NOW),
            kill_suidgid=bool(v & F.KILL_SUIDGID),
        )
        return P.attr_body(self.fs.setattr(ctx, r.header.nodeid, changes, r.fh), self.fs.attr_timeout)

    def _op_statx(self, r: P.Statx, ctx: Context, buf: bytearray) -> Body:
        return P.statx_body(self.fs.statx(ctx, r.header.nodeid, r.fh, r.sx_flags, r.sx_mask), self.fs.attr_timeout)

    def _op_rename(self, r: P.Rename, ctx: Context, buf: bytearray) -> Body:
        return self.fs.rename(ctx, r.header.nodeid, r.name, r.newdir, r.newname, r.flags)

    def _entry_body(self, ctx: Context, entry: Entry) -> bytes:
        """Encode an entry; if the kernel never gets it, it never counted the lookup: forget it."""
        nodeid = entry.nodeid
        ctx.on_undelivered(lambda: self.fs.forget(((nodeid, 1),)))
        return P.entry_body(entry)

    def _opened_body(self, ino: int, opened: Opened, ctx: Context, regular: bool) -> bytes:
        """Encode an open reply, routing regular files through the backing registry."""
        flags = opened.fopen_flags()
        fh = opened.fh
        backing_id = 0
        if regular:
            backing_id, _ = self.registry.acquire(ino, opened.backing_fd)
            if backing_id:
                flags = (flags & abi.FOPEN_PASSTHROUGH_COMPATIBLE) | abi.FopenFlag.PASSTHROUGH

            def undo() -> None:
                self.registry.release(ino)
                self.fs.release(ctx, ino, fh, 0)

            ctx.on_undelivered(undo)
        else:
            ctx.on_undelivered(lambda: self.fs.releasedir(ctx, ino, fh))
        return P.open_body(fh, flags, backing_id)

    def _op_open(self, r: P.Open, ctx: Context, buf: bytearray) -> Body:
        ino = r.header.nodeid
        return self._opened_body(ino, self.fs.open(ctx, ino, r.flags), ctx, True)

    def _op_opendir(self, r: P.Open, ctx: Context, buf: bytearray) -> Body:
        ino = r.header.nodeid
        return self._opened_body(ino, self.fs.opendir(ctx, ino, r.flags), ctx, False)

    def _op_create(self, r: P.Create, ctx: Context, buf: bytearray) -> Body:
        entry, opened = self.fs.create(ctx, r.header.nodeid, r.name, r.mode, r.umask, r.flags)
        return self._entry_body(ctx, entry) + self._opened_body(entry.nodeid, opened, ctx, True)

    def _op_tmpfile(self, r: P.Create, ctx: Context, buf: bytearray) -> Body:
        entry, opened = self.fs.tmpfile(ctx, r.header.nodeid, r.mode, r.umask, r.flags)
        return self._entry_body(ctx, entry) + self._opened_body(entry.nodeid, opened, ctx, True)

    def _op_release(self, r: P.Release, ctx: Context, buf: bytearray) -> Body:
        ino = r.header.nodeid
        try:
            if r.release_flags & abi.RELEASE_FLOCK_UNLOCK and implemented(self.fs, "flock"):
                self.fs.flock(ctx, ino, r.fh, r.lock_owner, _F_UNLCK, False)
            self.fs.release(ctx, ino, r.fh, r.flags)
        finally:
            self.registry.release(ino)
        return b""

    def _op_write(self, r: P.Write, ctx: Context, buf: bytearray) -> Body:
        written = self.fs.write(ctx, r.header.nodeid, r.fh, r.offset, r.data, r.write_flags)
        return abi.WRITE_OUT.pack(written, 0)

    def _op_copy_file_range(self, r: P.CopyFileRange, ctx: Context, buf: bytearray) -> Body:
        n = self.fs.copy_file_range(
            ctx, r.header.nodeid, r.fh_in, r.off_in, r.nodeid_out, r.fh_out, r.off_out, r.length, r.flags
        )
        if r.header.opcode == abi.Opcode.COPY_FILE_RANGE:
            return abi.WRITE_OUT.pack(min(n, 0xFFFFFFFF), 0)
        return abi.COPY_FILE_RANGE_OUT.pack(n)

    def _op_statfs(self, r: P.Statfs, ctx: Context, buf: bytearray) -> Body:
        if implemented(self.fs, "statfs"):
            return P.statfs_body(self.fs.statfs(ctx, r.header.nodeid))
        return P.statfs_body(P.StatfsReply(0, 0, 0, 0, 0, 512, 255, 512))

    def _op_readdir(self, r: P.Read, ctx: Context, buf: bytearray) -> Body:
        plus = r.header.opcode == abi.Opcode.READDIRPLUS
        listing = DirListing(buf, r.size, plus, self.fs.entry_timeout, self.fs.attr_timeout)
        self.fs.readdir(ctx, r.header.nodeid, r.fh, r.offset, listing)
        return listing.result()

    def _op_getxattr(self, r: P.Getxattr, ctx: Context, buf: bytearray) -> Body:
        return _sized(self.fs.getxattr(ctx, r.header.nodeid, r.name), r.size)

    def _op_listxattr(self, r: P.Listxattr, ctx: Context, buf: bytearray) -> Body:
        return _sized(P.join_names(self.fs.listxattr(ctx, r.header.nodeid)), r.size)

    def _op_getlk(self, r: P.Lock, ctx: Context, buf: bytearray) -> Body:
        start, end, typ, pid = self.fs.getlk(ctx, r.header.nodeid, r.fh, r.owner, r.start, r.end, r.type, r.pid)
        return P.lock_body(start, end, typ, pid)

    def _op_setlk(self, r: P.Lock, ctx: Context, buf: bytearray) -> Body:
        wait = r.header.opcode == abi.Opcode.SETLKW
        if r.lk_flags & abi.LK_FLOCK:
            self.fs.flock(ctx, r.header.nodeid, r.fh, r.owner, r.type, wait)
        else:
            self.fs.setlk(ctx, r.header.nodeid, r.fh, r.owner, r.start, r.end, r.type, r.pid, wait)
        return b""


_F_UNLCK = 2


def _options_dict(o: mountmod.MountOptions) -> dict[str, Any]:
    return {
        "fsname": o.fsname, "subtype": o.subtype, "allow_other": o.allow_other,
        "default_permissions": o.default_permissions, "ro": o.ro, "max_read": o.max_read,
    }


def _sized(value: bytes, size: int) -> bytes:
    """The xattr reply convention: size 0 asks for the length; too small a size is ERANGE."""
    if size == 0:
        return abi.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise OSError(errno.ERANGE, "buffer too small")
    return value


def _opname(opcode: int) -> str:
    try:
        return abi.Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode}"


def _trace(req: Any, reply: tuple[Any, ...] | None, elapsed_ns: int) -> str:
    h = req.header
    fields = " ".join(
        f"{k}={getattr(req, k)!r}" for k in req.__slots__ if k not in ("header", "data")
    )
    if reply is None:
        outcome = "no reply"
    else:
        err = -int.from_bytes(reply[0][4:8], "little", signed=True)
        outcome = f"error {errno.errorcode.get(err, err)}" if err else f"ok, {sum(len(p) for p in reply)} bytes"
    who = f"unique={h.unique} node={h.nodeid} uid={h.uid} pid={h.pid}"
    return f"{_opname(h.opcode)} {who} {fields} -> {outcome} in {elapsed_ns / 1000:.0f}us"
