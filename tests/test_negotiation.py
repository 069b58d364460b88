"""INIT negotiation, driven through the dispatcher with INIT requests as bytes: no mount, no kernel."""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest
from fakekernel import ALL_6_18, FakeKernel, init_body

from fusepass import abi
from fusepass.backing import BackingRegistry
from fusepass.device import BackingId
from fusepass.ops import ConnectionInfo, Operations
from fusepass.session import Session

F = abi.InitFlag


class Plain(Operations):
    pass


class UnusedDevice:
    """Negotiation never registers a backing file."""

    def backing_open(self, fd: int) -> BackingId:
        raise AssertionError("backing_open during negotiation")

    def backing_close(self, backing_id: int) -> None:
        raise AssertionError("backing_close during negotiation")


def kernel(fs: Operations, passthrough: str = "auto", **kw: Any) -> FakeKernel:
    """A dispatcher for ``fs`` in a process that may pass through."""
    return FakeKernel(fs, passthrough=passthrough, may_pass_through=True,
                      registry=BackingRegistry(UnusedDevice()), **kw)


def init_request(minor: int, flags: int, readahead: int = 131072) -> bytes:
    body = init_body(minor, flags, readahead)
    return struct.pack("<IIQQIIIHH", 40 + len(body), abi.Opcode.INIT, 2, 0, 0, 0, 0, 0, 0) + body


def negotiate(k: FakeKernel, req: bytes) -> dict[str, int]:
    (reply,) = k.send(req)
    if reply.error:
        raise OSError(-reply.error, f"INIT refused: {k.dispatcher.failure}")
    fields = struct.unpack("<IIIIHHIIHHIIH22x", reply.payload)
    names = ("major minor max_readahead flags max_background congestion_threshold max_write time_gran "
             "max_pages map_alignment flags2 max_stack_depth request_timeout").split()
    out = dict(zip(names, fields, strict=True))
    out["want"] = out["flags"] | out["flags2"] << 32
    return out


def test_kernel_older_than_7_31_is_refused_with_a_clear_error() -> None:
    s = kernel(Plain())
    with pytest.raises(OSError) as e:
        negotiate(s, init_request(30, ALL_6_18 & 0xFFFFFFFF))
    assert e.value.errno == errno.EPROTO
    assert s.dispatcher.failure is not None and "7.30" in s.dispatcher.failure and "7.31" in s.dispatcher.failure


def test_reply_minor_is_capped_at_ours_and_flags_stay_within_what_was_offered() -> None:
    s = kernel(Plain(), passthrough="off")
    out = negotiate(s, init_request(99, ALL_6_18))
    assert out["major"] == 7 and out["minor"] == abi.KERNEL_MINOR_VERSION
    assert out["want"] & ~ALL_6_18 == 0
    assert out["want"] & F.INIT_EXT and out["want"] & F.MAX_PAGES and out["want"] & F.BIG_WRITES
    assert out["max_write"] == abi.MAX_WRITE and out["max_pages"] == abi.MAX_PAGES


def test_flags_the_kernel_did_not_offer_are_not_requested() -> None:
    s = kernel(Plain(), passthrough="off")
    offered = int(F.INIT_EXT | F.BIG_WRITES)
    out = negotiate(s, init_request(45, offered))
    assert out["want"] & ~offered == 0
    assert not out["want"] & F.ASYNC_READ


def test_flags_newer_than_the_kernels_minor_are_dropped() -> None:
    s = kernel(Plain())
    out = negotiate(s, init_request(35, ALL_6_18))  # INIT_EXT and PASSTHROUGH came later
    assert out["minor"] == 35
    assert not out["want"] & F.INIT_EXT and out["flags2"] == 0
    assert not s.dispatcher.registry.available and s.dispatcher.registry.why_not is not None


def test_passthrough_is_asked_with_depth_and_without_writeback_cache() -> None:
    s = kernel(Plain(), max_stack_depth=2)
    out = negotiate(s, init_request(45, ALL_6_18))
    assert out["want"] & F.PASSTHROUGH, s.dispatcher.registry.why_not
    assert not out["want"] & F.WRITEBACK_CACHE
    assert out["max_stack_depth"] == 2
    assert s.dispatcher.registry.available and s.dispatcher.registry.why_not is None


def test_passthrough_not_offered_by_the_kernel_is_reported() -> None:
    s = kernel(Plain())
    out = negotiate(s, init_request(45, ALL_6_18 & ~F.PASSTHROUGH))
    assert not out["want"] & F.PASSTHROUGH and out["max_stack_depth"] == 0
    assert s.dispatcher.registry.why_not is not None and "FUSE_PASSTHROUGH" in s.dispatcher.registry.why_not


def test_writeback_cache_wanted_by_the_filesystem_switches_passthrough_off() -> None:
    class Writeback(Operations):
        def init(self, conn: ConnectionInfo) -> None:
            conn.want |= F.WRITEBACK_CACHE

    s = kernel(Writeback())
    out = negotiate(s, init_request(45, ALL_6_18))
    assert out["want"] & F.WRITEBACK_CACHE and not out["want"] & F.PASSTHROUGH
    assert s.dispatcher.registry.why_not is not None and "writeback" in s.dispatcher.registry.why_not


def test_passthrough_on_fails_init_when_it_cannot_be_had() -> None:
    s = kernel(Plain(), passthrough="on")
    with pytest.raises(OSError):
        negotiate(s, init_request(45, ALL_6_18 & ~F.PASSTHROUGH))
    assert s.dispatcher.failure is not None and "passthrough" in s.dispatcher.failure


def test_passthrough_off_is_reported_as_switched_off() -> None:
    s = kernel(Plain(), passthrough="off")
    out = negotiate(s, init_request(45, ALL_6_18))
    assert not out["want"] & F.PASSTHROUGH
    assert s.dispatcher.registry.why_not is not None and "off" in s.dispatcher.registry.why_not


def test_readdirplus_and_locks_follow_what_the_filesystem_implements() -> None:
    class Rich(Operations):
        readdirplus = True

        def getlk(self, *a: object) -> tuple[int, int, int, int]:
            return (0, 0, 2, 0)

        def setlk(self, *a: object) -> None:
            return None

        def flock(self, *a: object) -> None:
            return None

    plain = negotiate(kernel(Plain(), passthrough="off"), init_request(45, ALL_6_18))["want"]
    rich = negotiate(kernel(Rich(), passthrough="off"), init_request(45, ALL_6_18))["want"]
    for flag in (F.DO_READDIRPLUS, F.POSIX_LOCKS, F.FLOCK_LOCKS):
        assert rich & flag and not plain & flag


def test_setxattr_layout_follows_the_negotiated_flag() -> None:
    class Ext(Operations):
        def init(self, conn: ConnectionInfo) -> None:
            conn.want |= F.SETXATTR_EXT

    s = kernel(Ext(), passthrough="off")
    negotiate(s, init_request(45, ALL_6_18))
    assert s.dispatcher.parser.setxattr_ext
    s2 = kernel(Plain(), passthrough="off")
    negotiate(s2, init_request(45, ALL_6_18))
    assert not s2.dispatcher.parser.setxattr_ext


def test_bad_session_arguments_are_refused() -> None:
    for kw in ({"passthrough": "maybe"}, {"max_stack_depth": 3}, {"threads": 0}):
        with pytest.raises(ValueError):
            Session(Plain(), "/x", **kw)  # type: ignore[arg-type]


def test_a_server_that_may_not_pass_through_says_why_and_serves() -> None:
    k = FakeKernel(Plain(), passthrough="auto", may_pass_through=False, registry=BackingRegistry(UnusedDevice()))
    out = negotiate(k, init_request(45, ALL_6_18))
    assert not out["want"] & F.PASSTHROUGH and out["max_stack_depth"] == 0
    assert k.dispatcher.registry.why_not is not None and "CAP_SYS_ADMIN" in k.dispatcher.registry.why_not


def test_an_init_too_short_for_its_header_is_refused_with_eio() -> None:
    k = kernel(Plain())
    _, msg = k.message(abi.Opcode.INIT, b"\x07\x00\x00\x00", nodeid=0)
    (reply,) = k.send(msg)
    assert reply.error == -errno.EIO and k.dispatcher.conn is None


def test_negotiating_arbitrary_flag_words_keeps_no_memory() -> None:
    """Found by fuzz/fuzz_init.py: every new combination of an IntFlag is a pseudo-member Python
    keeps for ever, so negotiation works on plain ints (the fuzzer's memory grew past 200 MiB)."""
    import random

    class Wishful(Operations):
        def init(self, conn: ConnectionInfo) -> None:
            conn.want = rng.getrandbits(64)

    rng = random.Random(7)
    members = len(F._value2member_map_)
    for _ in range(500):
        negotiate(kernel(Wishful(), passthrough="off"), init_request(45, rng.getrandbits(64) | int(F.INIT_EXT)))
    assert len(F._value2member_map_) - members < 50


def test_request_timeout_is_asked_for_only_when_wanted_and_offered() -> None:
    """FUSE_REQUEST_TIMEOUT (7.43): the kernel aborts the connection when a request stays
    unanswered that long; off unless asked for, and never to a kernel that does not offer it."""
    plain = negotiate(kernel(Plain()), init_request(abi.KERNEL_MINOR_VERSION, ALL_6_18))
    assert not plain["want"] & F.REQUEST_TIMEOUT and plain["request_timeout"] == 0
    asked = negotiate(kernel(Plain(), request_timeout=90), init_request(abi.KERNEL_MINOR_VERSION, ALL_6_18))
    assert asked["want"] & F.REQUEST_TIMEOUT and asked["request_timeout"] == 90
    old = negotiate(kernel(Plain(), request_timeout=90), init_request(42, ALL_6_18))
    assert not old["want"] & F.REQUEST_TIMEOUT and old["request_timeout"] == 0
    unoffered = negotiate(kernel(Plain(), request_timeout=90),
                          init_request(abi.KERNEL_MINOR_VERSION, ALL_6_18 & ~F.REQUEST_TIMEOUT))
    assert not unoffered["want"] & F.REQUEST_TIMEOUT and unoffered["request_timeout"] == 0
