"""Kernel passthrough: the two backing ioctls, and the per-inode registry that keeps their rules.

The kernel's rules (KERNEL.md section 9): an inode open in passthrough has exactly one
backing object, so every concurrent open of it must name the same backing id; an id
closed while its file is open locks the inode until every fd is closed; closing right
after the OPEN reply races the opener. ``BackingRegistry`` therefore keeps one id per
inode, counts the opens using it, and closes it at the last RELEASE. An inode that cannot
be passed through is served for all its opens, with the reason recorded.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections import Counter
from dataclasses import dataclass

from . import abi

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class BackingError(OSError):
    """A backing ioctl failed; ``errno`` is the kernel's, the message explains it."""


_OPEN_REASONS = {
    errno.EPERM: "passthrough is not available on this /dev/fuse descriptor: it is not mounted, "
    "passthrough was not negotiated at INIT, or the caller lacks CAP_SYS_ADMIN",
    errno.EINVAL: "the file is not a regular file (or the map's flags/padding are not zero)",
    errno.EBADF: "the descriptor is not open",
    errno.EISDIR: "the file is a directory; only regular files can back a passthrough open",
    errno.ELOOP: "the backing file's filesystem is stacked as deep as max_stack_depth allows "
    "(a file on overlayfs or another FUSE mount needs max_stack_depth=2; "
    "a file on this same mount can never back it)",
    errno.ENOMEM: "the kernel is out of memory",
}
_CLOSE_REASONS = {
    errno.EPERM: _OPEN_REASONS[errno.EPERM],
    errno.EINVAL: "backing ids are positive",
    errno.ENOENT: "no such backing id: never registered, or already closed",
}


def backing_open(devfd: int, fd: int, flags: int = 0, padding: int = 0) -> int:
    """Register ``fd`` (a regular file; O_PATH is fine) with the connection of ``devfd``
    and return its backing id. ``flags`` and ``padding`` exist only to test the kernel's checks."""
    arg = ctypes.create_string_buffer(abi.BACKING_MAP.pack(fd, flags, padding), abi.BACKING_MAP.size)
    ret = _libc.ioctl(devfd, abi.DEV_IOC_BACKING_OPEN, ctypes.addressof(arg))
    if ret < 0:
        err = ctypes.get_errno()
        reason = _OPEN_REASONS.get(err, os.strerror(err))
        raise BackingError(err, f"FUSE_DEV_IOC_BACKING_OPEN of fd {fd} failed: {reason}")
    return ret


def backing_close(devfd: int, backing_id: int) -> None:
    """Release a backing id. The kernel keeps the backing file for opens still using it."""
    arg = ctypes.c_int32(backing_id)
    if _libc.ioctl(devfd, abi.DEV_IOC_BACKING_CLOSE, ctypes.addressof(arg)) < 0:
        err = ctypes.get_errno()
        reason = _CLOSE_REASONS.get(err, os.strerror(err))
        raise BackingError(err, f"FUSE_DEV_IOC_BACKING_CLOSE of id {backing_id} failed: {reason}")


@dataclass(slots=True)
class _InodeState:
    opens: int = 0
    backing_id: int = 0  # 0 while the inode is served
    served_because: str | None = None  # sticky: this inode is never passed through


class BackingRegistry:
    """One backing id per inode, shared by its concurrent opens and closed at the last release.

    ``acquire`` is called for every open of a file and returns the id to put in the reply,
    or None (serve it) and why; ``release`` is called for every RELEASE. Thread-safe.
    """

    def __init__(self, devfd: int, available: bool, why_not: str | None = None) -> None:
        self.devfd = devfd
        self.available = available
        self.why_not = why_not if not available else None
        self._lock = threading.Lock()
        self._inodes: dict[int, _InodeState] = {}
        self.passthrough_opens = 0
        self.served_opens: Counter[str] = Counter()

    def acquire(self, ino: int, fd: int | None) -> tuple[int, str | None]:
        """Account one open of ``ino``; return (backing id or 0, reason it is served)."""
        with self._lock:
            st = self._inodes.get(ino)
            if st is None:
                st = self._inodes[ino] = _InodeState()
            if st.opens and st.backing_id:
                reason = None  # join the inode's passthrough mode, whatever the filesystem offered
            elif not self.available:
                reason = self.why_not or "passthrough unavailable"
            elif st.opens:
                reason = st.served_because or "inode already open in served mode"
            elif st.served_because:
                reason = st.served_because
            elif fd is None:
                reason = "the filesystem gave no backing file"
            else:
                try:
                    st.backing_id = backing_open(self.devfd, fd)
                    reason = None
                except BackingError as e:
                    reason = st.served_because = f"{errno.errorcode.get(e.errno or 0, e.errno)}: {e.strerror}"
            st.opens += 1
            if reason is None:
                self.passthrough_opens += 1
            else:
                self.served_opens[reason] += 1
            return st.backing_id, reason

    def release(self, ino: int) -> None:
        """Account the end of one open of ``ino``; close its id at the last one."""
        with self._lock:
            st = self._inodes.get(ino)
            if st is None or st.opens == 0:
                return
            st.opens -= 1
            if st.opens:
                return
            backing_id, st.backing_id = st.backing_id, 0
            if not st.served_because:
                del self._inodes[ino]
            if backing_id:
                try:
                    backing_close(self.devfd, backing_id)
                except BackingError:
                    pass  # the connection is gone; its ids went with it

    def forget(self, ino: int) -> None:
        """Drop what is remembered about ``ino`` (a sticky served reason) once nothing has it open."""
        with self._lock:
            st = self._inodes.get(ino)
            if st is not None and st.opens == 0:
                del self._inodes[ino]

    def served_reason(self, ino: int) -> str | None:
        with self._lock:
            st = self._inodes.get(ino)
            return st.served_because if st else None

    @property
    def registered(self) -> int:
        """Backing ids registered now."""
        with self._lock:
            return sum(1 for st in self._inodes.values() if st.backing_id)

    def close_all(self) -> None:
        """Release every id (at session end)."""
        with self._lock:
            for st in self._inodes.values():
                if st.backing_id:
                    try:
                        backing_close(self.devfd, st.backing_id)
                    except BackingError:
                        pass
                st.backing_id = 0
                st.opens = 0
            self._inodes.clear()
