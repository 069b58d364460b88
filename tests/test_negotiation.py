"""INIT negotiation, tested on the session's handler directly: no mount, no kernel."""

from __future__ import annotations

import errno
import struct

import pytest

from fusepass import abi, protocol
from fusepass.ops import ConnectionInfo, Context, Operations
from fusepass.session import Session

F = abi.InitFlag
ALL_6_18 = 0x5FD73FFFFFB  # what Linux 6.18.44 offered (KERNEL.md section 3)


class Plain(Operations):
    pass


def init_request(minor: int, flags: int, readahead: int = 131072) -> protocol.Init:
    header = protocol.InHeader(104, abi.Opcode.INIT, 2, 0, 0, 0, 0, 0)
    return protocol.Init(header, 7, minor, readahead, flags)


def negotiate(session: Session, req: protocol.Init) -> dict[str, int]:
    body = session._op_init(req, Context(0, 0, 0, 2, memoryview(bytearray(0))), bytearray())
    fields = struct.unpack("<IIIIHHIIHHIIH22x", body)
    names = ("major minor max_readahead flags max_background congestion_threshold max_write time_gran "
             "max_pages map_alignment flags2 max_stack_depth request_timeout").split()
    out = dict(zip(names, fields, strict=True))
    out["want"] = out["flags"] | out["flags2"] << 32
    return out


def test_kernel_older_than_7_31_is_refused_with_a_clear_error() -> None:
    s = Session(Plain(), "/nonexistent")
    with pytest.raises(OSError) as e:
        negotiate(s, init_request(30, ALL_6_18 & 0xFFFFFFFF))
    assert e.value.errno == errno.EPROTO
    assert s.failure is not None and "7.30" in s.failure and "7.31" in s.failure


def test_reply_minor_is_capped_at_ours_and_flags_stay_within_what_was_offered() -> None:
    s = Session(Plain(), "/nonexistent", passthrough="off")
    out = negotiate(s, init_request(99, ALL_6_18))
    assert out["major"] == 7 and out["minor"] == abi.KERNEL_MINOR_VERSION
    assert out["want"] & ~ALL_6_18 == 0
    assert out["want"] & F.INIT_EXT and out["want"] & F.MAX_PAGES and out["want"] & F.BIG_WRITES
    assert out["max_write"] == abi.MAX_WRITE and out["max_pages"] == abi.MAX_PAGES


def test_flags_the_kernel_did_not_offer_are_not_requested() -> None:
    s = Session(Plain(), "/nonexistent", passthrough="off")
    offered = int(F.INIT_EXT | F.BIG_WRITES)
    out = negotiate(s, init_request(45, offered))
    assert out["want"] & ~offered == 0
    assert not out["want"] & F.ASYNC_READ


def test_flags_newer_than_the_kernels_minor_are_dropped() -> None:
    s = Session(Plain(), "/nonexistent")
    out = negotiate(s, init_request(35, ALL_6_18))  # INIT_EXT and PASSTHROUGH came later
    assert out["minor"] == 35
    assert not out["want"] & F.INIT_EXT and out["flags2"] == 0
    assert not s.passthrough and s.passthrough_why_not is not None


def test_passthrough_is_asked_with_depth_and_without_writeback_cache() -> None:
    s = Session(Plain(), "/nonexistent", max_stack_depth=2)
    out = negotiate(s, init_request(45, ALL_6_18))
    assert out["want"] & F.PASSTHROUGH, s.passthrough_why_not
    assert not out["want"] & F.WRITEBACK_CACHE
    assert out["max_stack_depth"] == 2
    assert s.passthrough and s.passthrough_why_not is None


def test_passthrough_not_offered_by_the_kernel_is_reported() -> None:
    s = Session(Plain(), "/nonexistent")
    out = negotiate(s, init_request(45, ALL_6_18 & ~F.PASSTHROUGH))
    assert not out["want"] & F.PASSTHROUGH and out["max_stack_depth"] == 0
    assert s.passthrough_why_not is not None and "FUSE_PASSTHROUGH" in s.passthrough_why_not


def test_writeback_cache_wanted_by_the_filesystem_switches_passthrough_off() -> None:
    class Writeback(Operations):
        def init(self, conn: ConnectionInfo) -> None:
            conn.want |= F.WRITEBACK_CACHE

    s = Session(Writeback(), "/nonexistent")
    out = negotiate(s, init_request(45, ALL_6_18))
    assert out["want"] & F.WRITEBACK_CACHE and not out["want"] & F.PASSTHROUGH
    assert s.passthrough_why_not is not None and "writeback" in s.passthrough_why_not


def test_passthrough_on_fails_init_when_it_cannot_be_had() -> None:
    s = Session(Plain(), "/nonexistent", passthrough="on")
    with pytest.raises(OSError):
        negotiate(s, init_request(45, ALL_6_18 & ~F.PASSTHROUGH))
    assert s.failure is not None and "passthrough" in s.failure


def test_passthrough_off_is_reported_as_switched_off() -> None:
    s = Session(Plain(), "/nonexistent", passthrough="off")
    out = negotiate(s, init_request(45, ALL_6_18))
    assert not out["want"] & F.PASSTHROUGH
    assert s.passthrough_why_not is not None and "off" in s.passthrough_why_not


def test_readdirplus_and_locks_follow_what_the_filesystem_implements() -> None:
    class Rich(Operations):
        readdirplus = True

        def getlk(self, *a: object) -> tuple[int, int, int, int]:
            return (0, 0, 2, 0)

        def setlk(self, *a: object) -> None:
            return None

        def flock(self, *a: object) -> None:
            return None

    plain = negotiate(Session(Plain(), "/x", passthrough="off"), init_request(45, ALL_6_18))["want"]
    rich = negotiate(Session(Rich(), "/x", passthrough="off"), init_request(45, ALL_6_18))["want"]
    for flag in (F.DO_READDIRPLUS, F.POSIX_LOCKS, F.FLOCK_LOCKS):
        assert rich & flag and not plain & flag


def test_setxattr_layout_follows_the_negotiated_flag() -> None:
    class Ext(Operations):
        def init(self, conn: ConnectionInfo) -> None:
            conn.want |= F.SETXATTR_EXT

    s = Session(Ext(), "/x", passthrough="off")
    negotiate(s, init_request(45, ALL_6_18))
    assert s._parser.setxattr_ext
    s2 = Session(Plain(), "/x", passthrough="off")
    negotiate(s2, init_request(45, ALL_6_18))
    assert not s2._parser.setxattr_ext


def test_bad_session_arguments_are_refused() -> None:
    for kw in ({"passthrough": "maybe"}, {"max_stack_depth": 3}, {"threads": 0}):
        with pytest.raises(ValueError):
            Session(Plain(), "/x", **kw)  # type: ignore[arg-type]
