"""A Unix socket per mount through which ``fusepass status`` asks a running server for its state,
and the status document it answers with; and the socket of a supervised mount's supervisor,
through which ``fusepass restart`` asks for a new server.

The exchange is one line each way: the client sends a JSON object naming a command
(``{"command": "status"}``; the supervisor's ``{"command": "restart", "options": {...}}``), the
server answers with one JSON object (the command's document, or ``{"error": "..."}``) and
closes the connection.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from . import __version__
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
        "version": __version__,  # of the code this server runs (``fusepass restart`` installs new code)
        "uptime_s": round(time.time() - session.started, 3),
        "options": {
            "fsname": o.fsname, "subtype": o.subtype, "allow_other": o.allow_other,
            "default_permissions": o.default_permissions, "ro": o.ro, "max_read": o.max_read,
        },
        "threads": session.worker_count,
        "transport": session.transport_status(),
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
        "restarts": None if session.restarts is None else {
            **session.restarts.status(), "resent_requests": session.dispatcher.resent,
            "resent_changes_made_already": session.dispatcher.made_already,
            "journal_bytes": session.journal.size if session.journal is not None else 0,
        },
    }


def runtime_dir() -> str:
    """Where the sockets live: /run/fusepass for root, else $XDG_RUNTIME_DIR/fusepass or /tmp/fusepass-UID."""
    if os.geteuid() == 0:
        return "/run/fusepass"
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "fusepass") if base else f"/tmp/fusepass-{os.geteuid()}"


def socket_path(connection: int) -> str:
    return os.path.join(runtime_dir(), f"{connection}.sock")


def supervisor_socket_path(connection: int) -> str:
    return os.path.join(runtime_dir(), f"{connection}.supervisor.sock")


def listen(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` (in a directory only its owner may enter), replacing
    one left by a process that was killed."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    return sock


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return int(uid)


MAX_REQUEST = 4096
_CLIENT_TIMEOUT = 2.0

Commands = dict[str, Callable[[], dict[str, Any]]]


def answer(request: bytes, commands: Commands) -> dict[str, Any]:
    """The answer to one request line: never raises, whatever the bytes."""
    try:
        message = json.loads(request)
    except (ValueError, UnicodeDecodeError):
        return {"error": "the request is not a JSON object"}
    if not isinstance(message, dict):
        return {"error": "the request is not a JSON object"}
    name = message.get("command")
    command = commands.get(name) if isinstance(name, str) else None
    if command is None:
        return {"error": f"unknown command {name!r}; known: {', '.join(sorted(commands))}"}
    try:
        return command()
    except Exception as e:
        log.exception("control command %s failed", name)
        return {"error": f"{name} failed: {e}"}


class ControlServer:
    """Answers each connection's one request from ``commands`` (name -> JSON document), then closes it."""

    def __init__(self, commands: Commands, connection: int) -> None:
        self.commands = commands
        self.path = socket_path(connection)
        self._sock = listen(self.path)
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
                    conn.settimeout(_CLIENT_TIMEOUT)
                    reply = answer(read_line(conn), self.commands)
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError as e:
                    log.warning("control connection: %s", e)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def read_line(conn: socket.socket) -> bytes:
    """One request line, at most MAX_REQUEST bytes (a longer one is cut there and fails to parse)."""
    data = b""
    while b"\n" not in data and len(data) < MAX_REQUEST:
        chunk = conn.recv(MAX_REQUEST - len(data))
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def query(mountpoint: str, timeout: float = 5.0, command: str = "status") -> dict[str, Any]:
    """Ask the server of the fusepass mount at ``mountpoint`` for ``command``'s document."""
    mnt = os.path.abspath(mountpoint)
    connection = mountmod.connection_id(mnt)
    if connection is None:
        raise OSError(errno.ENOENT, f"{mnt} is not a FUSE mount")
    reply = ask(socket_path(connection), {"command": command}, timeout, f"the server of {mnt}")
    if "error" in reply and len(reply) == 1:
        raise OSError(errno.EPROTO, f"the server of {mnt}: {reply['error']}")
    return reply


def ask(path: str, message: dict[str, Any], timeout: float, who: str) -> dict[str, Any]:
    """Send ``message`` to the socket at ``path`` and return the JSON object answered (``who``
    names the other end in errors)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise OSError(errno.ECONNREFUSED, f"{who} is not answering (no control socket {path})") from None
        s.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while b"\n" not in data and (chunk := s.recv(65536)):
            data += chunk
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise OSError(errno.EPROTO, f"{who} answered with something other than a JSON object")
    return reply
