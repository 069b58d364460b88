"""Hostile and malformed requests thrown at the real worker loop (no mount): every request the
kernel expects an answer to gets exactly one well-formed reply, the rest get none, and the
worker keeps serving."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import pytest
from fakekernel import FakeKernel, Reply
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusepass import abi
from fusepass.examples.memfs import MemFS

NO_REPLY = {int(op) for op in abi.NO_REPLY_OPCODES}
OPCODES = [int(op) for op in abi.Opcode] + [0, 7, 19, 54, 4096, 0xFFFFFFFF]
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def kernel() -> Iterator[FakeKernel]:
    with FakeKernel(MemFS()) as k:
        assert k.init().error == 0
        yield k
        assert k.worker.is_alive()


def assert_well_formed(reply: Reply, unique: int) -> None:
    assert reply.unique == unique
    assert reply.length == reply.received, "the length field disagrees with the bytes written"
    assert -abi.MAX_ERRNO <= reply.error <= 0
    if reply.error:
        assert reply.payload == b"", "an error reply carries a payload"


@SETTINGS
@given(opcode=st.sampled_from(OPCODES), body=st.binary(max_size=400),
       nodeid=st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 2**64 - 1)))
def test_any_body_behind_a_valid_header_gets_one_well_formed_reply_or_none(
    kernel: FakeKernel, opcode: int, body: bytes, nodeid: int
) -> None:
    unique, msg = kernel.message(opcode, body, nodeid)
    kernel.send_raw(msg)
    replies = kernel.replies_until_sentinel()
    if opcode in NO_REPLY:
        assert replies == []
    else:
        assert len(replies) == 1
        assert_well_formed(replies[0], unique)


@SETTINGS
@given(data=st.binary(min_size=1, max_size=200))
def test_arbitrary_bytes_never_stop_the_worker(kernel: FakeKernel, data: bytes) -> None:
    kernel.send_raw(data)
    replies = kernel.replies_until_sentinel()
    assert len(replies) <= 1
    if len(data) < 40:
        assert replies == []  # not even a header: nothing to answer
    for reply in replies:
        assert reply.length == reply.received and -abi.MAX_ERRNO <= reply.error <= 0


def test_header_length_disagreeing_with_the_message_gets_eio(kernel: FakeKernel) -> None:
    unique, msg = kernel.message(abi.Opcode.GETATTR, struct.pack("<IIQ", 0, 0, 0))
    kernel.send_raw(msg[:4].replace(msg[:4], struct.pack("<I", len(msg) + 100)) + msg[4:])
    (reply,) = kernel.replies_until_sentinel()
    assert reply.unique == unique and reply.error == -errno.EIO


@pytest.mark.parametrize("opcode", [abi.Opcode.LOOKUP, abi.Opcode.MKDIR, abi.Opcode.SYMLINK, abi.Opcode.RENAME,
                                    abi.Opcode.SETXATTR, abi.Opcode.WRITE, abi.Opcode.BATCH_FORGET])
def test_truncated_requests_get_eio_or_nothing(kernel: FakeKernel, opcode: int) -> None:
    unique, msg = kernel.message(opcode, b"\x01\x02\x03")
    kernel.send_raw(msg)
    replies = kernel.replies_until_sentinel()
    if opcode in NO_REPLY:
        assert replies == []
    else:
        (reply,) = replies
        assert reply.unique == unique and reply.error == -errno.EIO


def test_batch_forget_whose_count_overflows_is_dropped_without_reply(kernel: FakeKernel) -> None:
    body = struct.pack("<II", 0xFFFFFFFF, 0) + struct.pack("<QQ", 2, 1)
    _, msg = kernel.message(abi.Opcode.BATCH_FORGET, body, nodeid=0)
    kernel.send_raw(msg)
    assert kernel.replies_until_sentinel() == []


def test_write_at_an_absurd_offset_fails_cleanly(kernel: FakeKernel) -> None:
    create = struct.pack("<IIII", 0o2, 0o100644, 0, 0) + b"big\0"
    created = kernel.call(abi.Opcode.CREATE, create)
    assert created.error == 0
    nodeid = struct.unpack_from("<Q", created.payload)[0]
    fh = struct.unpack_from("<Q", created.payload, abi.ENTRY_OUT.size)[0]
    write = struct.pack("<QQIIQII", fh, 1 << 62, 4, 0, 0, 0, 0) + b"data"
    reply = kernel.call(abi.Opcode.WRITE, write, nodeid=nodeid)
    assert reply.error == -errno.EFBIG
