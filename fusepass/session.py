"""A running filesystem: mount, worker threads that move bytes between /dev/fuse and the dispatcher, signals, unmount.

Each worker owns one descriptor of the connection (the first one, or a clone) and a
reusable buffer for requests; it reads one request, hands it to the ``Dispatcher``, and
writes the reply to the descriptor the request came from, so requests complete out of
order across workers. Everything between the bytes read and the bytes written is the
dispatcher's. A filesystem with ``async def`` handlers also gets an event loop
(``fusepass.aio``): the workers hand those requests to it, and it writes their replies to
the descriptor they came from when they end.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import resource
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING

from . import abi, syscalls
from . import mount as mountmod
from . import protocol as P
from .backing import BackingRegistry
from .device import Device
from .dispatch import PENDING, Dispatcher, Outcome, Scratch, coroutine_handlers
from .journal import Journal
from .negotiate import check_passthrough_mode
from .notify import Notifier
from .ops import ConnectionInfo, Operations
from .stats import OpSummary, summarize
from .uring_transport import UringTransport, refused_reason, unavailable_reason

if TYPE_CHECKING:
    import asyncio

    from .aio import InFlight, LoopRunner
    from .supervisor import Restarts

log = logging.getLogger("fusepass")

DEFAULT_THREADS = 4
#: A request's largest size: the biggest WRITE payload plus headers.
REQUEST_BUFFER = abi.MAX_WRITE + abi.PAGE_SIZE
_END_ERRNOS = (errno.ENODEV, errno.ECONNABORTED, errno.EBADF)
_RETRY_ERRNOS = (errno.ENOENT, errno.EAGAIN, errno.EINTR)  # ENOENT: the request was interrupted meanwhile
#: Set to 1 to make io_uring the default transport of every session (``-o io_uring`` per mount);
#: to ``require``, to make it the default and fail a session that would fall back to /dev/fuse
#: (for test runs that must not pass by serving through /dev/fuse unnoticed).
IO_URING_ENV = "FUSEPASS_IO_URING"
#: Wakes a worker blocked in read(2) when the session hands its connection over (``hand_over``);
#: whoever calls that must have a handler for it installed, in the main thread.
WAKE_SIGNAL = signal.SIGUSR1


class SessionError(RuntimeError):
    """The session could not start or negotiate; the message says why."""


class Session:
    """Serve ``fs`` at ``mountpoint``.

    ``threads``: worker threads (each with its own cloned descriptor).
    ``passthrough``: "auto" (use it where the kernel and privileges allow, serve otherwise),
    "on" (fail at INIT if it cannot be had) or "off".
    ``max_stack_depth``: 1 for backing files on ordinary filesystems, 2 when they live on
    overlayfs or another FUSE mount.
    ``device``: serve a connection mounted elsewhere (an inherited descriptor, or a mount made
    by another program) instead of mounting; ``mountpoint`` then only names it. ``clones``:
    descriptors of that connection made for the workers by whoever holds them (a supervisor,
    which must keep every descriptor a server reads from: requests read from a descriptor end
    with ECONNABORTED when its last reference is closed), instead of cloning ``device`` here.
    ``journal``: record what a successor needs (see ``fusepass.journal``); if it holds a
    predecessor's state, take the connection over from there instead of waiting for INIT.
    ``request_timeout``: have the kernel abort the connection when a request stays unanswered
    this many seconds (FUSE_REQUEST_TIMEOUT, where offered; 0: never), the last line of defence.

    For a filesystem with ``async def`` handlers: ``loop``, the asyncio loop to run them on, which
    its owner runs (default: a private one on a thread of its own; see ``fusepass.aio.serve``);
    ``max_in_flight``, how many requests they may serve at once (default
    ``fusepass.aio.DEFAULT_MAX_IN_FLIGHT``): beyond it the workers stop reading, but for one.

    ``io_uring``: take requests through FUSE over io_uring (``fusepass.uring_transport``) where the
    kernel and the process allow it, else through /dev/fuse, with the reason in
    ``io_uring_why_not`` (default: on if the environment variable FUSEPASS_IO_URING is 1 or ``require``;
    with ``require`` a session left to that default fails instead of falling back).
    ``io_uring_depth``: ring entries per queue (default: the filesystem's ``io_uring_depth``, else 2,
    each with its own thread; for ``async def`` handlers 1024 on one thread per queue, at most
    ``max_in_flight``). INIT, FORGET, INTERRUPT and
    notifications use /dev/fuse in any case (one worker there while the ring serves).
    """

    def __init__(
        self, fs: Operations, mountpoint: str, options: mountmod.MountOptions | None = None, *,
        threads: int = DEFAULT_THREADS, passthrough: str = "auto", max_stack_depth: int = 1, debug: bool = False,
        device: Device | None = None, loop: asyncio.AbstractEventLoop | None = None, max_in_flight: int | None = None,
        io_uring: bool | None = None, io_uring_depth: int | None = None,
        clones: Sequence[Device] = (), journal: Journal | None = None, request_timeout: int = 0,
    ) -> None:
        self.passthrough_mode = check_passthrough_mode(passthrough)
        if not 1 <= max_stack_depth <= 2:
            raise ValueError("max_stack_depth must be 1 or 2")
        if threads < 1:
            raise ValueError("threads must be at least 1")
        if io_uring_depth is not None and io_uring_depth < 1:
            raise ValueError("io_uring_depth must be at least 1")
        self.fs = fs
        self.mountpoint = os.path.abspath(mountpoint)
        self.options = options or mountmod.MountOptions()
        self.threads = threads
        self.max_stack_depth = max_stack_depth
        self.request_timeout = request_timeout
        self.debug = debug
        self.device = device
        self.clones = list(clones)
        self.journal = journal
        #: Set under a supervisor: the restarts so far, for ``status``.
        self.restarts: Restarts | None = None
        self.mount: mountmod.Mount | None = None
        self.connection_id: int | None = None
        self.registry = BackingRegistry(device)
        self.runner: LoopRunner | None = None
        self.in_flight: InFlight | None = None
        if coroutine_handlers(fs):
            from . import aio

            limit = aio.DEFAULT_MAX_IN_FLIGHT if max_in_flight is None else max_in_flight
            self.in_flight = aio.InFlight(limit, threads)
            self.runner = aio.LoopRunner(loop, self.in_flight)
        self.dispatcher = self._make_dispatcher()
        from_env = os.environ.get(IO_URING_ENV)
        self.io_uring_requested = from_env in ("1", "require") if io_uring is None else io_uring
        #: The environment's default said ``require``: a fallback to /dev/fuse is a failure.
        self.io_uring_required = io_uring is None and from_env == "require"
        self.io_uring_depth = io_uring_depth if io_uring_depth is not None else fs.io_uring_depth
        self.uring: UringTransport | None = None  # the ring entries, once prepared
        self.io_uring_why_not: str | None = None if self.io_uring_requested else "not asked for (-o io_uring)"
        self.started = time.time()
        self._devices: list[Device] = []
        self._workers: list[threading.Thread] = []
        self._scratches: list[Scratch] = []
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._alive = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._closed = False
        self._descriptors_closed = False  # under _lock: late replies from the loop go nowhere then
        self._handing_over = False  # set once: workers read no more requests
        self._stopped_reading: set[int] = set()  # under _lock: the workers (thread idents) that read no more
        self._released = threading.Event()  # a handing-over worker waits for it before its thread ends
        #: The workers ended with every request they had read answered: the connection is a successor's.
        self.handed_over = False

    def _make_dispatcher(self) -> Dispatcher:
        return Dispatcher(
            self.fs, registry=self.registry, send_notification=self._send_notification,
            passthrough=self.passthrough_mode, may_pass_through=mountmod.has_cap_sys_admin(),
            max_stack_depth=self.max_stack_depth, on_initialized=self._initialized,
            trace=(lambda line: log.debug("%s", line)) if self.debug else None, runner=self.runner,
            request_timeout=self.request_timeout,
        )

    def use_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the async handlers on ``loop`` (which its owner runs); before ``start``."""
        if self.runner is not None:
            self.runner.use_loop(loop)

    # --- what INIT decided --------------------------------------------------------------

    @property
    def conn(self) -> ConnectionInfo | None:
        return self.dispatcher.conn

    @property
    def failure(self) -> str | None:
        return self.dispatcher.failure

    @property
    def notifier(self) -> Notifier:
        """Cache invalidations and data for the kernel (see ``fusepass.notify``)."""
        return self.dispatcher.notifier

    @property
    def passthrough(self) -> bool:
        return self.registry.available

    @property
    def passthrough_why_not(self) -> str | None:
        return self.registry.why_not

    def _all_scratches(self) -> list[Scratch]:
        """Every worker's scratch, the ring's included: where the request counts are."""
        return self._scratches + (self.uring.scratches if self.uring is not None else [])

    def op_stats(self) -> dict[str, OpSummary]:
        return summarize([s.stats for s in self._all_scratches()] + [self.dispatcher.runner_stats])

    @property
    def malformed_requests(self) -> int:
        return sum(s.stats.malformed for s in self._all_scratches())

    @property
    def worker_count(self) -> int:
        ring = self.uring.workers if self.uring is not None and self.over_io_uring else []
        return len(self._devices) + len(ring)

    @property
    def over_io_uring(self) -> bool:
        """Whether requests come through io_uring (granted at INIT and registered)."""
        return self.uring is not None and self.dispatcher.over_io_uring and self.uring.failure is None

    def transport_status(self) -> dict[str, object]:
        """The transport in use, why io_uring is not (if asked for), and the requests per queue."""
        ring = self.uring if self.over_io_uring else None
        return {
            "kind": "io_uring" if ring is not None else "/dev/fuse",
            "io_uring_requested": self.io_uring_requested,
            "io_uring_why_not": self.io_uring_why_not,
            "threads": 0 if ring is None else len(ring.workers),
            "queues": [] if ring is None else [
                {"qid": qid, "entries": ring.depth, "requests": n, "replaced": replaced}
                for qid, (n, replaced) in enumerate(zip(ring.queue_counts(), ring.queue_replacements(), strict=True))
            ],
        }

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Mount (unless given a device) and start the workers. Returns at once; see ``wait_ready``."""
        if self.passthrough_mode == "on" and not mountmod.has_cap_sys_admin():
            raise SessionError("passthrough needs CAP_SYS_ADMIN, which this process does not have")
        if self.device is None:
            self.mount = mountmod.mount(self.mountpoint, self.options)
            self.device = self.mount.device
            self.registry.device = self.device
        self.connection_id = mountmod.connection_id(self.mountpoint)
        if self.io_uring_requested:
            if self.journal is not None:  # rings die with the server that made them
                self.io_uring_why_not = "not with a supervisor (a successor could not take the rings over)"
            else:
                self._prepare_uring(self.device)
            if self.io_uring_required and self.uring is None:
                self.close()  # unmounts: nothing was served yet
                raise SessionError(f"io_uring required ({IO_URING_ENV}=require) but not used: {self.io_uring_why_not}")
        if self.journal is not None and self._take_over(self.journal):
            # Before any worker reads: what the kernel requeues is then exactly what the predecessor
            # read and never answered (a request read here and requeued would be answered twice).
            self._resend(self.device)
        if self.runner is not None:
            self.runner.open()
        if self.clones:  # a supervisor's: it keeps them, so that no request read from one is lost
            self._start_workers([self.device, *self.clones], 0)
        else:
            # With a ring ready, one /dev/fuse worker takes INIT, FORGET and INTERRUPT; the rest
            # only if the ring is not granted after all.
            self._start_workers([self.device], 0 if self.uring is not None else self.threads - 1)

    def _start_workers(self, devices: list[Device], clones: int) -> None:
        """Start a worker for each of ``devices`` and for ``clones`` clones of the first device."""
        try:
            devices = devices + [self.device.clone() for _ in range(clones) if self.device is not None]
        except OSError as e:
            log.warning("FUSE_DEV_IOC_CLONE failed (%s); serving with %d worker(s)", e,
                        len(self._devices) + len(devices))
        with self._lock:
            if self._descriptors_closed:
                for device in devices:
                    device.close()
                return
            first = len(self._devices)
            self._devices += devices
            self._alive += len(devices)
            if self.in_flight is not None:
                self.in_flight.workers = len(self._devices)
        for i, device in enumerate(devices, first):
            scratch = Scratch(deliver=functools.partial(self._deliver_later, device.fd))
            self._scratches.append(scratch)
            t = threading.Thread(target=self._worker, args=(device.fd, scratch), name=f"fusepass-{i}", daemon=True)
            self._workers.append(t)
            t.start()

    def _prepare_uring(self, device: Device) -> None:
        """Make the ring entries before INIT, so that INIT asks for io_uring only if they exist."""
        reason = unavailable_reason()
        if reason is None:
            transport = UringTransport(self.dispatcher, device.fd, self.io_uring_depth, self._uring_fallback,
                                       max_in_flight=self.in_flight.limit if self.in_flight is not None else None)
            reason = transport.prepare()
            if reason is None:
                self.uring = transport
                self.dispatcher.io_uring = True
                return
        self.io_uring_why_not = reason
        log.warning("io_uring not used, serving through /dev/fuse: %s", reason)

    def _uring_fallback(self, reason: str) -> None:
        """A registration failed after INIT: the kernel serves through /dev/fuse again; so do we
        (unless io_uring is required: then the connection is aborted, so that callers see it)."""
        self.io_uring_why_not = reason
        if self.io_uring_required:
            log.error("io_uring required (%s=require): aborting the connection", IO_URING_ENV)
            self.abort()
            return
        self._start_workers([], self.threads - 1)

    # --- taking over from a predecessor -----------------------------------------

    def _take_over(self, journal: Journal) -> bool:
        """Start recording in ``journal``; if a predecessor left state there, take it over
        (before any worker reads a request: every node id and handle must mean what it meant).
        True if this session resumes a connection."""
        if not self.fs.persist(journal, fh_base()):
            raise SessionError(f"{type(self.fs).__name__} cannot record its state, so it cannot be restarted")
        self.registry.journal = journal
        self.dispatcher.journal = journal
        state = journal.state
        if state.init is None:
            return False
        self.dispatcher.resume(state.init)
        self.fs.restore(state)
        self.registry.restore(state.backing, Counter(nodeid for nodeid, _, _ in state.files.values()),
                              state.max_backing)
        self._initialized()
        return True

    def _resend(self, device: Device) -> None:
        """Have the kernel queue again every request the predecessor read and never answered
        (they come with ``abi.UNIQUE_RESEND`` set in ``unique``, which the reply carries back)."""
        conn = self.conn
        if conn is None or not conn.kernel_flags & abi.InitFlag.HAS_RESEND:
            log.warning("the kernel cannot resend requests (no FUSE_HAS_RESEND): those the previous server "
                        "read and never answered wait until the connection is aborted")
            return
        try:
            os.write(device.fd, P.encode_notify(abi.NotifyCode.RESEND, b""))
        except OSError as e:
            log.error("FUSE_NOTIFY_RESEND failed: %s", e)

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
        if not self._workers:
            self.start()
        restore = self._install_signal_handlers()
        try:
            if on_ready is not None and self.wait_ready():
                on_ready()
            self.wait_finished()
        finally:
            for sig, handler in restore:
                signal.signal(sig, handler)
            self.close()
        if self.failure:
            raise SessionError(self.failure)

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Wait until the workers have ended (the connection is gone); False on timeout."""
        if timeout is not None:
            return self._finished.wait(timeout)
        while not self._finished.wait(0.5):  # short waits, so that signal handlers run meanwhile
            pass
        return True

    def stop(self) -> None:
        """Unmount (lazily if busy). Workers end once the kernel drops the connection."""
        with self._lock:
            if self._stopping or not self._workers:
                return
            self._stopping = True
        if mountmod.mount_entry(self.mountpoint) is None:
            return
        try:
            mountmod.unmount(self.mountpoint, lazy=True, method=self.mount.method if self.mount else None)
        except OSError as e:
            log.warning("unmount of %s: %s", self.mountpoint, e)

    def hand_over(self, timeout: float = 10.0) -> bool:
        """Leave the connection to a successor, for a planned restart under a supervisor (which holds
        its descriptors): the workers read no more requests, answer those they have read, and end;
        requests arriving meanwhile wait in the kernel for the successor. A worker blocked in
        read(2) is woken with WAKE_SIGNAL. True once every worker has ended (``run`` then returns,
        and ``close`` leaves the mount, the descriptors and the backing ids alone); False if one
        is still serving a request after ``timeout`` seconds."""
        with self._lock:
            self._handing_over = True
            workers = list(self._workers)
        deadline = time.monotonic() + timeout
        try:
            for t in workers:
                while True:
                    with self._lock:
                        if t.ident in self._stopped_reading:
                            break
                    # Alive: a worker past its loop waits for _released before its thread ends.
                    signal.pthread_kill(t.ident or 0, WAKE_SIGNAL)
                    if time.monotonic() > deadline:
                        return False
                    t.join(0.002)
        finally:
            self._released.set()
        self.handed_over = True
        return True

    def abort(self) -> None:
        """Abort the connection: pending and future requests fail with ENOTCONN."""
        if self.connection_id is not None:
            try:
                mountmod.abort_connection(self.connection_id)
            except OSError as e:
                log.warning("abort of connection %s: %s", self.connection_id, e)

    def close(self) -> None:
        """Release everything after the workers ended (or abort them first)."""
        if self._closed:
            return
        self._closed = True
        if self.handed_over:  # the connection is a successor's: only what is this process's own ends
            if self.runner is not None:
                self.runner.close()
            self._destroy_fs()
            return
        if self.journal is not None and self._workers and not self._finished.is_set():
            return  # supervised, and the connection lives on: everything it holds is the successor's
        if self._workers and not self._finished.is_set():  # no workers: start() failed, nothing to wait for
            self.stop()
            if not self._finished.wait(5):
                self.abort()
                self._finished.wait(5)
        conn = self.connection_id
        if conn is not None and mountmod.connection_id(self.mountpoint) == conn:
            # The connection ended but is still mounted (aborted through fusectl): unmount the dead
            # mount point, as libfuse's servers do, instead of leaving ENOTCONN behind.
            try:
                mountmod.unmount(self.mountpoint, lazy=True, method=self.mount.method if self.mount else None)
            except OSError as e:
                log.warning("unmount of %s: %s", self.mountpoint, e)
        if self.runner is not None:
            self.runner.close()  # its last replies (EINTR) reach a connection that is gone
        if self.uring is not None:
            self.uring.cancel()  # those never registered end now; the others ended with the connection
            if not self.uring.join(5):
                log.warning("an io_uring thread did not end")
        self.registry.close_all()
        with self._lock:
            self._descriptors_closed = True
            for device in self._devices or ([self.device] if self.device else []):
                try:
                    device.close()
                except OSError:
                    pass
            self._devices = []
        self._destroy_fs()

    def _destroy_fs(self) -> None:
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

    def _install_signal_handlers(self) -> list[tuple[signal.Signals, Callable[[int, FrameType | None], object]
                                                     | int | None]]:
        if threading.current_thread() is not threading.main_thread():
            return []
        signals_seen = [0]

        def on_signal(signum: int, frame: FrameType | None) -> None:
            signals_seen[0] += 1
            if signals_seen[0] == 1:
                log.info("signal %d: unmounting %s", signum, self.mountpoint)
                threading.Thread(target=self.stop, daemon=True).start()
            else:
                log.warning("second signal: aborting the connection")
                self.abort()

        return [(sig, signal.signal(sig, on_signal)) for sig in (signal.SIGINT, signal.SIGTERM)]

    # --- the worker ----------------------------------------------------------

    def _worker(self, fd: int, scratch: Scratch) -> None:
        inbuf = bytearray(REQUEST_BUFFER)
        inview = memoryview(inbuf)
        handle = self.dispatcher.handle
        gate = self.in_flight  # None unless coroutines serve some requests
        read = self._reader(fd, inbuf)
        try:
            while True:
                if gate is not None:
                    gate.before_read()
                try:
                    n = read()
                except OSError as e:
                    if gate is not None:
                        gate.after_read()
                    if e.errno in _RETRY_ERRNOS and not self._handing_over:
                        continue
                    if e.errno not in _END_ERRNOS + _RETRY_ERRNOS:
                        log.error("reading %s: %s", mountmod.DEVICE, e)
                    return
                if n == 0:  # end of file: never from /dev/fuse, but from a socket standing in for it
                    return
                outcome = handle(inview[:n], scratch)
                if outcome is not None and outcome is not PENDING:
                    deliver(fd, outcome)
                if gate is not None:
                    gate.after_read()
                if self._handing_over:
                    return
        finally:
            with self._lock:
                self._stopped_reading.add(threading.get_ident())
                handing_over = self._handing_over
            if handing_over:
                self._released.wait()
            with self._lock:
                self._alive -= 1
                last = self._alive == 0
            if last:
                self._ready.set()
                self._finished.set()

    def _reader(self, fd: int, buf: bytearray) -> Callable[[], int]:
        """How a worker reads a request into ``buf``: under a supervisor with a read(2) that
        WAKE_SIGNAL interrupts (``os.readv`` retries it), so that ``hand_over`` can stop it."""
        if self.journal is None:
            return lambda: os.readv(fd, [buf])
        address = syscalls.buffer_address(buf)

        def read() -> int:
            n = syscalls.read_interruptible(fd, address, len(buf))
            if n < 0:
                raise OSError(-n, os.strerror(-n))
            return n

        return read

    def _deliver_later(self, fd: int, outcome: Outcome) -> None:
        """Deliver a reply a coroutine produced, unless the session has closed its descriptors
        (their numbers may name other files by now)."""
        with self._lock:
            if not self._descriptors_closed:
                deliver(fd, outcome)
                return
        outcome.undelivered()

    def _send_notification(self, message: bytes) -> None:
        # Any descriptor of the connection takes notifications: before the workers start (a
        # successor dropping what its predecessor let the kernel cache), the device itself.
        device = self._devices[0] if self._devices else self.device
        if device is None or device.fd < 0 or self._descriptors_closed:
            raise OSError(errno.ENOTCONN, "the session is not running")
        os.write(device.fd, message)

    def _initialized(self) -> None:
        """The INIT reply has been written: register the ring entries (or drop them and start the
        other /dev/fuse workers), raise readahead, and tell ``wait_ready``."""
        if self.uring is not None and self.conn is not None:
            if self.dispatcher.over_io_uring:
                self.uring.start()
            else:
                self.io_uring_why_not = refused_reason(bool(self.conn.kernel_flags & abi.InitFlag.OVER_IO_URING))
                log.warning("io_uring not used, serving through /dev/fuse: %s", self.io_uring_why_not)
                self.uring.cancel()
                if self.io_uring_required:
                    self.dispatcher.failure = (f"io_uring required ({IO_URING_ENV}=require) but not used: "
                                               f"{self.io_uring_why_not}")
                    self.abort()
                else:
                    self._start_workers([], self.threads - 1)
        if self.conn is not None:
            self._raise_readahead(self.conn)
        self._ready.set()

    def _raise_readahead(self, conn: ConnectionInfo) -> None:
        """Let the kernel read ahead in requests as large as max_pages allows.

        INIT can only lower the mount's readahead (128 KiB by default), which makes served
        reads arrive in 128 KiB pieces; the bdi's sysfs knob can raise it afterwards (root only).
        """
        if self.connection_id is None:
            return
        path = f"/sys/class/bdi/0:{self.connection_id}/read_ahead_kb"
        try:
            with open(path, "w") as f:
                f.write(str(conn.max_pages * abi.PAGE_SIZE // 1024))
        except OSError as e:
            log.debug("cannot raise readahead through %s: %s", path, e)


def fh_base() -> int:
    """Where the descriptors of open files start under a supervisor: half the descriptor limit,
    above everything else a server opens, so that a successor finds their numbers free."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2


def deliver(fd: int, outcome: Outcome) -> None:
    """Write a reply to the descriptor its request came from; if the kernel refuses it (ENOENT:
    the request is gone, interrupted or its caller dead), undo what the reply promised."""
    try:
        os.writev(fd, outcome.reply)
    except OSError as e:
        if e.errno not in (errno.ENOENT, *_END_ERRNOS):
            log.error("writing a reply of %d bytes: %s", sum(len(p) for p in outcome.reply), e)
        outcome.undelivered()
        return
    if outcome.after is not None:
        outcome.after()
