"""The journal a supervised server keeps, and a successor taking over from it: without a mount,
through the dispatcher as the kernel would drive it (``FakeKernel``)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakekernel import FakeKernel

from fusepass import abi
from fusepass.journal import MIN_COMPACT, Journal, Keeper, create_files
from fusepass.mirror import Mirror

pytestmark = pytest.mark.timeout(30)

R = abi.UNIQUE_RESEND


@pytest.fixture
def files() -> Iterator[tuple[int, int]]:
    fds = create_files()
    yield fds
    for fd in fds:
        os.close(fd)


def test_a_successor_reads_what_was_recorded(files: tuple[int, int]) -> None:
    j = Journal(files)
    assert not j.resumed
    j.init(b"init")
    j.node(5, b"five")
    j.lookup(5, 2)
    j.node(6, b"six")
    j.forget(6, 1)
    j.opened(10000, 5, os.O_RDWR, 42)
    j.opened(3, 5, 0, 44, is_dir=True)
    j.backing(5, 7)
    j.intent(46)
    s = Journal(files).state
    assert s.init == b"init"
    assert s.nodes == {5: (3, b"five")}
    assert s.max_nodeid == 6  # forgotten, but never handed out again
    assert s.files == {10000: (5, os.O_RDWR, 42)} and s.dirs == {3: (5, 44)}
    assert s.backing == {5: 7} and 46 in s.intents


def test_a_record_torn_by_a_crash_is_ignored_with_all_after_it(files: tuple[int, int]) -> None:
    j = Journal(files)
    j.node(5, b"five")
    end = j.size
    j.lookup(5)
    os.pwrite(j.fds[j._active], b"\xff", end + 3)  # the second record's CRC no longer matches
    s = Journal(files).state
    assert s.nodes == {5: (1, b"five")}


def test_a_long_log_is_compacted_and_the_newest_snapshot_wins(files: tuple[int, int]) -> None:
    j = Journal(files)
    j.node(5, b"five")
    j.backing(5, 9)
    j.unbacked(5)
    generation = j.generation
    for _ in range(MIN_COMPACT // 20):
        j.lookup(5)
        j.forget(5, 1)
    assert j.generation > generation
    assert j.size < MIN_COMPACT
    s = Journal(files).state
    assert s.nodes == {5: (1, b"five")} and not s.backing
    assert s.max_backing == 9  # a successor looks for an id registered after it (BackingRegistry.restore)


def test_the_keeper_holds_what_a_server_gives_until_it_is_let_go(files: tuple[int, int], tmp_path: Path) -> None:
    """A descriptor given is the keeper's even after the giver closed its own (and before the keeper
    took it from the socket); the journal says which nodes are kept, across a compaction too."""
    keeper = Keeper()
    j = Journal(files, keeper=os.dup(keeper.server_fd))
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR, 0o600)
    os.write(fd, b"kept")
    j.keep(5, fd)
    os.close(fd)
    os.unlink(tmp_path / "f")  # no name, no descriptor in the giver: only the one in flight
    directory = os.open(tmp_path, os.O_RDONLY)
    j.keep(6, directory)
    os.close(directory)
    keeper.take()
    assert sorted(keeper.held) == [5, 6]
    assert os.pread(keeper.held[5], 4, 0) == b"kept"
    j.let_go(6)
    keeper.take()
    assert sorted(keeper.held) == [5]
    j._compact()
    assert Journal(files).state.kept == {5}
    keeper.close()


def lookup_body(name: bytes) -> bytes:
    return name + b"\0"


def successor(source: Path, files: tuple[int, int]) -> FakeKernel:
    """A dispatcher serving a new mirror that takes over from the journal, as a session does."""
    fs = Mirror(str(source), watch=False)
    k = FakeKernel(fs)
    journal = Journal(files)
    assert fs.persist(journal, 10000)
    k.dispatcher.journal = journal
    k.dispatcher.registry.journal = journal
    if journal.state.init is not None:
        k.dispatcher.resume(journal.state.init)
        fs.restore(journal.state)
    return k


def test_a_successor_serves_the_nodes_and_open_files_of_its_predecessor(tmp_path: Path,
                                                                        files: tuple[int, int]) -> None:
    (tmp_path / "f").write_bytes(b"contents")
    first = successor(tmp_path, files)
    assert first.init().error == 0
    entry = first.call(abi.Opcode.LOOKUP, lookup_body(b"f"))
    nodeid = abi.ENTRY_OUT.unpack_from(entry.payload)[0]
    opened = first.call(abi.Opcode.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=nodeid)
    fh = abi.OPEN_OUT.unpack_from(opened.payload)[0]
    assert fh >= 10000
    fd = os.dup(fh)  # the predecessor dies: its descriptors close
    first.dispatcher.fs.destroy()
    os.close(fd)

    k = successor(tmp_path, files)
    assert k.dispatcher.conn is not None  # INIT negotiated again, not answered
    read = k.call(abi.Opcode.READ, abi.READ_IN.pack(fh, 2, 4, 0, 0, 0, 0), nodeid=nodeid)
    assert read.error == 0 and read.payload == b"nten"
    again = k.call(abi.Opcode.LOOKUP, lookup_body(b"f"))
    assert abi.ENTRY_OUT.unpack_from(again.payload)[0] == nodeid
    assert k.call(abi.Opcode.RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid=nodeid).error == 0
    assert fh not in Journal(files).state.files
    k.dispatcher.fs.destroy()


def test_a_resent_change_its_predecessor_made_succeeds(tmp_path: Path, files: tuple[int, int]) -> None:
    first = successor(tmp_path, files)
    first.init()
    made, msg = first.message(abi.Opcode.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + lookup_body(b"d"))
    assert first.send(msg)[0].error == 0  # made; the reply is lost with the server
    first.dispatcher.fs.destroy()

    k = successor(tmp_path, files)
    again = k.call(abi.Opcode.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + lookup_body(b"d"), unique=made | R)
    assert again.error == 0 and again.unique == made | R
    assert abi.ENTRY_OUT.unpack_from(again.payload)[0] > 1
    # A change no predecessor began keeps its error.
    assert k.call(abi.Opcode.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + lookup_body(b"d")).error == -errno.EEXIST
    k.dispatcher.fs.destroy()


def test_a_resent_release_of_a_number_opened_again_since_is_not_done_twice(tmp_path: Path,
                                                                          files: tuple[int, int]) -> None:
    (tmp_path / "f").write_bytes(b"x")
    k = successor(tmp_path, files)
    k.init()
    nodeid = abi.ENTRY_OUT.unpack_from(k.call(abi.Opcode.LOOKUP, lookup_body(b"f")).payload)[0]

    def open_() -> int:
        reply = k.call(abi.Opcode.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=nodeid)
        return int(abi.OPEN_OUT.unpack_from(reply.payload)[0])

    fh = open_()
    release, msg = k.message(abi.Opcode.RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid=nodeid)
    assert k.send(msg)[0].error == 0  # released; its reply lost
    assert open_() == fh  # the number is taken again by a later open
    _, msg = k.message(abi.Opcode.RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid=nodeid, unique=release | R)
    assert k.send(msg)[0].error == 0
    assert fh in k.dispatcher.fs._files  # the later open is still open
    k.dispatcher.fs.destroy()


def test_a_resent_release_whose_number_an_earlier_open_took_is_not_done_twice(tmp_path: Path,
                                                                              files: tuple[int, int]) -> None:
    """Served concurrently, an OPEN the kernel sent before a RELEASE may take the number that
    release frees: the journal then holds the number for an open older than the release, which
    must still be seen as done when it comes again, resent (or the later open is closed, and the
    inode's backing id with it while the kernel still uses it)."""
    (tmp_path / "f").write_bytes(b"x")
    k = successor(tmp_path, files)
    k.init()
    nodeid = abi.ENTRY_OUT.unpack_from(k.call(abi.Opcode.LOOKUP, lookup_body(b"f")).payload)[0]
    fh = abi.OPEN_OUT.unpack_from(k.call(abi.Opcode.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0),
                                         nodeid=nodeid).payload)[0]
    opening, open_msg = k.message(abi.Opcode.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=nodeid)
    release, release_msg = k.message(abi.Opcode.RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid=nodeid)
    assert opening < release
    assert k.send(release_msg)[0].error == 0  # served first; its reply lost
    assert abi.OPEN_OUT.unpack_from(k.send(open_msg)[0].payload)[0] == fh  # the number taken again
    _, msg = k.message(abi.Opcode.RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid=nodeid, unique=release | R)
    assert k.send(msg)[0].error == 0
    assert fh in k.dispatcher.fs._files  # the later open is still open
    k.dispatcher.fs.destroy()

    # So is it for a successor, which reads the release from the journal.
    k = successor(tmp_path, files)
    _, msg = k.message(abi.Opcode.RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid=nodeid, unique=release | R)
    assert k.send(msg)[0].error == 0
    assert fh in k.dispatcher.fs._files
    k.dispatcher.fs.destroy()


def test_a_resent_lookup_is_counted_once(tmp_path: Path, files: tuple[int, int]) -> None:
    """The predecessor counted a lookup and died before its reply reached the kernel, which resends
    the LOOKUP: the successor counts it once, so the kernel's one FORGET forgets the node."""
    (tmp_path / "f").write_bytes(b"x")
    first = successor(tmp_path, files)
    first.init()
    unique, msg = first.message(abi.Opcode.LOOKUP, lookup_body(b"f"))
    assert first.send(msg)[0].error == 0  # counted; the reply is lost with the server
    first.dispatcher.fs.destroy()

    k = successor(tmp_path, files)
    again = k.call(abi.Opcode.LOOKUP, lookup_body(b"f"), unique=unique | R)
    assert again.error == 0
    nodeid = abi.ENTRY_OUT.unpack_from(again.payload)[0]
    assert k.dispatcher.journal is not None
    assert k.dispatcher.journal.state.nodes[nodeid][0] == 1
    k.dispatcher.fs.destroy()
    # Resent once more (the successor died too before its reply): still counted once, never less.
    k = successor(tmp_path, files)
    third = k.call(abi.Opcode.LOOKUP, lookup_body(b"f"), unique=unique | R)
    nodeid = abi.ENTRY_OUT.unpack_from(third.payload)[0]
    assert k.dispatcher.journal is not None
    assert k.dispatcher.journal.state.nodes[nodeid][0] == 1
    k.send(k.message(abi.Opcode.FORGET, abi.FORGET_IN.pack(1), nodeid=nodeid)[1])
    assert nodeid not in k.dispatcher.journal.state.nodes
    k.dispatcher.fs.destroy()


def test_a_resent_append_its_predecessor_made_is_not_made_twice(tmp_path: Path, files: tuple[int, int]) -> None:
    """A served O_APPEND write whose reply died with the server comes again, resent: appending it
    again would duplicate it. One the predecessor never began is appended."""
    (tmp_path / "log").write_bytes(b"start;")
    first = successor(tmp_path, files)
    first.init()
    nodeid = abi.ENTRY_OUT.unpack_from(first.call(abi.Opcode.LOOKUP, lookup_body(b"log")).payload)[0]
    opened = first.call(abi.Opcode.OPEN, abi.OPEN_IN.pack(os.O_WRONLY | os.O_APPEND, 0), nodeid=nodeid)
    fh = abi.OPEN_OUT.unpack_from(opened.payload)[0]

    def write(data: bytes) -> bytes:
        return abi.WRITE_IN.pack(fh, 6, len(data), 0, 0, os.O_WRONLY | os.O_APPEND, 0) + data

    made, msg = first.message(abi.Opcode.WRITE, write(b"one;"), nodeid=nodeid)
    assert first.send(msg)[0].error == 0  # appended; the reply is lost with the server
    first.dispatcher.fs.destroy()
    with contextlib.suppress(OSError):
        os.close(fh)  # the predecessor dies: its descriptors close

    k = successor(tmp_path, files)
    again = k.call(abi.Opcode.WRITE, write(b"one;"), nodeid=nodeid, unique=made | R)
    assert again.error == 0 and abi.WRITE_OUT.unpack_from(again.payload)[0] == 4
    assert (tmp_path / "log").read_bytes() == b"start;one;"
    never_begun = k.call(abi.Opcode.WRITE, write(b"two;"), nodeid=nodeid, unique=(made + 2) | R)
    assert never_begun.error == 0
    assert k.call(abi.Opcode.WRITE, write(b"three;"), nodeid=nodeid).error == 0
    assert (tmp_path / "log").read_bytes() == b"start;one;two;three;"
    k.dispatcher.fs.destroy()
