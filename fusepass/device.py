"""A /dev/fuse descriptor as an object: cloning it, and registering backing files on its connection.

The backing registry and the session are given a ``Device`` rather than a bare descriptor, so
that tests can hand them a fake one, and so that a backing id is an object that releases
itself (``with device.backing_open(fd) as backing: ...``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Protocol

from . import abi, syscalls

DEVICE = "/dev/fuse"


class DeviceError(OSError):
    """/dev/fuse cannot be opened; the message says why in words."""


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


class BackingDevice(Protocol):
    """What the backing registry needs of a device (a fake in tests)."""

    def backing_open(self, fd: int) -> BackingId: ...

    def backing_close(self, backing_id: int) -> None: ...


class BackingId:
    """A backing file registered on a connection. ``close`` (or leaving a ``with`` block) releases
    it once; the kernel keeps the backing file for opens still using it."""

    __slots__ = ("device", "id", "closed")

    def __init__(self, device: BackingDevice, backing_id: int) -> None:
        self.device = device
        self.id = backing_id
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.device.backing_close(self.id)

    def __enter__(self) -> BackingId:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BackingId({self.id}{', closed' if self.closed else ''})"


class Device:
    """One descriptor of a FUSE connection (the one mount(2) used, a clone, or one inherited)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls) -> Device:
        """A fresh, unconnected /dev/fuse descriptor."""
        try:
            return cls(os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC))
        except FileNotFoundError:
            raise DeviceError(errno.ENODEV, f"{DEVICE} does not exist: load the fuse module (modprobe fuse)") from None
        except PermissionError:
            raise DeviceError(errno.EACCES, f"no permission to open {DEVICE}") from None

    def clone(self) -> Device:
        """Another descriptor on the same connection, with its own queue of requests being processed
        (a reply must go to the descriptor its request was read from)."""
        new = Device.open()
        try:
            fcntl.ioctl(new.fd, abi.DEV_IOC_CLONE, struct.pack("I", self.fd))
        except OSError:
            new.close()
            raise
        return new

    def backing_open(self, fd: int, flags: int = 0, padding: int = 0) -> BackingId:
        """Register ``fd`` (a regular file; O_PATH is fine) as a backing file. ``flags`` and
        ``padding`` exist only to test the kernel's checks."""
        ret = syscalls.ioctl_value(self.fd, abi.DEV_IOC_BACKING_OPEN, abi.BACKING_MAP.pack(fd, flags, padding))
        if ret < 0:
            reason = _OPEN_REASONS.get(-ret, os.strerror(-ret))
            raise BackingError(-ret, f"FUSE_DEV_IOC_BACKING_OPEN of fd {fd} failed: {reason}")
        return BackingId(self, ret)

    def backing_close(self, backing_id: int) -> None:
        """Release a backing id by number (``BackingId.close`` is the usual way)."""
        ret = syscalls.ioctl_value(self.fd, abi.DEV_IOC_BACKING_CLOSE, struct.pack("i", backing_id))
        if ret < 0:
            reason = _CLOSE_REASONS.get(-ret, os.strerror(-ret))
            raise BackingError(-ret, f"FUSE_DEV_IOC_BACKING_CLOSE of id {backing_id} failed: {reason}")

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __repr__(self) -> str:
        return f"Device(fd={self.fd})"
