"""Hostile and malformed requests thrown at the dispatcher as bytes (no mount, no thread): every
request the kernel expects an answer to gets exactly one well-formed reply, the rest get none,
and the dispatcher keeps serving."""

from __future__ import annotations

import errno
import struct
import tracemalloc
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
    k = FakeKernel(MemFS())
    assert k.init().error == 0
    yield k
    assert k.still_serving()


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
    replies = kernel.send(msg)
    if opcode in NO_REPLY:
        assert replies == []
    else:
        assert len(replies) == 1
        assert_well_formed(replies[0], unique)
    assert kernel.still_serving()


@SETTINGS
@given(data=st.binary(min_size=1, max_size=200))
def test_arbitrary_bytes_never_stop_the_dispatcher(kernel: FakeKernel, data: bytes) -> None:
    replies = kernel.send(data)
    assert kernel.still_serving()
    assert len(replies) <= 1
    if len(data) < 40:
        assert replies == []  # not even a header: nothing to answer
    for reply in replies:
        assert reply.length == reply.received and -abi.MAX_ERRNO <= reply.error <= 0


def test_header_length_disagreeing_with_the_message_gets_eio(kernel: FakeKernel) -> None:
    unique, msg = kernel.message(abi.Opcode.GETATTR, struct.pack("<IIQ", 0, 0, 0))
    (reply,) = kernel.send(struct.pack("<I", len(msg) + 100) + msg[4:])
    assert reply.unique == unique and reply.error == -errno.EIO


@pytest.mark.parametrize("opcode", [abi.Opcode.LOOKUP, abi.Opcode.MKDIR, abi.Opcode.SYMLINK, abi.Opcode.RENAME,
                                    abi.Opcode.SETXATTR, abi.Opcode.WRITE, abi.Opcode.BATCH_FORGET])
def test_truncated_requests_get_eio_or_nothing(kernel: FakeKernel, opcode: int) -> None:
    unique, msg = kernel.message(opcode, b"\x01\x02\x03")
    replies = kernel.send(msg)
    if opcode in NO_REPLY:
        assert replies == []
    else:
        (reply,) = replies
        assert reply.unique == unique and reply.error == -errno.EIO


def test_batch_forget_whose_count_overflows_is_dropped_without_reply(kernel: FakeKernel) -> None:
    body = struct.pack("<II", 0xFFFFFFFF, 0) + struct.pack("<QQ", 2, 1)
    _, msg = kernel.message(abi.Opcode.BATCH_FORGET, body, nodeid=0)
    assert kernel.send(msg) == []


def test_write_at_an_absurd_offset_fails_cleanly(kernel: FakeKernel) -> None:
    create = struct.pack("<IIII", 0o2, 0o100644, 0, 0) + b"big\0"
    created = kernel.call(abi.Opcode.CREATE, create)
    assert created.error == 0
    nodeid = struct.unpack_from("<Q", created.payload)[0]
    fh = struct.unpack_from("<Q", created.payload, abi.ENTRY_OUT.size)[0]
    write = struct.pack("<QQIIQII", fh, 1 << 62, 4, 0, 0, 0, 0) + b"data"
    reply = kernel.call(abi.Opcode.WRITE, write, nodeid=nodeid)
    assert reply.error == -errno.EFBIG


# --- sizes a request asks for are bounded by what INIT negotiated (found by the fuzzer) -------

def _open_file_and_dir(kernel: FakeKernel, name: bytes) -> tuple[int, int, int]:
    created = kernel.call(abi.Opcode.CREATE, struct.pack("<IIII", 0o2, 0o100644, 0, 0) + name + b"\0")
    assert created.error == 0
    nodeid, = struct.unpack_from("<Q", created.payload)
    fh, = struct.unpack_from("<Q", created.payload, abi.ENTRY_OUT.size)
    opened = kernel.call(abi.Opcode.OPENDIR, struct.pack("<II", 0, 0))
    assert opened.error == 0
    dir_fh, = struct.unpack_from("<Q", opened.payload)
    return nodeid, fh, dir_fh


@pytest.mark.parametrize(("opcode", "offset", "size"), [
    (abi.Opcode.READDIRPLUS, 0, 0x14EE0000),  # asked for 351 MB
    (abi.Opcode.READ, 463_051_161, 0xFF000000),  # asked for 4 GB at 441 MiB
    (abi.Opcode.READ, 0, abi.MAX_PAGES * abi.PAGE_SIZE + 1),  # one byte beyond max_pages
])
def test_a_size_beyond_what_was_negotiated_is_refused_before_any_handler_and_takes_no_memory(
    opcode: int, offset: int, size: int
) -> None:
    kernel = FakeKernel(MemFS())
    assert kernel.init().error == 0
    nodeid, fh, dir_fh = _open_file_and_dir(kernel, b"f")
    assert kernel.call(abi.Opcode.WRITE, struct.pack("<QQIIQII", fh, 0, 4, 0, 0, 0, 0) + b"data",
                       nodeid=nodeid).error == 0
    request = struct.pack("<QQIIQII", dir_fh if opcode == abi.Opcode.READDIRPLUS else fh, offset, size, 0, 0, 0, 0)
    tracemalloc.start()
    try:
        reply = kernel.call(opcode, request, nodeid=1 if opcode == abi.Opcode.READDIRPLUS else nodeid)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.error == -errno.EINVAL and reply.payload == b""
    assert peak < 256 * 1024, f"{peak} bytes taken to refuse it"
    assert kernel.stats.malformed == 1
    assert kernel.still_serving()


def test_a_read_of_exactly_max_pages_is_served() -> None:
    kernel = FakeKernel(MemFS())
    assert kernel.init().error == 0
    nodeid, fh, _ = _open_file_and_dir(kernel, b"f")
    data = bytes(range(256)) * (abi.MAX_PAGES * abi.PAGE_SIZE // 256)
    write = struct.pack("<QQIIQII", fh, 0, len(data), 0, 0, 0, 0) + data
    assert kernel.call(abi.Opcode.WRITE, write, nodeid=nodeid).error == 0
    reply = kernel.call(abi.Opcode.READ, struct.pack("<QQIIQII", fh, 0, len(data), 0, 0, 0, 0), nodeid=nodeid)
    assert reply.error == 0 and reply.payload == data


@pytest.mark.parametrize(("opcode", "body"), [
    (abi.Opcode.GETXATTR, struct.pack("<II", abi.XATTR_SIZE_MAX + 1, 0) + b"user.x\0"),
    (abi.Opcode.LISTXATTR, struct.pack("<II", 1 << 31, 0)),
    (abi.Opcode.SETXATTR, struct.pack("<II", abi.XATTR_SIZE_MAX + 1, 0) + b"user.x\0"),
])
def test_xattr_sizes_beyond_the_kernels_bound_are_refused(opcode: int, body: bytes) -> None:
    kernel = FakeKernel(MemFS())
    assert kernel.init().error == 0
    assert kernel.call(opcode, body).error == -errno.EINVAL


def test_an_ioctl_out_size_beyond_max_pages_is_malformed_for_the_parser() -> None:
    """No filesystem here implements IOCTL (the dispatcher answers ENOSYS unparsed); the parser,
    which a filesystem with IOCTL would go through, refuses the size on its own."""
    from fakekernel import IN_HEADER

    from fusepass import protocol

    body = struct.pack("<QIIQII", 0, 0, 0, 0, 0, abi.MAX_PAGES * abi.PAGE_SIZE + 1)
    msg = IN_HEADER.pack(IN_HEADER.size + len(body), abi.Opcode.IOCTL, 2, 1, 0, 0, 0, 0, 0) + body
    with pytest.raises(protocol.ProtocolError) as e:
        protocol.Parser().parse(msg)
    assert e.value.errno == errno.EINVAL and "out_size" in str(e.value)


def test_malformed_requests_are_logged_at_a_bounded_rate_and_all_counted(caplog: pytest.LogCaptureFixture) -> None:
    minute = [0]
    kernel = FakeKernel(MemFS(), clock=lambda: minute[0] * 60_000_000_000)
    assert kernel.init().error == 0
    with caplog.at_level("ERROR", logger="fusepass"):
        for _ in range(1000):
            kernel.send(kernel.message(abi.Opcode.LOOKUP, b"no terminator")[1])
        first_minute = len(caplog.records)
        minute[0] = 1
        kernel.send(kernel.message(abi.Opcode.LOOKUP, b"no terminator")[1])
    assert 1 <= first_minute <= 10, first_minute
    assert len(caplog.records) == first_minute + 1, "a new minute logs again"
    assert kernel.stats.malformed == 1001
