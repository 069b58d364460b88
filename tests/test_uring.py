"""FUSE over io_uring without a mount: the ring itself, the options, the reasons given in words when
it cannot be had, and INIT asking for FUSE_OVER_IO_URING only when the transport is ready."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
from fakekernel import ALL_6_18, FakeKernel, init_body

from fusepass import abi, uring_transport
from fusepass.ops import Operations
from fusepass.uring import OP_URING_CMD, Ring
from fusepass.uring_transport import UringOptions, take_options

pytestmark = pytest.mark.timeout(30)


class Plain(Operations):
    pass


def test_a_uring_cmd_on_a_file_without_one_completes_with_eopnotsupp_and_its_user_data(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        with Ring(2) as ring:
            ring.push(OP_URING_CMD, fd, 1, 0, 0, 0xDEADBEEF)
            ring.enter(1)
            assert list(ring.reap()) == [(0xDEADBEEF, -errno.EOPNOTSUPP)]
            assert list(ring.reap()) == []
    finally:
        os.close(fd)


def test_a_full_submission_queue_refuses_another_sqe() -> None:
    with Ring(1) as ring:
        for _ in range(ring.sq_entries):
            ring.push(OP_URING_CMD, -1, 1, 0, 0, 0)
        with pytest.raises(BufferError):
            ring.push(OP_URING_CMD, -1, 1, 0, 0, 0)


def test_closing_a_ring_releases_its_descriptor_and_mappings() -> None:
    ring = Ring(2)
    fd = ring.fd
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[io_uring]"
    ring.close()
    assert not any("io_uring" in line for line in Path("/proc/self/maps").read_text().splitlines())
    ring.close()  # twice is harmless


def test_options_are_taken_out_of_the_mount_options() -> None:
    assert take_options(["ro", "io_uring", "io_uring_depth=4", "timeout=3"]) == (
        UringOptions(True, 4), ["ro", "timeout=3"])
    assert take_options(["noio_uring"])[0] == UringOptions(False, None)
    assert take_options([])[0].enabled is None  # the session's default decides
    for bad in ("io_uring_depth=0", "io_uring_depth=x", f"io_uring_depth={uring_transport.MAX_DEPTH + 1}"):
        with pytest.raises(ValueError, match="io_uring_depth"):
            take_options([bad])


def test_the_reason_says_how_an_administrator_turns_the_parameter_on(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    param = tmp_path / "enable_uring"
    monkeypatch.setattr(uring_transport, "MODULE_PARAMETER", str(param))
    assert "Linux 6.14" in (uring_transport.unavailable_reason() or "")
    param.write_text("N\n")
    reason = uring_transport.unavailable_reason() or ""
    assert "enable_uring is off" in reason and "echo Y > /sys/module/fuse/parameters/enable_uring" in reason
    param.write_text("Y\n")
    assert uring_transport.unavailable_reason() is None
    assert "init()" in uring_transport.refused_reason(kernel_offered=True)


def test_possible_cpus_counts_the_queues_the_kernel_makes() -> None:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    assert uring_transport.possible_cpus() == int(text.rpartition("-")[2].split(",")[-1]) + 1


def _init(k: FakeKernel, offered: int) -> int:
    body = init_body(abi.KERNEL_MINOR_VERSION, offered)
    (reply,) = k.send(struct.pack("<IIQQIIIHH", 40 + len(body), abi.Opcode.INIT, 2, 0, 0, 0, 0, 0, 0) + body)
    assert reply.error == 0
    fields = struct.unpack("<IIIIHHIIHHIIH22x", reply.payload)
    return fields[3] | fields[10] << 32


@pytest.mark.parametrize("asked", [True, False])
@pytest.mark.parametrize("offered", [True, False])
def test_init_asks_for_io_uring_only_when_the_transport_is_ready(asked: bool, offered: bool) -> None:
    k = FakeKernel(Plain(), passthrough="off", io_uring=asked)
    flags = ALL_6_18 | abi.InitFlag.OVER_IO_URING if offered else ALL_6_18 & ~abi.InitFlag.OVER_IO_URING
    want = _init(k, flags)
    assert bool(want & abi.InitFlag.OVER_IO_URING) == (asked and offered)
    assert k.dispatcher.over_io_uring == (asked and offered)
