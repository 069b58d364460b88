"""Everything between a request's bytes and its reply's bytes, with no descriptor, thread or clock of its own.

``Dispatcher.handle(message, scratch)`` parses one message, runs the filesystem's handler and
returns the reply to write (an ``Outcome``), or None when the kernel expects no answer. It
also keeps the connection-wide state a reply depends on: INIT negotiation, the requests in
flight (for INTERRUPT), the NOTIFY_REPLY waiters and the backing registry. Each worker
gives it its own ``Scratch`` (a reply buffer and counters), so workers share nothing on
the hot path but the in-flight table. The transport (a read/write loop on ``/dev/fuse``
today) does the I/O: it writes ``outcome.reply``, runs ``outcome.undo`` if the kernel
refused it, then ``outcome.after``.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

from . import abi
from . import protocol as P
from .backing import BackingRegistry
from .negotiate import NegotiationError, PassthroughMode, negotiate
from .notify import Notifier
from .ops import Changes, ConnectionInfo, Context, DirListing, Entry, Opened, Operations, implemented
from .stats import WorkerStats

log = logging.getLogger("fusepass")

Body = P.Buffer | None  # a reply payload; None is an empty success reply
Handler = Callable[[P.InHeader, memoryview, Context], Body]
R = TypeVar("R")

#: The reply buffer each worker needs: the largest READ or READDIR reply.
REPLY_BUFFER = abi.MAX_PAGES * abi.PAGE_SIZE
_F_UNLCK = 2
_EARLY_INTERRUPTS = 1024
_MALFORMED_LOG_BURST = 10  # lines logged per minute at most; the rest are counted
_MINUTE_NS = 60_000_000_000


class Outcome(NamedTuple):
    """What to write for one request, and what to do if it cannot be delivered or once it was.
    (A tuple: one is made for every request, so it must be cheap; see ``_outcome``.)"""

    reply: Sequence[P.Buffer]
    undo: list[Callable[[], None]] | None = None
    after: Callable[[], None] | None = None

    def undelivered(self) -> None:
        """The kernel refused the reply (the request is gone): take back what it promised."""
        for undo in self.undo or ():
            try:
                undo()
            except Exception:
                log.exception("undoing an undelivered reply failed")


class Scratch:
    """One worker's reply buffer and counters; never shared between threads."""

    __slots__ = ("buffer", "view", "stats")

    def __init__(self, size: int = REPLY_BUFFER) -> None:
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.stats = WorkerStats()


_new_tuple = tuple.__new__  # builds an Outcome without NamedTuple's Python-level __new__
_pack_out_header = abi.OUT_HEADER.pack


def _route(parse: Callable[[P.InHeader, memoryview], R], handle: Callable[[R, Context], Body]) -> Handler:
    """Pair a body parser with the handler of the request type it produces (mypy checks the pair)."""

    def run(h: P.InHeader, body: memoryview, ctx: Context) -> Body:
        return handle(parse(h, body), ctx)

    return run


def _enosys(h: P.InHeader, body: memoryview, ctx: Context) -> Body:
    raise OSError(errno.ENOSYS, "not implemented")


class Dispatcher:
    """Dispatch requests for ``fs``.

    ``registry``: where open files get their backing ids (given the device by the session).
    ``send_notification``: writes one notification message to the connection (for the
    ``Notifier`` the filesystem gets in ``init``). ``may_pass_through``: whether this process
    can use the backing ioctls (CAP_SYS_ADMIN). ``clock``: nanoseconds, for latencies and log
    rate limits. ``trace``: called with one line per request when debugging.
    ``on_initialized``: called once the INIT reply has been written.
    """

    def __init__(
        self, fs: Operations, *, registry: BackingRegistry | None = None,
        send_notification: Callable[[bytes], object] | None = None, passthrough: PassthroughMode = "auto",
        may_pass_through: bool = False, max_stack_depth: int = 1, clock: Callable[[], int] = time.monotonic_ns,
        trace: Callable[[str], None] | None = None, on_initialized: Callable[[], None] | None = None,
    ) -> None:
        self.fs = fs
        self.registry = registry if registry is not None else BackingRegistry(None)
        self.passthrough_mode: PassthroughMode = passthrough
        self.may_pass_through = may_pass_through
        self.max_stack_depth = max_stack_depth
        self.parser = P.Parser()
        self.notifier = Notifier(send_notification or _not_connected, self)
        self.conn: ConnectionInfo | None = None
        self.failure: str | None = None  # why INIT was refused, for the session to report
        self._clock = clock
        self._trace = trace
        self._on_initialized = on_initialized
        self._lock = threading.Lock()
        self._inflight: dict[int, Context] = {}
        self._early_interrupts: OrderedDict[int, None] = OrderedDict()
        self._notify_replies: dict[int, Callable[[bytes], None]] = {}
        self._next_notify = 0
        self._log_window = (0, 0)  # (minute it counts, lines logged in it)
        self._replying, self._silent = self._build_tables()

    # --- the request path -------------------------------------------------------------

    def handle(self, message: memoryview, scratch: Scratch) -> Outcome | None:
        """Handle one whole message as read from the device."""
        t0 = self._clock()
        try:
            h, body = self.parser.split(message)
        except P.ProtocolError as e:
            return self._malformed(e, scratch, t0)
        opcode = h.opcode
        ctx = Context(h.uid, h.gid, h.pid, h.unique, scratch.view)
        silent = self._silent.get(opcode)
        if silent is not None:
            err = 0
            try:
                silent(h, body, ctx)
            except P.ProtocolError as e:
                return self._malformed(e, scratch, t0)
            except Exception:
                err = errno.EIO
                log.error("handling %s raised:\n%s", abi.opname(opcode), traceback.format_exc())
            scratch.stats.record(opcode, err, self._clock() - t0)
            return None
        inflight = self._inflight
        lock = self._lock
        with lock:  # tracked for INTERRUPT (inline: this runs for every request)
            inflight[h.unique] = ctx
            early = self._early_interrupts and self._early_interrupts.pop(h.unique, 0) is None
        if early:
            ctx.interrupt()
        err = 0
        try:
            out = self._replying.get(opcode, _enosys)(h, body, ctx)
            if out is None:
                out = b""
            reply: Sequence[P.Buffer] = (_pack_out_header(16 + len(out), 0, h.unique), out)
        except OSError as e:
            err = e.errno or errno.EIO
            reply = (P.encode_error(h.unique, err),)
        except P.ProtocolError as e:
            with lock:
                inflight.pop(h.unique, None)
            return self._malformed(e, scratch, t0)
        except Exception:
            err = errno.EIO
            log.error("handler for %s raised:\n%s", abi.opname(opcode), traceback.format_exc())
            reply = (P.encode_error(h.unique, errno.EIO),)
        with lock:
            inflight.pop(h.unique, None)
        elapsed = self._clock() - t0
        scratch.stats.record(opcode, err, elapsed)  # before the reply: a caller that saw it sees it counted
        if self._trace is not None:
            self._trace(self._describe(message, reply, elapsed))
        return _new_tuple(Outcome, (reply, ctx.undo, self._on_initialized if opcode == abi.Opcode.INIT else None))

    def _malformed(self, e: P.ProtocolError, scratch: Scratch, t0: int) -> Outcome | None:
        """Answer a malformed request with its errno (if it expects an answer), count it, and log it
        at a bounded rate, so that hostile input cannot fill a disk through the log."""
        scratch.stats.malformed += 1
        minute, logged = self._log_window
        now = t0 // _MINUTE_NS
        if now != minute:
            minute, logged = now, 0
        if logged < _MALFORMED_LOG_BURST:
            log.error("malformed request: %s%s", e,
                      "" if logged < _MALFORMED_LOG_BURST - 1 else " (more this minute are only counted)")
        self._log_window = (minute, logged + 1)
        h = e.header
        if h is None:
            return None
        scratch.stats.record(h.opcode, e.errno, self._clock() - t0)
        if h.opcode in abi.NO_REPLY_OPCODES:
            return None
        return Outcome((P.encode_error(h.unique, e.errno),))

    def _describe(self, message: memoryview, reply: Sequence[P.Buffer], elapsed_ns: int) -> str:
        req = self.parser.parse(message)  # parsed again: only when tracing
        h = req.header
        fields = " ".join(f"{k}={getattr(req, k)!r}" for k in req.__slots__ if k not in ("header", "data"))
        error = -int.from_bytes(bytes(reply[0][4:8]), "little", signed=True)
        outcome = f"error {errno.errorcode.get(error, error)}" if error else f"ok, {sum(len(p) for p in reply)} bytes"
        who = f"unique={h.unique} node={h.nodeid} uid={h.uid} pid={h.pid}"
        return f"{abi.opname(h.opcode)} {who} {fields} -> {outcome} in {elapsed_ns / 1000:.0f}us"

    # --- interrupts and notification replies -------------------------------------------

    def _interrupt(self, r: P.Interrupt, ctx: Context) -> None:
        with self._lock:
            target = self._inflight.get(r.target)
            if target is None:
                # Read by another worker that has not registered it yet (or already answered).
                self._early_interrupts[r.target] = None
                while len(self._early_interrupts) > _EARLY_INTERRUPTS:
                    self._early_interrupts.popitem(last=False)
        if target is not None:
            target.interrupt()

    def expect_notify_reply(self, deliver: Callable[[bytes], None]) -> int:
        """A key for a RETRIEVE notification; ``deliver`` gets the data of its NOTIFY_REPLY."""
        with self._lock:
            self._next_notify += 1
            self._notify_replies[self._next_notify] = deliver
            return self._next_notify

    def forget_notify_reply(self, key: int) -> None:
        with self._lock:
            self._notify_replies.pop(key, None)

    def _notify_reply(self, r: P.NotifyReply, ctx: Context) -> None:
        with self._lock:
            deliver = self._notify_replies.pop(r.header.unique, None)
        if deliver is not None:
            deliver(r.data)

    # --- INIT -------------------------------------------------------------------------

    def _init(self, r: P.Init, ctx: Context) -> Body:
        try:
            done = negotiate(r, self.fs, passthrough=self.passthrough_mode, may_pass_through=self.may_pass_through,
                             max_stack_depth=self.max_stack_depth, notifier=self.notifier)
        except NegotiationError as e:
            self.failure = e.strerror
            log.error("%s", self.failure)
            raise
        if done.passthrough_why_not and self.passthrough_mode == "auto":
            log.info("passthrough off: %s", done.passthrough_why_not)
        self.parser.setxattr_ext = bool(done.conn.want & abi.InitFlag.SETXATTR_EXT)
        self.parser.max_reply = min(done.conn.max_pages * abi.PAGE_SIZE, REPLY_BUFFER)
        self.registry.enable(done.passthrough_why_not)
        self.conn = done.conn
        return done.reply

    # --- the table --------------------------------------------------------------------

    def _build_tables(self) -> tuple[dict[int, Handler], dict[int, Handler]]:
        O = abi.Opcode
        p = self.parser
        # (opcodes, handler, the fs method it needs, or None when always served)
        plan: list[tuple[Sequence[int], Handler, str | None]] = [
            ((O.INIT,), _route(p.parse_init, self._init), None),
            ((O.DESTROY,), _route(p.parse_destroy, self._destroy), None),
            ((O.LOOKUP,), _route(p.parse_lookup, self._lookup), "lookup"),
            ((O.GETATTR,), _route(p.parse_getattr, self._getattr), "getattr"),
            ((O.SETATTR,), _route(p.parse_setattr, self._setattr), "setattr"),
            ((O.STATX,), _route(p.parse_statx, self._statx), "statx"),
            ((O.READLINK,), _route(p.parse_readlink, self._readlink), "readlink"),
            ((O.SYMLINK,), _route(p.parse_symlink, self._symlink), "symlink"),
            ((O.MKNOD,), _route(p.parse_mknod, self._mknod), "mknod"),
            ((O.MKDIR,), _route(p.parse_mkdir, self._mkdir), "mkdir"),
            ((O.UNLINK,), _route(p.parse_unlink, self._unlink), "unlink"),
            ((O.RMDIR,), _route(p.parse_rmdir, self._rmdir), "rmdir"),
            ((O.RENAME,), _route(p.parse_rename, self._rename), "rename"),
            ((O.RENAME2,), _route(p.parse_rename2, self._rename), "rename"),
            ((O.LINK,), _route(p.parse_link, self._link), "link"),
            ((O.OPEN,), _route(p.parse_open, self._open), "open"),
            ((O.CREATE,), _route(p.parse_create, self._create), "create"),
            ((O.TMPFILE,), _route(p.parse_create, self._tmpfile), "tmpfile"),
            ((O.READ,), _route(p.parse_read, self._read), "read"),
            ((O.WRITE,), _route(p.parse_write, self._write), "write"),
            ((O.FLUSH,), _route(p.parse_flush, self._flush), "flush"),
            ((O.RELEASE,), _route(p.parse_release, self._release), None),
            ((O.FSYNC,), _route(p.parse_fsync, self._fsync), "fsync"),
            ((O.FALLOCATE,), _route(p.parse_fallocate, self._fallocate), "fallocate"),
            ((O.LSEEK,), _route(p.parse_lseek, self._lseek), "lseek"),
            ((O.COPY_FILE_RANGE, O.COPY_FILE_RANGE_64), _route(p.parse_copy_file_range, self._copy_file_range),
             "copy_file_range"),
            ((O.STATFS,), _route(p.parse_statfs, self._statfs), None),
            ((O.ACCESS,), _route(p.parse_access, self._access), "access"),
            ((O.OPENDIR,), _route(p.parse_open, self._opendir), "opendir"),
            ((O.READDIR, O.READDIRPLUS), _route(p.parse_read, self._readdir), "readdir"),
            ((O.RELEASEDIR,), _route(p.parse_release, self._releasedir), None),
            ((O.FSYNCDIR,), _route(p.parse_fsync, self._fsyncdir), "fsyncdir"),
            ((O.SETXATTR,), _route(p.parse_setxattr, self._setxattr), "setxattr"),
            ((O.GETXATTR,), _route(p.parse_getxattr, self._getxattr), "getxattr"),
            ((O.LISTXATTR,), _route(p.parse_listxattr, self._listxattr), "listxattr"),
            ((O.REMOVEXATTR,), _route(p.parse_removexattr, self._removexattr), "removexattr"),
            ((O.GETLK,), _route(p.parse_lock, self._getlk), "getlk"),
            ((O.SETLK, O.SETLKW), _route(p.parse_lock, self._setlk), "setlk"),
        ]
        replying = {op: handler for ops, handler, need in plan if need is None or implemented(self.fs, need)
                    for op in ops}
        silent: dict[int, Handler] = {
            O.FORGET: _route(p.parse_forget, self._forget),
            O.BATCH_FORGET: _route(p.parse_batch_forget, self._forget),
            O.INTERRUPT: _route(p.parse_interrupt, self._interrupt),
            O.NOTIFY_REPLY: _route(p.parse_notify_reply, self._notify_reply),
        }
        return replying, silent

    # --- one method per request type --------------------------------------------------

    def _destroy(self, r: P.Destroy, ctx: Context) -> Body:
        return None

    def _forget(self, r: P.Forget, ctx: Context) -> None:
        self.fs.forget(r.items)
        for nodeid, _ in r.items:  # the kernel dropped the inode: its sticky served reason goes too
            self.registry.forget(nodeid)

    def _lookup(self, r: P.Lookup, ctx: Context) -> Body:
        fs = self.fs
        try:
            return self._entry_body(ctx, fs.lookup(ctx, r.header.nodeid, r.name))
        except OSError as e:
            if e.errno == errno.ENOENT and fs.negative_timeout > 0:
                return P.negative_entry_body(fs.negative_timeout)
            raise

    def _getattr(self, r: P.Getattr, ctx: Context) -> Body:
        return P.attr_body(self.fs.getattr(ctx, r.header.nodeid, r.fh), self.fs.attr_timeout)

    def _setattr(self, r: P.Setattr, ctx: Context) -> Body:
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

    def _statx(self, r: P.Statx, ctx: Context) -> Body:
        return P.statx_body(self.fs.statx(ctx, r.header.nodeid, r.fh, r.sx_flags, r.sx_mask), self.fs.attr_timeout)

    def _readlink(self, r: P.Readlink, ctx: Context) -> Body:
        return self.fs.readlink(ctx, r.header.nodeid)

    def _symlink(self, r: P.Symlink, ctx: Context) -> Body:
        return self._entry_body(ctx, self.fs.symlink(ctx, r.header.nodeid, r.name, r.target))

    def _mknod(self, r: P.Mknod, ctx: Context) -> Body:
        entry = self.fs.mknod(ctx, r.header.nodeid, r.name, r.mode, P.decode_rdev(r.rdev), r.umask)
        return self._entry_body(ctx, entry)

    def _mkdir(self, r: P.Mkdir, ctx: Context) -> Body:
        return self._entry_body(ctx, self.fs.mkdir(ctx, r.header.nodeid, r.name, r.mode, r.umask))

    def _unlink(self, r: P.Unlink, ctx: Context) -> Body:
        self.fs.unlink(ctx, r.header.nodeid, r.name)
        return None

    def _rmdir(self, r: P.Rmdir, ctx: Context) -> Body:
        self.fs.rmdir(ctx, r.header.nodeid, r.name)
        return None

    def _rename(self, r: P.Rename, ctx: Context) -> Body:
        self.fs.rename(ctx, r.header.nodeid, r.name, r.newdir, r.newname, r.flags)
        return None

    def _link(self, r: P.Link, ctx: Context) -> Body:
        return self._entry_body(ctx, self.fs.link(ctx, r.oldnodeid, r.header.nodeid, r.newname))

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

    def _open(self, r: P.Open, ctx: Context) -> Body:
        ino = r.header.nodeid
        return self._opened_body(ino, self.fs.open(ctx, ino, r.flags), ctx, True)

    def _opendir(self, r: P.Open, ctx: Context) -> Body:
        ino = r.header.nodeid
        return self._opened_body(ino, self.fs.opendir(ctx, ino, r.flags), ctx, False)

    def _create(self, r: P.Create, ctx: Context) -> Body:
        entry, opened = self.fs.create(ctx, r.header.nodeid, r.name, r.mode, r.umask, r.flags)
        return self._entry_body(ctx, entry) + self._opened_body(entry.nodeid, opened, ctx, True)

    def _tmpfile(self, r: P.Create, ctx: Context) -> Body:
        entry, opened = self.fs.tmpfile(ctx, r.header.nodeid, r.mode, r.umask, r.flags)
        return self._entry_body(ctx, entry) + self._opened_body(entry.nodeid, opened, ctx, True)

    def _read(self, r: P.Read, ctx: Context) -> Body:
        return self.fs.read(ctx, r.header.nodeid, r.fh, r.offset, r.size)

    def _write(self, r: P.Write, ctx: Context) -> Body:
        written = self.fs.write(ctx, r.header.nodeid, r.fh, r.offset, r.data, r.write_flags)
        return abi.WRITE_OUT.pack(written, 0)

    def _flush(self, r: P.Flush, ctx: Context) -> Body:
        self.fs.flush(ctx, r.header.nodeid, r.fh, r.lock_owner)
        return None

    def _release(self, r: P.Release, ctx: Context) -> Body:
        ino = r.header.nodeid
        try:
            if r.release_flags & abi.RELEASE_FLOCK_UNLOCK and implemented(self.fs, "flock"):
                self.fs.flock(ctx, ino, r.fh, r.lock_owner, _F_UNLCK, False)
            self.fs.release(ctx, ino, r.fh, r.flags)
        finally:
            self.registry.release(ino)
        return None

    def _fsync(self, r: P.Fsync, ctx: Context) -> Body:
        self.fs.fsync(ctx, r.header.nodeid, r.fh, r.datasync)
        return None

    def _fallocate(self, r: P.Fallocate, ctx: Context) -> Body:
        self.fs.fallocate(ctx, r.header.nodeid, r.fh, r.offset, r.length, r.mode)
        return None

    def _lseek(self, r: P.Lseek, ctx: Context) -> Body:
        return abi.LSEEK_OUT.pack(self.fs.lseek(ctx, r.header.nodeid, r.fh, r.offset, r.whence))

    def _copy_file_range(self, r: P.CopyFileRange, ctx: Context) -> Body:
        n = self.fs.copy_file_range(
            ctx, r.header.nodeid, r.fh_in, r.off_in, r.nodeid_out, r.fh_out, r.off_out, r.length, r.flags
        )
        if r.header.opcode == abi.Opcode.COPY_FILE_RANGE:
            return abi.WRITE_OUT.pack(min(n, 0xFFFFFFFF), 0)
        return abi.COPY_FILE_RANGE_OUT.pack(n)

    def _statfs(self, r: P.Statfs, ctx: Context) -> Body:
        if implemented(self.fs, "statfs"):
            return P.statfs_body(self.fs.statfs(ctx, r.header.nodeid))
        return P.statfs_body(P.StatfsReply(0, 0, 0, 0, 0, 512, 255, 512))

    def _access(self, r: P.Access, ctx: Context) -> Body:
        self.fs.access(ctx, r.header.nodeid, r.mask)
        return None

    def _readdir(self, r: P.Read, ctx: Context) -> Body:
        plus = r.header.opcode == abi.Opcode.READDIRPLUS
        listing = DirListing(ctx.scratch, r.size, plus)
        self.fs.readdir(ctx, r.header.nodeid, r.fh, r.offset, listing)
        return listing.result()

    def _releasedir(self, r: P.Release, ctx: Context) -> Body:
        self.fs.releasedir(ctx, r.header.nodeid, r.fh)
        return None

    def _fsyncdir(self, r: P.Fsync, ctx: Context) -> Body:
        self.fs.fsyncdir(ctx, r.header.nodeid, r.fh, r.datasync)
        return None

    def _setxattr(self, r: P.Setxattr, ctx: Context) -> Body:
        self.fs.setxattr(ctx, r.header.nodeid, r.name, r.value, r.flags)
        return None

    def _getxattr(self, r: P.Getxattr, ctx: Context) -> Body:
        return _sized(self.fs.getxattr(ctx, r.header.nodeid, r.name), r.size)

    def _listxattr(self, r: P.Listxattr, ctx: Context) -> Body:
        return _sized(P.join_names(self.fs.listxattr(ctx, r.header.nodeid)), r.size)

    def _removexattr(self, r: P.Removexattr, ctx: Context) -> Body:
        self.fs.removexattr(ctx, r.header.nodeid, r.name)
        return None

    def _getlk(self, r: P.Lock, ctx: Context) -> Body:
        start, end, typ, pid = self.fs.getlk(ctx, r.header.nodeid, r.fh, r.owner, r.start, r.end, r.type, r.pid)
        return P.lock_body(start, end, typ, pid)

    def _setlk(self, r: P.Lock, ctx: Context) -> Body:
        wait = r.header.opcode == abi.Opcode.SETLKW
        if r.lk_flags & abi.LK_FLOCK:
            self.fs.flock(ctx, r.header.nodeid, r.fh, r.owner, r.type, wait)
        else:
            self.fs.setlk(ctx, r.header.nodeid, r.fh, r.owner, r.start, r.end, r.type, r.pid, wait)
        return None


def _sized(value: bytes, size: int) -> bytes:
    """The xattr reply convention: size 0 asks for the length; too small a size is ERANGE."""
    if size == 0:
        return abi.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise OSError(errno.ERANGE, "buffer too small")
    return value


def _not_connected(message: bytes) -> None:
    raise OSError(errno.ENOTCONN, "the dispatcher is not connected to a device")
