"""A Unix socket per mount through which ``fusepass status`` asks a running server for its state,
and the status document it answers with."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from . import mount as mountmod
from .session import Session

log = logging.getLogger("fusepass")


def status_document(session: Session) -> dict[str, Any]:
    """A JSON-ready snapshot of a session: the schema ``fusepass status --json`` documents."""
    reg = session.registry
    try:
        open_fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_fds = -1
    o = session.options
    return {
        "mountpoint": session.mountpoint,
        "fsname": o.fsname,
        "pid": os.getpid(),
        "uptime_s": round(time.time() - session.started, 3),
        "options": {
            "fsname": o.fsname, "subtype": o.subtype, "allow_other": o.allow_other,
            "default_permissions": o.default_permissions, "ro": o.ro, "max_read": o.max_read,
        },
        "threads": session.worker_count,
        "passthrough": {
            "mode": session.passthrough_mode,
            "negotiated": reg.available,
            "why_not": reg.why_not,
            "max_stack_depth": session.max_stack_depth,
            "opens": reg.passthrough_opens,
            "served_opens": sum(reg.served_opens.values()),
            "served_reasons": dict(reg.served_opens),
            "backing_ids": reg.registered,
        },
        "requests": {
            name: {"count": r.requests, "errors": r.errors, "expected_errors": r.expected,
                   "total_ms": round(r.total_ns / 1e6, 3), "p50_us": r.p50_ns / 1000, "p99_us": r.p99_ns / 1000}
            for name, r in session.op_stats().items()
        },
        "malformed_requests": session.malformed_requests,
        "open_fds": open_fds,
        "filesystem": session.fs.status(),
    }


def runtime_dir() -> str:
    """Where the sockets live: /run/fusepass for root, else $XDG_RUNTIME_DIR/fusepass or /tmp/fusepass-UID."""
    if os.geteuid() == 0:
        return "/run/fusepass"
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "fusepass") if base else f"/tmp/fusepass-{os.geteuid()}"


def socket_path(connection: int) -> str:
    return os.path.join(runtime_dir(), f"{connection}.sock")


class ControlServer:
    """Answers every connection with one JSON document, ``document()``, then closes it."""

    def __init__(self, document: Callable[[], dict[str, Any]], connection: int) -> None:
        self.document = document
        self.path = socket_path(connection)
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by a server that was killed
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(8)
        self._thread = threading.Thread(target=self._serve, name="fusepass-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.sendall(json.dumps(self.document()).encode())
                except Exception:
                    log.exception("status query failed")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def query(mountpoint: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the server of the fusepass mount at ``mountpoint`` for its status."""
    mnt = os.path.abspath(mountpoint)
    connection = mountmod.connection_id(mnt)
    if connection is None:
        raise OSError(errno.ENOENT, f"{mnt} is not a FUSE mount")
    path = socket_path(connection)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise OSError(errno.ECONNREFUSED,
                          f"the server of {mnt} is not answering (no control socket {path})") from None
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))
