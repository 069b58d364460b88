"""``fusepass`` (the command line) run without CAP_SYS_ADMIN, still as uid 0.

Removes CAP_SYS_ADMIN from this process's effective, permitted and inheritable sets with
capset(2), then runs ``fusepass.cli.main`` on the remaining arguments. mount(2) is then
refused, so the library mounts through fusermount3 (which regains the capability by
exec as uid 0); the backing ioctls are refused too, so passthrough must be off and say why.
"""

from __future__ import annotations

import ctypes
import sys

from fusepass import cli

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_SYS_ADMIN = 21
_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capability(cap: int) -> None:
    """Remove ``cap`` from the effective, permitted and inheritable sets of this process.
    Only ctypes calls on an already loaded libc: safe in a child forked from a threaded process."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # version 3: two 32-bit words per set
    if _libc.capget(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "capget failed")
    word, bit = divmod(cap, 32)
    mask = ~(1 << bit) & 0xFFFFFFFF
    data[word].effective &= mask
    data[word].permitted &= mask
    data[word].inheritable &= mask
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "capset failed")


def main() -> int:
    drop_capability(CAP_SYS_ADMIN)
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
