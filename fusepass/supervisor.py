"""A mount that outlives its server: a supervisor holds the connection, the filesystem runs in a child it restarts.

The supervisor mounts, makes the workers' cloned descriptors and the journal's files, and then
does nothing but fork a server, wait for it, and fork another when it dies. It holds every
descriptor a server reads from, because the kernel ends the requests read from a descriptor
with ECONNABORTED when its last reference is closed (``fuse_dev_release``); so a successor
finds the connection as it was: the requests queued meanwhile, and, once it sends
FUSE_NOTIFY_RESEND, those its predecessor read and never answered. The journal
(``fusepass.journal``) gives it everything the predecessor handed the kernel.

A server that ends with status 0 (the connection ended: unmounted) ends the supervisor. If the
first server never becomes ready, or servers die before becoming ready ``QUICK_FAILURES``
times in a row, no other is started: the mount is detached and, with the supervisor's
descriptors closed, the connection ends (callers get ENOTCONN, as without a supervisor).
"""

from __future__ import annotations

import copy
import logging
import os
import resource
import select
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType

from . import journal as journalmod
from . import mount as mountmod
from .device import Device
from .stall import Stall

log = logging.getLogger("fusepass")

QUICK_FAILURES = 5
KEEP_RECOVERIES = 100  # times to recover kept for status
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)



@dataclass(slots=True)
class Restarts:
    """What ``fusepass status`` shows of the restarts; each server gets a copy when it starts."""

    supervisor_pid: int
    count: int = 0
    last_cause: str | None = None
    last_at: str | None = None  # when, as an ISO time
    died_ns: int | None = None  # CLOCK_MONOTONIC of the last death, which every process shares
    recoveries_ms: list[float] = field(default_factory=list)  # from a death to the successor being ready

    def recovered(self) -> None:
        """The server that took over is ready: the time since the death is one more recovery."""
        if self.died_ns is not None:
            self.recoveries_ms.append(round((time.monotonic_ns() - self.died_ns) / 1e6, 3))
            del self.recoveries_ms[:-KEEP_RECOVERIES]

    def status(self) -> dict[str, object]:
        r = self.recoveries_ms
        return {
            "supervisor_pid": self.supervisor_pid, "count": self.count, "last_cause": self.last_cause,
            "last_at": self.last_at, "last_recovery_ms": r[-1] if r else None,
            "median_recovery_ms": statistics.median(r) if r else None, "worst_recovery_ms": max(r) if r else None,
        }


#: Runs one server in the child: (the connection's descriptors, the journal's files, the restarts
#: so far, the descriptor to write b"ready\n" or an error to) -> exit status.
ServerMain = Callable[[list[Device], tuple[int, int], Restarts, int], int]


def describe_exit(status: int) -> str:
    """A wait status in words: "killed by SIGKILL", "exit status 70"."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    """Mount ``options`` at ``mountpoint`` with ``threads`` descriptors and serve it with
    ``server`` in a child, restarted whenever it dies; ``run`` returns an exit status.
    ``deadline``: seconds a server may leave requests waiting without progress before it is
    killed and replaced (``fusepass.stall``); None: never."""

    def __init__(self, mountpoint: str, options: mountmod.MountOptions, threads: int, server: ServerMain,
                 deadline: float | None = None) -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self.options = options
        self.threads = threads
        self.server = server
        self.deadline = deadline
        self.connection: int | None = None
        self.child: int | None = None
        self.restarts = Restarts(os.getpid())

    def run(self, ready_fd: int | None) -> int:
        _raise_descriptor_limit()
        try:
            mount = mountmod.mount(self.mountpoint, self.options)
        except OSError as e:
            _report(ready_fd, f"{e.strerror or e}")
            return 1
        devices = [mount.device]
        self.connection = mountmod.connection_id(self.mountpoint)
        if self.deadline is not None:
            mountmod.ensure_fusectl()
        try:
            devices += [mount.device.clone() for _ in range(self.threads - 1)]
        except OSError as e:
            log.warning("FUSE_DEV_IOC_CLONE failed (%s); serving with %d worker(s)", e, len(devices))
        files = journalmod.create_files()
        previous = [(sig, signal.signal(sig, self._forward)) for sig in _FORWARDED]
        try:
            return self._supervise(devices, files, ready_fd)
        finally:
            for sig, handler in previous:
                signal.signal(sig, handler)

    def _supervise(self, devices: list[Device], files: tuple[int, int], ready_fd: int | None) -> int:
        quick = 0
        first = True
        while True:
            started = time.monotonic_ns()
            pid, ready = self._start(devices, files, ready_fd if first else None)
            status, hung = self._wait(pid)
            died = time.monotonic_ns()
            self.child = None
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                return 0  # the connection ended
            cause = hung or describe_exit(status)
            quick = 0 if ready else quick + 1
            if first and not ready or quick >= QUICK_FAILURES:
                log.error("the server of %s failed (%s) before it served; giving the mount up",
                          self.mountpoint, cause)
                self._give_up()
                return 1
            log.warning("the server of %s died (%s) after %.1f s; starting another", self.mountpoint, cause,
                        (died - started) / 1e9)
            r = self.restarts
            r.count += 1
            r.last_cause = cause
            r.last_at = datetime.now(UTC).isoformat()
            r.died_ns = died
            first = False

    def _start(self, devices: list[Device], files: tuple[int, int], ready_fd: int | None) -> tuple[int, bool]:
        """Fork a server; wait until it is ready or dead. (pid, whether it became ready)."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the server
            status = 70
            try:
                os.close(r)
                if ready_fd is not None:
                    os.close(ready_fd)
                for sig in _FORWARDED:
                    signal.signal(sig, signal.SIG_DFL)
                os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor alone, which passes on one signal
                status = self.server(devices, files, copy.deepcopy(self.restarts), w)
            except BaseException:
                log.exception("the server failed")
            finally:
                os._exit(status)
        os.close(w)
        self.child = pid
        with os.fdopen(r, "rb") as f:
            line = f.readline()
        ready = line.startswith(b"ready")
        if ready:
            self.restarts.recovered()
        if ready_fd is not None:
            _report(ready_fd, line.decode(errors="replace").strip() or "the server exited before the mount was ready")
        return pid, ready

    def _wait(self, pid: int) -> tuple[int, str | None]:
        """Wait for the server to end: (its wait status, why it was killed as hung or None)."""
        if self.deadline is None or self.connection is None:
            return os.waitpid(pid, 0)[1], None
        stall = Stall(pid, self.connection, self.deadline)
        hung = None
        pidfd = os.pidfd_open(pid)
        try:
            while not select.select([pidfd], [], [], self.deadline / 4)[0]:
                why = stall.check() if hung is None else None
                if why is not None:
                    hung = f"hung ({why})"
                    log.warning("the server of %s is %s: killing it", self.mountpoint, hung)
                    os.kill(pid, signal.SIGKILL)
        finally:
            os.close(pidfd)
        return os.waitpid(pid, 0)[1], hung

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if self.child is not None:
            try:
                os.kill(self.child, signum)
            except ProcessLookupError:
                pass

    def _give_up(self) -> None:
        if mountmod.mount_entry(self.mountpoint) is not None:
            try:
                mountmod.unmount(self.mountpoint, lazy=True)
            except OSError as e:
                log.warning("unmount of %s: %s", self.mountpoint, e)


def _report(ready_fd: int | None, message: str) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, f"{message}\n".encode())
        os.close(ready_fd)
    except OSError:
        pass


def _raise_descriptor_limit() -> None:
    """As many descriptors as allowed: open files live in the upper half (``session.fh_base``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
