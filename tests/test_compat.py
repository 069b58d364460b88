"""fusepy and mfusepy programs, unchanged, through the launcher (``python -m fusepass.compat``),
driven by the same system calls as on the real library where it is installed: same results.
The programs are in tests/compat_programs/; each is written against one library's API."""

from __future__ import annotations

import errno
import importlib.util
import os
import stat
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, ServerProcess

from fusepass import cli, control

pytestmark = pytest.mark.timeout(90)

PROGRAMS = Path(__file__).resolve().parent / "compat_programs"


class Launched(ServerProcess):
    """A program run by fusepass's launcher."""

    def command(self, ready_fd: int) -> list[str]:
        return [sys.executable, "-m", "fusepass.compat", "--ready-fd", str(ready_fd), *self.argv]


class Reference(ServerProcess):
    """The same program on the real library, which reports nothing: a helper waits for the mount."""

    def command(self, ready_fd: int) -> list[str]:
        return [sys.executable, str(PROGRAMS / "reference.py"), "--ready-fd", str(ready_fd), *self.argv]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _inline(tmp_path: Path, source: str) -> Launched:
    """A program written here, to be run through the launcher on ``tmp_path/mnt`` (not started)."""
    program = tmp_path / "program.py"
    program.write_text("import errno, stat, sys\nimport mfusepy\n" + source)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return Launched([str(program), str(mnt)], mnt, env=_env())


def _library_works(module: str) -> str | None:
    """Why the real ``module`` cannot run here, or None."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install '.[test]')"
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=30)
    return None if probe.returncode == 0 else f"{module} cannot load its libfuse: {probe.stderr.strip()[-200:]}"


@pytest.fixture
def run_program(tmp_path: Path) -> Any:
    """``run_program(kind, program, *args)`` mounts at a fresh mount point (appended last)."""
    servers: list[ServerProcess] = []

    def run(kind: type[ServerProcess], program: str, *args: str) -> ServerProcess:
        mnt = tmp_path / f"mnt{len(servers)}"
        mnt.mkdir()
        server = kind([str(PROGRAMS / program), *args, str(mnt)], mnt, env=_env())
        servers.append(server)
        return server.start()

    yield run
    for server in reversed(servers):
        server.cleanup()


def outcome(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, e.errno)


def compare(run_program: Any, program: str, library: str, scenario: Callable[[Path], dict[str, Any]],
            *args: Callable[[], str]) -> dict[str, Any]:
    """Run ``scenario`` on the launched program, and on the real library if it works here;
    assert both give the same results; return ours. ``args`` make each run's arguments."""
    ours = scenario(Path(run_program(Launched, program, *(a() for a in args)).mountpoint))
    why_not = _library_works(library)
    if why_not is None:
        theirs = scenario(Path(run_program(Reference, program, *(a() for a in args)).mountpoint))
        assert ours == theirs
    else:
        warnings.warn(f"{program} not compared with the real library: {why_not}", stacklevel=2)
    return ours


# --- the scenarios ------------------------------------------------------------------------------


def files_and_directories(mnt: Path) -> dict[str, Any]:
    r: dict[str, Any] = {}
    f = mnt / "file"
    with open(f, "wb") as out:
        out.write(b"hello")
    with open(f, "ab") as out:
        out.write(b", world")
    r["read"] = f.read_bytes()
    with open(f, "r+b") as rw:
        rw.seek(7)
        rw.write(b"W")
    r["patched"] = f.read_bytes()
    os.truncate(f, 3)
    r["truncated"] = (f.read_bytes(), os.stat(f).st_size)
    with open(f, "wb") as out:  # O_TRUNC
        out.write(b"new")
    r["rewritten"] = f.read_bytes()
    os.chmod(f, 0o640)
    r["mode"] = oct(os.stat(f).st_mode)
    os.mkdir(mnt / "dir", 0o755)
    r["dir"] = (stat.S_ISDIR(os.stat(mnt / "dir").st_mode), outcome(lambda: os.mkdir(mnt / "dir")))
    os.rename(f, mnt / "dir" / "moved")
    r["after rename"] = (sorted(os.listdir(mnt)), sorted(os.listdir(mnt / "dir")),
                         (mnt / "dir" / "moved").read_bytes())
    os.symlink("dir/moved", mnt / "link")
    r["symlink"] = (os.readlink(mnt / "link"), (mnt / "link").read_bytes())
    r["xattr"] = outcome(lambda: (os.setxattr(mnt / "dir" / "moved", "user.k", b"v"),
                                  os.getxattr(mnt / "dir" / "moved", "user.k"), os.listxattr(mnt / "dir" / "moved")))
    r["missing"] = outcome(lambda: os.stat(mnt / "nope"))
    r["rmdir busy"] = outcome(lambda: os.rmdir(mnt / "dir"))
    os.unlink(mnt / "dir" / "moved")
    os.rmdir(mnt / "dir")
    r["end"] = sorted(os.listdir(mnt))
    return r


def test_a_fusepy_memory_filesystem_runs_unchanged(run_program: Any) -> None:
    r = compare(run_program, "memory.py", "fuse", files_and_directories)
    assert r["read"] == b"hello, world" and r["patched"] == b"hello, World"
    assert r["truncated"] == (b"hel", 3) and r["rewritten"] == b"new"
    assert r["after rename"] == (["dir"], ["moved"], b"new") and r["symlink"] == ("dir/moved", b"new")
    assert r["xattr"] == (None, b"v", ["user.k"]) and r["missing"] == "ENOENT" and r["end"] == ["link"]


def tree_through_a_loopback(mnt: Path) -> dict[str, Any]:
    r = files_and_directories(mnt)
    os.makedirs(mnt / "a" / "b")
    data = bytes(range(256)) * 4096
    (mnt / "a" / "b" / "big").write_bytes(data)
    r["big"] = (mnt / "a" / "b" / "big").read_bytes() == data
    os.link(mnt / "a" / "b" / "big", mnt / "a" / "hard")
    r["nlink"] = os.stat(mnt / "a" / "hard").st_nlink
    os.utime(mnt / "a" / "hard", ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(mnt / "a" / "hard")
    r["times"] = (st.st_atime_ns, st.st_mtime_ns)
    r["statvfs"] = os.statvfs(mnt).f_namemax
    return r


def test_an_mfusepy_loopback_runs_unchanged_and_opts_into_passthrough(run_program: Any, tmp_path: Path) -> None:
    sources = iter(range(2))

    def source() -> str:
        src = tmp_path / f"src{next(sources)}"
        src.mkdir()
        return str(src)

    r = compare(run_program, "loopback.py", "mfusepy", tree_through_a_loopback, source)
    assert r["big"] and r["nlink"] == 2 and r["times"] == (1_000_000_123, 2_000_000_456)
    assert (tmp_path / "src0" / "a" / "b" / "big").stat().st_size == 1 << 20
    status = control.query(str(tmp_path / "mnt0"), timeout=5)
    assert status["passthrough"]["opens"] > 0, status["passthrough"]
    assert "READ" not in status["requests"]  # every byte moved by the kernel


def raw_file_info(mnt: Path) -> dict[str, Any]:
    return {
        "a": (mnt / "a").read_bytes(), "b": (mnt / "b").read_bytes(),
        "opens": [(mnt / "opens").read_bytes() for _ in range(2)],
        "write": outcome(lambda: os.open(mnt / "a", os.O_WRONLY)),
        "listing": sorted((e.name, e.is_file(follow_symlinks=False)) for e in os.scandir(mnt)),
        "whoami": (mnt / "whoami").read_bytes(),
    }


def test_a_raw_fi_program_sets_and_gets_its_file_info(run_program: Any) -> None:
    r = compare(run_program, "rawfi.py", "mfusepy", raw_file_info)
    assert r["a"] == b"alpha\n" and r["b"] == b"bravo bravo\n" and r["write"] == "EROFS"
    assert r["listing"] == [("a", True), ("b", True), ("opens", True), ("whoami", True)]  # types from the tuples
    assert r["opens"] == [b"open 3 of 3\n", b"open 4 of 4\n"]  # direct_io: the size is not trusted
    assert r["whoami"] == f"uid={os.getuid()} gid={os.getgid()} pid={os.getpid()}\n".encode()  # fuse_get_context


def nanosecond_times(mnt: Path) -> dict[str, Any]:
    os.utime(mnt / "f", ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    st = os.stat(mnt / "f")
    return {"times": (st.st_atime_ns, st.st_mtime_ns), "listing": os.listdir(mnt)}


def test_use_ns_keeps_nanoseconds_both_ways(run_program: Any) -> None:
    r = compare(run_program, "nstimes.py", "mfusepy", nanosecond_times)
    assert r["times"] == (1_500_000_000_123_456_789, 1_600_000_000_987_654_321)
    assert r["listing"] == ["f"]  # from readdir_with_offset


def failing_handlers(mnt: Path) -> dict[str, Any]:
    return {
        "FuseOSError": outcome(lambda: open(mnt / "denied", "rb")),
        "unexpected exception": outcome(lambda: open(mnt / "buggy", "rb")),
        "negative return": outcome(lambda: os.unlink(mnt / "negative")),
        "other negative return": outcome(lambda: os.unlink(mnt / "ok")),
        "ValueError": outcome(lambda: os.mkdir(mnt / "new")),
        "still serving": (mnt / "ok").read_bytes(),
    }


def test_errors_raised_or_returned_reach_the_caller(run_program: Any) -> None:
    r = compare(run_program, "raising.py", "mfusepy", failing_handlers)
    assert r == {"FuseOSError": "EACCES", "unexpected exception": "EINVAL", "negative return": "EPERM",
                 "other negative return": "EROFS", "ValueError": "EINVAL", "still serving": b"ok"}


# --- what fusepass cannot do fails clearly ------------------------------------------------------


@pytest.mark.parametrize("body, missing", [
    ("class Fs(mfusepy.Operations):\n    def ioctl(self, path, cmd, arg, fh, flags, data):\n        return 0\n"
     "mfusepy.FUSE(Fs(), sys.argv[1], foreground=True)\n", "ioctl()"),
    ("mfusepy.FUSE(mfusepy.Operations(), sys.argv[1], foreground=True, writeback_cache=True)\n", "writeback_cache"),
])
def test_what_fusepass_cannot_do_stops_the_program_with_its_name(tmp_path: Path, body: str, missing: str) -> None:
    program = _inline(tmp_path, body)  # refused before anything is mounted: run it directly
    done = subprocess.run([sys.executable, "-m", "fusepass.compat", *program.argv], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL, env=_env())
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fusepass.compat: ") and missing in last
    assert "Traceback" not in done.stderr


def test_without_foreground_the_program_goes_to_the_background(tmp_path: Path) -> None:
    server = _inline(tmp_path, "class Fs(mfusepy.Operations):\n    use_ns = True\n"
                               "mfusepy.FUSE(Fs(), sys.argv[1])\n")
    mnt = server.mountpoint
    try:
        server.start()
        assert server.proc is not None and server.proc.wait(10) == 0  # the launcher returned; the mount stays
        daemon = int(control.query(str(mnt), timeout=5)["pid"])
        assert daemon != server.proc.pid and stat.S_ISDIR(os.stat(mnt).st_mode)
    finally:
        server.cleanup()
    assert cli.wait_for_exit(daemon, 10), "the background server did not end at unmount"


def test_a_critical_exception_in_a_handler_unmounts_and_ends_the_program_with_it(tmp_path: Path) -> None:
    server = _inline(tmp_path, "class Fs(mfusepy.Operations):\n    use_ns = True\n"
                               "    def getattr(self, path, fh=None):\n"
                               "        if path == '/quit':\n            raise SystemExit(7)\n"
                               "        return {'st_mode': stat.S_IFDIR | 0o755, 'st_nlink': 2}\n"
                               "mfusepy.FUSE(Fs(), sys.argv[1], foreground=True)\n")
    mnt = server.mountpoint
    try:
        server.start()
        with pytest.raises(OSError):
            os.stat(mnt / "quit")
        assert server.proc is not None and server.proc.wait(20) == 7  # FUSE(...) raised the SystemExit
        assert not server.mounted()
    finally:
        server.cleanup()


def test_the_launcher_explains_its_usage() -> None:
    done = subprocess.run([sys.executable, "-m", "fusepass.compat"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage: python -m fusepass.compat" in done.stderr
