"""The session core against a real kernel: unprivileged mounts, handler errors, interrupts,
concurrency across workers, dying servers, signals, unusable mount points, cache notifications
and the per-opcode counters. Servers run in child processes (tests/servers/ and memfs)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import NOBODY, REPO, python_module, run_as, server_script, wait_unmounted

from fusepass import mount as mountmod

pytestmark = pytest.mark.timeout(90)

SYSTEM_PYTHON = "/usr/bin/python3"
_libc = ctypes.CDLL(None, use_errno=True)
_libc.getxattr.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.getxattr.restype = ctypes.c_ssize_t


# --- helpers ---------------------------------------------------------------------------------


class ControlClient:
    """The test's end of tests/servers/_control.py: commands in, replies and events out."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        os.mkfifo(directory / "cmd")
        os.mkfifo(directory / "events")
        self.directory = directory
        self._events = os.open(directory / "events", os.O_RDONLY | os.O_NONBLOCK)
        self._cmd: int | None = None
        self._partial = b""
        self._lines: list[str] = []
        self._next = 0

    def args(self) -> list[str]:
        return ["--control", str(self.directory)]

    def expect(self, wanted: str, timeout: float = 20.0) -> str:
        """The first line from the server that is ``wanted`` or starts with ``wanted + " "``."""
        deadline = time.monotonic() + timeout
        while True:
            for i, line in enumerate(self._lines):
                if line == wanted or line.startswith(wanted + " "):
                    return self._lines.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"server never said {wanted!r}; it said {self._lines}")
            ready, _, _ = select.select([self._events], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._events, 65536)
            if not chunk:
                raise AssertionError(f"the server closed its event channel while we waited for {wanted!r}")
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            self._lines += [line.decode() for line in lines]

    def command(self, word: str, *args: str) -> str:
        if self._cmd is None:
            self._cmd = os.open(self.directory / "cmd", os.O_WRONLY | os.O_NONBLOCK)
        self._next += 1
        ident = str(self._next)
        os.write(self._cmd, " ".join([ident, word, *args]).encode() + b"\n")
        _, status, result = self.expect(ident).split(" ", 2)
        if status != "ok":
            raise AssertionError(f"server command {word} {args} failed: {result}")
        return result

    def stats(self) -> dict[str, dict[str, int]]:
        path = self.directory / f"stats-{self._next + 1}.json"
        self.command("stats", str(path))
        return json.loads(path.read_text())

    def close(self) -> None:
        for fd in (self._events, self._cmd):
            if fd is not None:
                os.close(fd)


@pytest.fixture
def control(tmp_path: Path) -> Iterator[ControlClient]:
    client = ControlClient(tmp_path / "control")
    yield client
    client.close()


def expect_errno(code: int, fn: Callable[..., Any], *args: Any) -> OSError:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"
    return info.value


def bounded(fn: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Run ``fn`` on a thread and fail if it has not returned within ``timeout``: a request the
    server never answers must fail the test, not hang it. (Teardown then aborts the mount,
    which frees the thread.)"""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"no answer within {timeout}s: the mount stopped serving")
    if "error" in box:
        raise box["error"]
    return box["value"]


class CallerProcess:
    """A forked child that calls getxattr(2) through ctypes, so that nothing retries on EINTR
    as Python's os functions do, with a SIGUSR1 handler installed so that the signal
    interrupts the call instead of killing the child. ``result`` is (return value, errno)."""

    def __init__(self, path: Path, name: str) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: system calls only, then _exit
            status = 1
            try:
                os.close(r)
                signal.signal(signal.SIGUSR1, lambda signum, frame: None)
                buf = ctypes.create_string_buffer(256)
                n = _libc.getxattr(os.fsencode(path), name.encode(), buf, 256)
                os.write(w, f"{n} {ctypes.get_errno() if n < 0 else 0}".encode())
                status = 0
            finally:
                os._exit(status)
        os.close(w)
        self.pid: int | None = pid
        self._r = r

    def finished(self) -> bool:
        return bool(select.select([self._r], [], [], 0)[0])

    def result(self, timeout: float = 20.0) -> tuple[int, int]:
        ready, _, _ = select.select([self._r], [], [], timeout)
        assert ready, f"the caller did not return within {timeout}s"
        text = os.read(self._r, 100).decode()
        self.reap()
        n, err = text.split()
        return int(n), int(err)

    def reap(self) -> None:
        if self.pid is not None:
            pid, self.pid = self.pid, None
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        if self._r >= 0:
            os.close(self._r)
            self._r = -1


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory`` (other test runs may mount elsewhere meanwhile)."""
    prefix = str(directory)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return sorted(p for p in points if p == prefix or p.startswith(prefix + "/"))


def faulty(control: ControlClient, *args: str) -> list[str]:
    return server_script("faulty", *control.args(), *args)


# --- unprivileged mount ------------------------------------------------------------------------


def _system_python_usable() -> str | None:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is missing"
    if mountmod.fusermount_path() is None:
        return "fusermount3 is missing (Debian package fuse3)"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                           capture_output=True, text=True, check=False)
    if probe.stdout.strip() != "True":
        return f"{SYSTEM_PYTHON} is older than the 3.11 fusepass needs"
    return None


@contextlib.contextmanager
def fuse_device_open_to_all() -> Iterator[None]:
    """fusermount3 opens /dev/fuse as the calling user, so the device must be mode 0666, as
    the distribution's udev rule makes it. A machine without udev keeps devtmpfs's 0600:
    open it up while the test mounts, then put the mode back."""
    mode = os.stat(mountmod.DEVICE).st_mode & 0o7777
    if mode & 0o666 != 0o666:
        os.chmod(mountmod.DEVICE, mode | 0o666)
    try:
        yield
    finally:
        os.chmod(mountmod.DEVICE, mode)


@pytest.mark.timeout(60)
def test_unprivileged_mount_goes_through_fusermount3_and_only_the_owner_gets_in(public_tmp, start_server):
    why_not = _system_python_usable()
    if why_not:
        pytest.skip(why_not)
    # A copy of the package that nobody can read (the interpreter under /root is out of reach).
    lib = public_tmp / "lib"
    shutil.copytree(REPO / "fusepass", lib / "fusepass", ignore=shutil.ignore_patterns("__pycache__"))
    for dirpath, _, filenames in os.walk(lib):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    mnt = public_tmp / "mnt"
    mnt.mkdir()
    os.chown(mnt, *NOBODY)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(lib), "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    # -P: do not put the working directory (this repository) on sys.path, so the copy is used
    with fuse_device_open_to_all():
        server = start_server([SYSTEM_PYTHON, "-P", "-m", "fusepass.examples.memfs"], mountpoint=mnt,
                              user=NOBODY, env=env)

    with open(f"/proc/{server.proc.pid}/status") as f:
        uids = next(line.split()[1:] for line in f if line.startswith("Uid:"))
    assert uids == ["65534"] * 4
    with open("/proc/mounts") as f:
        entry = next(line.split() for line in f if line.split()[1] == str(mnt))
    assert entry[2] == "fuse.memfs"
    assert "user_id=65534" in entry[3].split(",") and "group_id=65534" in entry[3].split(",")

    def as_nobody() -> tuple[Any, ...]:
        (mnt / "hello").write_bytes(b"from nobody")
        os.mkdir(mnt / "d")
        st = os.stat(mnt / "hello")
        return (mnt / "hello").read_bytes(), st.st_uid, st.st_gid, sorted(os.listdir(mnt))

    assert run_as(*NOBODY, as_nobody) == (b"from nobody", *NOBODY, ["d", "hello"])
    # Without allow_other the kernel lets only the mounting user in, root included.
    expect_errno(errno.EACCES, os.stat, mnt)
    expect_errno(errno.EACCES, os.listdir, mnt)
    expect_errno(errno.EACCES, os.stat, mnt / "hello")

    # SIGTERM: the unprivileged server unmounts itself through fusermount3 -u and exits 0.
    server.signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0, server.log()
    assert not server.mounted()
    assert "Traceback" not in server.log()


# --- handler errors ----------------------------------------------------------------------------


def test_handler_exception_is_eio_with_a_logged_traceback_and_serving_goes_on(start_server, control):
    server = start_server(faulty(control))
    mnt = Path(server.mountpoint)
    (mnt / "f").write_bytes(b"data")

    expect_errno(errno.EIO, os.stat, mnt / "boom")
    expect_errno(errno.EIO, os.getxattr, mnt / "f", "user.boom")

    # the very next requests are answered
    os.setxattr(mnt / "f", "user.ok", b"fine")
    assert os.getxattr(mnt / "f", "user.ok") == b"fine"
    (mnt / "after").write_bytes(b"still serving")
    assert (mnt / "after").read_bytes() == b"still serving"
    assert server.proc.poll() is None
    log = server.log()
    assert log.count("Traceback (most recent call last)") == 2, log
    assert "handler for LOOKUP raised" in log and "RuntimeError: injected failure for boom" in log
    assert "handler for GETXATTR raised" in log and "RuntimeError: injected failure for user.boom" in log


@pytest.mark.parametrize("code", [
    errno.EPERM, errno.EACCES, errno.EBUSY, errno.ENOSPC, errno.EROFS, errno.ELOOP, errno.EOPNOTSUPP,
    errno.EDQUOT, errno.ENOTRECOVERABLE,
], ids=errno.errorcode.get)
def test_handler_oserror_reaches_the_caller_as_exactly_that_errno(start_server, code):
    server = start_server(server_script("faulty"))
    mnt = Path(server.mountpoint)
    expect_errno(code, os.stat, mnt / f"errno-{code}")
    expect_errno(code, os.getxattr, mnt, f"user.errno.{code}")
    assert "Traceback" not in server.log()  # an OSError is an answer, not a crash


# --- concurrency and interrupts --------------------------------------------------------------------


def test_interrupted_request_ends_with_eintr_while_other_requests_are_answered(start_server, control):
    server = start_server(faulty(control, "--threads", "4"))
    mnt = Path(server.mountpoint)
    (mnt / "target").write_bytes(b"")
    (mnt / "other").write_bytes(b"other data")
    caller = CallerProcess(mnt / "target", "user.block")
    try:
        control.expect("event started block")
        # One worker sits in the handler; the others answer later requests first.
        def meanwhile() -> tuple[Any, ...]:
            os.setxattr(mnt / "other", "user.x", b"1")
            (mnt / "new").write_bytes(b"created while blocked")
            return os.getxattr(mnt / "other", "user.x"), (mnt / "new").read_bytes(), sorted(os.listdir(mnt))

        assert bounded(meanwhile) == (b"1", b"created while blocked", ["new", "other", "target"])
        assert not caller.finished()  # the handler only returns once interrupted
        os.kill(caller.pid, signal.SIGUSR1)
        n, err = caller.result()
        assert (n, errno.errorcode.get(err)) == (-1, "EINTR")
        control.expect("event interrupted block")
    finally:
        caller.reap()
    assert bounded(lambda: os.getxattr(mnt / "other", "user.x")) == b"1"


def test_a_slow_handler_on_one_worker_does_not_hold_up_the_others(start_server, control):
    server = start_server(faulty(control, "--threads", "4"))
    mnt = Path(server.mountpoint)
    (mnt / "slow").write_bytes(b"")
    box: dict[str, Any] = {}
    slow = threading.Thread(target=lambda: box.update(value=os.getxattr(mnt / "slow", "user.slow")), daemon=True)
    slow.start()
    try:
        control.expect("event started slow")

        def other_requests() -> int:
            for i in range(30):
                path = mnt / f"f{i}"
                path.write_bytes(b"%d" % i)
                os.setxattr(path, "user.i", b"%d" % i)
                assert os.getxattr(path, "user.i") == b"%d" % i
            return len(os.listdir(mnt))

        assert bounded(other_requests) == 31
        assert slow.is_alive()  # still waiting for the release
    finally:
        control.command("release")
    slow.join(20)
    assert not slow.is_alive()
    assert box["value"] == b"slow-done"


# --- ends of a session -----------------------------------------------------------------------------


def test_killed_server_leaves_enotconn_and_teardown_unmounts(start_server, control):
    server = start_server(faulty(control))
    mnt = Path(server.mountpoint)
    (mnt / "slow").write_bytes(b"")
    box: dict[str, Any] = {}

    def blocked() -> None:
        try:
            os.getxattr(mnt / "slow", "user.slow")
        except OSError as e:
            box["errno"] = e.errno

    waiter = threading.Thread(target=blocked, daemon=True)
    waiter.start()
    control.expect("event started slow")
    server.proc.kill()
    assert server.proc.wait(10) == -signal.SIGKILL
    waiter.join(10)
    assert not waiter.is_alive(), "a request in flight when the server died never returned"
    # requests the server had read end with ECONNABORTED when the kernel aborts the connection
    assert errno.errorcode.get(box.get("errno")) == "ECONNABORTED"
    expect_errno(errno.ENOTCONN, bounded, lambda: os.stat(mnt))
    expect_errno(errno.ENOTCONN, bounded, lambda: os.listdir(mnt))
    assert server.mounted()  # a dead connection stays mounted until someone unmounts it
    server.stop()
    assert not server.mounted()
    assert os.listdir(mnt) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_unmounts_cleanly_and_exits_zero(start_server, sig):
    server = start_server(python_module("fusepass.examples.memfs"))
    mnt = Path(server.mountpoint)
    (mnt / "f").write_bytes(b"x")
    server.signal(sig)
    assert server.proc.wait(20) == 0, server.log()
    assert not server.mounted()
    assert os.stat(mnt).st_dev == os.stat(mnt.parent).st_dev and os.listdir(mnt) == []
    assert "Traceback" not in server.log()


def test_signal_with_a_file_open_detaches_and_exits_after_the_last_close(start_server):
    server = start_server(python_module("fusepass.examples.memfs"))
    mnt = Path(server.mountpoint)
    fd = os.open(mnt / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"kept")
        server.signal(signal.SIGINT)
        wait_unmounted(mnt)
        assert server.proc.poll() is None  # the connection lives on for the open file
        assert os.pread(fd, 10, 0) == b"kept"
    finally:
        os.close(fd)
    assert server.proc.wait(20) == 0, server.log()
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("case", ["missing", "file", "mounted"])
def test_unusable_mount_point_is_a_clear_error_and_exit_status_1(tmp_path, start_server, case):
    if case == "missing":
        target, reason = tmp_path / "nowhere", "does not exist"
    elif case == "file":
        target, reason = tmp_path / "a-file", "is not a directory"
        target.write_bytes(b"")
    else:
        first = start_server(python_module("fusepass.examples.memfs"))
        target, reason = Path(first.mountpoint), "already a mount point"
        (target / "f").write_bytes(b"first")
    before = mounts_under(tmp_path)
    proc = subprocess.run(python_module("fusepass.examples.memfs", str(target)), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 1
    assert reason in proc.stderr and str(target) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert mounts_under(tmp_path) == before
    if case == "mounted":
        assert (target / "f").read_bytes() == b"first"


# --- cache notifications ---------------------------------------------------------------------------


def test_invalidate_entry_makes_the_kernel_look_the_name_up_again(start_server, control):
    server = start_server(server_script("notifying", *control.args()))
    path = Path(server.mountpoint) / "name"
    path.write_bytes(b"old")
    old = os.stat(path)
    new_ino = int(control.command("replace", "name", "new-content"))
    assert new_ino != old.st_ino
    # entries are cached for an hour: without a notification nothing changes for callers
    st = os.stat(path)
    assert (st.st_ino, st.st_size) == (old.st_ino, 3)
    control.command("inval_entry", "name")
    st = os.stat(path)
    assert (st.st_ino, st.st_size) == (new_ino, len("new-content"))
    assert path.read_bytes() == b"new-content"


def test_invalidate_inode_drops_cached_data_and_attributes(start_server, control):
    server = start_server(server_script("notifying", *control.args()))
    path = Path(server.mountpoint) / "name"
    path.write_bytes(b"aaaa")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == b"aaaa"  # now in the page cache
        # same size, same times: the kernel has no reason to read again...
        ino = int(control.command("set", "name", "bbbb"))
        assert ino == os.fstat(fd).st_ino
        assert os.pread(fd, 100, 0) == b"aaaa"
        # ...until told to
        control.command("inval_inode", str(ino))
        assert os.pread(fd, 100, 0) == b"bbbb"

        assert os.stat(path).st_size == 4  # attributes fetched, now cached for an hour
        control.command("set", "name", "cccccccc")
        assert os.stat(path).st_size == 4
        control.command("inval_inode", str(ino))
        assert os.stat(path).st_size == 8
        assert os.pread(fd, 100, 0) == b"cccccccc"
    finally:
        os.close(fd)


def test_notify_delete_removes_a_cached_name(start_server, control):
    server = start_server(server_script("notifying", *control.args()))
    mnt = Path(server.mountpoint)
    (mnt / "name").write_bytes(b"x")
    (mnt / "other").write_bytes(b"y")
    ino = int(control.command("detach", "name"))
    assert os.stat(mnt / "name").st_ino == ino  # still cached
    control.command("notify_delete", str(ino), "name")
    expect_errno(errno.ENOENT, os.stat, mnt / "name")
    assert os.listdir(mnt) == ["other"]


# --- per-opcode counters -------------------------------------------------------------------------


def _delta(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]], op: str) -> tuple[int, int, int]:
    """(requests, real failures, expected errors) between two snapshots."""
    a, b = after.get(op, {}), before.get(op, {})
    return tuple(a.get(k, 0) - b.get(k, 0) for k in ("requests", "errors", "expected"))  # type: ignore[return-value]


def test_op_stats_count_requests_and_errors_per_opcode(start_server, control):
    server = start_server(faulty(control))
    mnt = Path(server.mountpoint)
    os.setxattr(mnt, "user.x", b"1")

    before = control.stats()
    for i in range(5):
        expect_errno(errno.ENOENT, os.stat, mnt / f"missing-{i}")
    for _ in range(3):
        expect_errno(errno.EACCES, os.getxattr, mnt, "user.errno.13")
    assert os.getxattr(mnt, "user.x") == b"1"
    after = control.stats()
    assert _delta(after, before, "LOOKUP") == (5, 0, 5), "ENOENT to a LOOKUP is an answer, not a failure"
    assert _delta(after, before, "GETXATTR") == (4, 3, 0)
    assert after["INIT"]["requests"] == 1 and after["INIT"]["errors"] == 0
    assert after["LOOKUP"]["p50_ns"] > 0 and after["LOOKUP"]["total_ns"] > 0

    os.mkdir(mnt / "d")
    for i in range(300):
        os.mknod(mnt / "d" / f"entry-{i:04d}", 0o644)
    before = after
    assert len(os.listdir(mnt / "d")) == 300
    after = control.stats()
    assert _delta(after, before, "MKNOD") == (300, 0, 0)
    listing = [_delta(after, before, op) for op in ("READDIRPLUS", "READDIR")]
    assert sum(n for n, _, _ in listing) >= 2 and sum(e for _, e, _ in listing) == 0  # several replies
