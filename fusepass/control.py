"""A Unix socket per mount through which ``fusepass status`` asks a running server for its state."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from typing import Any, Protocol

from . import mount as mountmod

log = logging.getLogger("fusepass")


class _HasStatus(Protocol):
    def status(self) -> dict[str, Any]: ...


def runtime_dir() -> str:
    """Where the sockets live: /run/fusepass for root, else $XDG_RUNTIME_DIR/fusepass or /tmp/fusepass-UID."""
    if os.geteuid() == 0:
        return "/run/fusepass"
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "fusepass") if base else f"/tmp/fusepass-{os.geteuid()}"


def socket_path(connection: int) -> str:
    return os.path.join(runtime_dir(), f"{connection}.sock")


class ControlServer:
    """Answers every connection with one JSON document, ``source.status()``, then closes it."""

    def __init__(self, source: _HasStatus, connection: int) -> None:
        self.source = source
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
                    conn.sendall(json.dumps(self.source.status()).encode())
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
        raise OSError(2, f"{mnt} is not a FUSE mount")
    path = socket_path(connection)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise OSError(111, f"the server of {mnt} is not answering (no control socket {path})") from None
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))
