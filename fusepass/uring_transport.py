"""FUSE over io_uring: ring entries on one queue per possible CPU, each request answered and the next
one fetched with a single COMMIT_AND_FETCH, feeding the same ``Dispatcher`` as /dev/fuse.

INIT stays on /dev/fuse. Once its reply has granted FUSE_OVER_IO_URING, the kernel holds every new
request until each queue has an entry registered (FUSE_IO_URING_CMD_REGISTER), then sends each
request to the queue of the CPU its caller runs on; FORGET, INTERRUPT and notifications stay on
/dev/fuse. An entry is a ``struct fuse_uring_req_header`` (the in header, the first argument, the
payload size) and a payload buffer for the other arguments; the reply goes back the same way.

Each entry here has a thread and a ring of its own (rings are single-issuer), so a handler that
blocks (a lock wait, a slow source) holds up its own entry only, as a /dev/fuse worker does;
``depth`` entries per queue bound the requests served at once per CPU.

The rings are made before INIT (``prepare``), so that a process that may not use io_uring falls
back to /dev/fuse before asking the kernel for it: once granted, the kernel would hold requests
until every queue registered, and only a failed REGISTER makes it fall back by itself.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import abi, syscalls
from . import protocol as P
from .dispatch import PENDING, Dispatcher, Outcome, Pending, Scratch
from .uring import Ring

log = logging.getLogger("fusepass")

DEFAULT_DEPTH = 2
MAX_DEPTH = 64
MODULE_PARAMETER = "/sys/module/fuse/parameters/enable_uring"
HOW_TO_ENABLE = (f"an administrator turns it on with `echo Y > {MODULE_PARAMETER}` (for mounts made "
                 "afterwards; `options fuse enable_uring=1` in /etc/modprobe.d or fuse.enable_uring=1 on "
                 "the kernel command line keeps it on across reboots)")
#: Every argument but the first fits here: the largest WRITE, or the largest reply.
PAYLOAD_SIZE = max(8192, abi.MAX_WRITE, abi.MAX_PAGES * abi.PAGE_SIZE)
#: Where the payload starts in an entry's buffer (the header struct comes first); the message the
#: dispatcher reads is rebuilt just before it: the in header, then the first argument.
PAYLOAD_AT = abi.PAGE_SIZE
_PAYLOAD_SZ_AT = abi.URING_ENT_IN_OUT + 16
_IOVECS = struct.Struct("<QQQQ")  # two struct iovec: header, payload
_U32 = struct.Struct("<I")
_END_ERRNOS = (errno.ENOTCONN, errno.ECANCELED, errno.ECONNABORTED, errno.ENODEV)
_PREPARE_TIMEOUT = 10.0


@dataclass(slots=True, frozen=True)
class UringOptions:
    """``-o io_uring`` (or ``noio_uring``) and ``-o io_uring_depth=N`` (ring entries, each with its
    thread, per queue). ``enabled`` None: neither was given (the session's default decides)."""

    enabled: bool | None = None
    depth: int = DEFAULT_DEPTH


def take_options(items: list[str]) -> tuple[UringOptions, list[str]]:
    """Pick the io_uring options out of ``-o`` items; return them and the items left. Raises
    ValueError for a bad depth."""
    enabled: bool | None = None
    depth = DEFAULT_DEPTH
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
    return f"io_uring_setup failed: {e.strerror}"


class UringTransport:
    """The ring entries of a connection: ``depth`` per queue, a queue per possible CPU.

    ``prepare`` makes their rings and buffers (before INIT); ``start`` registers them (after the
    INIT reply granted FUSE_OVER_IO_URING), ``cancel`` drops them unregistered. ``on_fallback``
    is called once, with the reason in words, if a registration fails after INIT: the kernel
    then serves new requests through /dev/fuse again. ``join`` waits for the threads, which end
    when the kernel ends their entries (unmount, abort) or when cancelled.
    """

    def __init__(self, dispatcher: Dispatcher, fd: int, depth: int = DEFAULT_DEPTH,
                 on_fallback: Callable[[str], None] | None = None, queues: int | None = None) -> None:
        self.dispatcher = dispatcher
        self.fd = fd
        self.depth = depth
        self.queues = possible_cpus() if queues is None else queues
        self.on_fallback = on_fallback
        self.entries = [_Entry(self, qid, i) for qid in range(self.queues) for i in range(depth)]
        self.failure: str | None = None  # why a registration failed, once it did
        self._go = threading.Event()
        self._cancelled = False
        self._prepared = threading.Semaphore(0)
        self._lock = threading.Lock()

    @property
    def scratches(self) -> list[Scratch]:
        return [e.scratch for e in self.entries]

    def prepare(self) -> str | None:
        """Start the threads and let each make its ring and buffers; the reason in words if one
        could not (and then every thread has ended), else None."""
        for e in self.entries:
            e.thread.start()
        for _ in self.entries:
            if not self._prepared.acquire(timeout=_PREPARE_TIMEOUT):
                self.cancel()
                return "the io_uring threads did not start in time"
        failed = next((e.setup_error for e in self.entries if e.setup_error is not None), None)
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
        for e in self.entries:
            if e.thread.ident is not None:
                e.thread.join(timeout)
        return not any(e.thread.is_alive() for e in self.entries)

    def queue_counts(self) -> list[int]:
        """Requests answered per queue, by qid."""
        counts = [0] * self.queues
        for e in self.entries:
            counts[e.qid] += e.requests
        return counts

    def _wait_go(self) -> bool:
        self._go.wait()
        return not self._cancelled

    def _registration_failed(self, reason: str) -> None:
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = reason
        if first:
            log.error("FUSE over io_uring: %s; serving through /dev/fuse", reason)
            if self.on_fallback is not None:
                self.on_fallback(reason)


class _Entry:
    """One ring entry, its buffers, its ring and the thread that serves it."""

    def __init__(self, transport: UringTransport, qid: int, index: int) -> None:
        self.transport = transport
        self.qid = qid
        self.requests = 0
        self.setup_error: OSError | None = None
        self.scratch = Scratch(deliver=self._deliver_later)
        self._late: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._ended = False
        self.buffer: mmap.mmap | None = None  # the header and payload buffers, while the thread runs
        self.thread = threading.Thread(target=self._run, name=f"fusepass-uring-{qid}.{index}", daemon=True)

    def _run(self) -> None:
        ring: Ring | None = None
        buf: mmap.mmap | None = None
        try:
            try:
                ring = Ring(2)
                buf = self.buffer = mmap.mmap(-1, PAYLOAD_AT + PAYLOAD_SIZE)
            except OSError as e:
                self.setup_error = e
                return
            finally:
                self.transport._prepared.release()
            if self.transport._wait_go():
                self._serve(ring, buf)
        finally:
            with self._lock:
                self._ended = True
            if ring is not None:
                ring.close()
            if buf is not None:
                try:
                    buf.close()
                except BufferError:  # a view of a request is still held somewhere: unmapped when it goes
                    log.warning("an io_uring entry buffer is still referenced; it is unmapped later")

    def _serve(self, ring: Ring, buf: mmap.mmap) -> None:
        """Register, then answer requests until the kernel ends the entry."""
        t = self.transport
        base = syscalls.buffer_address(buf)
        iovecs = bytearray(_IOVECS.pack(base, abi.URING_HEADER_SIZE, base + PAYLOAD_AT, PAYLOAD_SIZE))
        iov_addr = syscalls.buffer_address(iovecs)
        ring.push(t.fd, abi.URING_CMD_REGISTER, iov_addr, 2, 0, abi.URING_CMD_REQ.pack(0, 0, self.qid))
        view = memoryview(buf)
        handle = t.dispatcher.handle
        registered = False
        try:
            while True:
                ring.enter(1)
                for _, res in ring.reap():
                    if res < 0:
                        self._ended_by(-res, registered)
                        return
                registered = True
                unique = self._answer(buf, view, handle)
                ring.push(t.fd, abi.URING_CMD_COMMIT_AND_FETCH, iov_addr, 2, 0,
                          abi.URING_CMD_REQ.pack(0, unique, self.qid))
        finally:
            view.release()

    def _answer(self, buf: mmap.mmap, view: memoryview,
                handle: Callable[[memoryview, Scratch], Outcome | Pending | None]) -> int:
        """Serve the request in the entry and write its reply there; its unique (the commit id)."""
        length, opcode, unique = abi.IN_HEADER.unpack_from(buf)[:3]
        payload = _U32.unpack_from(buf, _PAYLOAD_SZ_AT)[0]
        first = length - abi.IN_HEADER.size - payload  # the first argument's size, in op_in
        outcome: Outcome | Pending | None
        if 0 <= first <= abi.URING_OP_IN and payload <= PAYLOAD_SIZE:
            start = PAYLOAD_AT - first - abi.IN_HEADER.size
            buf[start:start + abi.IN_HEADER.size] = buf[:abi.IN_HEADER.size]
            buf[PAYLOAD_AT - first:PAYLOAD_AT] = buf[abi.URING_OP_IN:abi.URING_OP_IN + first]
            outcome = handle(view[start:PAYLOAD_AT + payload], self.scratch)
            if outcome is PENDING:
                outcome = self._late.get()  # a coroutine serves it: its reply comes through deliver
        else:
            log.error("io_uring entry with an impossible size: len %d, payload %d", length, payload)
            outcome = Outcome((abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -errno.EIO, unique),))
        self.requests += 1
        if outcome is None:  # a request that takes no answer (NOTIFY_REPLY): commit an empty one
            err = 0 if opcode in abi.NO_REPLY_OPCODES else -errno.EIO
            self._write_reply(buf, (abi.OUT_HEADER.pack(abi.OUT_HEADER.size, err, unique),))
            return unique
        if not self._write_reply(buf, outcome.reply):
            outcome.undelivered()
            self._write_reply(buf, (abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -errno.EIO, unique),))
        elif outcome.after is not None:
            outcome.after()
        return unique

    @staticmethod
    def _write_reply(buf: mmap.mmap, parts: Sequence[P.Buffer]) -> bool:
        """The out header into in_out, the rest into the payload buffer, and its size; False if it
        does not fit."""
        head = parts[0]
        rest = parts[1:]
        if len(head) != abi.OUT_HEADER.size:
            whole = b"".join(parts)
            head, rest = whole[:abi.OUT_HEADER.size], (whole[abi.OUT_HEADER.size:],)
        at = PAYLOAD_AT
        for part in rest:
            n = len(part)
            if at + n > PAYLOAD_AT + PAYLOAD_SIZE:
                return False
            buf[at:at + n] = part
            at += n
        buf[:abi.OUT_HEADER.size] = head
        _U32.pack_into(buf, _PAYLOAD_SZ_AT, at - PAYLOAD_AT)
        return True

    def _ended_by(self, err: int, registered: bool) -> None:
        if err in _END_ERRNOS:
            return  # the connection is gone: unmounted, aborted, or the kernel cancelled the ring
        what = "COMMIT_AND_FETCH" if registered else "REGISTER"
        if not registered:
            self.transport._registration_failed(f"{what} of queue {self.qid} failed: {os.strerror(err)}")
        else:
            log.error("FUSE over io_uring: %s on queue %d failed: %s; this entry ends", what, self.qid,
                      os.strerror(err))

    def _deliver_later(self, outcome: Outcome) -> None:
        """A coroutine's reply, for the thread waiting on it (or undone, if the thread is gone)."""
        with self._lock:
            if not self._ended:
                self._late.put(outcome)
                return
        outcome.undelivered()
