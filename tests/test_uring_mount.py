"""FUSE over io_uring against the real kernel: memfs and the mirror served through the rings, requests
routed to the queue of the caller's CPU, the fallback to /dev/fuse with its reason when enable_uring
is off, and teardown (unmount, abort, a killed server) leaving no ring, thread or mapping behind.
Each test that needs enable_uring sets it and puts back the value it found."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, fusepass_cli, mirror_argv, poll_until, python_module

from fusepass import abi, control, uring_transport
from fusepass import mount as mountmod
from fusepass.examples.memfs import MemFS
from fusepass.session import Session, SessionError

pytestmark = pytest.mark.timeout(90)

QUEUES = uring_transport.possible_cpus()


def status(server: ServerProcess) -> dict[str, Any]:
    return control.query(str(server.mountpoint))


def ring_descriptors(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[io_uring]"
        except OSError:
            pass
    return count


def test_memfs_over_io_uring_serves_posix_operations_and_counts_them_per_queue(enable_uring, start_server):
    server = start_server(python_module("fusepass.examples.memfs", "-o", "io_uring,io_uring_depth=3"))
    mnt = server.mountpoint
    tr = status(server)["transport"]
    assert tr["kind"] == "io_uring", tr
    assert [q["qid"] for q in tr["queues"]] == list(range(QUEUES))
    assert all(q["entries"] == 3 for q in tr["queues"])
    before = sum(q["requests"] for q in tr["queues"])

    (mnt / "d").mkdir()
    f = mnt / "d" / "f"
    f.write_bytes(b"hello " * 10_000)  # 60 kB: WRITE payloads through the ring
    assert f.read_bytes() == b"hello " * 10_000
    os.truncate(f, 5)
    assert f.read_bytes() == b"hello"
    os.chmod(f, 0o600)
    assert f.stat().st_mode & 0o777 == 0o600
    os.symlink("f", mnt / "d" / "s")
    assert os.readlink(mnt / "d" / "s") == "f"
    os.link(f, mnt / "d" / "h")
    assert f.stat().st_nlink == 2
    os.setxattr(f, "user.k", b"v" * 300)
    assert os.getxattr(f, "user.k") == b"v" * 300
    os.rename(mnt / "d" / "h", mnt / "d" / "h2")
    names = [f"n{i:03}" for i in range(200)]
    for name in names:
        (mnt / "d" / name).touch()
    assert sorted(os.listdir(mnt / "d")) == sorted(["f", "s", "h2", *names])
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "d" / "missing")
    with pytest.raises(OSError) as e:
        os.rmdir(mnt / "d")
    assert e.value.errno == errno.ENOTEMPTY
    for name in [*names, "f", "s", "h2"]:
        os.unlink(mnt / "d" / name)
    os.rmdir(mnt / "d")
    assert os.statvfs(mnt).f_namemax > 0

    tr = status(server)["transport"]
    assert sum(q["requests"] for q in tr["queues"]) - before > 400
    text = fusepass_cli("status", str(mnt)).stdout
    assert f"transport: io_uring, {QUEUES} queues of 3 entries; requests per queue 0:" in text


def test_each_request_goes_to_the_queue_of_the_cpu_its_caller_runs_on(enable_uring, start_server):
    server = start_server(python_module("fusepass.examples.memfs", "-o", "io_uring"))
    for cpu in sorted(os.sched_getaffinity(0)):
        before = status(server)["transport"]["queues"][cpu]["requests"]
        code = (f"import os\nos.sched_setaffinity(0, {{{cpu}}})\n"
                f"for i in range(300):\n"
                f"    try: os.stat({str(server.mountpoint)!r} + '/cpu{cpu}-' + str(i))\n"
                f"    except FileNotFoundError: pass\n")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        after = status(server)["transport"]["queues"][cpu]["requests"]
        assert after - before >= 300, (cpu, before, after)


def test_the_mirror_over_io_uring_passes_files_through(enable_uring, start_server, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(b"from the source")
    server = start_server(mirror_argv(src, "-o", "io_uring"))
    mnt = server.mountpoint
    assert (mnt / "old").read_bytes() == b"from the source"
    (mnt / "new").write_bytes(b"through the mount")
    assert (src / "new").read_bytes() == b"through the mount"
    os.rename(mnt / "new", mnt / "renamed")
    assert sorted(os.listdir(mnt)) == ["old", "renamed"]
    st = status(server)
    assert st["transport"]["kind"] == "io_uring"
    assert st["passthrough"]["negotiated"] and st["passthrough"]["opens"] >= 2
    # One entry per queue for the mirror (its handlers never wait for one another); two elsewhere.
    assert [q["entries"] for q in st["transport"]["queues"]] == [1] * QUEUES


def test_with_enable_uring_off_the_mount_serves_through_dev_fuse_and_says_how_to_turn_it_on(
        disable_uring, start_server):
    server = start_server(python_module("fusepass.examples.memfs", "-o", "io_uring"))
    (server.mountpoint / "f").write_bytes(b"x")
    assert (server.mountpoint / "f").read_bytes() == b"x"
    tr = status(server)["transport"]
    assert tr["kind"] == "/dev/fuse" and tr["io_uring_requested"] and tr["queues"] == []
    assert "enable_uring is off" in tr["io_uring_why_not"]
    assert "echo Y > /sys/module/fuse/parameters/enable_uring" in tr["io_uring_why_not"]
    assert ring_descriptors(server.proc.pid) == 0
    text = fusepass_cli("status", str(server.mountpoint)).stdout
    assert "transport: /dev/fuse (io_uring not used: the fuse module parameter enable_uring is off" in text


def test_without_the_option_the_transport_is_dev_fuse(enable_uring, start_server, monkeypatch):
    monkeypatch.delenv("FUSEPASS_IO_URING", raising=False)
    server = start_server(python_module("fusepass.examples.memfs"))
    tr = status(server)["transport"]
    assert tr["kind"] == "/dev/fuse" and not tr["io_uring_requested"]
    assert ring_descriptors(server.proc.pid) == 0


def test_closing_an_in_process_session_leaves_no_ring_thread_or_mapping(enable_uring, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    session = Session(MemFS(), str(mnt), io_uring=True, io_uring_depth=2)
    try:
        session.start()
        assert session.wait_ready(30)
        (mnt / "f").write_bytes(b"in process")
        assert (mnt / "f").read_bytes() == b"in process"
        assert session.over_io_uring
        assert ring_descriptors(os.getpid()) == 2 * QUEUES
        assert sum(t.name.startswith("fusepass-uring") for t in threading.enumerate()) == 2 * QUEUES
        assert session.uring is not None
        entries = session.uring.workers
        assert all(e.buffer is not None and not e.buffer.closed for e in entries)
    finally:
        session.close()
    assert ring_descriptors(os.getpid()) == 0
    assert not any(t.name.startswith("fusepass-uring") for t in threading.enumerate())
    assert "[io_uring]" not in Path("/proc/self/maps").read_text()
    assert all(e.buffer is not None and e.buffer.closed for e in entries)
    assert mountmod.mount_entry(str(mnt)) is None


def test_abort_ends_the_rings_and_the_server(enable_uring, start_server):
    server = start_server(python_module("fusepass.examples.memfs", "-o", "io_uring"))
    (server.mountpoint / "f").touch()
    assert ring_descriptors(server.proc.pid) == uring_transport.DEFAULT_DEPTH * QUEUES
    assert server.connection is not None and mountmod.abort_connection(server.connection)
    assert server.proc.wait(20) == 0
    assert not server.mounted()  # the server unmounts the aborted mount point on its way out


def test_a_killed_server_over_io_uring_leaves_enotconn_and_its_connection_goes_at_unmount(
        enable_uring, start_server):
    server = start_server(python_module("fusepass.examples.memfs", "-o", "io_uring"))
    (server.mountpoint / "f").touch()
    conn = server.connection
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(20)
    with pytest.raises(OSError) as e:
        os.stat(server.mountpoint / "f")
    # ECONNABORTED if the request was queued before the connection ended: the dead process's rings
    # hold its /dev/fuse file until the kernel has cancelled their commands.
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    mountmod.unmount(str(server.mountpoint), lazy=True)
    connections = Path(mountmod.ensure_fusectl())
    poll_until(lambda: (connections / str(conn)).exists(), lambda present: not present,
               "the killed server's connection is released")


def test_with_io_uring_required_a_server_that_would_fall_back_fails_and_leaves_no_mount(
        disable_uring, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEPASS_IO_URING", "require")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    session = Session(MemFS(), str(mnt))
    with pytest.raises(SessionError, match="io_uring required .*enable_uring is off"):
        session.start()
    session.close()
    assert mountmod.mount_entry(str(mnt)) is None
    assert ring_descriptors(os.getpid()) == 0


def test_an_entry_whose_commit_and_fetch_fails_is_registered_again(enable_uring, tmp_path, monkeypatch):
    """The reply to a LOOKUP of "poison" is committed under a unique the kernel does not know: that
    COMMIT_AND_FETCH fails, the entry is registered again, and the queue (of one entry) goes on
    serving its CPU's callers."""
    def poisoning(buf: Any, view: memoryview, o: int) -> Any:
        request = take(buf, view, o)
        if request is not None and request[0].opcode == abi.Opcode.LOOKUP and bytes(request[1]) == b"poison\0":
            return request[0]._replace(unique=request[0].unique + (1 << 40)), request[1]
        return request

    take = uring_transport._request
    monkeypatch.setattr(uring_transport, "_request", poisoning)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    session = Session(MemFS(), str(mnt), io_uring=True, io_uring_depth=1)
    cpu = min(os.sched_getaffinity(0))
    on_cpu = f"import os, sys\nos.sched_setaffinity(0, {{{cpu}}})\nos.stat(sys.argv[1])\n"
    stuck = None
    try:
        session.start()
        assert session.wait_ready(30) and session.over_io_uring
        (mnt / "f").write_bytes(b"x")
        # Its LOOKUP's reply never reaches the kernel: the caller waits (unkillably: the request was
        # sent) until the connection is aborted.
        stuck = subprocess.Popen([sys.executable, "-c", on_cpu, str(mnt / "poison")], stderr=subprocess.DEVNULL)
        assert session.uring is not None
        poll_until(lambda: session.uring.queue_replacements()[cpu], lambda n: n == 1,  # type: ignore[union-attr]
                   "the entry is registered again")
        subprocess.run([sys.executable, "-c", on_cpu, str(mnt / "f")], check=True, timeout=30)
        assert session.transport_status()["queues"][cpu]["replaced"] == 1  # type: ignore[index]
    finally:
        session.abort()  # ends the poisoned LOOKUP (the caller gets ENOTCONN)
        session.close()
        if stuck is not None:
            assert stuck.wait(20) != 0
    assert mountmod.mount_entry(str(mnt)) is None
