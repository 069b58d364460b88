"""Everything between a request's bytes and its reply's bytes, with no descriptor, thread or clock of its own.

``Dispatcher.handle(message, scratch)`` parses one message, runs the filesystem's handler and
returns the reply to write (an ``Outcome``), or None when the kernel expects no answer. It
also keeps the connection-wide state a reply depends on: INIT negotiation, the requests in
flight (for INTERRUPT), the NOTIFY_REPLY waiters and the backing registry. Each request type
has a method that asks the filesystem (``_getattr`` calls ``fs.getattr``) and, where the answer
needs encoding, one that encodes it (``_attr_reply``); the table pairs them with the request's
parser, so that a plain handler and an ``async def`` one share both.

What a transport (the session's worker loop on ``/dev/fuse`` today) provides and does:

- one ``Scratch`` per source of requests (a worker and its descriptor, or a ring entry): a reply
  buffer and counters, used by one thread only, and ``deliver``, which takes an Outcome that is
  ready later and writes it back where its request came from;
- for every Outcome, from ``handle`` or through ``deliver``: write ``outcome.reply``, run
  ``outcome.undelivered()`` if the kernel refused it, then ``outcome.after``;
- if the filesystem has coroutine handlers (``coroutine_handlers(fs)``), a ``Runner`` (an event
  loop; ``fusepass.aio`` has the asyncio one). ``handle`` then parses such a request on the
  transport's thread, starts the handler's coroutine on the runner and returns ``PENDING``; the
  runner reports the end on its own thread, where the reply is encoded and handed to the
  scratch's ``deliver`` (an INTERRUPT cancels the coroutine: the reply is EINTR). The transport
  decides how many requests it reads meanwhile (``fusepass.aio.InFlight``); silent requests
  (FORGET, INTERRUPT) and plain handlers never wait for the runner.
"""

from __future__ import annotations

import enum
import errno
import inspect
import logging
import os
import struct
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeVar, cast, overload

from . import abi
from . import protocol as P
from .backing import BackingRegistry
from .negotiate import NegotiationError, PassthroughMode, negotiate
from .notify import Notifier
from .ops import (
    AttrLike,
    Changes,
    ConnectionInfo,
    Context,
    DirListing,
    Entry,
    Opened,
    Operations,
    StatxReply,
    implemented,
)
from .stats import WorkerStats

if TYPE_CHECKING:
    from .journal import Journal

log = logging.getLogger("fusepass")

Body = P.Buffer | None  # a reply payload; None is an empty success reply
Handler = Callable[[P.InHeader, memoryview, Context], Body]
R = TypeVar("R")
T = TypeVar("T")
#: What a runner hands back when a job ends: returns the job's value, or raises its exception
#: (InterruptedError if the job was cancelled).
Settled = Callable[[], object]

#: The reply buffer each worker needs: the largest READ or READDIR reply.
REPLY_BUFFER = abi.MAX_PAGES * abi.PAGE_SIZE
_F_UNLCK = 2
_EARLY_INTERRUPTS = 1024
_MALFORMED_LOG_BURST = 10  # lines logged per minute at most; the rest are counted
_MINUTE_NS = 60_000_000_000
#: Requests that change the namespace or attributes in a way that cannot simply be done twice.
_CHANGES = frozenset({
    abi.Opcode.MKDIR, abi.Opcode.MKNOD, abi.Opcode.SYMLINK, abi.Opcode.LINK, abi.Opcode.CREATE, abi.Opcode.UNLINK,
    abi.Opcode.RMDIR, abi.Opcode.RENAME, abi.Opcode.RENAME2, abi.Opcode.SETXATTR, abi.Opcode.REMOVEXATTR,
})
#: What a journal keeps of INIT: major, minor, max_readahead, the 64-bit flags word.
_INIT_RECORD = struct.Struct("<IIIQ")


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
    """One worker's reply buffer and counters, never shared between threads; and ``deliver``,
    where an Outcome that is ready later goes (called on the runner's thread)."""

    __slots__ = ("buffer", "view", "stats", "deliver")

    def __init__(self, size: int = REPLY_BUFFER, deliver: Callable[[Outcome], None] | None = None) -> None:
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.stats = WorkerStats()
        self.deliver = deliver


class Pending(enum.Enum):
    """``handle``'s answer for a request a coroutine is serving: its Outcome goes to the scratch's
    ``deliver`` when the coroutine ends. (An enum of one, so that ``is PENDING`` narrows the type.)"""

    PENDING = "pending"


PENDING = Pending.PENDING


class Runner(Protocol):
    """Where coroutine handlers run: an event loop, which the transport provides."""

    def start(self, job: Awaitable[object], finish: Callable[[Settled], None]) -> Callable[[], None]:
        """Run ``job``; when it ends, call ``finish`` on the runner's thread (always the same one).
        Return a cancel function, safe from any thread and before the job has started."""
        ...


_new_tuple = tuple.__new__  # builds an Outcome without NamedTuple's Python-level __new__
_pack_out_header = abi.OUT_HEADER.pack
_PASSTHROUGH, _PASSTHROUGH_COMPATIBLE = int(abi.FopenFlag.PASSTHROUGH), int(abi.FOPEN_PASSTHROUGH_COMPATIBLE)
_NO_BUFFER = memoryview(b"")  # a Context served on the runner has none: Context.buffer makes one


class _Route(NamedTuple):
    """One request type: its parser, the method that asks the filesystem, the one that encodes
    the answer (None: the answer is the reply's body), and whether the handler is a coroutine."""

    parse: Callable[[P.InHeader, memoryview], object]
    ask: Callable[[object, Context], Body]  # erased: what it returns is answer's third argument
    answer: Callable[[object, Context, object], Body] | None = None
    awaited: bool = False


@overload
def _route(parse: Callable[[P.InHeader, memoryview], R], ask: Callable[[R, Context], Body]) -> _Route: ...


@overload
def _route(parse: Callable[[P.InHeader, memoryview], R], ask: Callable[[R, Context], Awaitable[Body]]) -> _Route: ...


@overload
def _route(parse: Callable[[P.InHeader, memoryview], R], ask: Callable[[R, Context], T],
           answer: Callable[[R, Context, T], Body]) -> _Route: ...


def _route(parse: Callable[[P.InHeader, memoryview], R], ask: Callable[[R, Context], T],
           answer: Callable[[R, Context, T], Body] | None = None) -> _Route:
    """Pair a body parser with the methods of the request type it produces (mypy checks the three)."""
    return _Route(parse, cast(Callable[[object, Context], Body], ask),
                  cast(Callable[[object, Context, object], Body] | None, answer))


def _enosys(h: P.InHeader, body: memoryview) -> object:
    raise OSError(errno.ENOSYS, "not implemented")


_NOT_IMPLEMENTED = _route(_enosys, lambda r, ctx: None)
#: Handlers the session calls outside a request, or that must never wait: plain methods only.
_PLAIN_ONLY = ("init", "destroy", "status", "forget", "persist", "restore")


_HANDLERS = sorted(name for name, value in vars(Operations).items() if callable(value) and name[0] != "_")


def coroutine_handlers(fs: Operations) -> list[str]:
    """The handlers of ``fs`` that are coroutine functions (``async def``), which need a runner."""
    return [name for name in _HANDLERS if inspect.iscoroutinefunction(getattr(type(fs), name))]


class Dispatcher:
    """Dispatch requests for ``fs``.

    ``registry``: where open files get their backing ids (given the device by the session).
    ``send_notification``: writes one notification message to the connection (for the
    ``Notifier`` the filesystem gets in ``init``). ``may_pass_through``: whether this process
    can use the backing ioctls (CAP_SYS_ADMIN). ``clock``: nanoseconds, for latencies and log
    rate limits. ``trace``: called with one line per request when debugging.
    ``on_initialized``: called once the INIT reply has been written. ``request_timeout``: seconds
    after which the kernel aborts the connection if a request stays unanswered (0: never).
    ``runner``: where coroutine handlers run; required if ``fs`` has any (``coroutine_handlers``).
    ``io_uring``: ask INIT for FUSE_OVER_IO_URING (set by a transport that is ready to register
    ring entries).
    """

    def __init__(
        self, fs: Operations, *, registry: BackingRegistry | None = None,
        send_notification: Callable[[bytes], object] | None = None, passthrough: PassthroughMode = "auto",
        may_pass_through: bool = False, max_stack_depth: int = 1, clock: Callable[[], int] = time.monotonic_ns,
        request_timeout: int = 0,
        trace: Callable[[str], None] | None = None, on_initialized: Callable[[], None] | None = None,
        runner: Runner | None = None, io_uring: bool = False,
    ) -> None:
        awaited = coroutine_handlers(fs)
        plain_only = [name for name in awaited if name in _PLAIN_ONLY]
        if plain_only:
            raise TypeError(f"{', '.join(plain_only)} must be plain methods, not async def: "
                            "the session calls them outside any request")
        if awaited and runner is None:
            raise ValueError(f"async handlers ({', '.join(awaited)}) need a runner to run on")
        self.fs = fs
        self.runner = runner
        #: Counters of the requests coroutines answered, written on the runner's thread only.
        self.runner_stats = WorkerStats()
        self.registry = registry if registry is not None else BackingRegistry(None)
        self.passthrough_mode: PassthroughMode = passthrough
        self.may_pass_through = may_pass_through
        self.max_stack_depth = max_stack_depth
        self.io_uring = io_uring
        #: Whether INIT granted FUSE_OVER_IO_URING: requests but FORGET and INTERRUPT come through the ring.
        self.over_io_uring = False
        self.request_timeout = request_timeout
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
        self._replying, self._silent = self._build_tables(frozenset(awaited))
        #: Under a supervisor: where the INIT request is recorded, for a successor to negotiate again;
        #: requests the kernel resent after a restart, and changes among them found made already.
        self.journal: Journal | None = None
        self.resent = 0
        self.made_already = 0

    # --- the request path -------------------------------------------------------------

    def handle(self, message: memoryview, scratch: Scratch) -> Outcome | Pending | None:
        """Handle one whole message as read from the device: the Outcome to write, None if the
        kernel expects no answer, PENDING if a coroutine answers it later (see the module)."""
        t0 = self._clock()
        try:
            h, body = self.parser.split(message)
        except P.ProtocolError as e:
            return self._malformed(e, scratch, t0)
        return self.handle_parts(h, body, scratch, message, t0)

    def handle_parts(self, h: P.InHeader, body: memoryview, scratch: Scratch, message: memoryview | None = None,
                     t0: int = 0) -> Outcome | Pending | None:
        """``handle`` for a transport that has the header and the body apart (io_uring's entries:
        no whole message to rebuild). ``body`` is without extensions, checked against the header by
        the caller; ``message``, the whole message if there is one (else rebuilt when tracing)."""
        if not t0:
            t0 = self._clock()
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
        parse, ask, answer, awaited = self._replying.get(opcode, _NOT_IMPLEMENTED)
        if awaited:
            return self._start(message, h, body, ctx, parse, ask, answer, scratch, t0)
        in_doubt = False
        if self.journal is not None:  # supervised: count what the kernel resent, record changes begun
            if h.unique & abi.UNIQUE_RESEND:
                self.resent += 1
                self._uncount(h.unique)
            self.journal.serving(h.unique)
            in_doubt = opcode in _CHANGES and self._begin_change(h.unique)
        err = 0
        r = None
        try:
            r = parse(h, body)
            out = ask(r, ctx) if answer is None else answer(r, ctx, ask(r, ctx))
            if out is None:
                out = b""
            reply: Sequence[P.Buffer] = (_pack_out_header(16 + len(out), 0, h.unique), out)
        except OSError as e:
            done = self._made_already(h, r, ctx, e) if in_doubt else None
            if done is not None:
                self.made_already += 1
                reply = (_pack_out_header(16 + len(done), 0, h.unique), done)
            else:
                reply, err = self._refusal(h, e)
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
            self._trace(self._describe(_whole(h, body, message), reply, elapsed))
        return _new_tuple(Outcome, (reply, ctx.undo, self._on_initialized if opcode == abi.Opcode.INIT else None))

    # --- requests a predecessor may have carried out -------------------------------------

    def _uncount(self, unique: int) -> None:
        """A resent request: the lookups a predecessor counted for it never reached the kernel (it
        resends only what it had no reply to): forget them, or their nodes would never be forgotten."""
        assert self.journal is not None
        items = self.journal.uncount(unique & ~abi.UNIQUE_RESEND)
        if items:
            self.fs.forget(items)

    def _begin_change(self, unique: int) -> bool:
        """Record that a change is about to be made for request ``unique``; True if a predecessor
        began it already (the kernel resent it after a restart: it may be done)."""
        assert self.journal is not None
        first = unique & ~abi.UNIQUE_RESEND
        in_doubt = first != unique and self.journal.in_doubt(first)
        self.journal.intent(first)
        return in_doubt

    def _made_already(self, h: P.InHeader, r: object, ctx: Context, e: OSError) -> bytes | None:
        """The reply to a resent change a predecessor began, if the error says it got as far as
        making it: the name it created is there (EEXIST), or the name it removed or moved is gone
        (ENOENT). None: the error stands. The caller sees the change succeed, as it did."""
        O = abi.Opcode
        op, err, fs = h.opcode, e.errno, self.fs
        try:
            if err == errno.EEXIST and isinstance(r, P.Mkdir | P.Mknod | P.Symlink):
                return self._entry_body(r, ctx, fs.lookup(ctx, h.nodeid, r.name))
            if err == errno.EEXIST and isinstance(r, P.Link):
                return self._entry_body(r, ctx, fs.lookup(ctx, h.nodeid, r.newname))
            if err == errno.EEXIST and isinstance(r, P.Create) and op == O.CREATE:
                entry = fs.lookup(ctx, h.nodeid, r.name)
                opened = fs.open(ctx, entry.nodeid, r.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
                return bytes(self._created(r, ctx, (entry, opened)) or b"")
            if err == errno.ENOENT and op in (O.UNLINK, O.RMDIR, O.RENAME, O.RENAME2):
                return b""
            if (err, op) in ((errno.EEXIST, O.SETXATTR), (errno.ENODATA, O.REMOVEXATTR)):
                return b""
        except OSError:
            return None
        return None

    def _drop_undelivered(self, h: P.InHeader, ctx: Context) -> None:
        """A resent open: whatever a predecessor opened for it never reached the kernel (or it
        would not be resent), which will never release it: release it here."""
        if self.journal is None or not h.unique & abi.UNIQUE_RESEND:
            return
        for fh, nodeid, is_dir in self.journal.opens_of(h.unique & ~abi.UNIQUE_RESEND):
            try:
                if is_dir:
                    self.fs.releasedir(ctx, nodeid, fh)
                else:
                    self.fs.release(ctx, nodeid, fh, 0)
            except OSError as e:
                log.debug("releasing an undelivered open: %s", e)
            if not is_dir:
                self.registry.release(nodeid)

    def _released_already(self, r: P.Release, is_dir: bool) -> bool:
        """Whether a resent release was carried out by a predecessor (the journal says so: its
        handle's number may be another open's since, even one the kernel sent before this release,
        served concurrently), or is of a handle the journal never held."""
        if self.journal is None or not r.header.unique & abi.UNIQUE_RESEND:
            return False
        state = self.journal.state
        held = state.dirs.get(r.fh) if is_dir else state.files.get(r.fh)
        return held is None or self.journal.released_already(r.header.unique & ~abi.UNIQUE_RESEND)

    def _refusal(self, h: P.InHeader, e: OSError) -> tuple[Sequence[P.Buffer], int]:
        """The reply to a handler's OSError, and the errno to count (0 for a negative entry:
        ENOENT to LOOKUP, cached for ``negative_timeout``)."""
        err = e.errno or errno.EIO
        if err == errno.ENOENT and h.opcode == abi.Opcode.LOOKUP and self.fs.negative_timeout > 0:
            body = P.negative_entry_body(self.fs.negative_timeout)
            return (_pack_out_header(16 + len(body), 0, h.unique), body), 0
        return (P.encode_error(h.unique, err),), err

    # --- requests coroutines answer -------------------------------------------------------

    def _start(self, message: memoryview | None, h: P.InHeader, body: memoryview, ctx: Context,
               parse: Callable[[P.InHeader, memoryview], object], ask: Callable[[object, Context], Body],
               answer: Callable[[object, Context, object], Body] | None, scratch: Scratch,
               t0: int) -> Outcome | Pending | None:
        """Start the coroutine that answers a request on the runner and return PENDING; or the
        Outcome at once if there is none to start (it failed first, the request was interrupted
        already, or the handler asked turned out plain: a lock request whose other lock kind is async)."""
        runner, deliver = self.runner, scratch.deliver
        assert runner is not None and deliver is not None, "a transport serving coroutines gives a deliver"
        ctx.scratch = _NO_BUFFER  # the worker's buffer is the next request's
        trace = bytes(_whole(h, body, message)) if self._trace is not None else b""
        try:
            r = parse(h, memoryview(bytes(body)))  # the coroutine outlives the read buffer
            job = ask(r, ctx)
        except P.ProtocolError as e:
            with self._lock:
                self._inflight.pop(h.unique, None)
            return self._malformed(e, scratch, t0)
        except Exception as e:
            return self._settle(h, None, ctx, answer, _raising(e), t0, trace, scratch)
        if not inspect.isawaitable(job):
            return self._settle(h, r, ctx, answer, lambda: job, t0, trace, scratch)
        if ctx.interrupted:  # by an INTERRUPT that came first: the coroutine never runs
            if inspect.iscoroutine(job):
                job.close()
            return self._settle(h, r, ctx, answer, _raising(_interrupted()), t0, trace, scratch)
        cancel = runner.start(job, lambda settled: deliver(self._settle(h, r, ctx, answer, settled, t0, trace)))
        ctx.cancel_with(cancel)
        return PENDING

    def _settle(self, h: P.InHeader, r: object, ctx: Context, answer: Callable[[object, Context, object], Body] | None,
                settled: Settled, t0: int, trace: bytes, scratch: Scratch | None = None) -> Outcome:
        """The Outcome of a request a coroutine answered (``settled`` gives its value, or raises),
        counted in ``scratch`` if settled on its thread, else in ``runner_stats``."""
        opcode = h.opcode
        err = 0
        try:
            value = settled()
            out = cast(Body, value) if answer is None else answer(r, ctx, value)
            if out is None:
                out = b""
            reply: Sequence[P.Buffer] = (_pack_out_header(16 + len(out), 0, h.unique), out)
        except OSError as e:
            reply, err = self._refusal(h, e)
        except Exception:
            err = errno.EIO
            log.error("handler for %s raised:\n%s", abi.opname(opcode), traceback.format_exc())
            reply = (P.encode_error(h.unique, errno.EIO),)
        with self._lock:
            self._inflight.pop(h.unique, None)
        elapsed = self._clock() - t0
        (scratch.stats if scratch is not None else self.runner_stats).record(opcode, err, elapsed)
        if self._trace is not None:
            self._trace(self._describe(memoryview(trace), reply, elapsed))
        return Outcome(reply, ctx.undo)

    def _aside(self, value: object) -> None:
        """Run what a coroutine handler returned where no one waits for it (an undo, or a release
        the kernel is not told about): on the runner, failures logged."""
        if inspect.isawaitable(value) and self.runner is not None:
            self.runner.start(value, _log_failure)

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
        reply = self._negotiate(r)
        if self.journal is not None:
            self.journal.init(_INIT_RECORD.pack(r.major, r.minor, r.max_readahead, r.flags))
        return reply

    def resume(self, record: bytes) -> None:
        """Take up a connection a predecessor negotiated: the INIT it answered (as ``journal``
        recorded it) is negotiated again, with the same result, and not answered: the kernel
        sends INIT once. ``on_initialized`` is not called."""
        major, minor, readahead, flags = _INIT_RECORD.unpack(record)
        header = P.InHeader(0, abi.Opcode.INIT, 0, 0, 0, 0, 0, 0)
        self._negotiate(P.Init(header, major, minor, readahead, flags))

    def _negotiate(self, r: P.Init) -> bytes:
        try:
            done = negotiate(r, self.fs, passthrough=self.passthrough_mode, may_pass_through=self.may_pass_through,
                             max_stack_depth=self.max_stack_depth, notifier=self.notifier, io_uring=self.io_uring,
                             request_timeout=self.request_timeout)
        except NegotiationError as e:
            self.failure = e.strerror
            log.error("%s", self.failure)
            raise
        if done.passthrough_why_not and self.passthrough_mode == "auto":
            log.info("passthrough off: %s", done.passthrough_why_not)
        self.parser.setxattr_ext = bool(done.conn.want & abi.InitFlag.SETXATTR_EXT)
        self.parser.max_reply = min(done.conn.max_pages * abi.PAGE_SIZE, REPLY_BUFFER)
        self.registry.enable(done.passthrough_why_not)
        self.over_io_uring = done.io_uring
        self.conn = done.conn
        return done.reply

    # --- the table --------------------------------------------------------------------

    def _build_tables(self, awaited: frozenset[str]) -> tuple[dict[int, _Route], dict[int, Handler]]:
        O = abi.Opcode
        p = self.parser
        # (opcodes, route, the fs methods it calls: the first is the one it needs to be served,
        #  the others are those of which one that is a coroutine makes the route a coroutine's)
        plan: list[tuple[Sequence[int], _Route, Sequence[str]]] = [
            ((O.INIT,), _route(p.parse_init, self._init), ()),
            ((O.DESTROY,), _route(p.parse_destroy, self._destroy), ()),
            ((O.LOOKUP,), _route(p.parse_lookup, self._lookup, self._entry_body), ("lookup",)),
            ((O.GETATTR,), _route(p.parse_getattr, self._getattr, self._attr_reply), ("getattr",)),
            ((O.SETATTR,), _route(p.parse_setattr, self._setattr, self._attr_reply), ("setattr",)),
            ((O.STATX,), _route(p.parse_statx, self._statx, self._statx_reply), ("statx",)),
            ((O.READLINK,), _route(p.parse_readlink, self._readlink), ("readlink",)),
            ((O.SYMLINK,), _route(p.parse_symlink, self._symlink, self._entry_body), ("symlink",)),
            ((O.MKNOD,), _route(p.parse_mknod, self._mknod, self._entry_body), ("mknod",)),
            ((O.MKDIR,), _route(p.parse_mkdir, self._mkdir, self._entry_body), ("mkdir",)),
            ((O.UNLINK,), _route(p.parse_unlink, self._unlink, _no_body), ("unlink",)),
            ((O.RMDIR,), _route(p.parse_rmdir, self._rmdir, _no_body), ("rmdir",)),
            ((O.RENAME,), _route(p.parse_rename, self._rename, _no_body), ("rename",)),
            ((O.RENAME2,), _route(p.parse_rename2, self._rename, _no_body), ("rename",)),
            ((O.LINK,), _route(p.parse_link, self._link, self._entry_body), ("link",)),
            ((O.OPEN,), _route(p.parse_open, self._open, self._file_opened), ("open",)),
            ((O.CREATE,), _route(p.parse_create, self._create, self._created), ("create",)),
            ((O.TMPFILE,), _route(p.parse_create, self._tmpfile, self._created), ("tmpfile",)),
            ((O.READ,), _route(p.parse_read, self._read), ("read",)),
            ((O.WRITE,), _route(p.parse_write, self._write, _written), ("write",)),
            ((O.FLUSH,), _route(p.parse_flush, self._flush, _no_body), ("flush",)),
            ((O.FSYNC,), _route(p.parse_fsync, self._fsync, _no_body), ("fsync",)),
            ((O.FALLOCATE,), _route(p.parse_fallocate, self._fallocate, _no_body), ("fallocate",)),
            ((O.LSEEK,), _route(p.parse_lseek, self._lseek, _sought), ("lseek",)),
            ((O.COPY_FILE_RANGE, O.COPY_FILE_RANGE_64),
             _route(p.parse_copy_file_range, self._copy_file_range, _copied), ("copy_file_range",)),
            ((O.STATFS,), _route(p.parse_statfs, self._statfs, _statfs_reply), ("", "statfs")),
            ((O.ACCESS,), _route(p.parse_access, self._access, _no_body), ("access",)),
            ((O.OPENDIR,), _route(p.parse_open, self._opendir, self._dir_opened), ("opendir",)),
            ((O.FSYNCDIR,), _route(p.parse_fsync, self._fsyncdir, _no_body), ("fsyncdir",)),
            ((O.SETXATTR,), _route(p.parse_setxattr, self._setxattr, _no_body), ("setxattr",)),
            ((O.GETXATTR,), _route(p.parse_getxattr, self._getxattr, _xattr_reply), ("getxattr",)),
            ((O.LISTXATTR,), _route(p.parse_listxattr, self._listxattr, _xattr_names_reply), ("listxattr",)),
            ((O.REMOVEXATTR,), _route(p.parse_removexattr, self._removexattr, _no_body), ("removexattr",)),
            ((O.GETLK,), _route(p.parse_lock, self._getlk, _lock_reply), ("getlk",)),
            ((O.SETLK, O.SETLKW), _route(p.parse_lock, self._setlk, _no_body), ("setlk", "flock")),
            ((O.RELEASEDIR,), _route(p.parse_release, self._releasedir, _no_body), ("", "releasedir")),
            # Their coroutine forms await more than the one call their plain forms make.
            ((O.RELEASE,), _route(p.parse_release, self._release_async) if awaited & {"release", "flock"}
             else _route(p.parse_release, self._release), ("", "release", "flock")),
            ((O.READDIR, O.READDIRPLUS), _route(p.parse_read, self._readdir_async) if "readdir" in awaited
             else _route(p.parse_read, self._readdir), ("readdir",)),
        ]
        replying = {
            op: route._replace(awaited=bool(awaited.intersection(calls)))
            for ops, route, calls in plan if not calls or not calls[0] or implemented(self.fs, calls[0])
            for op in ops
        }
        silent: dict[int, Handler] = {
            O.FORGET: _silent(p.parse_forget, self._forget),
            O.BATCH_FORGET: _silent(p.parse_batch_forget, self._forget),
            O.INTERRUPT: _silent(p.parse_interrupt, self._interrupt),
            O.NOTIFY_REPLY: _silent(p.parse_notify_reply, self._notify_reply),
        }
        return replying, silent

    # --- one method per request type, asking the filesystem; encoders of its answers ---

    def _destroy(self, r: P.Destroy, ctx: Context) -> Body:
        return None

    def _forget(self, r: P.Forget, ctx: Context) -> None:
        self.fs.forget(r.items)
        for nodeid, _ in r.items:  # the kernel dropped the inode: its sticky served reason goes too
            self.registry.forget(nodeid)

    def _lookup(self, r: P.Lookup, ctx: Context) -> Entry:
        return self.fs.lookup(ctx, r.header.nodeid, r.name)

    def _getattr(self, r: P.Getattr, ctx: Context) -> AttrLike:
        return self.fs.getattr(ctx, r.header.nodeid, r.fh)

    def _attr_reply(self, r: object, ctx: Context, attr: AttrLike) -> Body:
        return P.attr_body(attr, self.fs.attr_timeout)

    def _setattr(self, r: P.Setattr, ctx: Context) -> AttrLike:
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
        return self.fs.setattr(ctx, r.header.nodeid, changes, r.fh)

    def _statx(self, r: P.Statx, ctx: Context) -> StatxReply:
        return self.fs.statx(ctx, r.header.nodeid, r.fh, r.sx_flags, r.sx_mask)

    def _statx_reply(self, r: object, ctx: Context, sx: StatxReply) -> Body:
        return P.statx_body(sx, self.fs.attr_timeout)

    def _readlink(self, r: P.Readlink, ctx: Context) -> Body:
        return self.fs.readlink(ctx, r.header.nodeid)

    def _symlink(self, r: P.Symlink, ctx: Context) -> Entry:
        return self.fs.symlink(ctx, r.header.nodeid, r.name, r.target)

    def _mknod(self, r: P.Mknod, ctx: Context) -> Entry:
        return self.fs.mknod(ctx, r.header.nodeid, r.name, r.mode, P.decode_rdev(r.rdev), r.umask)

    def _mkdir(self, r: P.Mkdir, ctx: Context) -> Entry:
        return self.fs.mkdir(ctx, r.header.nodeid, r.name, r.mode, r.umask)

    def _unlink(self, r: P.Unlink, ctx: Context) -> None:
        return self.fs.unlink(ctx, r.header.nodeid, r.name)

    def _rmdir(self, r: P.Rmdir, ctx: Context) -> None:
        return self.fs.rmdir(ctx, r.header.nodeid, r.name)

    def _rename(self, r: P.Rename, ctx: Context) -> None:
        return self.fs.rename(ctx, r.header.nodeid, r.name, r.newdir, r.newname, r.flags)

    def _link(self, r: P.Link, ctx: Context) -> Entry:
        return self.fs.link(ctx, r.oldnodeid, r.header.nodeid, r.newname)

    def _entry_body(self, r: object, ctx: Context, entry: Entry) -> bytes:
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
            backing_id, _ = self.registry.acquire(ino, opened.backing_fd, opened.served_because)
            if backing_id:
                flags = (flags & _PASSTHROUGH_COMPATIBLE) | _PASSTHROUGH

            release: Callable[[Context, int, int, int], object] = self.fs.release

            def undo() -> None:
                self.registry.release(ino)
                self._aside(release(ctx, ino, fh, 0))

            ctx.on_undelivered(undo)
        else:
            releasedir: Callable[[Context, int, int], object] = self.fs.releasedir
            ctx.on_undelivered(lambda: self._aside(releasedir(ctx, ino, fh)))
        return P.open_body(fh, flags, backing_id)

    def _open(self, r: P.Open, ctx: Context) -> Opened:
        self._drop_undelivered(r.header, ctx)
        ctx.kill_suidgid = bool(r.open_flags & abi.OPEN_KILL_SUIDGID)
        return self.fs.open(ctx, r.header.nodeid, r.flags)

    def _file_opened(self, r: P.Open, ctx: Context, opened: Opened) -> Body:
        return self._opened_body(r.header.nodeid, opened, ctx, True)

    def _opendir(self, r: P.Open, ctx: Context) -> Opened:
        self._drop_undelivered(r.header, ctx)
        return self.fs.opendir(ctx, r.header.nodeid, r.flags)

    def _dir_opened(self, r: P.Open, ctx: Context, opened: Opened) -> Body:
        return self._opened_body(r.header.nodeid, opened, ctx, False)

    def _create(self, r: P.Create, ctx: Context) -> tuple[Entry, Opened]:
        self._drop_undelivered(r.header, ctx)
        ctx.kill_suidgid = bool(r.open_flags & abi.OPEN_KILL_SUIDGID)
        return self.fs.create(ctx, r.header.nodeid, r.name, r.mode, r.umask, r.flags)

    def _tmpfile(self, r: P.Create, ctx: Context) -> tuple[Entry, Opened]:
        return self.fs.tmpfile(ctx, r.header.nodeid, r.mode, r.umask, r.flags)

    def _created(self, r: object, ctx: Context, made: tuple[Entry, Opened]) -> Body:
        entry, opened = made
        return self._entry_body(r, ctx, entry) + self._opened_body(entry.nodeid, opened, ctx, True)

    def _read(self, r: P.Read, ctx: Context) -> Body:
        return self.fs.read(ctx, r.header.nodeid, r.fh, r.offset, r.size)

    def _write(self, r: P.Write, ctx: Context) -> int:
        return self.fs.write(ctx, r.header.nodeid, r.fh, r.offset, r.data, r.write_flags)

    def _flush(self, r: P.Flush, ctx: Context) -> None:
        return self.fs.flush(ctx, r.header.nodeid, r.fh, r.lock_owner)

    def _release(self, r: P.Release, ctx: Context) -> Body:
        ino = r.header.nodeid
        if self._released_already(r, False):
            return None
        try:
            if r.release_flags & abi.RELEASE_FLOCK_UNLOCK and implemented(self.fs, "flock"):
                self.fs.flock(ctx, ino, r.fh, r.lock_owner, _F_UNLCK, False)
            self.fs.release(ctx, ino, r.fh, r.flags)
        finally:
            self.registry.release(ino)
        return None

    async def _release_async(self, r: P.Release, ctx: Context) -> Body:
        ino = r.header.nodeid
        if self._released_already(r, False):
            return None
        flock: Callable[[Context, int, int, int, int, bool], object] = self.fs.flock
        release: Callable[[Context, int, int, int], object] = self.fs.release
        try:
            if r.release_flags & abi.RELEASE_FLOCK_UNLOCK and implemented(self.fs, "flock"):
                await _settled_value(flock(ctx, ino, r.fh, r.lock_owner, _F_UNLCK, False))
            await _settled_value(release(ctx, ino, r.fh, r.flags))
        finally:
            self.registry.release(ino)
        return None

    def _fsync(self, r: P.Fsync, ctx: Context) -> None:
        return self.fs.fsync(ctx, r.header.nodeid, r.fh, r.datasync)

    def _fallocate(self, r: P.Fallocate, ctx: Context) -> None:
        return self.fs.fallocate(ctx, r.header.nodeid, r.fh, r.offset, r.length, r.mode)

    def _lseek(self, r: P.Lseek, ctx: Context) -> int:
        return self.fs.lseek(ctx, r.header.nodeid, r.fh, r.offset, r.whence)

    def _copy_file_range(self, r: P.CopyFileRange, ctx: Context) -> int:
        return self.fs.copy_file_range(
            ctx, r.header.nodeid, r.fh_in, r.off_in, r.nodeid_out, r.fh_out, r.off_out, r.length, r.flags
        )

    def _statfs(self, r: P.Statfs, ctx: Context) -> P.StatfsReply:
        if implemented(self.fs, "statfs"):
            return self.fs.statfs(ctx, r.header.nodeid)
        return P.StatfsReply(0, 0, 0, 0, 0, 512, 255, 512)

    def _access(self, r: P.Access, ctx: Context) -> None:
        return self.fs.access(ctx, r.header.nodeid, r.mask)

    def _readdir(self, r: P.Read, ctx: Context) -> Body:
        listing = DirListing(ctx.scratch, r.size, r.header.opcode == abi.Opcode.READDIRPLUS)
        self.fs.readdir(ctx, r.header.nodeid, r.fh, r.offset, listing)
        return listing.result()

    async def _readdir_async(self, r: P.Read, ctx: Context) -> Body:
        listing = DirListing(ctx.buffer(r.size), r.size, r.header.opcode == abi.Opcode.READDIRPLUS)
        readdir: Callable[[Context, int, int, int, DirListing], object] = self.fs.readdir
        await _settled_value(readdir(ctx, r.header.nodeid, r.fh, r.offset, listing))
        return listing.result()

    def _releasedir(self, r: P.Release, ctx: Context) -> None:
        if self._released_already(r, True):
            return None
        return self.fs.releasedir(ctx, r.header.nodeid, r.fh)

    def _fsyncdir(self, r: P.Fsync, ctx: Context) -> None:
        return self.fs.fsyncdir(ctx, r.header.nodeid, r.fh, r.datasync)

    def _setxattr(self, r: P.Setxattr, ctx: Context) -> None:
        return self.fs.setxattr(ctx, r.header.nodeid, r.name, r.value, r.flags)

    def _getxattr(self, r: P.Getxattr, ctx: Context) -> bytes:
        return self.fs.getxattr(ctx, r.header.nodeid, r.name)

    def _listxattr(self, r: P.Listxattr, ctx: Context) -> Sequence[bytes]:
        return self.fs.listxattr(ctx, r.header.nodeid)

    def _removexattr(self, r: P.Removexattr, ctx: Context) -> None:
        return self.fs.removexattr(ctx, r.header.nodeid, r.name)

    def _getlk(self, r: P.Lock, ctx: Context) -> tuple[int, int, int, int]:
        return self.fs.getlk(ctx, r.header.nodeid, r.fh, r.owner, r.start, r.end, r.type, r.pid)

    def _setlk(self, r: P.Lock, ctx: Context) -> None:
        wait = r.header.opcode == abi.Opcode.SETLKW
        if r.lk_flags & abi.LK_FLOCK:
            return self.fs.flock(ctx, r.header.nodeid, r.fh, r.owner, r.type, wait)
        return self.fs.setlk(ctx, r.header.nodeid, r.fh, r.owner, r.start, r.end, r.type, r.pid, wait)


def _silent(parse: Callable[[P.InHeader, memoryview], R], handle: Callable[[R, Context], None]) -> Handler:
    """Pair a body parser with the handler of a request the kernel expects no answer to."""

    def run(h: P.InHeader, body: memoryview, ctx: Context) -> Body:
        handle(parse(h, body), ctx)
        return None

    return run


async def _settled_value(value: object) -> None:
    """Await what a handler returned if it is awaitable (its coroutine form), else take it as it is."""
    if inspect.isawaitable(value):
        await value


def _no_body(r: object, ctx: Context, value: object) -> Body:
    return None


def _written(r: object, ctx: Context, n: int) -> Body:
    return abi.WRITE_OUT.pack(n, 0)


def _sought(r: object, ctx: Context, offset: int) -> Body:
    return abi.LSEEK_OUT.pack(offset)


def _copied(r: P.CopyFileRange, ctx: Context, n: int) -> Body:
    if r.header.opcode == abi.Opcode.COPY_FILE_RANGE:
        return abi.WRITE_OUT.pack(min(n, 0xFFFFFFFF), 0)
    return abi.COPY_FILE_RANGE_OUT.pack(n)


def _statfs_reply(r: object, ctx: Context, st: P.StatfsReply) -> Body:
    return P.statfs_body(st)


def _xattr_reply(r: P.Getxattr, ctx: Context, value: bytes) -> Body:
    return _sized(value, r.size)


def _xattr_names_reply(r: P.Listxattr, ctx: Context, names: Sequence[bytes]) -> Body:
    return _sized(P.join_names(names), r.size)


def _lock_reply(r: object, ctx: Context, lock: tuple[int, int, int, int]) -> Body:
    start, end, typ, pid = lock
    return P.lock_body(start, end, typ, pid)


def _sized(value: bytes, size: int) -> bytes:
    """The xattr reply convention: size 0 asks for the length; too small a size is ERANGE."""
    if size == 0:
        return abi.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise OSError(errno.ERANGE, "buffer too small")
    return value


def _whole(h: P.InHeader, body: memoryview, message: memoryview | None) -> memoryview:
    """The message a request came in, or one rebuilt from its parts (without extensions), for the trace."""
    if message is not None:
        return message
    header = abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), h.opcode, h.unique, h.nodeid, h.uid, h.gid, h.pid,
                                0, 0)
    return memoryview(header + bytes(body))


def _not_connected(message: bytes) -> None:
    raise OSError(errno.ENOTCONN, "the dispatcher is not connected to a device")


def _log_failure(settled: Settled) -> None:
    try:
        settled()
    except InterruptedError:
        pass
    except Exception:
        log.error("a handler run aside raised:\n%s", traceback.format_exc())


def _interrupted() -> InterruptedError:
    return InterruptedError(errno.EINTR, "interrupted")


def _raising(error: BaseException) -> Settled:
    def settled() -> object:
        raise error

    return settled
