"""FUSE over io_uring: ring entries on one queue per possible CPU, each request answered and the next
one fetched with a single COMMIT_AND_FETCH, feeding the same ``Dispatcher`` as /dev/fuse.

INIT stays on /dev/fuse. Once its reply has granted FUSE_OVER_IO_URING, the kernel holds every new
request until each queue has an entry registered (FUSE_IO_URING_CMD_REGISTER), then sends each
request to the queue of the CPU its caller runs on; FORGET, INTERRUPT and notifications stay on
/dev/fuse. An entry is a ``struct fuse_uring_req_header`` (the in header, the first argument, the
payload size) and a payload buffer for the other arguments; the reply goes back the same way.

For a filesystem of plain handlers each entry has a thread and a ring of its own (rings are
single-issuer), so a handler that blocks (a lock wait, a slow source) holds up its own entry
only, as a /dev/fuse worker does; ``depth`` entries per queue bound the requests served at once
per CPU. One entry per queue is faster where handlers never wait for one another: a request that
comes while its CPU's entry is busy (the RELEASE the kernel sends in the background before the
caller's next LOOKUP, say) waits in the kernel and the same thread's COMMIT_AND_FETCH fetches it,
where a second entry wakes a second thread to contend with the first for the GIL, which costs
more than the wait. But a request that waits for another (an interrupt, a lock) would then hold
up every caller on its CPU, hence two by default.

For a filesystem with ``async def`` handlers, one thread per queue serves all of the queue's
entries: a coroutine's request keeps its entry until the coroutine ends, when the event loop
hands the reply over and wakes the thread through an eventfd read kept armed on the same ring.
As many requests are in flight per queue as there are entries, hence the larger default depth.

The rings are made before INIT (``prepare``), so that a process that may not use io_uring falls
back to /dev/fuse before asking the kernel for it: once granted, the kernel would hold requests
until every queue registered, and only a failed REGISTER makes it fall back by itself.
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import abi, syscalls, uring
from . import protocol as P
from .dispatch import PENDING, Dispatcher, Outcome, Pending, Scratch
from .uring import Ring

log = logging.getLogger("fusepass")

DEFAULT_DEPTH = 2
#: For coroutine handlers: entries per queue (at most ``max_in_flight``). Each entry's buffer is
#: address space more than memory: only the pages a request or reply touches are ever resident.
DEFAULT_ASYNC_DEPTH = 1024
MAX_DEPTH = 4096
MODULE_PARAMETER = "/sys/module/fuse/parameters/enable_uring"
HOW_TO_ENABLE = (f"an administrator turns it on with `echo Y > {MODULE_PARAMETER}` (for mounts made "
                 "afterwards; `options fuse enable_uring=1` in /etc/modprobe.d or fuse.enable_uring=1 on "
                 "the kernel command line keeps it on across reboots)")
#: Every argument but the first fits here: the largest WRITE, or the largest reply.
PAYLOAD_SIZE = max(8192, abi.MAX_WRITE, abi.MAX_PAGES * abi.PAGE_SIZE)
#: Where the payload starts in an entry's buffer (the header struct comes first). A request with a
#: first argument and a payload has the argument copied just before the payload, so that the
#: dispatcher reads its body in one piece.
PAYLOAD_AT = abi.PAGE_SIZE
SLOT_SIZE = PAYLOAD_AT + PAYLOAD_SIZE
_WAKE = 1 << 63  # the user_data of the eventfd read that wakes a thread with replies to commit
_OP_READ = 22
_PAYLOAD_SZ_AT = abi.URING_ENT_IN_OUT + 16
_IOVECS = struct.Struct("<QQQQ")  # two struct iovec: header, payload
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_IN_FIELDS = struct.Struct("<IIQQIIIH")  # the in header's fields but its padding: a P.InHeader
#: An URING_CMD SQE to /dev/fuse: the SQE's fixed fields, then fuse_uring_cmd_req in the command area.
_FUSE_SQE = struct.Struct(uring.SQE_HEAD_FORMAT + abi.URING_CMD_REQ.format[1:]
                          + f"{uring.CMD_SIZE - abi.URING_CMD_REQ.size}x")
assert _FUSE_SQE.size == uring.SQE_SIZE
_new_header = tuple.__new__  # a P.InHeader without NamedTuple's Python-level __new__
_COMMIT_ID_AT = struct.calcsize(uring.SQE_HEAD_FORMAT) + 8  # in the SQE: after the command's flags
_END_ERRNOS = (errno.ENOTCONN, errno.ECANCELED, errno.ECONNABORTED, errno.ENODEV)
_PREPARE_TIMEOUT = 10.0


@dataclass(slots=True, frozen=True)
class UringOptions:
    """``-o io_uring`` (or ``noio_uring``) and ``-o io_uring_depth=N`` (ring entries per queue).
    None: not given (the session's default decides)."""

    enabled: bool | None = None
    depth: int | None = None


def take_options(items: list[str]) -> tuple[UringOptions, list[str]]:
    """Pick the io_uring options out of ``-o`` items; return them and the items left. Raises
    ValueError for a bad depth."""
    enabled: bool | None = None
    depth: int | None = None
    rest = []
    for item in items:
        key, _, value = item.partition("=")
        if item in ("io_uring", "noio_uring"):
            enabled = item == "io_uring"
        elif key == "io_uring_depth":
            if not value.isdigit() or not 1 <= int(value) <= MAX_DEPTH:
                raise ValueError(f"io_uring_depth must be a whole number from 1 to {MAX_DEPTH}, not {value!r}")
            depth = int(value)
        else:
            rest.append(item)
    return UringOptions(enabled, depth), rest


def possible_cpus() -> int:
    """How many queues the kernel makes: one per possible CPU (not only the online ones)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    highest = 0
    for part in text.split(","):
        highest = max(highest, int(part.rpartition("-")[2]))
    return highest + 1


def unavailable_reason() -> str | None:
    """Why this kernel will not offer FUSE over io_uring, in words (None: it will)."""
    try:
        with open(MODULE_PARAMETER) as f:
            value = f.read().strip()
    except FileNotFoundError:
        return ("this kernel has no FUSE over io_uring (it needs Linux 6.14 or later built with "
                "CONFIG_FUSE_IO_URING)")
    except OSError as e:
        return f"cannot read {MODULE_PARAMETER}: {e.strerror}"
    if value not in ("Y", "1"):
        return f"the fuse module parameter enable_uring is off; {HOW_TO_ENABLE}"
    return None


def refused_reason(kernel_offered: bool) -> str:
    """Why INIT did not grant FUSE_OVER_IO_URING although the transport asked for it."""
    if not kernel_offered:
        return (unavailable_reason() or "the kernel did not offer FUSE_OVER_IO_URING at INIT "
                "(enable_uring was off when the filesystem was mounted)")
    return "the filesystem turned FUSE_OVER_IO_URING off in init()"


def _setup_reason(e: OSError) -> str:
    if e.errno == errno.EPERM:
        return ("io_uring is not permitted for this process (see /proc/sys/kernel/io_uring_disabled "
                "and /proc/sys/kernel/io_uring_group)")
    if e.errno == errno.ENOSYS:
        return "this kernel has no io_uring"
    if e.errno == errno.EINVAL:
        return "this kernel's io_uring lacks 128-byte SQEs, SINGLE_ISSUER, DEFER_TASKRUN or NO_SQARRAY"
    return f"the rings could not be set up: {e.strerror}"


class UringTransport:
    """The ring entries of a connection: ``depth`` per queue, a queue per possible CPU.

    ``prepare`` makes their rings and buffers (before INIT); ``start`` registers them (after the
    INIT reply granted FUSE_OVER_IO_URING), ``cancel`` drops them unregistered. ``on_fallback``
    is called once, with the reason in words, if a registration fails after INIT: the kernel
    then serves new requests through /dev/fuse again. ``join`` waits for the threads, which end
    when the kernel ends their entries (unmount, abort) or when cancelled. ``depth`` None: the
    default for the filesystem (DEFAULT_DEPTH, or for coroutine handlers DEFAULT_ASYNC_DEPTH
    bounded by ``max_in_flight``).
    """

    def __init__(self, dispatcher: Dispatcher, fd: int, depth: int | None = None,
                 on_fallback: Callable[[str], None] | None = None, queues: int | None = None,
                 max_in_flight: int | None = None) -> None:
        self.dispatcher = dispatcher
        self.fd = fd
        shared = dispatcher.runner is not None  # coroutines: one thread serves many entries
        if depth is None:
            depth = min(DEFAULT_ASYNC_DEPTH, max_in_flight or DEFAULT_ASYNC_DEPTH) if shared else DEFAULT_DEPTH
        self.depth = depth
        self.queues = possible_cpus() if queues is None else queues
        self.on_fallback = on_fallback
        if shared:
            self.workers = [_Worker(self, qid, 0, depth, wakeable=True) for qid in range(self.queues)]
        else:
            self.workers = [_Worker(self, qid, i, 1, wakeable=False)
                            for qid in range(self.queues) for i in range(depth)]
        self.failure: str | None = None  # why a registration failed, once it did
        #: For coroutine handlers: requests being served at once, at most ``max_in_flight`` (the
        #: others wait in their entries, unread, until there is room).
        self.bound = (max_in_flight or DEFAULT_ASYNC_DEPTH) if shared else None
        self.active = 0
        self._go = threading.Event()
        self._cancelled = False
        self._prepared = threading.Semaphore(0)
        self._lock = threading.Lock()

    @property
    def scratches(self) -> list[Scratch]:
        return [w.scratch for w in self.workers]

    def prepare(self) -> str | None:
        """Start the threads and let each make its ring and buffers; the reason in words if one
        could not (and then every thread has ended), else None."""
        for w in self.workers:
            w.thread.start()
        for _ in self.workers:
            if not self._prepared.acquire(timeout=_PREPARE_TIMEOUT):
                self.cancel()
                return "the io_uring threads did not start in time"
        failed = next((w.setup_error for w in self.workers if w.setup_error is not None), None)
        if failed is not None:
            self.cancel()
            return _setup_reason(failed)
        return None

    def start(self) -> None:
        """Register every entry: the kernel switches the connection over once each queue has one."""
        self._go.set()

    def cancel(self) -> None:
        """End threads that have not registered (INIT did not grant io_uring, or the session closes)."""
        self._cancelled = True
        self._go.set()
        self.join(_PREPARE_TIMEOUT)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every thread to end; False if one is still running after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for w in self.workers:
            if w.thread.ident is not None:
                w.thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(w.thread.is_alive() for w in self.workers)

    def queue_counts(self) -> list[int]:
        """Requests answered per queue, by qid."""
        counts = [0] * self.queues
        for w in self.workers:
            counts[w.qid] += w.requests
        return counts

    def queue_replacements(self) -> list[int]:
        """Entries registered again after a failed COMMIT_AND_FETCH, per queue, by qid."""
        counts = [0] * self.queues
        for w in self.workers:
            counts[w.qid] += w.replaced
        return counts

    def _wait_go(self) -> bool:
        self._go.wait()
        return not self._cancelled

    def _admit(self, worker: _Worker, slot: int) -> bool:
        """Count a request in before it is served; if the bound is reached, leave it with the
        worker's deferred ones instead (False)."""
        if self.bound is None:
            return True
        with self._lock:
            if self.active < self.bound:
                self.active += 1
                return True
            worker.deferred.append(slot)
            return False

    def _admit_deferred(self, worker: _Worker) -> list[int]:
        """The deferred requests of ``worker`` there is now room for, counted in."""
        if self.bound is None:
            return []
        with self._lock:
            n = max(0, min(len(worker.deferred), self.bound - self.active))
            taken, worker.deferred[:n] = worker.deferred[:n], []
            self.active += n
            return taken

    def _done(self) -> None:
        """A request was answered: wake the workers holding deferred ones, if any."""
        if self.bound is None:
            return
        with self._lock:
            self.active -= 1
            waiting = [w for w in self.workers if w.deferred]
        for w in waiting:
            w.wake()

    def _registration_failed(self, reason: str) -> None:
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = reason
        if first:
            log.error("FUSE over io_uring: %s; serving through /dev/fuse", reason)
            if self.on_fallback is not None:
                self.on_fallback(reason)


class _Worker:
    """A thread, its ring and ``slots`` ring entries of queue ``qid``, in one buffer (entry i at
    i * SLOT_SIZE: the header struct, then the payload at PAYLOAD_AT). ``wakeable``: requests may
    be answered later, by coroutines, through ``_deliver_later``."""

    def __init__(self, transport: UringTransport, qid: int, index: int, slots: int, wakeable: bool) -> None:
        self.transport = transport
        self.qid = qid
        self.slots = slots
        self.wakeable = wakeable
        self.requests = 0
        self.replaced = 0  # entries registered again after a failed COMMIT_AND_FETCH
        self.setup_error: OSError | None = None
        self.scratch = Scratch()  # its deliver is set to the entry's before each request
        self._delivers = [functools.partial(self._deliver_later, i) for i in range(slots)]
        self._late: queue.SimpleQueue[tuple[int, Outcome]] = queue.SimpleQueue()
        self.deferred: list[int] = []  # entries whose request waits for room (under the transport's lock)
        self._lock = threading.Lock()
        self._ended = False
        self._wake_fd = -1
        self.buffer: mmap.mmap | None = None  # every entry's buffers, while the thread runs
        self.thread = threading.Thread(target=self._run, name=f"fusepass-uring-{qid}.{index}", daemon=True)

    def _run(self) -> None:
        ring: Ring | None = None
        buf: mmap.mmap | None = None
        try:
            try:
                ring = Ring(self.slots + 1)
                buf = self.buffer = mmap.mmap(-1, self.slots * SLOT_SIZE)
                if self.wakeable:
                    self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            except OSError as e:
                self.setup_error = e
                return
            finally:
                self.transport._prepared.release()
            if self.transport._wait_go():
                try:
                    self._serve(ring, buf)
                except OSError as e:  # io_uring_enter itself failed: this thread's entries are lost
                    log.error("FUSE over io_uring: queue %d: %s", self.qid, e)
        finally:
            with self._lock:
                self._ended = True
            if ring is not None:
                ring.close()
            if self._wake_fd >= 0:
                os.close(self._wake_fd)
            if buf is not None:
                try:
                    buf.close()
                except BufferError:  # a view of a request is still held somewhere: unmapped when it goes
                    log.warning("an io_uring entry buffer is still referenced; it is unmapped later")

    def _serve(self, ring: Ring, buf: mmap.mmap) -> None:
        """Register every entry, then answer requests until the kernel has ended them all."""
        t = self.transport
        base = syscalls.buffer_address(buf)
        iovecs = bytearray(_IOVECS.size * self.slots)
        for i in range(self.slots):
            at = base + i * SLOT_SIZE
            _IOVECS.pack_into(iovecs, i * _IOVECS.size, at, abi.URING_HEADER_SIZE, at + PAYLOAD_AT, PAYLOAD_SIZE)
        iov_base = syscalls.buffer_address(iovecs)
        self._iov_base = iov_base
        view = memoryview(buf)
        try:
            if not self.wakeable:
                self._serve_alone(ring, buf, view)
                return
            for i in range(self.slots):
                self._push(ring, abi.URING_CMD_REGISTER, i, 0)
            wake = bytearray(8)
            ring.push(_OP_READ, self._wake_fd, 0, syscalls.buffer_address(wake), 8, _WAKE)
            handle = t.dispatcher.handle_parts
            registered = [False] * self.slots
            replaced: set[int] = set()  # entries registered again after a failed COMMIT_AND_FETCH
            live = self.slots
            while live:
                ring.enter(1)
                for slot, res in ring.reap():
                    if slot == _WAKE:
                        if res >= 0:
                            ring.push(_OP_READ, self._wake_fd, 0, syscalls.buffer_address(wake), 8, _WAKE)
                        self._commit_late(ring)
                        for admitted in t._admit_deferred(self):
                            self._answer(ring, buf, view, admitted, handle, admitted=True)
                    elif res < 0:
                        if self._replaces(-res, registered[slot], slot in replaced):
                            registered[slot] = False
                            replaced.add(slot)
                            self._push(ring, abi.URING_CMD_REGISTER, slot, 0)
                        else:
                            live -= 1
                    else:
                        registered[slot] = True
                        self._answer(ring, buf, view, slot, handle)
        finally:
            view.release()

    def _serve_alone(self, ring: Ring, buf: mmap.mmap, view: memoryview) -> None:
        """The request path of a worker of plain handlers: one entry, one command in flight, so each
        turn is one system call (the reply committed, the next request fetched) and the SQE is
        written once, with only the request's unique changed per turn (``Ring.cycle``)."""
        commit = _FUSE_SQE.pack(uring.OP_URING_CMD, 0, 0, self.transport.fd, abi.URING_CMD_COMMIT_AND_FETCH, 0,
                                self._iov_base, 2, 0, 0, 0, 0, 0, 0, 0, self.qid)
        handle = self.transport.dispatcher.handle_parts
        scratch = self.scratch

        def answer(res: int) -> int | None:
            """Serve the request the entry holds (``res`` >= 0) and write its reply; its unique, for
            the COMMIT_AND_FETCH. None when the kernel ended the entry."""
            if res < 0:
                return None
            request = _request(buf, view, 0)
            if request is None:
                unique: int = _U64.unpack_from(buf, 8)[0]
                outcome = Outcome((abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -errno.EIO, unique),))
            else:
                h, body = request
                unique = h.unique
                answered = handle(h, body, scratch)
                if answered is None:
                    outcome = _no_answer(h.opcode, unique)
                elif answered is PENDING:  # cannot happen: only coroutine handlers pend, on wakeable workers
                    raise AssertionError("a request pends on an io_uring worker that cannot be woken")
                else:
                    outcome = answered
            if not _write_reply(buf, 0, outcome.reply):
                outcome.undelivered()
                _write_reply(buf, 0, (abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -errno.EIO, unique),))
                outcome = Outcome(())
            self.requests += 1
            if outcome.after is not None:
                outcome.after()
            return unique

        again = False
        while True:
            self._push(ring, abi.URING_CMD_REGISTER, 0, 0)
            ring.enter(0)  # the REGISTER read by the kernel: every slot may take the COMMIT_AND_FETCH
            ring.prefill(commit)
            before = self.requests
            res = ring.cycle(_U64, _COMMIT_ID_AT, answer)
            # A request came since the REGISTER: it worked, and what failed is a COMMIT_AND_FETCH.
            if not self._replaces(-res, self.requests > before, again):
                return
            again = True

    def _answer(self, ring: Ring, buf: mmap.mmap, view: memoryview, slot: int,
                handle: Callable[[P.InHeader, memoryview, Scratch], Outcome | Pending | None],
                admitted: bool = False) -> None:
        """Serve the request in entry ``slot``, and commit its reply unless a coroutine answers it
        (or the bound leaves it waiting: ``admitted`` once it has been counted in)."""
        if not admitted and not self.transport._admit(self, slot):
            return
        o = slot * SLOT_SIZE
        request = _request(buf, view, o)
        outcome: Outcome | Pending | None
        if request is None:
            unique = _U64.unpack_from(buf, o + 8)[0]
            outcome = Outcome((abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -errno.EIO, unique),))
        else:
            h, body = request
            unique = h.unique
            self.scratch.deliver = self._delivers[slot]
            outcome = handle(h, body, self.scratch)
            if outcome is PENDING:
                return
            if outcome is None:
                outcome = _no_answer(h.opcode, unique)
        self._commit(ring, buf, slot, unique, outcome)

    def _commit(self, ring: Ring, buf: mmap.mmap, slot: int, unique: int, outcome: Outcome) -> None:
        """Write ``outcome`` into entry ``slot`` and queue its COMMIT_AND_FETCH."""
        self.requests += 1
        self.transport._done()
        if not _write_reply(buf, slot * SLOT_SIZE, outcome.reply):
            outcome.undelivered()
            _write_reply(buf, slot * SLOT_SIZE, (abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -errno.EIO, unique),))
            outcome = Outcome(())
        self._push(ring, abi.URING_CMD_COMMIT_AND_FETCH, slot, unique)
        if outcome.after is not None:
            outcome.after()

    def _push(self, ring: Ring, cmd_op: int, slot: int, commit_id: int) -> None:
        """Queue a REGISTER or COMMIT_AND_FETCH of entry ``slot`` (its iovecs, its qid)."""
        ring.push_packed(_FUSE_SQE, uring.OP_URING_CMD, 0, 0, self.transport.fd, cmd_op, 0,
                         self._iov_base + slot * _IOVECS.size, 2, 0, slot, 0, 0, 0, 0, commit_id, self.qid)

    def _commit_late(self, ring: Ring) -> None:
        """Commit the replies coroutines handed over since the last wake-up."""
        buf = self.buffer
        assert buf is not None
        while True:
            try:
                slot, outcome = self._late.get_nowait()
            except queue.Empty:
                return
            unique = abi.IN_HEADER.unpack_from(buf, slot * SLOT_SIZE)[2]
            self._commit(ring, buf, slot, unique, outcome)

    def _replaces(self, err: int, registered: bool, again: bool) -> bool:
        """An entry's command failed with ``err``: whether to register the entry again. Yes after a
        failed COMMIT_AND_FETCH (the kernel then holds the entry as the server's for good, so the
        queue would have one entry fewer, none at depth 1: its CPU's callers would wait for ever);
        no when the connection is gone, or a REGISTER failed (``again``: one that replaced an entry;
        otherwise the first, and the kernel serves through /dev/fuse: so does the session). What the
        failed command's reply promised is not undone: the error may have come after the kernel took
        it (sending the next request), and a node counted twice is a leak, one forgotten an error."""
        if err in _END_ERRNOS:
            return False  # the connection is gone: unmounted, aborted, or the kernel cancelled the ring
        if registered:
            self.replaced += 1
            log.warning("FUSE over io_uring: COMMIT_AND_FETCH on queue %d failed: %s; the entry is registered "
                        "again", self.qid, os.strerror(err))
            return True
        if again:
            log.error("FUSE over io_uring: registering an entry of queue %d again failed: %s; this entry ends",
                      self.qid, os.strerror(err))
        else:
            self.transport._registration_failed(f"REGISTER of queue {self.qid} failed: {os.strerror(err)}")
        return False

    def _deliver_later(self, slot: int, outcome: Outcome) -> None:
        """A coroutine's reply for entry ``slot``: queued for the thread, which the eventfd wakes
        (or undone, if the thread is gone). Called on the event loop's thread."""
        with self._lock:
            if not self._ended:
                self._late.put((slot, outcome))
                os.eventfd_write(self._wake_fd, 1)
                return
        outcome.undelivered()

    def wake(self) -> None:
        """Make the thread look at its deferred requests and late replies."""
        with self._lock:
            if not self._ended and self._wake_fd >= 0:
                os.eventfd_write(self._wake_fd, 1)


def _request(buf: mmap.mmap, view: memoryview, o: int) -> tuple[P.InHeader, memoryview] | None:
    """The header and body (without extensions) of the request in the entry at ``o``, read where
    the kernel put them; None if its sizes are impossible. The first argument is in op_in, the
    rest in the payload buffer: a body of both has the first copied just before the payload."""
    fields = _IN_FIELDS.unpack_from(buf, o)
    payload = _U32.unpack_from(buf, o + _PAYLOAD_SZ_AT)[0]
    first = fields[0] - abi.IN_HEADER.size - payload  # the first argument's size, in op_in
    ext = fields[7] * 8
    if not 0 <= first <= abi.URING_OP_IN or payload > PAYLOAD_SIZE or ext > first + payload:
        log.error("io_uring entry with an impossible size: len %d, payload %d", fields[0], payload)
        return None
    if not payload:
        start = o + abi.URING_OP_IN
    elif not first:
        start = o + PAYLOAD_AT
    else:
        start = o + PAYLOAD_AT - first
        buf[start:start + first] = view[o + abi.URING_OP_IN:o + abi.URING_OP_IN + first]
    return _new_header(P.InHeader, fields), view[start:start + first + payload - ext]


def _no_answer(opcode: int, unique: int) -> Outcome:
    """What to commit for a request that takes no answer (NOTIFY_REPLY): an empty reply."""
    err = 0 if opcode in abi.NO_REPLY_OPCODES else -errno.EIO
    return Outcome((abi.OUT_HEADER.pack(abi.OUT_HEADER.size, err, unique),))


def _write_reply(buf: mmap.mmap, o: int, parts: Sequence[P.Buffer]) -> bool:
    """The out header into the in_out of the entry at ``o``, the rest into its payload buffer, and
    its size; False if it does not fit."""
    if len(parts) == 2 and len(parts[0]) == abi.OUT_HEADER.size:  # the usual shape: header, body
        head, body = parts
        n = len(body)
        if n > PAYLOAD_SIZE:
            return False
        at = o + PAYLOAD_AT
        buf[at:at + n] = body
        buf[o:o + abi.OUT_HEADER.size] = head
        _U32.pack_into(buf, o + _PAYLOAD_SZ_AT, n)
        return True
    head = parts[0]
    rest = parts[1:]
    if len(head) != abi.OUT_HEADER.size:
        whole = b"".join(parts)
        head, rest = whole[:abi.OUT_HEADER.size], (whole[abi.OUT_HEADER.size:],)
    at = o + PAYLOAD_AT
    for part in rest:
        n = len(part)
        if at + n > o + SLOT_SIZE:
            return False
        buf[at:at + n] = part
        at += n
    buf[o:o + abi.OUT_HEADER.size] = head
    _U32.pack_into(buf, o + _PAYLOAD_SZ_AT, at - o - PAYLOAD_AT)
    return True
