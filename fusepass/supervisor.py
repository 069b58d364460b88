"""A mount that outlives its server: a supervisor holds the connection, the filesystem runs in a child it restarts.

The supervisor mounts, makes the workers' cloned descriptors and the journal's files, and then
does nothing but fork a server, wait for it, and fork another when it dies. It holds every
descriptor a server reads from, because the kernel ends the requests read from a descriptor
with ECONNABORTED when its last reference is closed (``fuse_dev_release``); so a successor
finds the connection as it was: the requests queued meanwhile, and, once it sends
FUSE_NOTIFY_RESEND, those its predecessor read and never answered. The journal
(``fusepass.journal``) gives it everything the predecessor handed the kernel.

``fusepass restart`` asks the supervisor, on its own socket (``fusepass.control``), for a new
server: one executed afresh (``python -m fusepass.successor``: the code on disk now) with new
options where they may change. It is made first, while the old one serves; then the old one
hands the connection over (``Session.hand_over``: it reads no more requests, answers those it
has read and exits; callers wait in the kernel meanwhile) and the new one takes it. A new server
that cannot start changes nothing; from then on, successors after a crash run the new code too.

A server that ends with status 0 (the connection ended: unmounted) ends the supervisor. If the
first server never becomes ready, or servers die before becoming ready ``QUICK_FAILURES``
times in a row, no other is started: the mount is detached and, with the supervisor's
descriptors closed, the connection ends (callers get ENOTCONN, as without a supervisor).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import select
import signal
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from . import control, successor
from . import journal as journalmod
from . import mount as mountmod
from .device import Device
from .stall import Stall
from .successor import Prepare

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
            "median_recovery_ms": round(statistics.median(r), 3) if r else None,
            "worst_recovery_ms": max(r) if r else None,
        }


#: Runs one server in the child: (the connection's descriptors, the journal's two files and the
#: keeper's socket (``journal.Keeper``), the restarts so far, the descriptor to write b"ready\n" or
#: an error to) -> exit status.
ServerMain = Callable[[list[Device], tuple[int, int, int], Restarts, int], int]

#: Sent to a server to have it hand its connection over (``Session.hand_over``) and exit.
HAND_OVER_SIGNAL = signal.SIGUSR2
#: Seconds a server may take to answer the requests it has read when asked to hand over; then it is killed
#: (its successor is resent what it read: still no caller sees an error).
HAND_OVER_TIMEOUT = 10.0
#: Seconds a new server may take to be made, or to become ready once given the connection.
READY_TIMEOUT = 60.0
#: With a deadline, a server may take this long on top of it to be made (an interpreter's start), and
#: at least TAKE_OVER_MIN to become ready once given the connection: callers wait meanwhile, so a
#: server that hangs before it is ready is killed and replaced like one that hangs later.
STARTUP_ALLOWANCE = 10.0
TAKE_OVER_MIN = 5.0


def describe_exit(status: int) -> str:
    """A wait status in words: "killed by SIGKILL", "exit status 70"."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


class _Child:
    """A server being started or serving, and the two pipes to it (``fusepass.successor``)."""

    def __init__(self, pid: int, inbox: int, report: int, keeper: journalmod.Keeper) -> None:
        self.pid = pid
        self._keeper = keeper
        self._inbox: int | None = inbox
        self._report = report
        self._buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        """One line to the server; lost if it is dead (which ``line`` then tells)."""
        if self._inbox is not None:
            try:
                os.write(self._inbox, json.dumps(message).encode() + b"\n")
            except OSError:
                pass

    def line(self, timeout: float) -> str:
        """The server's next line: "" if it ended its pipe, "timed out" after ``timeout`` seconds
        (what servers give the keeper meanwhile is taken)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            keeper = self._keeper.fileno()
            ready = select.select([self._report, keeper], [], [], left)[0] if left > 0 else []
            if keeper in ready:
                self._keeper.take()
            if not ready:
                return "timed out"
            if self._report not in ready:
                continue
            chunk = os.read(self._report, 4096)
            if not chunk:
                return self._buffer.decode(errors="replace").strip()
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace").strip()

    def close(self) -> None:
        """Close the pipes (a server that has not been given the connection then gives up)."""
        if self._inbox is not None:
            os.close(self._inbox)
            self._inbox = None
        if self._report >= 0:
            os.close(self._report)
            self._report = -1


class Supervisor:
    """Mount ``options`` at ``mountpoint`` and serve it with a server made by ``prepare(spec)`` in a
    child, restarted whenever it dies; ``run`` returns an exit status. ``spec`` is the server's
    options as a JSON object: the supervisor itself reads ``threads`` (descriptors) and
    ``deadline`` (seconds a server may leave requests waiting without progress before it is killed
    and replaced, ``fusepass.stall``; None: never). ``changeable``: the keys of ``spec`` that
    ``fusepass restart`` may change; ``vet(old spec, new spec)``: why a change is refused, or None."""

    def __init__(self, mountpoint: str, options: mountmod.MountOptions, spec: dict[str, Any], prepare: Prepare,
                 changeable: frozenset[str] = frozenset(),
                 vet: Callable[[dict[str, Any], dict[str, Any]], str | None] = lambda old, new: None) -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self.options = options
        self.spec = spec
        self.prepare = prepare
        self.changeable = changeable
        self.vet = vet
        self.connection: int | None = None
        self.child: _Child | None = None
        self.restarts = Restarts(os.getpid())
        self.devices: list[Device] = []
        self.files: tuple[int, int, int] = (-1, -1, -1)  # the journal's, and the keeper's socket
        self.keeper = journalmod.Keeper()
        #: After a restart on request, successors run the code on disk (executed), not the supervisor's.
        self.exec_successors = False
        self._listener: socket.socket | None = None
        self._asking: socket.socket | None = None  # the connection being answered (a forked server closes it)

    @property
    def deadline(self) -> float | None:
        value = self.spec.get("deadline")
        return None if value is None else float(value)

    def run(self, ready_fd: int | None) -> int:
        _raise_descriptor_limit()
        try:
            mount = mountmod.mount(self.mountpoint, self.options)
        except OSError as e:
            _report(ready_fd, f"{e.strerror or e}")
            return 1
        self.devices = [mount.device]
        self.connection = mountmod.connection_id(self.mountpoint)
        if self.deadline is not None:
            mountmod.ensure_fusectl()
        try:
            self.devices += [mount.device.clone() for _ in range(int(self.spec["threads"]) - 1)]
        except OSError as e:
            log.warning("FUSE_DEV_IOC_CLONE failed (%s); serving with %d worker(s)", e, len(self.devices))
        self.files = (*journalmod.create_files(), self.keeper.server_fd)
        if self.connection is not None:
            try:
                self._listener = control.listen(control.supervisor_socket_path(self.connection))
            except OSError as e:
                log.warning("no supervisor socket (fusepass restart will not reach this mount): %s", e)
        previous = [(sig, signal.signal(sig, self._forward)) for sig in _FORWARDED]
        try:
            return self._supervise(ready_fd)
        finally:
            for sig, handler in previous:
                signal.signal(sig, handler)
            if self._listener is not None and self.connection is not None:
                self._listener.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(control.supervisor_socket_path(self.connection))

    def _supervise(self, ready_fd: int | None) -> int:
        quick = 0
        first = True
        while True:
            started = time.monotonic_ns()
            ready, late = self._start_now(ready_fd if first else None, self.exec_successors and quick == 0)
            status, hung = self._wait()
            died = time.monotonic_ns()
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                return 0  # the connection ended
            cause = late or hung or describe_exit(status)
            quick = 0 if ready else quick + 1
            if first and not ready or quick >= QUICK_FAILURES:
                log.error("the server of %s failed (%s) before it served; giving the mount up",
                          self.mountpoint, cause)
                self._give_up()
                return 1
            log.warning("the server of %s died (%s) after %.1f s; starting another", self.mountpoint, cause,
                        (died - started) / 1e9)
            self._count(cause, died)
            first = False

    def _count(self, cause: str, since_ns: int) -> None:
        r = self.restarts
        r.count += 1
        r.last_cause = cause
        r.last_at = datetime.now(UTC).isoformat()
        r.died_ns = since_ns

    def _prepare_timeout(self) -> float:
        return READY_TIMEOUT if self.deadline is None else self.deadline + STARTUP_ALLOWANCE

    def _ready_timeout(self) -> float:
        return READY_TIMEOUT if self.deadline is None else max(self.deadline, TAKE_OVER_MIN)

    def _start_now(self, ready_fd: int | None, execute: bool) -> tuple[bool, str | None]:
        """Start a server and give it the connection at once (no predecessor serves); wait until it
        is ready, dead, or past its time (then it is killed, and ``_wait`` finds it dead).
        (Whether it became ready, why it was killed or None.)"""
        child = self._spawn(self.spec, self.devices, execute, ready_fd)
        self.child = child
        child.send(asdict(self.restarts))
        line = child.line(self._prepare_timeout())
        if line == "prepared":
            line = child.line(self._ready_timeout())
        ready = line.startswith("ready")
        late = None
        if ready:
            self.restarts.recovered()
        elif line == "timed out":
            late = "not ready in time"
            log.warning("the server of %s was %s: killing it", self.mountpoint, late)
            _kill(child.pid)
        if ready_fd is not None:
            _report(ready_fd, line or "the server exited before the mount was ready")
        return ready, late

    def _spawn(self, spec: dict[str, Any], devices: list[Device], execute: bool,
               ready_fd: int | None = None) -> _Child:
        """Fork a server (``execute``: running ``python -m fusepass.successor``, the code on disk) and
        send it ``spec``."""
        inbox_r, inbox_w = os.pipe()
        report_r, report_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the server
            status = 70
            try:
                for sock in (self._listener, self._asking):
                    if sock is not None:
                        sock.close()
                self.keeper.close()
                for fd in (inbox_w, report_r, ready_fd):
                    if fd is not None:
                        os.close(fd)
                for sig in _FORWARDED:
                    signal.signal(sig, signal.SIG_DFL)
                os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor alone, which passes on one signal
                if execute:
                    for fd in [d.fd for d in devices] + [*self.files, inbox_r, report_w]:
                        os.set_inheritable(fd, True)
                    argv = successor.command(devices, self.files, inbox_r, report_w)
                    os.execv(argv[0], argv)
                status = successor.run(self.prepare, devices, self.files, inbox_r, report_w)
            except BaseException:
                log.exception("the server failed")
            finally:
                os._exit(status)
        os.close(inbox_r)
        os.close(report_w)
        child = _Child(pid, inbox_w, report_r, self.keeper)
        child.send(spec)
        return child

    def _wait(self) -> tuple[int, str | None]:
        """Wait for the server to end, answering the supervisor socket meanwhile (a restart replaces
        the server watched): (its wait status, why it was killed as hung or None)."""
        while True:
            assert self.child is not None
            pid = self.child.pid
            deadline = self.deadline
            stall = Stall(pid, self.connection, deadline) if deadline is not None and self.connection else None
            hung = None
            pidfd = os.pidfd_open(pid)
            try:
                watched: list[Any] = [pidfd, self.keeper]
                if self._listener is not None:
                    watched.append(self._listener)
                while True:
                    ready = select.select(watched, [], [], None if stall is None or deadline is None
                                          else deadline / 4)[0]
                    if self.keeper in ready:
                        self.keeper.take()
                    if pidfd in ready:
                        break
                    if self._listener is not None and self._listener in ready:
                        self._answer_one()
                        if self.child.pid != pid or self.deadline != deadline:
                            break  # restarted: watch the new server (with the deadline now asked for)
                    why = stall.check() if stall is not None and hung is None else None
                    if why is not None:
                        hung = f"hung ({why})"
                        log.warning("the server of %s is %s: killing it", self.mountpoint, hung)
                        _kill(pid)
            finally:
                os.close(pidfd)
            if self.child.pid == pid and self.deadline == deadline:
                status = os.waitpid(pid, 0)[1]
                self.child.close()
                return status, hung

    # --- fusepass restart ---------------------------------------------------------------

    def _answer_one(self) -> None:
        """Answer one request on the supervisor socket (one line each way, as ``fusepass.control``)."""
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        self._asking = conn
        with conn:
            try:
                conn.settimeout(2.0)
                if control.peer_uid(conn) not in (0, os.geteuid()):
                    reply: dict[str, Any] = {"error": "only the mount's owner or root may restart its server"}
                else:
                    reply = self._command(control.read_line(conn))
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError as e:
                log.warning("supervisor socket: %s", e)
            finally:
                self._asking = None

    def _command(self, request: bytes) -> dict[str, Any]:
        try:
            message = json.loads(request)
        except (ValueError, UnicodeDecodeError):
            message = None
        if not isinstance(message, dict) or message.get("command") != "restart":
            return {"error": "the supervisor knows one command: restart"}
        changes = message.get("options", {})
        if not isinstance(changes, dict) or not set(changes) <= self.changeable:
            refused = sorted(set(changes) - self.changeable) if isinstance(changes, dict) else changes
            return {"error": f"these options cannot change on a restart: {refused}", "refused": True}
        return self._restart(changes)

    def _restart(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Replace the server with one running the code on disk and ``changes`` to its options:
        the new one is made first, then the old one hands the connection over (answering what
        it has read; callers wait in the kernel meanwhile), then the new one takes it. If the new
        one cannot start, the old one was never disturbed; if it fails after taking over, a server
        with the supervisor's own code and the old options takes its place."""
        assert self.child is not None
        old = self.child
        spec = {**self.spec, **changes}
        refused = self.vet(self.spec, spec)
        if refused is not None:
            return {"error": refused, "refused": True}
        try:
            devices = self._devices_for(int(spec["threads"]))
        except OSError as e:
            return {"error": f"cannot make the descriptors for {spec['threads']} threads: {e}"}
        new = self._spawn(spec, devices, execute=True)
        line = new.line(READY_TIMEOUT)
        if line != "prepared":
            return {"error": self._discard(new, line)}
        began = time.monotonic_ns()
        status = _stop(old.pid, HAND_OVER_SIGNAL, HAND_OVER_TIMEOUT)
        old.close()
        handed_over = os.WIFEXITED(status) and os.WEXITSTATUS(status) == successor.EXIT_HANDED_OVER
        cause = "restart requested" + ("" if handed_over else f" (the old server did not hand over: "
                                                               f"{describe_exit(status)})")
        self._count(cause, began)
        self.child = new
        new.send(asdict(self.restarts))
        line = new.line(self._ready_timeout())
        if line.startswith("ready"):
            self.restarts.recovered()
            self.spec, self.exec_successors = spec, True
            self._trim(len(devices))
            if self.deadline is not None:
                mountmod.ensure_fusectl()
            log.warning("the server of %s was restarted on request: pid %d took over from %d",
                        self.mountpoint, new.pid, old.pid)
            return {"pid": new.pid, "previous_pid": old.pid, "handed_over": handed_over,
                    "waited_ms": self.restarts.recoveries_ms[-1]}
        why = self._discard(new, line)
        self._count(f"restart requested; the new server failed ({why})", time.monotonic_ns())
        self.exec_successors = False
        log.error("the new server of %s failed (%s); serving on with the supervisor's code", self.mountpoint, why)
        ready, _ = self._start_now(None, execute=False)
        serving = f"pid {self.child.pid} serves on" if ready else "no server serves yet"
        return {"error": f"the new server failed after taking over ({why}); {serving} with the code the "
                         "supervisor started with and the options it had"}

    def _discard(self, child: _Child, line: str) -> str:
        """Stop a server that never served and reap it; why it failed, in words."""
        child.close()  # it gives up at once if it was waiting for the connection
        status = _stop(child.pid, signal.SIGKILL, 5.0) if line == "timed out" else _stop(child.pid, None, 5.0)
        if line in ("", "prepared", "ready"):
            return f"the new server exited ({describe_exit(status)})"
        return "the new server was not ready in time" if line == "timed out" else line

    def _devices_for(self, threads: int) -> list[Device]:
        """``threads`` descriptors of the connection, cloning more if needed (kept until ``_trim``)."""
        while len(self.devices) < threads:
            self.devices.append(self.devices[0].clone())
        return self.devices[:threads]

    def _trim(self, threads: int) -> None:
        """Close the descriptors beyond ``threads``: the server that took over has had every request
        read from them resent (or answered by its predecessor), so none ends with ECONNABORTED."""
        for device in self.devices[threads:]:
            device.close()
        del self.devices[threads:]

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if self.child is not None:
            try:
                os.kill(self.child.pid, signum)
            except ProcessLookupError:
                pass

    def _give_up(self) -> None:
        if mountmod.mount_entry(self.mountpoint) is not None:
            try:
                mountmod.unmount(self.mountpoint, lazy=True)
            except OSError as e:
                log.warning("unmount of %s: %s", self.mountpoint, e)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _stop(pid: int, sig: signal.Signals | None, timeout: float) -> int:
    """Send ``sig`` (if any) to child ``pid``, wait ``timeout`` seconds for it to end, then kill it;
    reap it and return its wait status."""
    pidfd = os.pidfd_open(pid)
    try:
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not select.select([pidfd], [], [], timeout)[0]:
            _kill(pid)
    finally:
        os.close(pidfd)
    return os.waitpid(pid, 0)[1]


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
