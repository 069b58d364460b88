"""Randomized data integrity: a file written through the mount always holds what the same
operations give on a plain file.

A hypothesis state machine applies one random sequence of pwrite, append, truncate, mmap
writes, fallocate (allocate, keep-size, punch hole, zero range), renames across directories,
reopens and reads to a file through the mount, and the same sequence to a reference file in
another directory of the source filesystem. After every step the whole content is compared four
ways: through the mount's open descriptor, through a fresh open of the mount path, in the source
file directly, and in the reference. It runs with passthrough and with the server answering
READ and WRITE itself. On failure hypothesis prints the shortest failing sequence it found
(and a blob to replay it with ``@reproduce_failure``).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ServerProcess, mirror_argv
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from fusepass import control

pytestmark = pytest.mark.timeout(120)

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 1, 2, 0x10
FALLOCATE_MODES = [0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                   FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
MAX_OFFSET = 256 * 1024
DIRS = ["d0", "d1", "d2"]
_libc = ctypes.CDLL(None, use_errno=True)

offsets = st.integers(0, MAX_OFFSET)
chunks = st.binary(min_size=1, max_size=40 * 1024)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileThroughMount(RuleBasedStateMachine):
    """One file through the mount (``self.path``, open as ``self.fd``) and its reference
    (``self.ref_path``, ``self.ref_fd``). ``mnt``, ``src`` and ``ref`` are set by the test."""

    mnt: Path
    src: Path
    ref: Path
    examples = 0

    def __init__(self) -> None:
        super().__init__()
        cls = type(self)
        cls.examples += 1
        name = f"f{cls.examples}"
        self.rel = Path(DIRS[0]) / name
        self.path = self.mnt / self.rel
        self.ref_path = self.ref / self.rel
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self.ref_fd = os.open(self.ref_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

    def teardown(self) -> None:
        os.close(self.fd)
        os.close(self.ref_fd)
        os.unlink(self.path)
        os.unlink(self.ref_path)

    def both(self, op: Callable[[int], object]) -> None:
        """Apply ``op`` to the mount's descriptor and the reference's; they must agree, in
        result or in errno."""
        results = []
        for fd in (self.fd, self.ref_fd):
            try:
                results.append(("ok", op(fd)))
            except OSError as e:
                results.append(("error", e.errno))
        assert results[0] == results[1]

    def size(self) -> int:
        return os.fstat(self.ref_fd).st_size

    # --- rules ---------------------------------------------------------------------------

    @rule(offset=offsets, data=chunks)
    def pwrite(self, offset: int, data: bytes) -> None:
        self.both(lambda fd: os.pwrite(fd, data, offset))

    @rule(data=chunks)
    def append(self, data: bytes) -> None:
        for path in (self.path, self.ref_path):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                assert os.write(fd, data) == len(data)
            finally:
                os.close(fd)

    @rule(size=offsets)
    def truncate(self, size: int) -> None:
        self.both(lambda fd: os.ftruncate(fd, size))

    @rule(size=offsets)
    def truncate_by_path(self, size: int) -> None:
        os.truncate(self.path, size)
        os.truncate(self.ref_path, size)

    @precondition(lambda self: self.size() > 0)
    @rule(where=st.floats(0, 1, exclude_max=True), data=chunks)
    def mmap_write(self, where: float, data: bytes) -> None:
        size = self.size()
        offset = int(where * size)
        data = data[: size - offset]
        with mmap.mmap(self.fd, size) as m:
            m[offset:offset + len(data)] = data
            m.flush()
        os.pwrite(self.ref_fd, data, offset)

    @precondition(lambda self: self.size() > 0)
    @rule(where=st.floats(0, 1, exclude_max=True), length=st.integers(1, 64 * 1024))
    def mmap_read(self, where: float, length: int) -> None:
        size = self.size()
        offset = int(where * size)
        with mmap.mmap(self.fd, size, prot=mmap.PROT_READ) as m:
            assert m[offset:offset + length] == os.pread(self.ref_fd, length, offset)

    @rule(mode=st.sampled_from(FALLOCATE_MODES), offset=offsets, length=st.integers(1, 128 * 1024))
    def fallocate(self, mode: int, offset: int, length: int) -> None:
        self.both(lambda fd: fallocate(fd, mode, offset, length))

    @rule(directory=st.sampled_from(DIRS), suffix=st.sampled_from(["", "-renamed", "-again"]))
    def rename(self, directory: str, suffix: str) -> None:
        rel = Path(directory) / (self.rel.name.split("-")[0] + suffix)
        if rel == self.rel:
            return
        os.rename(self.path, self.mnt / rel)
        os.rename(self.ref_path, self.ref / rel)
        self.rel, self.path, self.ref_path = rel, self.mnt / rel, self.ref / rel

    @rule()
    def reopen(self) -> None:
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)

    @rule(offset=offsets, length=st.integers(1, 128 * 1024))
    def read(self, offset: int, length: int) -> None:
        self.both(lambda fd: os.pread(fd, length, offset))

    @rule(whence=st.sampled_from([os.SEEK_DATA, os.SEEK_HOLE]), offset=offsets)
    def seek(self, whence: int, offset: int) -> None:
        # where data and holes are depends on block allocation, which both files share
        self.both(lambda fd: os.lseek(fd, offset, whence))

    # --- after every step -----------------------------------------------------------------

    @invariant()
    def same_content_everywhere(self) -> None:
        expected = os.pread(self.ref_fd, MAX_OFFSET * 4, 0)
        assert os.fstat(self.fd).st_size == len(expected)
        assert os.pread(self.fd, MAX_OFFSET * 4, 0) == expected, "through the open descriptor"
        assert self.path.read_bytes() == expected, "through a new open of the mount path"
        assert (self.src / self.rel).read_bytes() == expected, "in the source file"


@pytest.mark.parametrize("passthrough", ["on", "off"])
def test_random_operations_keep_the_file_identical_to_a_reference(
    tmp_path: Path, start_server: Callable[..., ServerProcess], passthrough: str
) -> None:
    src, ref = tmp_path / "src", tmp_path / "ref"
    for base in (src, ref):
        for d in DIRS:
            (base / d).mkdir(parents=True)
    server = start_server(mirror_argv(src, "--passthrough", passthrough))

    class Machine(FileThroughMount):
        pass

    Machine.mnt, Machine.src, Machine.ref = Path(server.mountpoint), src, ref
    run_state_machine_as_test(Machine, settings=settings(
        max_examples=100, stateful_step_count=25, deadline=None, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    ))
    assert Machine.examples >= 100
    status = control.query(str(server.mountpoint))
    if passthrough == "on":
        assert status["passthrough"]["opens"] > 0 and "WRITE" not in status["requests"]
    else:
        assert status["requests"]["WRITE"]["count"] > 0 and status["passthrough"]["opens"] == 0
