"""INIT policy: from what the kernel offers and what the filesystem wants, the connection's parameters.

A pure function of its inputs (the INIT request, the filesystem, the passthrough mode and
whether this process may register backing files), so that every rule can be tested with
values alone.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Literal

from . import abi
from . import protocol as P
from .notify import Notifier
from .ops import ConnectionInfo, Operations, implemented

PassthroughMode = Literal["auto", "on", "off"]
#: "auto": pass through where the kernel and privileges allow, serve otherwise; "on": fail at
#: INIT if it cannot be had; "off": always serve.
PASSTHROUGH_MODES: tuple[PassthroughMode, ...] = ("auto", "on", "off")

_DEFAULT_WANT = (
    abi.InitFlag.ASYNC_READ | abi.InitFlag.ATOMIC_O_TRUNC | abi.InitFlag.BIG_WRITES | abi.InitFlag.MAX_PAGES
    | abi.InitFlag.PARALLEL_DIROPS | abi.InitFlag.AUTO_INVAL_DATA | abi.InitFlag.INIT_EXT
)


class NegotiationError(OSError):
    """INIT cannot be answered with a connection fusepass can serve; the message says why."""


@dataclass(slots=True, frozen=True)
class Negotiated:
    conn: ConnectionInfo
    #: Why passthrough is off, in words (None: it is on).
    passthrough_why_not: str | None
    reply: bytes
    #: Whether requests will come through io_uring (FUSE_OVER_IO_URING asked for and granted).
    io_uring: bool = False


def check_passthrough_mode(mode: str) -> PassthroughMode:
    for known in PASSTHROUGH_MODES:
        if mode == known:
            return known
    raise ValueError(f"passthrough must be auto, on or off, not {mode!r}")


def negotiate(
    req: P.Init, fs: Operations, *, passthrough: PassthroughMode, may_pass_through: bool, max_stack_depth: int,
    notifier: Notifier | None = None, io_uring: bool = False, request_timeout: int = 0,
) -> Negotiated:
    """Answer INIT. ``may_pass_through``: whether this process holds CAP_SYS_ADMIN, which the
    backing ioctls require. ``io_uring``: ask for FUSE_OVER_IO_URING (the transport is ready for
    it). Calls ``fs.init(conn)``, which may change ``conn.want``.
    Raises NegotiationError for a kernel too old, or passthrough "on" that cannot be had."""
    if req.major != abi.KERNEL_VERSION or req.minor < abi.MIN_KERNEL_MINOR_VERSION:
        raise NegotiationError(
            errno.EPROTO,
            f"kernel FUSE protocol {req.major}.{req.minor} is too old: fusepass needs "
            f"{abi.KERNEL_VERSION}.{abi.MIN_KERNEL_MINOR_VERSION} or newer",
        )
    minor = min(req.minor, abi.KERNEL_MINOR_VERSION)
    # Plain ints throughout: every new combination of an IntFlag is a cached pseudo-member.
    offered = req.flags
    want = int(_DEFAULT_WANT)
    if fs.readdirplus:
        want |= abi.InitFlag.DO_READDIRPLUS | abi.InitFlag.READDIRPLUS_AUTO
    if implemented(fs, "getlk") and implemented(fs, "setlk"):
        want |= abi.InitFlag.POSIX_LOCKS
    if implemented(fs, "flock"):
        want |= abi.InitFlag.FLOCK_LOCKS
    if passthrough != "off":
        want |= abi.InitFlag.PASSTHROUGH
    if io_uring:
        want |= abi.InitFlag.OVER_IO_URING
    conn = ConnectionInfo(
        proto_minor=minor, kernel_flags=offered, want=want, max_write=abi.MAX_WRITE,
        max_readahead=req.max_readahead, max_pages=abi.MAX_PAGES, max_stack_depth=max_stack_depth,
        notifier=notifier, request_timeout=request_timeout,
    )
    fs.init(conn)
    want = int(conn.want)
    timeout = max(0, min(int(conn.request_timeout), 0xFFFF))
    if timeout:
        want |= abi.InitFlag.REQUEST_TIMEOUT
    for flag, since in abi.INIT_FLAG_MINOR.items():
        if minor < since:
            want &= ~int(flag)
    granted = want & offered
    why_not = _passthrough_refusal(passthrough, may_pass_through, want, granted)
    if why_not:
        granted &= ~int(abi.InitFlag.PASSTHROUGH)
        if passthrough == "on":
            raise NegotiationError(errno.EPROTO, f"passthrough was required but cannot be had: {why_not}")
    conn.want = granted
    # The session's buffers hold no more; the kernel takes no less than a page.
    conn.max_write = max(abi.PAGE_SIZE, min(conn.max_write, abi.MAX_WRITE))
    conn.max_pages = max(1, min(conn.max_pages, abi.MAX_PAGES))
    reply = P.init_body(
        minor, min(conn.max_readahead, req.max_readahead), int(granted), conn.max_background,
        conn.congestion_threshold, conn.max_write, conn.time_gran, conn.max_pages,
        conn.max_stack_depth if why_not is None else 0,
        timeout if granted & abi.InitFlag.REQUEST_TIMEOUT else 0,
    )
    return Negotiated(conn, why_not, reply, bool(granted & abi.InitFlag.OVER_IO_URING))


def _passthrough_refusal(
    mode: PassthroughMode, may_pass_through: bool, want: int, granted: int
) -> str | None:
    F = abi.InitFlag
    if mode == "off":
        return "switched off (passthrough=off)"
    if not want & F.PASSTHROUGH:
        return "the filesystem turned it off in init()"
    if not granted & F.PASSTHROUGH:
        return "the kernel does not offer FUSE_PASSTHROUGH (needs Linux 6.9+ built with CONFIG_FUSE_PASSTHROUGH)"
    if want & F.WRITEBACK_CACHE:
        return "the filesystem asked for writeback cache, which excludes passthrough"
    if not may_pass_through:
        return "the server lacks CAP_SYS_ADMIN, which the backing ioctls require"
    return None
