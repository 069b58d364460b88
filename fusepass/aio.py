"""The asyncio side of a session: the event loop coroutine handlers run on, the bound on the requests
they serve at once, and notifications sent from the loop without blocking it.

A filesystem whose handlers are ``async def`` (any of them: plain and coroutine handlers mix) is
served as any other: the workers read ``/dev/fuse`` and answer plain handlers themselves, and hand
each request for a coroutine handler to ``LoopRunner``, which runs it as a task on an asyncio loop
and writes its reply when it ends. The loop is a private one on a thread of its own, or the
author's (``Session(..., loop=...)``, or ``await fusepass.aio.serve(session)`` from a coroutine).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import queue
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .dispatch import Settled
from .notify import Notifier

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("fusepass")

#: Requests coroutines may serve at once by default; each holds a task, its request and its frames
#: (a few KiB for a metadata request, plus the data of a WRITE).
DEFAULT_MAX_IN_FLIGHT = 4096
T = TypeVar("T")


class InFlight:
    """The bound on the requests coroutines serve at once, kept by the workers that read them.

    A worker calls ``before_read`` before it reads a request and ``after_read`` once it has
    answered it or handed it to the loop; a job counts from ``started`` to ``finished``. A worker
    waits before reading while the jobs and the requests being read reach ``limit - reserve``, so
    that further requests wait in the kernel, where their callers can still be killed and they
    cost the server nothing. The last worker still reading goes on up to ``limit``: the kernel
    hands out INTERRUPT and FORGET before any other request, so they are not stuck behind slow
    handlers while the reserve lasts (INTERRUPT cancels a job, which makes room).
    """

    def __init__(self, limit: int, workers: int) -> None:
        if limit < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.limit = limit
        self.reserve = limit // 8
        self.workers = workers
        self.running = 0  # jobs started, not yet finished
        self.reading = 0  # workers between before_read and after_read
        self.waiting = 0  # workers waiting in before_read
        self.peak = 0  # the most jobs running at once so far
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)

    def before_read(self) -> None:
        with self._lock:
            while True:
                last = self.waiting >= self.workers - 1
                if self.running + self.reading < (self.limit if last else self.limit - self.reserve):
                    break
                self.waiting += 1
                self._room.wait()
                self.waiting -= 1
            self.reading += 1

    def after_read(self) -> None:
        with self._lock:
            self.reading -= 1
            if self.waiting:
                self._room.notify()

    def started(self) -> None:
        with self._lock:
            self.running += 1
            if self.running > self.peak:
                self.peak = self.running

    def finished(self) -> None:
        with self._lock:
            self.running -= 1
            if self.waiting:
                self._room.notify_all()


class _Job:
    __slots__ = ("work", "finish", "task", "started", "cancelled")

    def __init__(self, work: Awaitable[object], finish: Callable[[Settled], None]) -> None:
        self.work = work
        self.finish = finish
        self.task: asyncio.Future[None] | None = None
        self.started = False  # its task has taken its first step: cancelling it reaches the work
        self.cancelled = False  # cancelled before that: the work never runs


class LoopRunner:
    """Runs the dispatcher's coroutines (a ``dispatch.Runner``) on an asyncio event loop: ``loop``,
    which its owner runs, or a private one on a thread of its own from ``open`` to ``close``.

    Jobs started from worker threads are queued and begun in batches, one wake-up of the loop for
    all the jobs that arrived while it was busy. ``in_flight`` counts them."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, in_flight: InFlight | None = None) -> None:
        self.loop = loop
        self.in_flight = in_flight
        self._private = loop is None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._queue: list[_Job] = []
        self._jobs: set[_Job] = set()  # begun, not ended (their tasks are kept alive here)

    @property
    def thread(self) -> threading.Thread | None:
        """The private loop's thread (None when the loop is the author's)."""
        return self._thread

    def use_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on ``loop`` (which its owner runs) instead of a private one; before ``open``."""
        if self._thread is not None:
            raise RuntimeError("the runner's private loop is running already")
        self.loop, self._private = loop, False

    def open(self) -> None:
        if self._private and self._thread is None:
            self.loop = loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="fusepass-loop", daemon=True)
            self._thread.start()

    def start(self, job: Awaitable[object], finish: Callable[[Settled], None]) -> Callable[[], None]:
        loop = self.loop
        assert loop is not None, "LoopRunner.open() first"
        entry = _Job(job, finish)
        if self.in_flight is not None:
            self.in_flight.started()
        with self._lock:
            self._queue.append(entry)
            wake = len(self._queue) == 1
        if wake:
            self._call_soon(self._begin)

        def cancel() -> None:
            self._call_soon(lambda: _cancel(entry))

        return cancel

    def close(self, timeout: float = 5.0) -> None:
        """Cancel the jobs still running (their callers get EINTR); stop the private loop."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        if not self._private:
            self._call_soon(self._cancel_all)
            return
        stopped = asyncio.run_coroutine_threadsafe(self._wind_down(), loop)
        try:
            stopped.result(timeout)
        except Exception as e:  # a job that ignores its cancellation: leave it to the daemon thread
            log.warning("stopping the event loop: %r", e)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                loop.close()

    # --- on the loop's thread ---------------------------------------------------------

    def _begin(self) -> None:
        loop = self.loop
        assert loop is not None
        with self._lock:
            batch, self._queue = self._queue, []
        for entry in batch:
            entry.task = loop.create_task(self._run(entry))
            self._jobs.add(entry)

    async def _run(self, entry: _Job) -> None:
        """A job's task: the work awaited, then its end reported in the same step (no later callback)."""
        entry.started = True
        settled: Settled
        try:
            if entry.cancelled:  # interrupted before it began: it never runs
                _close(entry.work)
                raise asyncio.CancelledError
            value = await entry.work
        except asyncio.CancelledError:
            settled = _raising(InterruptedError(errno.EINTR, "interrupted"))
        except Exception as e:
            settled = _raising(e)
        else:
            settled = lambda: value  # noqa: E731
        finally:
            self._jobs.discard(entry)
        if self.in_flight is not None:
            self.in_flight.finished()  # before the reply: a caller that has its answer is not counted
        try:
            entry.finish(settled)
        except Exception:
            log.exception("finishing a request served on the event loop failed")

    def _cancel_all(self) -> None:
        self._begin()  # jobs queued meanwhile: begun and cancelled like the others
        for entry in list(self._jobs):
            _cancel(entry)

    async def _wind_down(self) -> None:
        self._cancel_all()
        await asyncio.gather(*(entry.task for entry in list(self._jobs) if entry.task is not None),
                             return_exceptions=True)

    def _call_soon(self, fn: Callable[[], object]) -> None:
        loop = self.loop
        assert loop is not None
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop is closed: the session is ending, its replies go nowhere
            pass


def _cancel(entry: _Job) -> None:
    if entry.started and entry.task is not None:
        entry.task.cancel()
    else:
        entry.cancelled = True


def _raising(error: BaseException) -> Settled:
    def settled() -> object:
        raise error

    return settled


def _close(work: Awaitable[object]) -> None:
    close = getattr(work, "close", None)  # a coroutine that never ran: no "never awaited" warning
    if close is not None:
        close()


class AsyncNotifier:
    """``conn.notifier`` for coroutines: each call queues the notification and returns an awaitable
    at once, done when the kernel has taken it (or with the error it gave: ENOENT if it holds
    nothing of that inode or name). A thread of its own, started at the first call, writes them
    in order: the kernel may block a notification on a lock that a request waiting for the
    loop holds, and the loop must go on meanwhile. As with the plain notifier, do not await one
    from a handler of the inode it names: start it and let the handler return.

    Calls nobody awaits still happen; their errors are dropped."""

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._queue: queue.SimpleQueue[tuple[Callable[[], object], asyncio.AbstractEventLoop,
                                             asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def invalidate_inode(self, ino: int, offset: int = 0, length: int = 0) -> asyncio.Future[None]:
        """See ``Notifier.invalidate_inode``."""
        return self._submit(lambda: self._notifier.invalidate_inode(ino, offset, length))

    def invalidate_entry(self, parent: int, name: bytes, expire_only: bool = False) -> asyncio.Future[None]:
        """See ``Notifier.invalidate_entry``."""
        return self._submit(lambda: self._notifier.invalidate_entry(parent, name, expire_only))

    def notify_delete(self, parent: int, child: int, name: bytes) -> asyncio.Future[None]:
        """See ``Notifier.notify_delete``."""
        return self._submit(lambda: self._notifier.notify_delete(parent, child, name))

    def increment_epoch(self) -> asyncio.Future[None]:
        """See ``Notifier.increment_epoch``."""
        return self._submit(self._notifier.increment_epoch)

    def store(self, ino: int, offset: int, data: bytes) -> asyncio.Future[None]:
        """See ``Notifier.store``."""
        return self._submit(lambda: self._notifier.store(ino, offset, data))

    def retrieve(self, ino: int, offset: int, size: int, timeout: float = 5.0) -> asyncio.Future[bytes]:
        """See ``Notifier.retrieve``: awaiting it waits for the kernel's answer, not the loop."""
        return self._submit(lambda: self._notifier.retrieve(ino, offset, size, timeout))

    def close(self) -> None:
        """End the writer thread once what is queued is written."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread = None

    def _submit(self, send: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        future.add_done_callback(_mark_retrieved)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._write, name="fusepass-notify", daemon=True)
                self._thread.start()
            self._queue.put((send, loop, future))
        return future

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            send, loop, future = item
            try:
                value = send()
            except Exception as e:
                _resolve(loop, future, None, e)
            else:
                _resolve(loop, future, value, None)


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], value: object,
             error: BaseException | None) -> None:
    def settle() -> None:
        if future.done():  # the awaiting side gave up
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: no one is left to tell
        pass


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def serve(session: Session, on_ready: Callable[[Session], None] | None = None) -> None:
    """Mount ``session`` and serve it with its coroutine handlers on the running loop, until it is
    unmounted; cancelling this coroutine (Ctrl-C under ``asyncio.run``) unmounts. ``on_ready`` is
    called once the mount answers. The blocking steps (mounting, waiting for the workers) run on
    a short-lived thread each, never on the loop."""
    session.use_loop(asyncio.get_running_loop())
    try:
        await _in_thread(session.start)
        await _in_thread(session.wait_ready)
        if on_ready is not None:
            on_ready(session)
        await _in_thread(session.wait_finished)
    except asyncio.CancelledError:
        await _in_thread(session.stop)
        await _in_thread(lambda: session.wait_finished(10))
        raise
    finally:
        await _in_thread(session.close)


async def _in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a thread of its own (none is kept: the default executor would keep its threads)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            _resolve(loop, future, None, e)
        else:
            _resolve(loop, future, value, None)

    threading.Thread(target=run, name="fusepass-serve", daemon=True).start()
    return await asyncio.shield(future)
