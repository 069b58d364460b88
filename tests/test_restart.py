"""A supervised mount (``fusepass mount --supervise``) outlives its server: killed while callers
read, write, list, hold a directory as their cwd and map a file, the server is replaced and
no caller sees an error; the data is what a model says; nothing leaks across restarts."""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, fusepass_cli, mirror_argv, poll_until, stop_background

from fusepass import control
from fusepass.cli import wait_for_exit

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
        server.cleanup()
        for pid in s.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


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


def test_server_killed_again_and_again_no_caller_sees_an_error(supervised: Supervised) -> None:
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
    try:
        workers.start("reader", reader(mnt, data, workers.stop))
        workers.start("writer", writer(mnt, model, workers.stop))
        workers.start("mapper", mapper(mnt, data[: 256 * 1024], workers.stop))
        workers.start("metadata", metadata(mnt, workers.stop))
        rng = random.Random(2)
        for _ in range(KILLS):
            workers.stop.wait(rng.uniform(0.05, 0.4))
            supervised.kill_server()
        workers.stop.wait(0.2)
    finally:
        workers.join()
        out, err = cwd.communicate(b"", timeout=60)  # its stdin ends: it stops
    assert workers.errors == [], supervised.server.log()
    assert cwd.returncode == 0, err.decode()
    assert int(out) > 0
    assert (src / "w.bin").read_bytes() == bytes(model)
    assert len(model) > 0
    restarts = supervised.status()["restarts"]
    print(restarts)
    assert restarts["count"] == KILLS
    assert restarts["last_cause"] == "killed by SIGKILL"
    assert restarts["worst_recovery_ms"] > 0


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
        s.server.cleanup()
        for pid in s.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
