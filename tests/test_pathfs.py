"""The path-based layer through real mounts: the memfs system-call tests run against a memory
filesystem and a passthrough loopback written on ``fusepass.pathfs``; then what the layer keeps
for its author (lookup counts, handles, descriptors) after the kernel lets go."""

from __future__ import annotations

import inspect
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import test_memfs
from conftest import NOBODY, ServerProcess, poll_until, python_module, run_as

from fusepass import Attr, Entry, StatfsReply, control
from fusepass.protocol import name_bytes, name_str

pytestmark = pytest.mark.timeout(60)

# Every memfs test that needs only a mount point runs here too, on both path filesystems.
for _name, _test in list(vars(test_memfs).items()):
    if _name.startswith("test_") and list(inspect.signature(_test).parameters) == ["mnt"]:
        globals()[_name] = _test
# The loopback shows its source's figures, not memfs's invented ones.
_MEMFS_ONLY = {"test_statvfs_reports_the_filesystem_numbers"}


@pytest.fixture(params=["path_memfs", "path_loopback"])
def path_server(request: pytest.FixtureRequest, start_server: Callable[..., ServerProcess],
                tmp_path: Path) -> ServerProcess:
    if request.param == "path_loopback":
        if request.node.originalname in _MEMFS_ONLY:
            pytest.skip("memfs's own statfs figures")
        src = tmp_path / "src"
        src.mkdir()
        server = start_server(python_module("fusepass.examples.path_loopback", str(src)))
        server.source = src  # type: ignore[attr-defined]
        return server
    return start_server(python_module("fusepass.examples.path_memfs"))


@pytest.fixture
def mnt(path_server: ServerProcess) -> Path:
    return Path(path_server.mountpoint)


def _filesystem(server: ServerProcess) -> dict[str, int]:
    return control.query(str(server.mountpoint), timeout=5)["filesystem"]


def _drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")  # dentries and inodes: the kernel forgets every node it can


def test_lookup_counts_return_to_zero_once_the_kernel_forgets(path_server: ServerProcess) -> None:
    mnt = Path(path_server.mountpoint)
    for d in range(10):
        os.makedirs(mnt / f"d{d}" / "sub")
        for f in range(20):
            (mnt / f"d{d}" / f"f{f}").write_bytes(b"x" * f)
    for path in mnt.rglob("*"):
        os.stat(path)
    assert _filesystem(path_server)["nodes"] > 200
    _drop_caches()
    after = poll_until(lambda: _filesystem(path_server), lambda fs: fs["nodes"] == 1,
                       "the layer still holds nodes the kernel forgot")
    assert after["lookups"] == 1  # the root's own, never forgotten
    assert after["open_files"] == after["open_dirs"] == 0
    # A name looked up again after the forget gets a fresh node and the same answers.
    assert (mnt / "d3" / "f7").read_bytes() == b"x" * 7


def test_open_files_keep_their_handles_until_the_last_close_and_leak_no_descriptor(
        path_server: ServerProcess) -> None:
    mnt = Path(path_server.mountpoint)
    (mnt / "f").write_bytes(b"data")
    fds = [os.open(mnt / "f", os.O_RDWR) for _ in range(5)]
    dup = os.dup(fds[0])
    try:
        # the RELEASE of write_bytes's own open is asynchronous: it may come after these opens
        poll_until(lambda: _filesystem(path_server), lambda fs: fs["open_files"] == 5,
                   "the five opens (and no other) hold handles")
        for fd in fds:
            os.close(fd)
        assert os.pread(dup, 4, 0) == b"data"  # the open file lives on in the duplicate
    finally:
        os.close(dup)
    fs = poll_until(lambda: _filesystem(path_server), lambda fs: fs["open_files"] == 0,
                    "RELEASE did not free the handles")
    assert fs["layer_descriptors"] == 0
    before = control.query(str(path_server.mountpoint), timeout=5)["open_fds"]
    for _ in range(200):
        with open(mnt / "f", "rb") as f:
            f.read()
    poll_until(lambda: _filesystem(path_server), lambda fs: fs["open_files"] == 0, "handles left open")
    assert control.query(str(path_server.mountpoint), timeout=5)["open_fds"] == before


def test_rename_of_a_directory_moves_the_paths_of_everything_below_it(mnt: Path) -> None:
    os.makedirs(mnt / "a" / "b" / "c")
    (mnt / "a" / "b" / "c" / "f").write_bytes(b"deep")
    os.stat(mnt / "a" / "b" / "c" / "f")  # the kernel now knows every node on the way
    os.rename(mnt / "a", mnt / "z")
    assert (mnt / "z" / "b" / "c" / "f").read_bytes() == b"deep"
    (mnt / "z" / "b" / "c" / "g").write_bytes(b"new")
    assert sorted(os.listdir(mnt / "z" / "b" / "c")) == ["f", "g"]
    assert not (mnt / "a").exists()


def test_a_name_reused_after_unlink_is_a_new_file(mnt: Path) -> None:
    (mnt / "n").write_bytes(b"file")
    assert stat.S_ISREG(os.stat(mnt / "n").st_mode)
    os.unlink(mnt / "n")
    os.mkdir(mnt / "n")  # the same node id with another file type would make the kernel answer EIO
    assert stat.S_ISDIR(os.stat(mnt / "n").st_mode)
    (mnt / "n" / "inside").write_bytes(b"ok")
    assert os.listdir(mnt / "n") == ["inside"]


def test_loopback_data_goes_through_the_kernel_and_reaches_the_source(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(1 << 20))
    server = start_server(python_module("fusepass.examples.path_loopback", str(src), "--passthrough", "on"))
    mnt = Path(server.mountpoint)
    assert (mnt / "big").read_bytes() == (src / "big").read_bytes()
    with open(mnt / "new", "wb") as f:
        f.write(b"written through the mount")
    assert (src / "new").read_bytes() == b"written through the mount"
    status = control.query(str(mnt), timeout=5)
    assert status["passthrough"]["opens"] >= 2 and status["passthrough"]["served_opens"] == 0
    assert "READ" not in status["requests"] and "WRITE" not in status["requests"]


def test_loopback_serves_the_same_data_when_passthrough_is_off(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(300_000)
    (src / "f").write_bytes(data)
    server = start_server(python_module("fusepass.examples.path_loopback", str(src), "--passthrough", "off"))
    mnt = Path(server.mountpoint)
    assert (mnt / "f").read_bytes() == data
    with open(mnt / "f", "r+b") as f:
        f.seek(1000)
        f.write(b"patched")
    assert (src / "f").read_bytes()[1000:1007] == b"patched"
    requests = control.query(str(mnt), timeout=5)["requests"]
    assert requests["READ"]["count"] > 0 and requests["WRITE"]["count"] > 0


def test_path_memfs_files_belong_to_their_creator(public_tmp: Path,
                                                  start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(python_module("fusepass.examples.path_memfs", "-o", "allow_other"),
                          mountpoint=public_tmp / "mnt")
    mnt = Path(server.mountpoint)
    os.chmod(mnt, 0o1777)

    def create() -> tuple[int, int]:
        (mnt / "mine").write_bytes(b"x")
        st = os.stat(mnt / "mine")
        return st.st_uid, st.st_gid

    assert run_as(*NOBODY, create) == NOBODY


# --- the helpers every author needs (no mount) ------------------------------------------------------


def test_names_survive_the_round_trip_whatever_their_bytes() -> None:
    for raw in (b"plain", "caf\u00e9".encode(), b"\xff\xfe not utf-8", b"\x01"):
        assert name_bytes(name_str(raw)) == raw
    for bad in ("", "a/b", "nul\0"):
        with pytest.raises(ValueError):
            name_bytes(bad)


def test_stat_results_become_attributes_entries_and_statfs_replies(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"12345")
    st = os.lstat(f)
    attr = Attr.from_stat(st)
    assert (attr.ino, attr.mode, attr.size, attr.nlink, attr.mtime_ns) == (st.st_ino, st.st_mode, 5, 1,
                                                                            st.st_mtime_ns)
    assert Attr.from_stat(st, ino=7).ino == 7
    entry = Entry.from_stat(42, st, entry_timeout=2.0, attr_timeout=3.0)
    assert (entry.nodeid, entry.attr, entry.entry_timeout, entry.attr_timeout) == (42, attr, 2.0, 3.0)
    sv = os.statvfs(tmp_path)
    reply = StatfsReply.from_statvfs(sv)
    assert (reply.blocks, reply.bsize, reply.namelen, reply.frsize) == (sv.f_blocks, sv.f_bsize, sv.f_namemax,
                                                                       sv.f_frsize)
