"""An audit log of what callers did through a mount, as JSON lines, written off the request path.

A worker thread only appends a tuple to a bounded queue (``record``); a writer thread formats
the lines and writes them. When the queue is full the record is dropped and counted, so a slow
disk never slows the mount. ``reopen`` (on SIGHUP) makes the
writer open the file again by name, which is how log rotation works.

Each line has: ``time`` (ISO 8601, UTC), ``uid``, ``gid``, ``pid``, ``exe`` (the caller's
executable, or null if it cannot be read), ``op``, ``path`` (relative to the source root, "" for the
root, null if it cannot be told), ``flags`` (open or rename flags by name), ``result`` ("ok" or
the errno name), and ``to`` (the new path of a rename or link) and ``rule`` (the rule that
refused the operation) where they apply.

The executable is read from /proc/PID/exe in the request path, because short-lived callers
(``mv``, ``rm``) have often exited by the time a writer thread could look; that readlink costs
about 6 us here, so it is cached per pid for a quarter of a second: the first audited request of
a process pays it, and a process that calls exec() right after a request of its own (a shell
opening a redirection, then running the command) may be named by its former executable for that
long.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import queue
import threading
import time
from typing import Any

log = logging.getLogger("fusepass.audit")

CAPACITY = 65536
_EXE_TTL = 0.25
_REOPEN, _STOP = object(), object()

_ACCMODE = {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}
# Flags of several bits (O_TMPFILE includes O_DIRECTORY, O_SYNC includes O_DSYNC) come before their parts.
_OPEN_FLAGS = [(getattr(os, n), n) for n in (
    "O_TMPFILE", "O_SYNC", "O_CREAT", "O_EXCL", "O_NOCTTY", "O_TRUNC", "O_APPEND", "O_NONBLOCK", "O_DSYNC",
    "O_DIRECT", "O_DIRECTORY", "O_NOFOLLOW", "O_NOATIME", "O_CLOEXEC", "O_PATH")
    if getattr(os, n, 0)]
# The kernel adds O_LARGEFILE to every open on 64-bit machines (Python's os.O_LARGEFILE is 0 there):
# not something the caller asked for, so left out. Its value is the architecture's.
_FORCED_LARGEFILE = {"aarch64": 0o400000, "ppc64le": 0o200000, "ppc64": 0o200000}.get(os.uname().machine, 0o100000)
_RENAME_FLAGS = [(1, "RENAME_NOREPLACE"), (2, "RENAME_EXCHANGE"), (4, "RENAME_WHITEOUT")]
#: Operations whose flags are open(2) flags; rename's are renameat2(2)'s; the rest have none.
OPEN_OPS = ("open", "create", "tmpfile", "opendir")


class AuditLog:
    """Append audit records to ``path`` (created 0600 if missing). ``start`` the writer in the
    process that serves (threads do not survive the fork into the background)."""

    def __init__(self, path: str, capacity: int = CAPACITY) -> None:
        self.path = os.path.abspath(path)
        self.capacity = capacity
        self.written = 0
        self.dropped = 0
        self._fd = self._open()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._exe: dict[int, tuple[str | None, float]] = {}
        self._thread: threading.Thread | None = None

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fusepass-audit", daemon=True)
            self._thread.start()

    def record(self, uid: int, gid: int, pid: int, op: str, path: str | None, flags: int, result: str,
               to: str | None = None, rule: str | None = None) -> None:
        """Queue one record. Called in the request path: no file I/O, no formatting."""
        if self._queue.qsize() >= self.capacity:
            with self._lock:
                self.dropped += 1
            return
        now = time.time()
        self._queue.put((now, uid, gid, pid, self._executable(pid, now), op, path, flags, result, to, rule))

    def _executable(self, pid: int, now: float) -> str | None:
        """The caller's executable, cached per pid for _EXE_TTL (threads race only to read it twice)."""
        cached = self._exe.get(pid)
        if cached is not None and now - cached[1] < _EXE_TTL:
            return cached[0]
        try:
            exe: str | None = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = None
        if len(self._exe) > 4096:
            self._exe.clear()
        self._exe[pid] = (exe, now)
        return exe

    def reopen(self) -> None:
        """Open the file again by name before the next write (safe in a signal handler)."""
        self._queue.put(_REOPEN)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then close the file."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        else:
            while self._drain():
                pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def status(self) -> dict[str, object]:
        return {"log": self.path, "written": self.written, "dropped": self.dropped, "queued": self._queue.qsize()}

    # --- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        while self._drain(block=True):
            pass

    def _drain(self, block: bool = False) -> bool:
        """Write one batch of queued records; False once told to stop (or, unblocked, when empty)."""
        lines: list[str] = []
        going = True
        try:
            item = self._queue.get(block)
            while True:
                if item is _STOP:
                    going = False
                    break
                if item is _REOPEN:
                    self._write(lines)
                    lines = []
                    self._reopen()
                else:
                    lines.append(self._format(item))
                if len(lines) >= 256:
                    break
                item = self._queue.get_nowait()
        except queue.Empty:
            going = block
        self._write(lines)
        return going

    def _reopen(self) -> None:
        try:
            fd = self._open()
        except OSError as e:
            log.error("cannot reopen the audit log %s: %s (still writing to the old file)", self.path, e.strerror)
            return
        os.close(self._fd)
        self._fd = fd

    def _write(self, lines: list[str]) -> None:
        if not lines:
            return
        data = "".join(lines).encode("utf-8", "surrogateescape")
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as e:
            log.error("audit log %s: %s: %d records lost", self.path, e.strerror, len(lines))
            with self._lock:
                self.dropped += len(lines)
            return
        self.written += len(lines)

    def _format(self, item: tuple[Any, ...]) -> str:
        t, uid, gid, pid, exe, op, path, flags, result, to, rule = item
        rec: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="microseconds"),
            "uid": uid, "gid": gid, "pid": pid, "exe": exe, "op": op, "path": path,
            "flags": open_flag_names(flags) if op in OPEN_OPS else rename_flag_names(flags) if op == "rename" else [],
            "result": result,
        }
        if to is not None:
            rec["to"] = to
        if rule is not None:
            rec["rule"] = rule
        return json.dumps(rec) + "\n"


def open_flag_names(flags: int) -> list[str]:
    names = [_ACCMODE.get(flags & os.O_ACCMODE, "O_ACCMODE")]
    rest = flags & ~os.O_ACCMODE & ~_FORCED_LARGEFILE
    for bit, name in _OPEN_FLAGS:
        if rest & bit == bit:
            names.append(name)
            rest &= ~bit
    if rest:
        names.append(hex(rest))
    return names


def rename_flag_names(flags: int) -> list[str]:
    names = [name for bit, name in _RENAME_FLAGS if flags & bit]
    rest = flags & ~0b111
    return names + ([hex(rest)] if rest else [])


def errno_name(number: int) -> str:
    return errno.errorcode.get(number, str(number))
