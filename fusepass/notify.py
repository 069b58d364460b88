"""Notifications a server sends the kernel unasked: invalidating its caches, storing and retrieving data.

A filesystem receives its ``Notifier`` as ``conn.notifier`` in ``Operations.init``. The calls
may be made from any thread, but not from a handler of the inode they name while the kernel
waits on it (the kernel may hold that inode's lock): hand them to another thread there.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Protocol

from . import protocol as P


class ReplyBook(Protocol):
    """Where the dispatcher matches NOTIFY_REPLY requests to the RETRIEVE that asked for them."""

    def expect_notify_reply(self, deliver: Callable[[bytes], None]) -> int: ...

    def forget_notify_reply(self, key: int) -> None: ...


class Notifier:
    """Sends notification messages through ``send`` (a write to the connection's device)."""

    def __init__(self, send: Callable[[bytes], object], replies: ReplyBook) -> None:
        self._send = send
        self._replies = replies

    def send(self, message: bytes) -> None:
        try:
            self._send(message)
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.EBADF, errno.ECONNABORTED):
                raise OSError(errno.ENOTCONN, "the connection has ended") from None
            raise

    def invalidate_inode(self, ino: int, offset: int = 0, length: int = 0) -> None:
        """Drop the kernel's cached attributes of ``ino`` and its cached data from ``offset`` for
        ``length`` bytes (0: to the end); ``offset`` < 0 drops the attributes only.
        ENOENT if the kernel does not know ``ino``."""
        self.send(P.notify_inval_inode(ino, offset, length))

    def invalidate_entry(self, parent: int, name: bytes, expire_only: bool = False) -> None:
        """Drop the kernel's cached lookup of ``name`` in directory ``parent`` (``expire_only``:
        mark it stale but keep it for users of it). ENOENT if the kernel does not hold it."""
        self.send(P.notify_inval_entry(parent, name, expire_only))

    def notify_delete(self, parent: int, child: int, name: bytes) -> None:
        """Tell the kernel ``name`` in ``parent`` (node ``child``) is gone: it drops the dentry
        and, unlike ``invalidate_entry``, tells inotify watchers of the mount."""
        self.send(P.notify_delete(parent, child, name))

    def increment_epoch(self) -> None:
        """Make every name the kernel has cached stale at once (protocol 7.44, Linux 6.16+):
        for when the filesystem lost track of what changed. ENOSYS on older kernels."""
        self.send(P.notify_inc_epoch())

    def store(self, ino: int, offset: int, data: bytes) -> None:
        """Put ``data`` into the kernel's page cache of ``ino`` at ``offset`` (not for files open in
        passthrough, whose pages belong to the backing file)."""
        self.send(P.notify_store(ino, offset, data))

    def retrieve(self, ino: int, offset: int, size: int, timeout: float = 5.0) -> bytes:
        """What the kernel's page cache of ``ino`` holds from ``offset`` (at most ``size`` bytes,
        possibly nothing). Blocks until the kernel answers: never call it from a handler."""
        answered = threading.Event()
        box: list[bytes] = []

        def deliver(data: bytes) -> None:
            box.append(data)
            answered.set()

        key = self._replies.expect_notify_reply(deliver)
        try:
            self.send(P.notify_retrieve(key, ino, offset, size))
            if not answered.wait(timeout):
                raise TimeoutError(f"no NOTIFY_REPLY for inode {ino} within {timeout}s")
            return box[0]
        finally:
            self._replies.forget_notify_reply(key)
