"""Kernel passthrough on real mounts.

Data tests use the mirror in a child process and read its counters through the control
socket: "zero READ/WRITE requests" means the kernel moved the bytes itself. The ioctl errno
tests run a ``Session`` in this process, because they need the /dev/fuse descriptor of a
mounted connection; the test thread uses those mounts, never a worker thread.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import mmap
import os
import pickle
import select
import signal
import stat
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SERVERS, ServerProcess, mirror_argv, poll_until, server_script

from fusepass import Attr, Entry, MountOptions, Opened, Operations, Session, control
from fusepass import mount as mountmod
from fusepass.device import BackingError, Device
from fusepass.ops import ROOT_ID, Context

MiB = 1 << 20
DEADLINE = 15.0  # seconds to wait for an asynchronous condition (RELEASE processing)

_spec = importlib.util.spec_from_file_location("nocap_mirror", SERVERS / "nocap_mirror.py")
assert _spec is not None and _spec.loader is not None
nocap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nocap)


# --- helpers -------------------------------------------------------------------------------


def status(server: ServerProcess) -> dict[str, Any]:
    return control.query(str(server.mountpoint))


def count(st: dict[str, Any], opcode: str) -> int:
    return st["requests"].get(opcode, {}).get("count", 0)


def wait_for(server: ServerProcess, condition: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """Poll the server's status until ``condition`` holds; fail after DEADLINE seconds."""
    st: dict[str, Any] = poll_until(lambda: status(server), condition, f"{what}: not reached", DEADLINE)
    return st


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


class Children:
    """Forked worker processes that start together and each send back one picklable result."""

    def __init__(self) -> None:
        self._go_r, self._go_w = os.pipe()
        self._go_open = True
        self._kids: list[tuple[int, int]] = []  # (pid, result pipe)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: wait for the start signal, run, report, _exit
            code = 0
            try:
                os.close(r)
                os.close(self._go_w)
                os.read(self._go_r, 1)  # returns b"" when the parent closes its end
                result: Any = ("ok", fn(*args))
            except BaseException as e:  # noqa: BLE001 - shipped to the parent
                result = ("err", repr(e))
                code = 1
            try:
                os.write(w, pickle.dumps(result))
            finally:
                os._exit(code)
        os.close(w)
        self._kids.append((pid, r))

    def go(self) -> None:
        if self._go_open:
            os.close(self._go_w)
            self._go_open = False

    def close(self) -> None:
        """Kill and reap what still runs, close the start pipe."""
        self.kill()
        self.go()
        os.close(self._go_r)

    def running(self) -> bool:
        """Whether some child has not sent its result yet (it writes it just before exiting)."""
        fds = [r for _, r in self._kids]
        ready, _, _ = select.select(fds, [], [], 0)
        return len(ready) < len(fds)

    def results(self, timeout: float = 60.0) -> list[Any]:
        """Every child's result, in spawn order; fails the test if one fails or overruns."""
        deadline = time.monotonic() + timeout
        raw = []
        for pid, r in self._kids:
            data = _read_until_eof(r, deadline)
            if data is None:
                self.kill()
                pytest.fail(f"child {pid} did not finish within {timeout}s")
            raw.append((pid, data))
        self.reap()
        out = []
        for pid, data in raw:
            kind, value = pickle.loads(data)
            assert kind == "ok", f"child {pid} failed: {value}"
            out.append(value)
        return out

    def reap(self) -> None:
        for pid, r in self._kids:
            os.close(r)
            os.waitpid(pid, 0)
        self._kids = []

    def kill(self) -> None:
        for pid, _ in self._kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.reap()


def _read_until_eof(fd: int, deadline: float) -> bytes | None:
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    yield c
    c.close()


def open_read_close(path: str, expected: bytes, rounds: int, flags: int = os.O_RDONLY) -> dict[str, int]:
    """Open (odd rounds with ``flags``, even ones read-only), read and close ``path`` ``rounds``
    times; count errors by name and wrong reads."""
    errors: Counter[str] = Counter()
    wrong = 0
    for n in range(rounds):
        try:
            fd = os.open(path, flags if n % 2 else os.O_RDONLY)
            try:
                if os.pread(fd, len(expected), 0) != expected:
                    wrong += 1
            finally:
                os.close(fd)
        except OSError as e:
            errors[errno.errorcode.get(e.errno or 0, str(e.errno))] += 1
    return {"errors": dict(errors), "wrong": wrong}


# --- data through passthrough ------------------------------------------------------------


def test_reads_and_writes_pass_through_without_read_or_write_requests(mirror: ServerProcess) -> None:
    src: Path = mirror.source  # type: ignore[attr-defined]
    mnt = Path(mirror.mountpoint)
    data = bytearray(random_file(src / "big", 8 * MiB))

    assert sha256(mnt / "big") == hashlib.sha256(data).hexdigest()  # open 1

    fd = os.open(mnt / "big", os.O_RDWR)  # open 2
    try:
        for offset in (0, 4095, 3 * MiB + 17, 8 * MiB - 10):
            patch = os.urandom(64 * 1024 if offset < 8 * MiB - 64 * 1024 else 10)
            assert os.pwrite(fd, patch, offset) == len(patch)
            data[offset:offset + len(patch)] = patch
            assert os.pread(fd, len(patch), offset) == patch
        tail = os.urandom(1000)
        assert os.pwrite(fd, tail, 8 * MiB + 500) == len(tail)  # past the end: a hole, then data
        data += bytes(500) + tail
    finally:
        os.close(fd)

    fd = os.open(mnt / "big", os.O_WRONLY | os.O_APPEND)  # open 3
    try:
        appended = os.urandom(3 * 4096 + 5)
        assert os.write(fd, appended) == len(appended)
        data += appended
    finally:
        os.close(fd)

    with open(mnt / "new", "wb") as f:  # CREATE: open 4
        f.write(bytes(data[:MiB]))

    assert (src / "big").read_bytes() == data, "the writes landed in the backing file"
    assert (src / "new").read_bytes() == data[:MiB]
    assert sha256(mnt / "big") == hashlib.sha256(data).hexdigest()  # open 5, sees the new size
    st = status(mirror)
    assert st["passthrough"]["negotiated"]
    assert count(st, "READ") == 0
    assert count(st, "WRITE") == 0
    assert st["passthrough"]["opens"] == 5
    assert st["passthrough"]["served_opens"] == 0


def test_mmap_shared_writes_land_in_the_backing_file(mirror: ServerProcess) -> None:
    src: Path = mirror.source  # type: ignore[attr-defined]
    original = random_file(src / "mapped", 1 * MiB)
    patch = os.urandom(5000)
    with open(Path(mirror.mountpoint) / "mapped", "r+b") as f:
        with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
            assert m[:4096] == original[:4096], "the mapping shows the backing file"
            m[12345:12345 + len(patch)] = patch
            m.flush()
    expected = original[:12345] + patch + original[12345 + len(patch):]
    assert (src / "mapped").read_bytes() == expected
    st = status(mirror)
    assert count(st, "READ") == 0 and count(st, "WRITE") == 0
    assert st["passthrough"]["opens"] == 1


def test_eight_processes_opening_one_file_a_thousand_times_never_fail(
    mirror: ServerProcess, children: Children
) -> None:
    src: Path = mirror.source  # type: ignore[attr-defined]
    data = random_file(src / "shared", 64 * 1024)
    path = str(Path(mirror.mountpoint) / "shared")
    procs, rounds = 8, 1000
    for _ in range(procs):
        children.spawn(open_read_close, path, data, rounds)
    children.go()
    results = children.results(timeout=80)
    assert [r["errors"] for r in results] == [{}] * procs, "no EIO (nor anything else) from open or read"
    assert sum(r["wrong"] for r in results) == 0
    st = wait_for(mirror, lambda s: s["passthrough"]["backing_ids"] == 0, "every backing id closed after the RELEASEs")
    assert st["passthrough"]["opens"] == procs * rounds
    assert st["passthrough"]["served_opens"] == 0
    assert count(st, "READ") == 0


def test_file_held_open_keeps_one_shared_id_while_others_open_and_close_it(
    mirror: ServerProcess, children: Children
) -> None:
    src: Path = mirror.source  # type: ignore[attr-defined]
    data = random_file(src / "held", 64 * 1024)
    path = Path(mirror.mountpoint) / "held"
    holder = os.open(path, os.O_RDONLY)
    try:
        procs, rounds = 4, 250
        for _ in range(procs):
            children.spawn(open_read_close, str(path), data, rounds, os.O_RDWR)
        children.go()
        samples = 0
        while children.running():
            assert status(mirror)["passthrough"]["backing_ids"] == 1, "one id for the inode, never a second"
            samples += 1
        results = children.results()
        assert [r["errors"] for r in results] == [{}] * procs
        assert sum(r["wrong"] for r in results) == 0
        assert samples > 0
        assert os.pread(holder, len(data), 0) == data
        st = status(mirror)
        assert st["passthrough"]["backing_ids"] == 1, "the holder still uses it"
        assert st["passthrough"]["opens"] == 1 + procs * rounds, "every open joined passthrough mode"
        assert st["passthrough"]["served_opens"] == 0
        assert count(st, "READ") == 0 and count(st, "WRITE") == 0
    finally:
        os.close(holder)
    wait_for(mirror, lambda s: s["passthrough"]["backing_ids"] == 0, "the id closed at the last release")


# --- stacking ------------------------------------------------------------------------------


def test_mirror_of_a_fuse_mount_uses_max_stack_depth_2_and_passes_through(mirror: ServerProcess, start_server) -> None:
    src: Path = mirror.source  # type: ignore[attr-defined]
    data = random_file(src / "f", 2 * MiB)
    upper = start_server(mirror_argv(Path(mirror.mountpoint)))
    st = status(upper)
    assert st["passthrough"]["negotiated"]
    assert st["passthrough"]["max_stack_depth"] == 2, "the stacked source was detected"
    assert (Path(upper.mountpoint) / "f").read_bytes() == data
    st = status(upper)
    assert count(st, "READ") == 0
    assert st["passthrough"]["opens"] == 1
    assert st["passthrough"]["served_opens"] == 0
    assert count(status(mirror), "READ") == 0, "the lower mount passes through too"


def test_mirror_of_a_fuse_mount_forced_to_depth_1_serves_with_eloop_reason(
    mirror: ServerProcess, start_server
) -> None:
    src: Path = mirror.source  # type: ignore[attr-defined]
    data = random_file(src / "f", 2 * MiB)
    upper = start_server(mirror_argv(Path(mirror.mountpoint), "-o", "max_stack_depth=1"))
    assert status(upper)["passthrough"]["max_stack_depth"] == 1
    path = Path(upper.mountpoint) / "f"
    with open(path, "rb") as first, open(path, "rb") as second:  # two concurrent opens
        assert first.read() == data
        assert second.read() == data
    assert path.read_bytes() == data  # and one after both closed
    st = status(upper)
    pt = st["passthrough"]
    assert pt["negotiated"], "passthrough is negotiated; only this backing file is refused"
    assert pt["opens"] == 0, "never both modes for one inode"
    assert pt["served_opens"] == 3
    [(reason, n)] = pt["served_reasons"].items()
    assert n == 3
    assert reason.startswith("ELOOP") and "max_stack_depth" in reason
    assert count(st, "READ") > 0
    assert pt["backing_ids"] == 0


# --- without CAP_SYS_ADMIN, and the passthrough switch ---------------------------------------


def capabilities(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v, 16) for k, v in (line.split(":") for line in f) if k.startswith("Cap")}


def test_server_without_cap_sys_admin_serves_through_fusermount3_and_says_why(
    start_server, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = random_file(src / "f", 3 * MiB)
    server = start_server(server_script("nocap_mirror", "mount", "--foreground", str(src)))
    st = status(server)
    assert st["pid"] == server.proc.pid  # type: ignore[union-attr]
    caps = capabilities(st["pid"])
    bit = 1 << mountmod.CAP_SYS_ADMIN
    assert not caps["CapEff"] & bit and not caps["CapPrm"] & bit, "mount(2) was impossible: fusermount3 mounted it"
    assert server.mounted()
    pt = st["passthrough"]
    assert not pt["negotiated"]
    assert "CAP_SYS_ADMIN" in pt["why_not"]
    assert (Path(server.mountpoint) / "f").read_bytes() == data
    with open(Path(server.mountpoint) / "f", "rb") as a, open(Path(server.mountpoint) / "f", "rb") as b:
        assert a.read(100) == b.read(100) == data[:100]
    st = status(server)
    assert count(st, "READ") > 0, "READ requests reach the server"
    assert st["passthrough"]["opens"] == 0
    assert st["passthrough"]["served_opens"] == 3
    assert list(st["passthrough"]["served_reasons"]) == [pt["why_not"]], "every open reports the real reason"


def test_passthrough_off_serves_reads(start_server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = random_file(src / "f", 1 * MiB)
    server = start_server(mirror_argv(src, "--passthrough", "off"))
    assert (Path(server.mountpoint) / "f").read_bytes() == data
    st = status(server)
    assert not st["passthrough"]["negotiated"]
    assert "off" in st["passthrough"]["why_not"]
    assert count(st, "READ") > 0
    assert st["passthrough"]["opens"] == 0 and st["passthrough"]["served_opens"] == 1


def test_passthrough_on_passes_through(start_server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = random_file(src / "f", 1 * MiB)
    server = start_server(mirror_argv(src, "--passthrough", "on"))
    assert (Path(server.mountpoint) / "f").read_bytes() == data
    st = status(server)
    assert st["passthrough"]["negotiated"] and st["passthrough"]["mode"] == "on"
    assert count(st, "READ") == 0
    assert st["passthrough"]["opens"] == 1


def test_passthrough_on_without_cap_sys_admin_fails_before_mounting(tmp_path: Path) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    try:
        started = time.monotonic()
        proc = subprocess.run(
            server_script("nocap_mirror", "mount", "--foreground", "--passthrough", "on", str(src), str(mnt)),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )
        elapsed = time.monotonic() - started
        assert proc.returncode == 1, proc.stderr
        assert "passthrough needs CAP_SYS_ADMIN" in proc.stderr, "refused by Session.start, not at INIT"
        assert mountmod.mount_entry(str(mnt)) is None, "nothing was mounted"
        assert elapsed < 5, "a session that never started has no workers to wait for"
    finally:
        if mountmod.mount_entry(str(mnt)) is not None:
            conn = mountmod.connection_id(str(mnt))
            if conn is not None:
                mountmod.abort_connection(conn)
            mountmod.unmount(str(mnt), lazy=True)


# --- the backing ioctls, on in-process sessions ----------------------------------------------


class OneFile(Operations):
    """A root directory holding one regular file ``f``, served (no backing file)."""

    DATA = b"one file on an in-process mount\n" * 64
    FILE = 2

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        if parent != ROOT_ID or name != b"f":
            raise OSError(errno.ENOENT, "no such name")
        return Entry(self.FILE, self.getattr(ctx, self.FILE, None), 60.0, 60.0)

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> Attr:
        if ino == ROOT_ID:
            return Attr(ino=ROOT_ID, mode=stat.S_IFDIR | 0o755, nlink=2)
        if ino == self.FILE:
            return Attr(ino=self.FILE, mode=stat.S_IFREG | 0o644, size=len(self.DATA))
        raise OSError(errno.ENOENT, "no such node")

    def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        return Opened(fh=0)

    def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> bytes:
        return self.DATA[offset:offset + size]


@pytest.fixture
def inprocess(tmp_path: Path) -> Iterator[Callable[..., Session]]:
    """``inprocess(name, **session_kwargs)``: a Session of OneFile at tmp_path/name, to be used
    as a context manager. Teardown backstop: abort and lazily unmount whatever is still mounted."""
    mounts: list[str] = []

    def make(name: str, **kw: Any) -> Session:
        mnt = tmp_path / name
        mnt.mkdir()
        mounts.append(str(mnt))
        return Session(OneFile(), str(mnt), MountOptions(fsname="onefile", subtype="onefile"), threads=2, **kw)

    yield make
    for mnt in reversed(mounts):
        if mountmod.mount_entry(mnt) is not None:
            conn = mountmod.connection_id(mnt)
            if conn is not None:
                mountmod.abort_connection(conn)
            mountmod.unmount(mnt, lazy=True)


@pytest.fixture
def regular_fd(tmp_path: Path) -> Iterator[int]:
    p = tmp_path / "backing"
    p.write_bytes(b"backing data")
    fd = os.open(p, os.O_RDONLY)
    yield fd
    os.close(fd)


def expect(errno_: int, words: str, call: Callable[[], object]) -> BackingError:
    with pytest.raises(BackingError) as info:
        call()
    assert info.value.errno == errno_, f"expected {errno.errorcode[errno_]}, got {info.value}"
    assert words in str(info.value)
    return info.value


def test_backing_open_on_an_unmounted_device_is_eperm(regular_fd: int) -> None:
    dev = Device.open()
    try:
        expect(errno.EPERM, "not mounted", lambda: dev.backing_open(regular_fd))
        expect(errno.EPERM, "not mounted", lambda: dev.backing_close(1))
    finally:
        dev.close()


def test_backing_open_without_negotiated_passthrough_is_eperm(inprocess, regular_fd: int) -> None:
    with inprocess("off", passthrough="off") as s:
        assert not s.registry.available
        expect(errno.EPERM, "not negotiated", lambda: s.device.backing_open(regular_fd))
        expect(errno.EPERM, "not negotiated", lambda: s.device.backing_close(1))


def test_backing_ioctls_without_cap_sys_admin_are_eperm(inprocess, regular_fd: int, children: Children) -> None:
    def without_cap(devfd: int) -> list[int | None]:
        nocap.drop_capability(nocap.CAP_SYS_ADMIN)
        out = []
        dev = Device(devfd)
        for call in (lambda: dev.backing_open(regular_fd), lambda: dev.backing_close(1)):
            try:
                call()
                out.append(0)
            except BackingError as e:
                assert "CAP_SYS_ADMIN" in str(e)
                out.append(e.errno)
        return out

    with inprocess("nocap") as s:
        assert s.registry.available
        children.spawn(without_cap, s.device.fd)
        children.go()
        assert children.results() == [[errno.EPERM, errno.EPERM]]
        s.device.backing_open(regular_fd).close()  # with the capability it works


def test_backing_open_with_nonzero_flags_or_padding_is_einval(inprocess, regular_fd: int) -> None:
    with inprocess("m") as s:
        dev = s.device
        expect(errno.EINVAL, "flags/padding", lambda: dev.backing_open(regular_fd, flags=1))
        expect(errno.EINVAL, "flags/padding", lambda: dev.backing_open(regular_fd, padding=1))
        expect(errno.EINVAL, "flags/padding", lambda: dev.backing_open(9999, flags=1))  # checked before the fd


def test_backing_open_of_a_descriptor_not_open_is_ebadf(inprocess) -> None:
    with inprocess("m") as s:
        for fd in (9999, -1):
            expect(errno.EBADF, "not open", lambda fd=fd: s.device.backing_open(fd))


def test_backing_open_of_a_directory_is_eisdir(inprocess, tmp_path: Path) -> None:
    with inprocess("m") as s:
        d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            expect(errno.EISDIR, "directory", lambda: s.device.backing_open(d))
        finally:
            os.close(d)


def test_backing_open_of_a_non_regular_file_is_einval(inprocess) -> None:
    with inprocess("m") as s:
        r, w = os.pipe()
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            for fd in (r, w, null, s.device.fd):
                expect(errno.EINVAL, "not a regular file", lambda fd=fd: s.device.backing_open(fd))
        finally:
            for fd in (r, w, null):
                os.close(fd)


@pytest.mark.parametrize("depth", [1, 2])
def test_backing_open_of_a_file_on_the_same_mount_is_eloop(inprocess, depth: int) -> None:
    with inprocess("m", max_stack_depth=depth) as s:
        with open(Path(s.mountpoint) / "f", "rb") as f:
            assert f.read() == OneFile.DATA
            expect(errno.ELOOP, "max_stack_depth", lambda: s.device.backing_open(f.fileno()))


def test_backing_file_on_another_passthrough_mount_is_eloop_at_depth_1_and_accepted_at_depth_2(inprocess) -> None:
    with inprocess("lower") as lower, inprocess("upper1") as upper1, inprocess("upper2", max_stack_depth=2) as upper2:
        assert lower.registry.available and upper1.registry.available and upper2.registry.available
        with open(Path(lower.mountpoint) / "f", "rb") as f:
            expect(errno.ELOOP, "max_stack_depth", lambda: upper1.device.backing_open(f.fileno()))
            with upper2.device.backing_open(f.fileno()) as backing:
                assert backing.id >= 1


def test_backing_open_returns_increasing_ids_and_close_frees_them(inprocess, tmp_path: Path, regular_fd: int) -> None:
    path_fd = os.open(tmp_path / "backing", os.O_PATH)
    try:
        with inprocess("m") as s:
            dev = s.device
            first = dev.backing_open(regular_fd)
            second = dev.backing_open(path_fd)  # an O_PATH descriptor is accepted too
            assert 1 <= first.id < second.id
            first.close()
            with second:
                pass
            first.close()  # a second close of the object is a no-op, never another id's close
            for gone in (first, second):
                expect(errno.ENOENT, "no such backing id", lambda gone=gone: dev.backing_close(gone.id))
            expect(errno.ENOENT, "no such backing id", lambda: dev.backing_close(424242))
    finally:
        os.close(path_fd)


def test_backing_close_of_zero_or_negative_id_is_einval(inprocess) -> None:
    with inprocess("m") as s:
        for bad in (0, -1):
            expect(errno.EINVAL, "positive", lambda bad=bad: s.device.backing_close(bad))

