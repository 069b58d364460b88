"""Faults through a real mount of the mirror: the server killed or stopped under load, the source
filesystem full, an unmount under open files and live mappings.

Every caller runs in a child process that reports on a pipe, and every wait on it is bounded: a
caller that hangs fails the test instead of hanging it, and teardown aborts the connection.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from conftest import (
    TEST_IO_URING,
    ServerProcess,
    fusepass_cli,
    mirror_argv,
    poll_until,
    stop_background,
    wait_unmounted,
)

from fusepass import control
from fusepass import mount as mountmod

pytestmark = pytest.mark.timeout(120)

MODES = pytest.mark.parametrize("mode", ["auto", "off"], ids=["passthrough", "served"])
DEAD = {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO}  # what a caller of a dead server may get
if TEST_IO_URING:  # and over io_uring, a request the kernel was handing to a ring of the dying process
    DEAD.add(errno.ECANCELED)


# --- callers in child processes ---------------------------------------------------------------


class Caller:
    """A child process running ``code`` (Python) with ``args``; it reports lines on its stdout:
    progress while it works, ``err ERRNO`` or ``ok`` when it ends. Lines are collected by ``pump``."""

    def __init__(self, code: str, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.lines: list[str] = []
        self.eof = False
        self._partial = b""

    def read_some(self) -> None:
        data = os.read(self.fd, 65536)
        if not data:
            self.eof = True
            return
        *done, self._partial = (self._partial + data).split(b"\n")
        self.lines += [line.decode() for line in done]

    def count(self, prefix: str) -> int:
        return sum(1 for line in self.lines if line.startswith(prefix))

    def last(self, prefix: str) -> str | None:
        return next((line for line in reversed(self.lines) if line.startswith(prefix)), None)

    def end_errno(self) -> int | None:
        last = self.last("err ")
        return int(last.split()[1]) if last else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def pump(callers: Sequence[Caller], until: Callable[[], bool], timeout: float, what: str) -> float:
    """Collect the callers' lines until ``until()`` holds; fail after ``timeout`` seconds.
    Returns the time it took."""
    start = time.monotonic()
    deadline = start + timeout
    while not until():
        open_ = [c for c in callers if not c.eof]
        left = deadline - time.monotonic()
        if left <= 0 or not open_:
            raise AssertionError(f"{what}: not within {timeout}s; callers said "
                                 f"{[c.lines[-3:] for c in callers]}")
        ready, _, _ = select.select([c.fd for c in open_], [], [], left)
        for c in open_:
            if c.fd in ready:
                c.read_some()
    return time.monotonic() - start


def all_ended(callers: Sequence[Caller]) -> Callable[[], bool]:
    return lambda: all(c.eof for c in callers)


@pytest.fixture
def callers() -> Iterator[list[Caller]]:
    """Callers started by a test; teardown kills (by pid) any that still run."""
    started: list[Caller] = []
    yield started
    for c in started:
        c.kill()


# --- the server killed during heavy I/O ----------------------------------------------------------

RECORD = 64 * 1024
BATCH = 4  # records written between two fsyncs
WRITERS, READERS = 4, 2

# Appends numbered records to its file; after every successful fsync, acknowledges the last record.
WRITER = r"""
import os, struct, sys
path, wid, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def record(seq):
    head = struct.pack("<QQ", wid, seq)
    return head + bytes([(wid * 31 + seq) & 0xFF]) * (size - len(head))
try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    seq = 0
    while True:
        for _ in range(batch):
            data, offset = memoryview(record(seq)), seq * size
            while data:
                n = os.pwrite(fd, data, offset)
                data, offset = data[n:], offset + n
            seq += 1
        os.fsync(fd)
        os.write(1, b"ack %d\n" % (seq - 1))
except OSError as e:
    os.write(1, b"err %d\n" % e.errno)
"""

# Lists the directory and reads every static file, over and over; one line per pass.
READER = r"""
import os, sys
root = sys.argv[1]
try:
    while True:
        for name in sorted(os.listdir(root)):
            if name.startswith("static"):
                with open(os.path.join(root, name), "rb") as f:
                    while f.read(1 << 20):
                        pass
        os.write(1, b"pass\n")
except OSError as e:
    os.write(1, b"err %d\n" % e.errno)
"""


def expected_record(wid: int, seq: int) -> bytes:
    head = wid.to_bytes(8, "little") + seq.to_bytes(8, "little")
    return head + bytes([(wid * 31 + seq) & 0xFF]) * (RECORD - len(head))


@MODES
def test_sigkill_under_io_fails_every_caller_and_keeps_every_fsynced_record(
    start_server: Callable[..., ServerProcess], tmp_path: Path, callers: list[Caller], mode: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"static{i}").write_bytes(os.urandom(4 << 20))
    server = start_server(mirror_argv(src, "--passthrough", mode))
    assert server.proc is not None
    mnt = Path(server.mountpoint)
    writers = [Caller(WRITER, str(mnt / f"w{i}"), str(i), str(RECORD), str(BATCH)) for i in range(WRITERS)]
    readers = [Caller(READER, str(mnt)) for _ in range(READERS)]
    callers += writers + readers
    pump(callers, lambda: all(w.count("ack") >= 32 for w in writers) and all(r.count("pass") >= 1 for r in readers),
         60, "writers and readers under way")
    assert not any(c.eof for c in callers), [c.lines[-1:] for c in callers]
    st = control.query(str(mnt))
    if mode == "auto":
        assert st["passthrough"]["negotiated"] and st["passthrough"]["opens"] >= WRITERS
        assert "WRITE" not in st["requests"]
    else:
        assert st["requests"]["WRITE"]["count"] >= WRITERS * 32 * BATCH
    assert st["requests"]["FSYNC"]["count"] >= WRITERS * 32

    server.proc.kill()
    assert server.proc.wait(10) == -signal.SIGKILL
    took = pump(callers, all_ended(callers), 10, "every caller got an error")
    for c in callers:
        c.proc.wait(5)
        assert c.end_errno() in DEAD, f"caller ended with {c.lines[-2:]}"
    print(f"\n{mode}: every caller failed within {took:.2f}s of the kill; "
          f"acknowledged records per writer: {[int(w.last('ack').split()[1]) + 1 for w in writers]}")  # type: ignore[union-attr]

    r = fusepass_cli("umount", str(mnt))
    assert r.returncode == 0, r.stderr
    assert "no server was answering" in r.stdout
    assert mountmod.mount_entry(str(mnt)) is None
    assert os.listdir(mnt) == []

    for wid, w in enumerate(writers):
        acked = int(w.last("ack").split()[1])  # type: ignore[union-attr]
        data = (src / f"w{wid}").read_bytes()
        assert len(data) >= (acked + 1) * RECORD, f"writer {wid}: records acknowledged by fsync are missing"
        for seq in range(len(data) // RECORD + 1):  # acknowledged records, then whatever else arrived
            got = data[seq * RECORD:(seq + 1) * RECORD]
            assert got == expected_record(wid, seq)[:len(got)], f"writer {wid}: record {seq} is corrupt"


# --- the source filesystem fills up ---------------------------------------------------------------


@pytest.fixture
def small_source(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, unmounted in teardown (after the server, which depends on it)."""
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "fusepass-enospc", str(path)],
                   check=True, capture_output=True, timeout=30)
    try:
        yield path
    finally:
        if mountmod.mount_entry(str(path)) is not None:
            mountmod.unmount(str(path), lazy=True)


@pytest.fixture(params=["auto", "off"], ids=["passthrough", "served"])
def full_mirror(request: pytest.FixtureRequest, small_source: Path,
                start_server: Callable[..., ServerProcess]) -> tuple[Path, Path]:
    server = start_server(mirror_argv(small_source, "--passthrough", request.param))
    return small_source, Path(server.mountpoint)


def free_bytes(path: Path) -> int:
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def write_all(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def test_full_source_gives_enospc_keeps_data_and_recovers(full_mirror: tuple[Path, Path]) -> None:
    src, mnt = full_mirror
    early = os.urandom(1 << 20)
    write_all(mnt / "early", early)

    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    written = 0
    try:
        with pytest.raises(OSError) as full:
            for _ in range(1000):  # 250 MiB: far more than fits
                written += os.write(fd, b"\xaa" * (256 << 10))
        assert full.value.errno == errno.ENOSPC, full.value
        assert written >= 4 << 20, "the filler stopped long before the source was full"
        more = os.open(mnt / "more", os.O_WRONLY | os.O_CREAT, 0o644)  # an inode is still free on tmpfs...
        try:
            with pytest.raises(OSError) as again:
                os.write(more, b"x" * 4096)  # ...but no block
            assert again.value.errno == errno.ENOSPC
        finally:
            os.close(more)
    finally:
        os.close(fd)

    assert (mnt / "early").read_bytes() == early and (src / "early").read_bytes() == early
    assert (src / "filler").read_bytes() == b"\xaa" * written  # every byte a write() accepted is there
    assert sorted(os.listdir(mnt)) == ["early", "filler", "more"]

    os.unlink(mnt / "filler")
    os.unlink(mnt / "more")
    # The space comes back once the server has closed the file; RELEASE is asynchronous.
    poll_until(lambda: free_bytes(src), lambda free: free >= 6 << 20, "space not freed")

    after = os.urandom(4 << 20)
    write_all(mnt / "after", after)
    assert (mnt / "after").read_bytes() == after and (src / "after").read_bytes() == after
    assert (mnt / "early").read_bytes() == early
    assert sorted(os.listdir(mnt)) == ["after", "early"]


# --- unmount under open files and mappings, then mount again ----------------------------------


class Background:
    """A source and mount point for ``fusepass mount`` in the background. Teardown unmounts,
    and ends any server it was told of (through a pidfd: no pid reuse) that lingers."""

    def __init__(self, tmp_path: Path) -> None:
        self.src, self.mnt = tmp_path / "src", tmp_path / "mnt"
        self.src.mkdir()
        self.mnt.mkdir()
        self.pidfds: list[int] = []

    def mount(self, *args: str) -> int:
        """Mount; return a pidfd of its server."""
        r = fusepass_cli("mount", *args, str(self.src), str(self.mnt))
        assert r.returncode == 0, r.stderr
        pidfd = os.pidfd_open(int(control.query(str(self.mnt))["pid"]))
        self.pidfds.append(pidfd)
        return pidfd

    def cleanup(self) -> None:
        stop_background(self.mnt)
        for pidfd in self.pidfds:
            if not select.select([pidfd], [], [], 10)[0]:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)


@pytest.fixture
def background(tmp_path: Path) -> Iterator[Background]:
    bg = Background(tmp_path)
    yield bg
    bg.cleanup()


@MODES
def test_lazy_umount_keeps_open_files_and_mappings_then_mounts_again(background: Background, mode: str) -> None:
    src, mnt = background.src, background.mnt
    size = 1 << 20
    original = os.urandom(size)
    (src / "mapped").write_bytes(original)
    pidfd = background.mount("--passthrough", mode)
    pid = int(control.query(str(mnt))["pid"])

    fd = os.open(mnt / "mapped", os.O_RDWR)
    mapping = mmap.mmap(fd, size)
    umount: subprocess.Popen[str] | None = None
    try:
        mapping[0:6] = b"BEFORE"
        umount = subprocess.Popen([sys.executable, "-m", "fusepass.cli", "umount", "--lazy", str(mnt)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_unmounted(mnt)
        assert not (mnt / "mapped").exists(), "the mount point still shows the detached mount"
        assert not select.select([pidfd], [], [], 0)[0], "the server exited with files still open"
        # the descriptor and the mapping keep working on the detached mount
        mapping[100:105] = b"WORLD"
        mapping.flush()
        assert os.pwrite(fd, b"AFTER", 200) == 5
        assert os.pread(fd, 6, 0) == b"BEFORE" and os.pread(fd, 5, 100) == b"WORLD"
        assert mapping[200:205] == b"AFTER"
        assert mapping[size - 4096:] == original[size - 4096:]
        os.fsync(fd)
    finally:
        mapping.close()
        os.close(fd)
    assert select.select([pidfd], [], [], 15)[0], "the server did not exit after the last close"
    assert umount is not None
    out, err = umount.communicate(timeout=30)
    assert umount.returncode == 0, err
    assert out.startswith(f"detached {mnt}; server {pid} goes on serving the files open on it"), out

    expected = bytearray(original)
    expected[0:6], expected[100:105], expected[200:205] = b"BEFORE", b"WORLD", b"AFTER"
    assert (src / "mapped").read_bytes() == expected

    background.mount("--passthrough", mode)
    assert (mnt / "mapped").read_bytes() == expected
    r = fusepass_cli("umount", str(mnt))
    assert r.returncode == 0 and "stopped" in r.stdout, (r.stdout, r.stderr)
    assert mountmod.mount_entry(str(mnt)) is None


# --- a stopped server ----------------------------------------------------------------------------

STAT = r"""
import os, sys
try:
    os.stat(sys.argv[1])
    os.write(1, b"ok\n")
except OSError as e:
    os.write(1, b"err %d\n" % e.errno)
"""


def test_stopped_server_cannot_hang_callers_aborting_frees_them(
    start_server: Callable[..., ServerProcess], tmp_path: Path, callers: list[Caller]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    server = start_server(mirror_argv(src))
    assert server.proc is not None and server.connection is not None
    mnt = Path(server.mountpoint)
    assert (mnt / "f").read_bytes() == b"x"
    # Requests the kernel counts as waiting for the server; it sends no event when this changes, so it is polled.
    waiting = Path(mountmod.ensure_fusectl()) / str(server.connection) / "waiting"

    def poll_waiting(done: Callable[[int], bool], what: str) -> None:
        poll_until(lambda: int(waiting.read_text()), done, what)

    poll_waiting(lambda n: n == 0, "the server did not answer the last close")  # RELEASE is asynchronous
    server.signal(signal.SIGSTOP)
    try:
        blocked = Caller(STAT, str(mnt / "never-looked-up"))
        callers.append(blocked)
        poll_waiting(lambda n: n >= 1, "the caller's request never reached the connection")
        assert not select.select([blocked.fd], [], [], 0.2)[0], "a stopped server answered"
        assert blocked.proc.poll() is None

        assert mountmod.abort_connection(server.connection)
        late = Caller(STAT, str(mnt / "f"))
        callers.append(late)
        pump([late], all_ended([late]), 10, "a caller after the abort fails at once")
        assert late.end_errno() == errno.ENOTCONN, late.lines
        if TEST_IO_URING:
            # Over io_uring the request already sits in a ring entry, whose hand-over to the server
            # is task work of the stopped server's thread: the kernel's abort does not end it (only
            # requests not yet in an entry), so the caller is freed once the server runs again.
            server.signal(signal.SIGCONT)
        took = pump([blocked], all_ended([blocked]), 10, "the blocked caller was freed by the abort")
        assert blocked.end_errno() in (errno.ECONNABORTED, errno.ENOTCONN), blocked.lines
        print(f"\nthe blocked caller failed {took * 1000:.0f} ms after the abort")
    finally:
        server.signal(signal.SIGCONT)
    assert server.proc.wait(15) == 0, f"the server did not end cleanly after the abort:\n{server.log()}"
    # it unmounted its dead mount point on the way out, as libfuse's servers do
    assert mountmod.mount_entry(str(mnt)) is None
    assert os.listdir(mnt) == []
    r = fusepass_cli("umount", str(mnt))
    assert r.returncode == 2 and "is not mounted" in r.stderr
