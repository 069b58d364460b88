"""Coroutine handlers through real mounts (tests/servers/slow.py, whose handlers mix plain and
``async def``): a thousand slow requests in flight at once on a handful of server threads, the
caller of an interrupted one gets EINTR and its task is cancelled, errors reach callers as
errnos, the bound on requests in flight holds and INTERRUPT and FORGET still get through when it
is reached, and notifications sent from the loop do not block it."""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_IO_URING, ServerProcess, poll_until, server_script
from test_session import CallerProcess, ControlClient, bounded, expect_errno

pytestmark = pytest.mark.timeout(120)
#: The main thread, four workers, the event loop, the status socket and the test's control thread.
HANDFUL = 8


@pytest.fixture
def control(tmp_path: Path) -> Iterator[ControlClient]:
    client = ControlClient(tmp_path / "control")
    yield client
    client.close()


def slow(start_server: Callable[..., ServerProcess], control: ControlClient, *args: str) -> Path:
    return Path(start_server(server_script("slow", *control.args(), *args)).mountpoint)


def all_at_once(n: int, fn: Callable[[int], Any], timeout: float = 60.0) -> list[Any]:
    """``fn(0)`` .. ``fn(n - 1)`` on ``n`` threads released together; their results (an exception
    is a result). Fails if they have not all returned within ``timeout``."""
    start = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - compared by the caller
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return bounded(lambda: [t.join() for t in threads] and results, timeout)


def test_a_thousand_stats_and_reads_each_awaiting_100ms_are_served_at_once_by_a_handful_of_threads(
    start_server: Callable[..., ServerProcess], control: ControlClient
) -> None:
    mnt = slow(start_server, control, "--files", "1000", "--delay", "0.1")

    def stat_and_read(i: int) -> tuple[int, bytes]:
        st = os.stat(mnt / f"f{i}")
        return st.st_size, (mnt / f"f{i}").read_bytes()

    results = all_at_once(1000, stat_and_read)
    assert results == [(len(b"file %d\n" % i), b"file %d\n" % i) for i in range(1000)]
    # Each caller made five requests that each awaited 100 ms (lookup, getattr, lookup, and two
    # reads): one at a time, that is 500 s. They were in flight together instead...
    assert int(control.command("peak")) >= 200
    # ...on the same few threads as ever.
    assert int(control.command("threads")) <= HANDFUL


def test_a_thousand_requests_are_in_flight_at_the_same_moment(
    start_server: Callable[..., ServerProcess], control: ControlClient
) -> None:
    # Each getxattr(user.gate) awaits until a thousand of them are awaiting: they can only
    # return if the server holds all thousand at once.
    mnt = slow(start_server, control, "--files", "1", "--gate", "1000")
    results = all_at_once(1000, lambda i: os.getxattr(mnt / "f0", "user.gate"))
    assert results == [b"gate-open"] * 1000
    assert int(control.command("peak")) >= 1000
    assert int(control.command("threads")) <= HANDFUL


def test_an_interrupted_coroutine_is_cancelled_and_its_caller_gets_eintr(
    start_server: Callable[..., ServerProcess], control: ControlClient
) -> None:
    mnt = slow(start_server, control, "--files", "2", "--delay", "0")
    caller = CallerProcess(mnt / "f0", "user.block")
    try:
        control.expect("event started block")
        assert bounded(lambda: (mnt / "f1").read_bytes()) == b"file 1\n"  # meanwhile, served
        os.kill(caller.pid, signal.SIGUSR1)
        n, err = caller.result()
        assert (n, errno.errorcode.get(err)) == (-1, "EINTR")
        control.expect("event cancelled block")
    finally:
        caller.reap()
    os.setxattr(mnt / "f1", "user.x", b"1")
    assert bounded(lambda: os.getxattr(mnt / "f1", "user.x")) == b"1"
    assert int(control.command("running")) == 0


def test_a_coroutine_that_raises_gives_its_caller_the_errno_and_serving_goes_on(
    start_server: Callable[..., ServerProcess], control: ControlClient
) -> None:
    mnt = slow(start_server, control, "--files", "1", "--delay", "0")
    expect_errno(errno.EDQUOT, os.stat, mnt / f"errno-{errno.EDQUOT}")
    expect_errno(errno.ENOTRECOVERABLE, os.getxattr, mnt / "f0", f"user.errno.{errno.ENOTRECOVERABLE}")
    expect_errno(errno.EIO, os.stat, mnt / "boom")
    expect_errno(errno.EIO, os.getxattr, mnt / "f0", "user.boom")
    expect_errno(errno.ENOENT, os.stat, mnt / "missing")
    assert (mnt / "f0").read_bytes() == b"file 0\n"
    log = control.directory.parent / f"{mnt.name}.server.log"
    text = log.read_text()
    assert text.count("Traceback (most recent call last)") == 2, text
    assert "handler for LOOKUP raised" in text and "handler for GETXATTR raised" in text


def test_plain_and_coroutine_handlers_serve_one_filesystem_together(
    start_server: Callable[..., ServerProcess], control: ControlClient
) -> None:
    mnt = slow(start_server, control, "--files", "3", "--delay", "0.01")
    assert sorted(os.listdir(mnt)) == ["f0", "f1", "f2"]  # plain opendir and readdir
    assert [os.stat(mnt / f"f{i}").st_size for i in range(3)] == [7, 7, 7]  # coroutine lookup, getattr
    with open(mnt / "f2", "rb") as f:  # plain open, coroutine read
        assert f.read() == b"file 2\n"
    os.setxattr(mnt / "f1", "user.colour", b"blue")  # plain
    assert os.getxattr(mnt / "f1", "user.colour") == b"blue"  # coroutine
    os.unlink(mnt / "f0")  # plain
    assert sorted(os.listdir(mnt)) == ["f1", "f2"]
    stats = control.stats()
    assert all(stats[op]["errors"] == 0 for op in ("LOOKUP", "GETATTR", "READ", "GETXATTR", "SETXATTR", "UNLINK"))


def test_the_bound_on_requests_in_flight_holds_the_rest_in_the_kernel(
    start_server: Callable[..., ServerProcess], control: ControlClient
) -> None:
    mnt = slow(start_server, control, "--files", "1", "--max-in-flight", "8")
    done: list[Any] = []
    threads = [threading.Thread(target=lambda: done.append(os.getxattr(mnt / "f0", "user.slow")), daemon=True)
               for _ in range(20)]
    for t in threads:
        t.start()
    for _ in range(8):
        control.expect("event started slow")
    assert int(control.command("running")) == 8  # the other twelve wait in the kernel's queue
    control.command("release")
    bounded(lambda: [t.join() for t in threads])
    assert done == [b"slow-done"] * 20
    assert int(control.command("peak")) == 8


def test_interrupt_and_forget_get_through_while_slow_coroutines_fill_the_bound(
    start_server: Callable[..., ServerProcess], control: ControlClient
) -> None:
    # Sixteen in flight at most: from fourteen on, three of the four workers wait for room and
    # the fourth goes on reading, so that the INTERRUPTs and FORGETs the kernel hands out first
    # are not stuck behind the coroutines.
    mnt = slow(start_server, control, "--files", "2", "--delay", "0", "--max-in-flight", "16")
    os.stat(mnt / "f1")  # the kernel now holds f1's inode: its unlink will bring a FORGET
    callers = []
    try:
        for _ in range(15):
            callers.append(CallerProcess(mnt / "f0", "user.block"))
            control.expect("event started block")
        if not TEST_IO_URING:  # over io_uring, INTERRUPT and FORGET come through /dev/fuse, never behind the bound
            poll_until(lambda: int(control.command("waiting")), lambda n: n == 3, "three workers waiting for room")
        forgotten = int(control.command("forgets"))
        os.unlink(mnt / "f1")  # a plain handler: the reading worker answers it
        poll_until(lambda: int(control.command("forgets")), lambda n: n > forgotten, "the FORGET of f1 handled")
        for caller in callers:
            os.kill(caller.pid, signal.SIGUSR1)
            n, err = caller.result()
            assert (n, errno.errorcode.get(err)) == (-1, "EINTR")
            control.expect("event cancelled block")
    finally:
        for caller in callers:
            caller.reap()
    assert int(control.command("running")) == 0
    assert bounded(lambda: (mnt / "f0").read_bytes()) == b"file 0\n"
    assert int(control.command("peak")) == 16  # the fifteen and the unlink's lookup of f1: never more


def test_notifications_from_the_loop_do_not_block_it(
    start_server: Callable[..., ServerProcess], control: ControlClient
) -> None:
    mnt = slow(start_server, control, "--files", "2", "--delay", "0")
    # The kernel now holds the names f0 and f1 (so that using f1 below takes no lock on the root).
    assert os.stat(mnt / "f0").st_size == os.stat(mnt / "f1").st_size == 7
    # The mkdir's coroutine starts an invalidation of f0 in the root while the kernel holds the
    # root's lock for that mkdir: the kernel makes the notification wait for the lock...
    mkdir = threading.Thread(target=lambda: expect_errno(errno.EROFS, os.mkdir, mnt / "d"), daemon=True)
    mkdir.start()
    control.expect("event mkdir started")
    # ...and meanwhile the loop goes on answering requests.
    assert bounded(lambda: (mnt / "f1").read_bytes()) == b"file 1\n"
    assert control.command("notified") == "pending"
    control.command("release")  # the mkdir ends; the kernel lets go of the root; the notification goes
    control.expect("event notified")
    assert control.command("notified") == "done"
    mkdir.join(20)
    assert not mkdir.is_alive()


def test_invalidate_store_and_retrieve_from_the_loop(
    start_server: Callable[..., ServerProcess], control: ControlClient
) -> None:
    mnt = slow(start_server, control, "--files", "2", "--delay", "0")
    fd = os.open(mnt / "f1", os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == b"file 1\n"
        assert control.command("rewrite", "1", "rewritten") == "rewritten"  # awaited on the loop
        assert os.pread(fd, 100, 0) == b"rewritten"
    finally:
        os.close(fd)
    # direct_io opens bypass the page cache, but the kernel keeps one for the inode all the same
    fd = os.open(mnt / "f0", os.O_RDONLY)  # the kernel holds f0's inode while it is open
    try:
        assert control.command("store", "0", "stored-page") == "stored"
        assert control.command("retrieve", "0").startswith("stored-page")
    finally:
        os.close(fd)
