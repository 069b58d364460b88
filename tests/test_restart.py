"""A supervised mount (``fusepass mount --supervise``) outlives its server: killed, or replaced on
request (``fusepass restart``), while callers read, write, list, hold a directory as their cwd and
map a file, the server is replaced and no caller sees an error; the data is what a model says;
nothing leaks across restarts; a restart runs the code on disk, and one that cannot start changes
nothing."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, ServerProcess, fusepass_cli, mirror_argv, poll_until, server_script, stop_background

from fusepass import control
from fusepass.cli import wait_for_exit
from fusepass.device import BackingError, Device

pytestmark = pytest.mark.timeout(180)

BLOCK = 4096
KILLS = 5


def answering_pid(mnt: Path) -> int | None:
    """The pid of the server answering ``status``; None between servers."""
    try:
        return int(control.query(str(mnt))["pid"])
    except OSError:
        return None


class Supervised:
    """A supervised mirror mount and the servers it has had (each killed by pid in teardown if
    it outlived its supervisor)."""

    def __init__(self, server: ServerProcess, source: Path) -> None:
        self.server = server
        self.mnt = server.mountpoint
        self.source = source
        self.pids = {self.status()["pid"]}

    def status(self) -> dict[str, Any]:
        return control.query(str(self.mnt))

    def server_pid(self) -> int | None:
        return answering_pid(self.mnt)

    def kill_server(self) -> int:
        """SIGKILL the server; return the pid of the one that replaced it, once it answers."""
        old = self.server_pid()
        assert old is not None
        os.kill(old, signal.SIGKILL)
        new = poll_until(self.server_pid, lambda pid: pid not in (None, old), "a new server answers", timeout=30)
        self.pids.add(new)
        return int(new)

    def restart(self, *options: str) -> int:
        """``fusepass restart``; return the pid of the server that took over (it answers status)."""
        old = self.server_pid()
        r = fusepass_cli("restart", str(self.mnt), *options)
        assert r.returncode == 0, r.stdout + r.stderr + self.server.log()
        new = self.server_pid()
        assert new is not None and new != old, (old, new, r.stdout)
        assert f"handed over to pid {new}" in r.stdout, r.stdout
        self.pids.add(new)
        return new

    def cleanup(self) -> None:
        """Unmount (the server fixture's teardown), then SIGKILL every server this mount had that
        outlived its supervisor."""
        self.server.cleanup()
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def supervisor_fds(self) -> int:
        assert self.server.proc is not None
        return len(os.listdir(f"/proc/{self.server.proc.pid}/fd"))


@pytest.fixture(params=["on", "off"], ids=["passthrough", "served"])
def supervised(request: pytest.FixtureRequest, start_server: Callable[..., ServerProcess],
               tmp_path: Path) -> Iterator[Supervised]:
    src = tmp_path / "src"
    src.mkdir()
    server = start_server(mirror_argv(src, "--supervise", "--passthrough", request.param))
    s = Supervised(server, src)
    try:
        yield s
    finally:
        s.cleanup()


class Workers:
    """Callers of the mount, each on a thread, recording every error they see."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.threads: list[threading.Thread] = []

    def start(self, name: str, fn: Callable[[], None]) -> None:
        def run() -> None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - every failure is the test's finding
                self.errors.append(f"{name}: {e!r}")

        t = threading.Thread(target=run, name=name, daemon=True)
        self.threads.append(t)
        t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
            assert not t.is_alive(), f"{t.name} is stuck"


def reader(mnt: Path, data: bytes, stop: threading.Event) -> Callable[[], None]:
    def run() -> None:
        rng = random.Random(1)
        with open(mnt / "r.bin", "rb") as held:  # open across every restart
            while not stop.is_set():
                off = rng.randrange(0, len(data) - BLOCK)
                assert os.pread(held.fileno(), BLOCK, off) == data[off : off + BLOCK], f"held read at {off}"
                with open(mnt / "r.bin", "rb") as f:
                    f.seek(off)
                    assert f.read(BLOCK) == data[off : off + BLOCK], f"read at {off}"
    return run


def writer(mnt: Path, model: bytearray, stop: threading.Event, blocks: int = 400) -> Callable[[], None]:
    """Appends blocks, each fsynced; ``model`` is what was fsynced (bounded: ``blocks`` at most)."""
    def run() -> None:
        fd = os.open(mnt / "w.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for i in range(blocks):
                if stop.is_set():
                    break
                block = bytes([i % 251]) * BLOCK
                assert os.pwrite(fd, block, i * BLOCK) == BLOCK
                os.fsync(fd)
                model.extend(block)
        finally:
            os.close(fd)
    return run


def mapper(mnt: Path, data: bytes, stop: threading.Event) -> Callable[[], None]:
    def run() -> None:
        with open(mnt / "m.bin", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            while not stop.is_set():
                for off in range(0, len(data), 64 * 1024):
                    assert m[off : off + BLOCK] == data[off : off + BLOCK], f"mapped page at {off}"
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return run


def metadata(mnt: Path, stop: threading.Event) -> Callable[[], None]:
    def run() -> None:
        i = 0
        while not stop.is_set():
            d = mnt / f"meta{i}"
            d.mkdir()
            (d / "f").write_bytes(b"%d" % i)
            (d / "f").rename(d / "g")
            assert (d / "g").read_bytes() == b"%d" % i
            assert os.listdir(d) == ["g"]
            (d / "g").unlink()
            d.rmdir()
            i += 1
    return run


CWD_SCRIPT = """
import os, select, sys
n = 0
while not select.select([sys.stdin], [], [], 0)[0]:
    assert sorted(os.listdir(".")) == ["f"], os.listdir(".")
    with open("f") as f:
        assert f.read() == "in cwd\\n"
    os.stat("..")
    n += 1
print(n)
"""


def under_workload(supervised: Supervised, disrupt: Callable[[], int], times: int, seed: int,
                   longest: float) -> list[int]:
    """Run the workload (a reader reopening a file, a writer fsyncing every block, a read-only
    mapping, a metadata worker, a process with its cwd inside) while ``disrupt`` replaces the server
    ``times`` times, a random pause of up to ``longest`` seconds apart; assert that no caller saw an
    error and that the source holds every fsynced byte. Returns what ``disrupt`` returned (the pids)."""
    mnt, src = supervised.mnt, supervised.source
    data = random.Random(0).randbytes(1 << 20)
    (src / "r.bin").write_bytes(data)
    (src / "m.bin").write_bytes(data[: 256 * 1024])
    (src / "cwd").mkdir()
    (src / "cwd" / "f").write_text("in cwd\n")
    cwd = subprocess.Popen([sys.executable, "-c", CWD_SCRIPT], cwd=mnt / "cwd", stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    workers = Workers()
    model = bytearray()
    pids = []
    try:
        workers.start("reader", reader(mnt, data, workers.stop))
        workers.start("writer", writer(mnt, model, workers.stop))
        workers.start("mapper", mapper(mnt, data[: 256 * 1024], workers.stop))
        workers.start("metadata", metadata(mnt, workers.stop))
        rng = random.Random(seed)
        for _ in range(times):
            workers.stop.wait(rng.uniform(0.05, longest))
            pids.append(disrupt())
        workers.stop.wait(0.2)
    finally:
        workers.join()
        out, err = cwd.communicate(b"", timeout=60)  # its stdin ends: it stops
    assert workers.errors == [], supervised.server.log()
    assert cwd.returncode == 0, err.decode()
    assert int(out) > 0
    assert (src / "w.bin").read_bytes() == bytes(model)
    assert len(model) > 0
    return pids


def test_server_killed_again_and_again_no_caller_sees_an_error(supervised: Supervised) -> None:
    under_workload(supervised, supervised.kill_server, KILLS, seed=2, longest=0.4)
    restarts = supervised.status()["restarts"]
    assert restarts["count"] == KILLS
    assert restarts["last_cause"] == "killed by SIGKILL"
    assert restarts["worst_recovery_ms"] > 0


RESTARTS = 5


def test_restarted_again_and_again_no_caller_sees_an_error(supervised: Supervised) -> None:
    """``fusepass restart`` in a loop under the kill test's workload: every request in flight is
    answered by the old server or waits for the new one; fsynced data is what the model says; the
    servers and the supervisor hold no more than before."""
    supervisor_fds = supervised.supervisor_fds()
    pids = under_workload(supervised, supervised.restart, RESTARTS, seed=3, longest=0.3)
    assert len(set(pids)) == RESTARTS
    st = supervised.status()
    restarts = st["restarts"]
    assert restarts["count"] == RESTARTS and restarts["last_cause"] == "restart requested", restarts
    assert restarts["worst_recovery_ms"] > 0
    # Every file is closed: nothing is held for it; the supervisor holds what it held (no pipe left over).
    poll_until(lambda: (supervised.status()["passthrough"]["backing_ids"],
                        supervised.status()["filesystem"]["descriptors"]["files"]),
               lambda v: v == (0, 0), "every release reached the server")
    assert supervised.supervisor_fds() == supervisor_fds


def test_nothing_leaks_across_restarts(supervised: Supervised) -> None:
    """Once every file is closed, the server holds no open file and no backing id, restarted or not."""
    mnt, src = supervised.mnt, supervised.source
    for i in range(8):
        (src / f"f{i}").write_bytes(b"x" * 100)
    held = [open(mnt / f"f{i}", "rb") for i in range(8)]
    try:
        supervised.kill_server()
        for f in held:
            assert f.read() == b"x" * 100
        supervised.kill_server()
    finally:
        for f in held:
            f.close()

    def leftovers() -> tuple[int, int]:
        st = supervised.status()
        return st["passthrough"]["backing_ids"], st["filesystem"]["descriptors"]["files"]

    poll_until(leftovers, lambda v: v == (0, 0), "every release reached the server")
    assert supervised.status()["restarts"]["count"] == 2


@pytest.mark.parametrize("loses_its_name", ["unlinked", "renamed over", "O_TMPFILE"])
def test_a_file_open_without_a_name_outlives_its_server(supervised: Supervised, loses_its_name: str) -> None:
    """A file open through the mount that has no name left lives only as long as a descriptor of
    it: the supervisor holds one (a dead server's are gone), so the successor reopens it and serves
    it on, after a crash and after a restart; at its last close the supervisor lets it go."""
    mnt = supervised.mnt
    supervisor_fds = supervised.supervisor_fds()
    if loses_its_name == "O_TMPFILE":
        try:
            fd = os.open(mnt, os.O_TMPFILE | os.O_RDWR, 0o600)
        except OSError as e:
            pytest.skip(f"no O_TMPFILE through FUSE here: {e}")
    else:
        fd = os.open(mnt / "f", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"written first")
        if loses_its_name == "unlinked":
            os.unlink(mnt / "f")
        elif loses_its_name == "renamed over":
            (mnt / "g").write_bytes(b"")
            os.rename(mnt / "g", mnt / "f")
        poll_until(supervised.supervisor_fds, lambda n: n == supervisor_fds + 1, "the supervisor holds the file")
        supervised.kill_server()
        assert supervised.status()["filesystem"]["descriptors"]["kept_by_supervisor"] == 1
        assert os.pread(fd, 64, 0) == b"written first"
        os.pwrite(fd, b", then after a crash", 13)
        os.fsync(fd)
        supervised.restart()
        os.pwrite(fd, b", then after a restart", 33)
        os.fsync(fd)
        assert os.fstat(fd).st_size == 55
        assert os.pread(fd, 64, 0) == b"written first, then after a crash, then after a restart"
        assert os.listdir(supervised.source) == (["f"] if loses_its_name == "renamed over" else [])
    finally:
        os.close(fd)
    poll_until(supervised.supervisor_fds, lambda n: n == supervisor_fds, "the supervisor lets the file go")
    assert supervised.status()["filesystem"]["descriptors"]["kept_by_supervisor"] == 0


@pytest.mark.parametrize("where", ["through the mount", "in the source while no server watched"])
def test_an_open_directory_removed_before_a_crash_fails_cleanly_after_it(supervised: Supervised, where: str) -> None:
    """Not kept (only files are): a directory removed while open cannot be reopened by a successor.
    Its listing then fails with a clean errno, never EIO, and the mount serves on: ESTALE from the
    node's attributes (which the kernel asks for first), or ENOENT from the kernel itself where it
    saw the removal."""
    (supervised.mnt / "d").mkdir()
    fd = os.open(supervised.mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        if where == "through the mount":
            (supervised.mnt / "d").rmdir()
            supervised.kill_server()
        else:
            old = supervised.server_pid()
            assert old is not None
            os.kill(old, signal.SIGSTOP)  # its watcher reads no more: the kernel hears nothing of the removal
            try:
                (supervised.source / "d").rmdir()
            finally:
                os.kill(old, signal.SIGKILL)
            supervised.pids.add(poll_until(supervised.server_pid, lambda pid: pid not in (None, old),
                                           "a new server answers"))
        with pytest.raises(OSError) as e:
            os.listdir(fd)  # fdopendir's fstat: GETATTR of the node
        assert e.value.errno == errno.ESTALE
        assert getdents_errno(fd) == (errno.ENOENT if where == "through the mount" else errno.ESTALE)
    finally:
        os.close(fd)
    assert os.listdir(supervised.mnt) == []


#: getdents64's system call number by architecture (glibc has no wrapper of its own to call).
SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61}


def getdents_errno(fd: int) -> int:
    """The errno of getdents64(2) on ``fd`` (0 if it succeeded): a listing without fdopendir's fstat."""
    number = SYS_GETDENTS64.get(os.uname().machine)
    if number is None:
        pytest.skip(f"getdents64's number on {os.uname().machine} is not known here")
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(4096)
    return 0 if libc.syscall(number, fd, buf, len(buf)) >= 0 else ctypes.get_errno()


def test_a_shared_writable_mapping_outlives_its_server(supervised: Supervised) -> None:
    """Pages written through a MAP_SHARED mapping before, between and after two server deaths are
    all stored once msync returns (served: written back through the successor's reopened file)."""
    pages = 8
    path = supervised.mnt / "mapped"
    path.write_bytes(bytes(pages * mmap.PAGESIZE))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        for round_ in range(3):
            for page in range(round_, pages, 3):
                m[page * mmap.PAGESIZE : page * mmap.PAGESIZE + 6] = b"page%02d" % page
            if round_ == 1:
                m.flush()  # these pages written back before the kill, the others after one
            if round_ < 2:
                supervised.kill_server()
        m.flush()
        os.fsync(f.fileno())
    stored = (supervised.source / "mapped").read_bytes()
    for page in range(pages):
        assert stored[page * mmap.PAGESIZE : page * mmap.PAGESIZE + 6] == b"page%02d" % page, page
    assert stored.count(0) == pages * (mmap.PAGESIZE - 6)


def test_the_kernel_ends_a_connection_left_unanswered_past_its_request_timeout(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """``--request-timeout``, the last line of defence (negotiated at INIT): a server that stops
    answering, with no supervisor to replace it, has its connection aborted by the kernel; the
    waiting caller gets ECONNABORTED instead of waiting for ever (the kernel looks every 15 s).
    Through /dev/fuse only: over io_uring, aborting a connection (by this timeout or by fusectl)
    does not end a request a stopped server's ring entry holds (Linux 6.18: it waits until the
    server dies and its ring is torn down)."""
    src = tmp_path / "src"
    src.mkdir()
    server = start_server(mirror_argv(src, "--request-timeout", "1", "-o", "noio_uring"))
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)  # the fixture's teardown kills it
    began = time.monotonic()
    caller = subprocess.run([sys.executable, "-c", "import os, sys\ntry:\n os.stat(sys.argv[1])\n"
                             "except OSError as e:\n print(e.errno)", str(server.mountpoint / "x")],
                            capture_output=True, text=True, timeout=90, check=False)
    waited = time.monotonic() - began
    assert caller.stdout.strip() == str(errno.ECONNABORTED), (caller.stdout, caller.stderr)
    assert 1 <= waited < 1 + 2 * 15 + 10, waited


def registered_backing_ids(supervisor_pid: int, candidates: range) -> list[int]:
    """The ids among ``candidates`` registered on the connection, found by closing them through the
    supervisor's /dev/fuse descriptor (taken with pidfd_getfd): only for a mount with none in use."""
    fd_dir = f"/proc/{supervisor_pid}/fd"
    number = next(int(n) for n in os.listdir(fd_dir) if os.readlink(f"{fd_dir}/{n}") == "/dev/fuse")
    pidfd = os.pidfd_open(supervisor_pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(438, pidfd, number, 0)  # pidfd_getfd
        assert fd >= 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(pidfd)
    closed = []
    try:
        for backing_id in candidates:
            try:
                Device(fd).backing_close(backing_id)
                closed.append(backing_id)
            except BackingError as e:
                assert e.errno == errno.ENOENT, e
    finally:
        os.close(fd)
    return closed


def test_a_backing_id_registered_by_a_server_killed_before_recording_it_is_closed(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """The one instant the journal cannot cover: the kernel registered a backing file and the server
    died before recording its id. The successor closes it (else it stays registered until unmount)."""
    src, marker = tmp_path / "src", tmp_path / "die"
    src.mkdir()
    (src / "f").write_bytes(b"first")
    (src / "g").write_bytes(b"second")
    server = start_server(server_script("dies_registering", str(marker), "mount", "--foreground", "--supervise",
                                        "--passthrough", "on", str(src)))
    s = Supervised(server, src)
    try:
        assert (s.mnt / "f").read_bytes() == b"first"  # an id registered and recorded
        marker.write_bytes(b"")
        old = s.server_pid()
        assert (s.mnt / "g").read_bytes() == b"second"  # registered, the server killed, the OPEN resent
        assert not marker.exists()
        s.pids.add(poll_until(s.server_pid, lambda pid: pid not in (None, old), "the successor answers status"))
        assert s.status()["restarts"]["last_cause"] == "killed by SIGKILL"
        poll_until(lambda: s.status()["passthrough"]["backing_ids"], lambda n: n == 0,
                   "every release reached the server")
        assert server.proc is not None
        assert registered_backing_ids(server.proc.pid, range(1, 17)) == []
    finally:
        s.cleanup()


def test_changes_made_while_no_server_watched_are_seen(supervised: Supervised) -> None:
    """The kernel caches names and attributes for a day while the source is watched; what changes
    between one server's end and the next one's marks must not stay hidden behind those caches."""
    (supervised.source / "f").write_bytes(b"old")
    (supervised.source / "gone").write_bytes(b"")
    mnt = supervised.mnt
    assert os.stat(mnt / "f").st_size == 3 and (mnt / "gone").exists() and not (mnt / "new").exists()
    old = supervised.server_pid()
    assert old is not None
    os.kill(old, signal.SIGSTOP)  # its watcher reads no more; the events queued for it die with it
    try:
        (supervised.source / "f").write_bytes(b"changed while nobody watched")
        (supervised.source / "gone").unlink()
        (supervised.source / "new").write_bytes(b"")
    finally:
        os.kill(old, signal.SIGKILL)  # ends a stopped process too
    supervised.pids.add(poll_until(supervised.server_pid, lambda pid: pid not in (None, old), "a new server answers"))
    poll_until(lambda: supervised.status()["filesystem"]["watcher"]["notifications"]["overflows"], lambda n: n >= 1,
               "the new server drops what the kernel caches")
    assert os.stat(mnt / "f").st_size == len(b"changed while nobody watched")
    assert (mnt / "f").read_bytes() == b"changed while nobody watched"
    assert not (mnt / "gone").exists() and (mnt / "new").exists()
    assert sorted(os.listdir(mnt)) == ["f", "new"]


def test_background_mount_status_and_umount(tmp_path: Path) -> None:
    """``fusepass mount --supervise`` in the background: ``status`` tells the restarts, ``umount``
    stops the server and its supervisor."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "f").write_text("kept\n")
    assert fusepass_cli("mount", "--supervise", str(src), str(mnt)).returncode == 0
    pids: set[int] = set()
    try:
        st = control.query(str(mnt))
        supervisor = int(st["restarts"]["supervisor_pid"])
        pids.add(int(st["pid"]))
        with open(mnt / "f") as held:
            os.kill(int(st["pid"]), signal.SIGKILL)
            assert held.read() == "kept\n"
            assert (mnt / "f").read_text() == "kept\n"
        new = poll_until(lambda: answering_pid(mnt), lambda pid: pid not in (None, *pids), "a new server answers")
        pids.add(int(new))
        text = fusepass_cli("status", str(mnt)).stdout
        assert f"supervised by pid {supervisor}; restarts: 1 (last " in text and "killed by SIGKILL" in text
        r = fusepass_cli("umount", str(mnt))
        assert r.returncode == 0 and "stopped" in r.stdout, r.stdout + r.stderr
        assert wait_for_exit(supervisor, 10)
    finally:
        stop_background(mnt)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_stopped_server_is_replaced_within_its_deadline(start_server: Callable[..., ServerProcess],
                                                          tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("answered\n")
    s = Supervised(start_server(mirror_argv(src, "--supervise", "--deadline", "1", "-o", "timeout=0")), src)
    try:
        old = s.server_pid()
        assert old is not None
        os.kill(old, signal.SIGSTOP)
        t0 = time.monotonic()
        assert (s.mnt / "f").read_text() == "answered\n"  # waits for the server that replaced it
        waited = time.monotonic() - t0
        # It serves before its status socket is up.
        s.pids.add(poll_until(s.server_pid, lambda pid: pid not in (None, old), "the new server answers status"))
        restarts = s.status()["restarts"]
        assert 1 <= waited < 10, (waited, restarts, s.server.log())
        assert restarts["count"] == 1 and restarts["last_cause"].startswith("hung (no progress for "), \
            (restarts, s.server.log())
    finally:
        s.cleanup()


def copy_of_the_code(where: Path) -> Path:
    """A copy of the fusepass package, to be put first on PYTHONPATH and changed under a running mount."""
    shutil.copytree(REPO / "fusepass", where / "fusepass", ignore=shutil.ignore_patterns("__pycache__"))
    return where / "fusepass"


@pytest.fixture
def supervised_copy(start_server: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[tuple[Supervised, Path]]:
    """A supervised mirror whose servers import fusepass from a copy of the package (tmp_path/code)."""
    code = copy_of_the_code(tmp_path / "code")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("served\n")
    env = {**os.environ, "PYTHONPATH": str(code.parent)}
    s = Supervised(start_server(mirror_argv(src, "--supervise"), env=env), src)
    try:
        yield s, code
    finally:
        s.cleanup()


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rpartition(b")")[2].split()[1])


def set_version(code: Path, version: str) -> None:
    init = code / "__init__.py"
    text = init.read_text()
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', text))
    assert version in init.read_text()


def test_restart_runs_the_code_on_disk_and_crashes_after_it_too(supervised_copy: tuple[Supervised, Path]) -> None:
    s, code = supervised_copy
    old = s.server_pid()
    assert old is not None and s.status()["version"] == "0.1.0"
    set_version(code, "0.1.0+restarted")  # installed after the mount started
    assert s.status()["version"] == "0.1.0"  # the running server has its own copy in memory
    new = s.restart()
    st = s.status()
    assert st["version"] == "0.1.0+restarted", st["version"]
    assert cmdline(new)[1:4] == ["-P", "-m", "fusepass.successor"], cmdline(new)  # executed, not forked
    assert parent(new) == st["restarts"]["supervisor_pid"]
    assert (s.mnt / "f").read_text() == "served\n"
    set_version(code, "0.1.0+again")
    crashed = s.kill_server()  # a successor after a crash runs the code asked for, as it is on disk now
    assert s.status()["version"] == "0.1.0+again" and cmdline(crashed)[1:4] == ["-P", "-m", "fusepass.successor"]
    assert (s.mnt / "f").read_text() == "served\n"
    text = fusepass_cli("status", str(s.mnt)).stdout
    assert "restarts: 2 (last " in text and "killed by SIGKILL" in text, text


def test_a_new_server_that_cannot_start_changes_nothing(supervised_copy: tuple[Supervised, Path]) -> None:
    """New code that does not import: restart fails in one line, exit status 1; the old server serves on."""
    s, code = supervised_copy
    old = s.server_pid()
    (code / "mirror.py").write_text("raise ImportError('broken on purpose')\n")
    r = fusepass_cli("restart", str(s.mnt))
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "broken on purpose" in r.stderr, r.stderr
    assert s.server_pid() == old
    assert (s.mnt / "f").read_text() == "served\n"
    assert s.status()["restarts"]["count"] == 0


@pytest.mark.parametrize("options, says", [
    (["--passthrough", "off"], "negotiated with the kernel at INIT"),
    (["--request-timeout", "30"], "negotiated with the kernel at INIT"),
    (["-o", "ro"], "-o options are the mount's"),
    (["--hide", "f"], "hiding rules cannot change on a restart"),
    (["--rules", "/nonexistent/rules.toml"], "rules file /nonexistent/rules.toml"),
    (["--threads", "0"], "--threads"),
])
def test_options_that_cannot_change_are_refused_and_nothing_restarts(
        supervised_copy: tuple[Supervised, Path], options: list[str], says: str) -> None:
    s, _ = supervised_copy
    old = s.server_pid()
    r = fusepass_cli("restart", str(s.mnt), *options)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
    assert s.server_pid() == old and s.status()["restarts"]["count"] == 0


def test_options_that_may_change_take_effect(supervised_copy: tuple[Supervised, Path], tmp_path: Path) -> None:
    s, _ = supervised_copy
    audit = tmp_path / "audit.jsonl"
    s.restart("--read-only", "f", "--audit-log", str(audit), "--threads", "2")
    st = s.status()
    assert st["threads"] == 2 and st["filesystem"]["policy"]["rules"] == ["read-only f"], st["filesystem"]
    with pytest.raises(OSError) as e:
        open(s.mnt / "f", "a").close()
    assert e.value.errno == 30  # EROFS
    s.restart("--no-rules", "--audit-log", "", "--threads", "3")
    st = s.status()
    assert st["threads"] == 3 and st["filesystem"].get("policy") is None, st["filesystem"]
    with open(s.mnt / "f", "a") as f:
        f.write("more\n")
    assert (s.source / "f").read_text() == "served\nmore\n"
    assert audit.exists() and '"op": "open"' in audit.read_text()


def test_restart_of_a_mount_without_supervisor_is_refused(mirror: ServerProcess) -> None:
    r = fusepass_cli("restart", str(mirror.mountpoint))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is not supervised" in r.stderr, r.stderr


def test_a_new_server_that_hangs_after_taking_over_is_replaced(start_server: Callable[..., ServerProcess],
                                                               tmp_path: Path) -> None:
    """New code that stops itself once given the connection: killed when it is not ready within
    max(deadline, TAKE_OVER_MIN); a server of the supervisor's own code serves the caller that waited."""
    from fusepass.supervisor import TAKE_OVER_MIN

    code = copy_of_the_code(tmp_path / "code")
    cli_py = code / "cli.py"
    text = cli_py.read_text()
    marker = '        """Serve ``fs`` under the supervisor (with ``supervised``, a ``supervisor.ServerMain``)."""\n'
    assert marker in text
    cli_py.write_text(text.replace(marker, marker + "        os.kill(os.getpid(), signal.SIGSTOP)\n"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("served\n")
    env = {**os.environ, "PYTHONPATH": str(code.parent)}
    s = Supervised(start_server(mirror_argv(src, "--supervise", "--deadline", "1", "-o", "timeout=0"), env=env), src)
    try:
        box: dict[str, Any] = {}
        started = threading.Event()

        def restart() -> None:
            started.set()
            box["result"] = fusepass_cli("restart", str(s.mnt))

        t = threading.Thread(target=restart, daemon=True)
        t.start()
        started.wait(10)
        # Wait for the hand-over (the old server exits), then call: the call waits for a server that works.
        old = s.server_pid()
        assert old is not None
        assert wait_for_exit(old, 30)
        t0 = time.monotonic()
        assert (s.mnt / "f").read_text() == "served\n"
        waited = time.monotonic() - t0
        t.join(60)
        r = box["result"]
        assert r.returncode == 1 and "not ready in time" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        new = s.server_pid()
        assert new is not None and new != old
        s.pids.add(new)
        assert cmdline(new)[1:3] != ["-P", "-m"]  # forked: the supervisor's code
        assert waited < TAKE_OVER_MIN + 10, waited
        assert "the new server failed" in s.status()["restarts"]["last_cause"]
    finally:
        s.cleanup()
