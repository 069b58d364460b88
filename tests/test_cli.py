"""The fusepass command as an operator uses it: real mounts, the installed script, exit codes and messages."""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import DEAD_SERVER_ERRNOS, NOBODY, ServerProcess, expected_threads, run_as, stop_background

from fusepass import cli
from fusepass import mount as mountmod
from fusepass.mirror import Mirror
from fusepass.serve import USAGE

BIN = Path(sys.executable).parent
FUSEPASS = str(BIN / "fusepass")


def fusepass(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FUSEPASS, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    yield src, mnt
    stop_background(mnt)


def assert_not_mounted(mnt: Path) -> None:
    assert mountmod.mount_entry(str(mnt)) is None, f"{mnt} was left mounted"


def test_mount_use_status_umount(dirs: tuple[Path, Path]) -> None:
    src, mnt = dirs
    payload = os.urandom(3 << 20)
    (src / "data").write_bytes(payload)
    r = fusepass("mount", str(src), str(mnt))
    assert r.returncode == 0, r.stderr
    assert mountmod.mount_entry(str(mnt))[1] == "fuse.fusepass"  # type: ignore[index]
    before = json.loads(fusepass("status", str(mnt), "--json").stdout)
    assert (mnt / "data").read_bytes() == payload
    (mnt / "new").write_bytes(b"written through the mount")
    r = fusepass("status", str(mnt), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["mountpoint"] == str(mnt)
    assert st["filesystem"]["source"] == str(src)
    assert st["passthrough"]["negotiated"] is True and st["passthrough"]["why_not"] is None
    assert st["passthrough"]["opens"] >= before["passthrough"]["opens"] + 2
    assert "READ" not in st["requests"] and "WRITE" not in st["requests"]
    assert st["requests"]["CREATE"]["count"] == 1
    assert st["requests"]["OPEN"]["count"] >= 1
    assert st["options"]["default_permissions"] is True
    assert st["open_fds"] > 0 and st["pid"] > 0 and st["threads"] == expected_threads(st, 4)
    assert (src / "new").read_bytes() == b"written through the mount"
    text = fusepass("status")
    assert str(mnt) in text.stdout and "passthrough: on" in text.stdout
    r = fusepass("umount", str(mnt))
    assert r.returncode == 0, r.stderr
    assert f"server {st['pid']} stopped" in r.stdout
    assert_not_mounted(mnt)


def test_passthrough_off_serves_reads_and_says_why(dirs: tuple[Path, Path]) -> None:
    src, mnt = dirs
    (src / "f").write_bytes(b"abc" * 1000)
    assert fusepass("mount", "--passthrough", "off", str(src), str(mnt)).returncode == 0
    assert (mnt / "f").read_bytes() == b"abc" * 1000
    st = json.loads(fusepass("status", str(mnt), "--json").stdout)
    assert st["passthrough"]["negotiated"] is False
    assert "off" in st["passthrough"]["why_not"]
    assert st["requests"]["READ"]["count"] >= 1
    assert st["passthrough"]["served_opens"] >= 1


def test_read_only_option_refuses_writes(dirs: tuple[Path, Path]) -> None:
    src, mnt = dirs
    (src / "f").write_bytes(b"x")
    assert fusepass("mount", str(src), str(mnt), "-o", "ro").returncode == 0
    with pytest.raises(OSError) as e:
        (mnt / "g").write_bytes(b"y")
    assert e.value.errno == errno.EROFS
    assert not (src / "g").exists()


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda s, m: [str(s / "missing"), str(m)], "does not exist"),
        (lambda s, m: [str(s / "file"), str(m)], "not a directory"),
        (lambda s, m: [str(s), str(m / "missing")], "does not exist"),
        (lambda s, m: [str(s), str(s / "file")], "not a directory"),
        (lambda s, m: [str(s), str(s / "sub")], "inside the source"),
        (lambda s, m: [str(s), str(m), "-o", "bogus_option"], "unknown mount option: bogus_option"),
        (lambda s, m: [str(s), str(m), "-o", "timeout=soon"], "bad value in mount option"),
        (lambda s, m: [str(s), str(m), "-o", "timeout=-1"], "timeout must be a number of seconds from 0"),
        (lambda s, m: [str(s), str(m), "-o", "timeout=nan"], "timeout must be a number of seconds from 0"),
        (lambda s, m: [str(s), str(m), "-o", "timeout=inf"], "timeout must be a number of seconds from 0"),
        (lambda s, m: [str(s), str(m), "-o", "timeout=1e300"], "timeout must be a number of seconds from 0"),
        (lambda s, m: [str(s), str(m), "-o", "max_path_fds=0"], "max_path_fds must be at least 1"),
        (lambda s, m: [str(s), str(m), "-o", "max_path_fds=-5"], "max_path_fds must be at least 1"),
        (lambda s, m: [str(s), str(m), "-o", "max_stack_depth=3"], "max_stack_depth must be 1 or 2"),
        (lambda s, m: [str(s), str(m), "-o", "fsname=a=b"], "fsname 'a=b' must be"),
        (lambda s, m: [str(s), str(m), "--threads", "0"], "--threads: must be a whole number from 1"),
        (lambda s, m: [str(s), str(m), "--threads", "-2"], "--threads: must be a whole number from 1"),
        (lambda s, m: [str(s), str(m), "--threads", "many"], "--threads: must be a whole number from 1"),
        (lambda s, m: [str(s), str(m), "--passthrough", "maybe"], "invalid choice: 'maybe'"),
        (lambda s, m: [str(s), str(m), "--deny", "x,uid=root"], "uid must be a number"),
        (lambda s, m: [str(s), str(m), "--hide", "a/../b"], "'..'"),
        (lambda s, m: [str(s), str(m), "--rules", str(s / "none.toml")], "No such file or directory"),
        (lambda s, m: [str(s), str(m), "--audit-log", str(s / "no" / "dir")], "cannot open the audit log"),
        (lambda s, m: [str(s), str(m), "--log", str(s / "no" / "dir")], "cannot write the log"),
        (lambda s, m: [str(s)], "the following arguments are required: mountpoint"),
        (lambda s, m: [str(s), str(m), "--deadline", "5"], "--deadline needs --supervise"),
        (lambda s, m: [str(s), str(m), "--supervise", "-o", "io_uring"], "--supervise cannot be combined with"),
    ],
    ids=["source-missing", "source-not-dir", "mountpoint-missing", "mountpoint-not-dir", "loop", "unknown-option",
         "bad-value", "negative-timeout", "nan-timeout", "infinite-timeout", "absurd-timeout", "zero-fds",
         "negative-fds", "bad-depth", "fsname-with-equals", "zero-threads", "negative-threads", "word-threads",
         "bad-passthrough", "bad-deny", "bad-glob", "missing-rules", "unwritable-audit-log", "unwritable-log",
         "no-mountpoint", "deadline-alone", "supervised-io-uring"],
)
def test_bad_input_is_one_line_usage_status_and_mounts_nothing(
    dirs: tuple[Path, Path], make_args: Callable[[Path, Path], list[str]], message: str
) -> None:
    src, mnt = dirs
    (src / "file").write_bytes(b"")
    (src / "sub").mkdir()
    r = fusepass("mount", *make_args(src, mnt))
    assert r.returncode == USAGE, r.stderr
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and "[Errno" not in r.stderr
    assert_not_mounted(mnt)
    assert_not_mounted(src / "sub")
    assert not (src / "no").exists()


def test_mountpoint_already_mounted_is_refused(dirs: tuple[Path, Path]) -> None:
    src, mnt = dirs
    assert fusepass("mount", str(src), str(mnt)).returncode == 0
    r = fusepass("mount", str(src), str(mnt))
    assert r.returncode == USAGE
    assert "already a mount point" in r.stderr and len(r.stderr.splitlines()) == 1
    assert sum(1 for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if f" {mnt} " in line) == 1


def test_source_with_equals_and_comma_mounts_and_a_non_empty_mount_point_warns(tmp_path: Path) -> None:
    src, mnt = tmp_path / "a=b,c d", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "f").write_bytes(b"through a path with = and ,")
    (mnt / "underneath").write_bytes(b"")
    try:
        r = fusepass("mount", str(src), str(mnt))
        assert r.returncode == 0, r.stderr
        assert r.stderr.strip() == f"fusepass: warning: {mnt} is not empty; what it holds is hidden while the " \
                                   "mirror is mounted"
        assert (mnt / "f").read_bytes() == b"through a path with = and ,"
        assert mountmod.mount_entry(str(mnt))[2] == str(tmp_path / "a_b_c_d")  # type: ignore[index]
        st = json.loads(fusepass("status", str(mnt), "--json").stdout)
        assert st["filesystem"]["source"] == str(src)
    finally:
        stop_background(mnt)
    assert (mnt / "underneath").exists()


def test_missing_dev_fuse_is_reported(dirs: tuple[Path, Path]) -> None:
    src, mnt = dirs
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    # A private mount namespace whose /dev is an empty tmpfs: /dev/fuse is missing there only.
    script = f'mount -t tmpfs none /dev && exec "{FUSEPASS}" mount "{src}" "{mnt}"'
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1
    assert "/dev/fuse does not exist" in r.stderr
    assert_not_mounted(mnt)


def _as_nobody(argv: list[str], env_path: str) -> tuple[int, str]:
    """Run cli.main as nobody in a forked child, capturing stderr; return (status, stderr)."""

    def child() -> tuple[int, str]:
        os.environ["PATH"] = env_path
        sys.stderr = io.StringIO()
        status = cli.main(argv)
        return status, sys.stderr.getvalue()

    return run_as(*NOBODY, child)  # type: ignore[no-any-return]


@pytest.fixture
def public_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A source and mount point the unprivileged user may use."""
    base = Path("/tmp") / f"fusepass-cli-{os.getpid()}"
    base.mkdir(mode=0o755)
    src, mnt = base / "src", base / "mnt"
    src.mkdir()
    mnt.mkdir()
    os.chown(src, *NOBODY)
    os.chown(mnt, *NOBODY)
    yield src, mnt
    stop_background(mnt)
    shutil.rmtree(base)


def test_no_privilege_and_no_fusermount3_is_reported(public_dirs: tuple[Path, Path]) -> None:
    src, mnt = public_dirs
    status, err = _as_nobody(["mount", str(src), str(mnt)], env_path="/nonexistent")
    assert status == 1
    assert "CAP_SYS_ADMIN" in err and "fusermount3" in err
    assert_not_mounted(mnt)


def test_passthrough_on_without_privilege_fails_and_mounts_nothing(public_dirs: tuple[Path, Path]) -> None:
    src, mnt = public_dirs
    if mountmod.fusermount_path() is None:
        pytest.skip("fusermount3 is not installed")
    status, err = _as_nobody(["mount", "--foreground", "--passthrough", "on", str(src), str(mnt)],
                             env_path=os.environ["PATH"])
    assert status == 1
    assert "passthrough needs CAP_SYS_ADMIN" in err
    assert_not_mounted(mnt)


def test_killed_background_server_is_cleaned_up_by_umount(dirs: tuple[Path, Path]) -> None:
    src, mnt = dirs
    (src / "f").write_bytes(b"x")
    assert fusepass("mount", str(src), str(mnt)).returncode == 0
    pid = json.loads(fusepass("status", str(mnt), "--json").stdout)["pid"]
    os.kill(pid, signal.SIGKILL)
    assert cli.wait_for_exit(pid, 10)
    with pytest.raises(OSError) as e:
        os.stat(mnt / "f")
    assert e.value.errno in DEAD_SERVER_ERRNOS
    status = fusepass("status", str(mnt), "--json")
    error = json.loads(status.stdout)["error"]
    assert status.returncode == 1 and "not answering" in error and "Errno" not in error
    r = fusepass("mount", str(src), str(mnt))
    assert r.returncode == USAGE
    assert r.stderr.strip() == (f"fusepass: {mnt} is a FUSE mount whose server is gone: "
                                f"run `fusepass umount {mnt}` first")
    r = fusepass("umount", str(mnt))
    assert r.returncode == 0, r.stderr
    assert "no server was answering" in r.stdout
    assert_not_mounted(mnt)


def test_umount_of_something_not_mounted_is_an_error(tmp_path: Path) -> None:
    r = fusepass("umount", str(tmp_path))
    assert r.returncode == 2 and "is not mounted" in r.stderr


def test_busy_mount_needs_lazy_which_returns_at_once(dirs: tuple[Path, Path]) -> None:
    src, mnt = dirs
    (src / "f").write_bytes(b"x")
    assert fusepass("mount", str(src), str(mnt)).returncode == 0
    pid = json.loads(fusepass("status", str(mnt), "--json").stdout)["pid"]
    with open(mnt / "f", "rb") as held:
        r = fusepass("umount", str(mnt))
        assert r.returncode == USAGE and "busy" in r.stderr and "--lazy" in r.stderr
        # Returning at once: well within the 10 s a plain umount would wait for the server.
        r = fusepass("umount", "--lazy", str(mnt), timeout=8)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == (f"detached {mnt}; server {pid} goes on serving the files open on it and "
                                    "exits at the last close")
        assert_not_mounted(mnt)
        assert not cli.wait_for_exit(pid, 0), "the server stays while a file is open"
        assert held.read() == b"x"  # the detached mount still serves what is open
    assert cli.wait_for_exit(pid, 20), "the server exits at the last close"


def test_fstab_style_mount_through_the_mount_helper(dirs: tuple[Path, Path]) -> None:
    src, mnt = dirs
    (src / "f").write_bytes(b"from fstab")
    link = Path("/sbin/mount.fuse.fusepass")
    previous = os.readlink(link) if link.is_symlink() else None
    if link.exists() and previous is None:
        pytest.skip("/sbin/mount.fuse.fusepass exists and is not ours")
    try:
        r = fusepass("install-helper")
        assert r.returncode == 0, r.stderr
        rules = src.parent / "rules.toml"
        rules.write_text('hide = "*.secret"\n')
        (src / "x.secret").write_bytes(b"")
        r = subprocess.run(["mount", "-t", "fuse.fusepass", str(src), str(mnt), "-o",
                            f"ro,noauto,_netdev,timeout=5,passthrough=on,threads=2,rules={rules}"],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        assert (mnt / "f").read_bytes() == b"from fstab"
        assert os.listdir(mnt) == ["f"]
        st = json.loads(fusepass("status", str(mnt), "--json").stdout)
        assert st["threads"] == expected_threads(st, 2)
        assert st["options"]["ro"] is True and st["passthrough"]["mode"] == "on"
        assert st["filesystem"]["policy"]["rules"] == ["hide *.secret"]
        assert fusepass("umount", str(mnt)).returncode == 0
    finally:
        if previous is None:
            link.unlink(missing_ok=True)
        else:
            link.unlink()
            link.symlink_to(previous)


def test_demo_mounts_reads_shows_status_and_leaves_nothing() -> None:
    r = fusepass("demo", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "read 501 files through the mount" in r.stdout
    assert "passthrough: on" in r.stdout and "unmounted" in r.stdout
    assert "fusepass-demo" not in Path("/proc/mounts").read_text()


def test_demo_keep_then_umount_leaves_nothing() -> None:
    r = fusepass("demo", "--keep", timeout=120)
    assert r.returncode == 0, r.stderr
    mnt = Path(r.stdout.split("still mounted; unmount (and remove ")[1].split(") with: fusepass umount ")[1].strip())
    try:
        assert mountmod.mount_entry(str(mnt)) is not None
    finally:
        u = fusepass("umount", str(mnt))
    assert u.returncode == 0, u.stderr
    assert f"removed the demo's directory {mnt.parent}" in u.stdout
    assert not mnt.parent.exists()


def test_status_of_a_removed_or_moved_source_says_so_and_logs_it(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    src, mnt = dirs
    (src / "f").write_bytes(b"held")
    log = tmp_path / "server.log"
    assert fusepass("mount", str(src), str(mnt), "--log", str(log)).returncode == 0
    with open(mnt / "f", "rb") as held:
        src.rename(tmp_path / "elsewhere")
        st = json.loads(fusepass("status", str(mnt), "--json").stdout)
        assert st["filesystem"]["source_state"] == f"moved to {tmp_path / 'elsewhere'}"
        shutil.rmtree(tmp_path / "elsewhere")
        text = fusepass("status", str(mnt)).stdout
        assert "SOURCE REMOVED" in text.splitlines()[1]
        assert json.loads(fusepass("status", str(mnt), "--json").stdout)["filesystem"]["source_state"] == "removed"
        assert held.read() == b"held"
    logged = log.read_text()
    assert f"the source directory {src} was moved to {tmp_path / 'elsewhere'}" in logged
    assert f"the source directory {src} was removed" in logged


def test_status_of_another_filesystem_names_no_source(memfs: ServerProcess) -> None:
    first = fusepass("status", str(memfs.mountpoint)).stdout.splitlines()[0]
    assert first.startswith(f"{memfs.mountpoint}  (fsname memfs, pid ") and "source" not in first


def test_every_option_and_argument_has_help() -> None:
    parsers = [cli.build_parser()]
    subs = [a for a in parsers[0]._actions if isinstance(a, argparse._SubParsersAction)]
    parsers += list(subs[0].choices.values())
    for parser in parsers:
        for action in parser._actions:
            if action.help != argparse.SUPPRESS and not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{parser.prog} {action.dest} has no help"
    r = fusepass("mount", "--help")
    assert r.returncode == 0 and "--audit-log FILE" in r.stdout and "--lazy" in fusepass("umount", "--help").stdout


def test_the_mirror_leaves_the_process_umask_alone_and_modes_are_exact(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    before = os.umask(0o027)
    try:
        Mirror(str(tmp_path))
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(before)
    src = tmp_path / "src"
    src.mkdir()
    # A server whose own umask is 077: the modes callers ask for must still be what the source gets.
    server = start_server(["sh", "-c", 'umask 077 && exec "$0" "$@"', FUSEPASS, "mount", "--foreground", str(src)])
    mnt = Path(server.mountpoint)
    before = os.umask(0o002)
    try:
        os.close(os.open(mnt / "file", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(mnt / "dir", 0o777)
        os.mkfifo(mnt / "fifo", 0o660)
    finally:
        os.umask(before)
    assert {n: oct((src / n).stat().st_mode & 0o7777) for n in ("file", "dir", "fifo")} == {
        "file": oct(0o664), "dir": oct(0o775), "fifo": oct(0o660)}
