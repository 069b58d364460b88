"""BackingRegistry without a mount: the counting and stickiness rules, given a fake device.

The kernel's rules it keeps: one backing id per inode shared by all its
concurrent opens, closed only at the last release; an inode that cannot be passed through
is served for every open, because mixing modes on one inode gives EIO.
"""

from __future__ import annotations

import errno
import threading

import pytest

from fusepass.backing import BackingRegistry
from fusepass.device import BackingError, BackingId

FAKE_DEVFD = 987654  # never a real descriptor: the fakes below must be the only callers


class FakeDevice:
    """Records backing_open/backing_close calls; hands out increasing ids like the kernel."""

    fd = FAKE_DEVFD

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next_id = 1
        self.opened: list[tuple[int, int]] = []  # (devfd, fd)
        self.closed: list[int] = []
        self.live: set[int] = set()
        self.fail_with: int | None = None

    def backing_open(self, fd: int) -> BackingId:
        with self.lock:
            self.opened.append((self.fd, fd))
            if self.fail_with is not None:
                raise BackingError(self.fail_with, f"FUSE_DEV_IOC_BACKING_OPEN of fd {fd} failed: fake")
            backing_id = self.next_id
            self.next_id += 1
            self.live.add(backing_id)
            return BackingId(self, backing_id)

    def backing_close(self, backing_id: int) -> None:
        with self.lock:
            self.closed.append(backing_id)
            if backing_id not in self.live:
                raise BackingError(errno.ENOENT, "no such backing id")
            self.live.remove(backing_id)


class RefusingDevice:
    """A device on which any backing ioctl is a test failure."""

    def backing_open(self, fd: int) -> BackingId:
        raise AssertionError(f"an ioctl was called: backing_open({fd})")

    def backing_close(self, backing_id: int) -> None:
        raise AssertionError(f"an ioctl was called: backing_close({backing_id})")


@pytest.fixture
def fake() -> FakeDevice:
    return FakeDevice()


@pytest.fixture
def forbidden_ioctls() -> RefusingDevice:
    return RefusingDevice()


def test_unavailable_registry_serves_with_its_reason_and_never_calls_the_ioctl(
    forbidden_ioctls: RefusingDevice,
) -> None:
    reg = BackingRegistry(forbidden_ioctls, "the server lacks CAP_SYS_ADMIN")
    assert reg.acquire(5, fd=3) == (0, "the server lacks CAP_SYS_ADMIN")
    assert reg.acquire(5, fd=3) == (0, "the server lacks CAP_SYS_ADMIN")
    assert reg.acquire(6, fd=None) == (0, "the server lacks CAP_SYS_ADMIN")
    reg.release(5)
    reg.release(5)
    reg.release(6)
    assert reg.passthrough_opens == 0
    assert reg.served_opens == {"the server lacks CAP_SYS_ADMIN": 3}
    assert reg.registered == 0


def test_unavailable_registry_without_a_reason_still_gives_one(forbidden_ioctls: RefusingDevice) -> None:
    reg = BackingRegistry(forbidden_ioctls)
    backing_id, reason = reg.acquire(5, fd=3)
    assert backing_id == 0 and reason


def test_open_without_a_backing_fd_is_served_and_registers_nothing(fake: FakeDevice) -> None:
    reg = BackingRegistry(fake, None)
    backing_id, reason = reg.acquire(5, fd=None)
    assert backing_id == 0 and reason is not None and "no backing file" in reason
    assert fake.opened == []
    reg.release(5)
    assert reg.acquire(5, fd=3) == (1, None), "that reason is not sticky: a later open with a file passes through"


def test_concurrent_opens_of_one_inode_share_one_id(fake: FakeDevice) -> None:
    reg = BackingRegistry(fake, None)
    ids = [reg.acquire(7, fd=10 + i) for i in range(3)]
    assert ids == [(1, None)] * 3
    assert fake.opened == [(FAKE_DEVFD, 10)], "only the first open registers a backing file"
    assert reg.registered == 1
    assert reg.passthrough_opens == 3


def test_different_inodes_get_different_ids(fake: FakeDevice) -> None:
    reg = BackingRegistry(fake, None)
    assert reg.acquire(7, fd=10) == (1, None)
    assert reg.acquire(8, fd=11) == (2, None)
    assert reg.registered == 2


def test_id_is_closed_exactly_once_at_the_last_release(fake: FakeDevice) -> None:
    reg = BackingRegistry(fake, None)
    for fd in (10, 11, 12):
        reg.acquire(7, fd=fd)
    reg.release(7)
    reg.release(7)
    assert fake.closed == [], "closing while opens remain would lock the inode"
    assert reg.registered == 1
    reg.release(7)
    assert fake.closed == [1]
    assert reg.registered == 0
    reg.release(7)  # a stray release (e.g. after close_all) must not close anything again
    assert fake.closed == [1]


def test_inode_is_registered_again_after_its_last_release(fake: FakeDevice) -> None:
    reg = BackingRegistry(fake, None)
    assert reg.acquire(7, fd=10) == (1, None)
    reg.release(7)
    assert reg.acquire(7, fd=11) == (2, None), "a closed id is never reused: a fresh one is registered"
    assert fake.opened == [(FAKE_DEVFD, 10), (FAKE_DEVFD, 11)]


def test_failed_registration_serves_every_open_of_the_inode_with_the_reason(fake: FakeDevice) -> None:
    reg = BackingRegistry(fake, None)
    fake.fail_with = errno.ELOOP
    backing_id, reason = reg.acquire(7, fd=10)
    assert backing_id == 0
    assert reason is not None and reason.startswith("ELOOP")
    fake.fail_with = None  # even if it would now succeed, the inode stays served
    assert reg.acquire(7, fd=11) == (0, reason), "a concurrent open must not pass through (EIO: mixed modes)"
    reg.release(7)
    reg.release(7)
    assert reg.acquire(7, fd=12) == (0, reason), "the reason is sticky across closes"
    assert fake.opened == [(FAKE_DEVFD, 10)], "the ioctl is not retried for a served inode"
    assert reg.served_reason(7) == reason
    assert reg.served_opens == {reason: 3}
    assert reg.passthrough_opens == 0
    assert fake.closed == []


def test_failed_registration_of_one_inode_does_not_affect_another(fake: FakeDevice) -> None:
    reg = BackingRegistry(fake, None)
    fake.fail_with = errno.ELOOP
    reg.acquire(7, fd=10)
    fake.fail_with = None
    assert reg.acquire(8, fd=11) == (1, None)
    assert reg.served_reason(8) is None


def test_forget_drops_a_sticky_reason_once_nothing_is_open(fake: FakeDevice) -> None:
    reg = BackingRegistry(fake, None)
    fake.fail_with = errno.ELOOP
    reg.acquire(7, fd=10)
    fake.fail_with = None
    reg.forget(7)
    assert reg.served_reason(7) is not None, "forget while open must keep the inode served"
    reg.release(7)
    reg.forget(7)
    assert reg.served_reason(7) is None
    assert reg.acquire(7, fd=11) == (1, None)


def test_open_of_an_inode_already_open_served_stays_served_even_with_a_backing_fd(fake: FakeDevice) -> None:
    reg = BackingRegistry(fake, None)
    first = reg.acquire(7, fd=None)  # served: the filesystem gave no backing file
    assert first[0] == 0
    backing_id, reason = reg.acquire(7, fd=10)
    assert backing_id == 0 and reason, "the inode is in cached mode: a passthrough open would get EIO"
    assert fake.opened == []
    reg.release(7)
    reg.release(7)
    assert reg.acquire(7, fd=10) == (1, None), "once all are closed, passthrough is possible again"


def test_close_all_closes_every_registered_id(fake: FakeDevice) -> None:
    reg = BackingRegistry(fake, None)
    reg.acquire(7, fd=10)
    reg.acquire(7, fd=11)
    reg.acquire(8, fd=12)
    reg.close_all()
    assert sorted(fake.closed) == [1, 2]
    assert reg.registered == 0
    reg.release(7)
    assert sorted(fake.closed) == [1, 2]


def test_release_survives_a_failing_close(fake: FakeDevice) -> None:
    reg = BackingRegistry(fake, None)
    reg.acquire(7, fd=10)
    fake.live.clear()  # the connection went away with its ids: BACKING_CLOSE says ENOENT
    reg.release(7)
    assert reg.registered == 0


def test_acquire_and_release_are_thread_safe(fake: FakeDevice) -> None:
    reg = BackingRegistry(fake, None)
    threads, rounds = 8, 1000
    start = threading.Barrier(threads)
    seen: list[set[int]] = [set() for _ in range(threads)]
    errors: list[BaseException] = []
    holder = reg.acquire(1, fd=100)  # held throughout: inode 1 keeps one id
    assert holder == (1, None)

    def work(i: int) -> None:
        try:
            start.wait()
            for n in range(rounds):
                ino = 1 + n % 3  # inode 1 held open, inodes 2 and 3 come and go
                backing_id, reason = reg.acquire(ino, fd=100 + n)
                assert reason is None and backing_id > 0
                if ino == 1:
                    seen[i].add(backing_id)
                reg.release(ino)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert not any(t.is_alive() for t in workers)
    assert errors == []
    assert set().union(*seen) == {1}, "the held inode kept its single id"
    assert reg.registered == 1
    reg.release(1)
    assert reg.registered == 0
    assert reg.passthrough_opens == threads * rounds + 1
    assert fake.live == set(), "every registered id was closed"
    assert len(fake.closed) == len(set(fake.closed)) == len(fake.opened), "each id closed exactly once"


def test_a_forget_drops_the_sticky_reason_of_the_forgotten_inode(fake: FakeDevice) -> None:
    """FORGET means the kernel evicted the inode (no open file left): the dispatcher must drop
    the registry's memory of it too, or a reused node id would inherit a stale reason."""
    import struct

    from fakekernel import FakeKernel

    from fusepass import abi
    from fusepass.ops import Operations

    reg = BackingRegistry(fake, None)
    k = FakeKernel(Operations(), registry=reg)
    fake.fail_with = errno.ELOOP
    reg.acquire(7, fd=10)
    reg.acquire(8, fd=11)
    reg.release(7)
    reg.release(8)
    _, msg = k.message(abi.Opcode.BATCH_FORGET, struct.pack("<II", 1, 0) + struct.pack("<QQ", 7, 1), nodeid=0)
    assert k.send(msg) == []
    assert reg.served_reason(7) is None
    assert reg.served_reason(8) is not None, "only the forgotten inode"


def test_the_filesystems_reason_for_offering_no_descriptor_is_the_one_counted(fake: FakeDevice) -> None:
    reg = BackingRegistry(fake, None)
    assert reg.acquire(7, fd=None, why_no_fd="set-user-ID file") == (0, "set-user-ID file")
    assert reg.acquire(8, fd=None) == (0, "the filesystem gave no backing file")
    assert reg.served_opens == {"set-user-ID file": 1, "the filesystem gave no backing file": 1}
