"""Noticing a server that stopped answering: requests wait on its connection and it makes no progress.

The kernel counts the requests of a connection not yet answered (fusectl's ``waiting``); a
server that serves them uses CPU time. One whose connection has had requests waiting for a whole
deadline while its CPU time stood still is stopped (SIGSTOP), deadlocked or stuck in a system call,
and its supervisor replaces it. Nothing is added to the request path: the supervisor samples both.
"""

from __future__ import annotations

import os
import time

from . import mount as mountmod


def cpu_ticks(pid: int) -> int | None:
    """User and system time of every thread of ``pid``, in clock ticks; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def waiting(connection: int) -> int:
    """Requests of the connection not answered yet (queued or being served); 0 if it is gone."""
    try:
        with open(os.path.join(mountmod.FUSECTL, str(connection), "waiting")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


class Stall:
    """Watches server ``pid`` on ``connection``: ``check`` (called at least every deadline/4)
    returns why it is hung once requests have waited ``deadline`` seconds with no progress."""

    def __init__(self, pid: int, connection: int, deadline: float) -> None:
        self.pid = pid
        self.connection = connection
        self.deadline = deadline
        self._since: float | None = None  # when requests were first seen waiting at this CPU time
        self._ticks: int | None = None

    def check(self) -> str | None:
        now = time.monotonic()
        ticks = cpu_ticks(self.pid)
        queued = waiting(self.connection)
        if ticks is None or not queued or ticks != self._ticks:
            self._ticks, self._since = ticks, (now if queued else None)
            return None
        if self._since is None:
            self._since = now
        if now - self._since < self.deadline:
            return None
        return f"no progress for {now - self._since:.1f} s with {queued} request(s) waiting"
