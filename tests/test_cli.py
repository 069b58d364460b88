"""The fusepass command as an operator uses it: real mounts, the installed script, exit codes and messages."""

from __future__ import annotations

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
from conftest import NOBODY, run_as, stop_background

from fusepass import cli
from fusepass import mount as mountmod

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
    assert st["open_fds"] > 0 and st["pid"] > 0 and st["threads"] == 4
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
        (lambda s, m: [str(s), str(m), "-o", "max_stack_depth=3"], "max_stack_depth"),
    ],
    ids=["source-missing", "source-not-dir", "mountpoint-missing", "mountpoint-not-dir", "loop", "unknown-option",
         "bad-value", "bad-depth"],
)
def test_bad_input_is_one_line_nonzero_and_mounts_nothing(
    dirs: tuple[Path, Path], make_args: Callable[[Path, Path], list[str]], message: str
) -> None:
    src, mnt = dirs
    (src / "file").write_bytes(b"")
    (src / "sub").mkdir()
    r = fusepass("mount", *make_args(src, mnt))
    assert r.returncode != 0
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert_not_mounted(mnt)
    assert_not_mounted(src / "sub")


def test_mountpoint_already_mounted_is_refused(dirs: tuple[Path, Path]) -> None:
    src, mnt = dirs
    assert fusepass("mount", str(src), str(mnt)).returncode == 0
    r = fusepass("mount", str(src), str(mnt))
    assert r.returncode == 1
    assert "already a mount point" in r.stderr
    assert sum(1 for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if f" {mnt} " in line) == 1


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
    assert e.value.errno == errno.ENOTCONN
    status = fusepass("status", str(mnt), "--json")
    assert status.returncode == 1 and "not answering" in json.loads(status.stdout)["error"]
    r = fusepass("umount", str(mnt))
    assert r.returncode == 0, r.stderr
    assert "no server was answering" in r.stdout
    assert_not_mounted(mnt)


def test_umount_of_something_not_mounted_is_an_error(tmp_path: Path) -> None:
    r = fusepass("umount", str(tmp_path))
    assert r.returncode == 2 and "is not mounted" in r.stderr


def test_busy_mount_needs_lazy(dirs: tuple[Path, Path]) -> None:
    src, mnt = dirs
    (src / "f").write_bytes(b"x")
    assert fusepass("mount", str(src), str(mnt)).returncode == 0
    with open(mnt / "f", "rb") as held:
        r = fusepass("umount", str(mnt))
        assert r.returncode == 2 and "busy" in r.stderr and "--lazy" in r.stderr
        r = fusepass("umount", "--lazy", str(mnt))
        assert r.returncode == 0
        assert_not_mounted(mnt)
        assert held.read() == b"x"  # the detached mount still serves what is open
        pid_line = r.stdout
    assert "still serving" in pid_line or "stopped" in pid_line


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
        r = subprocess.run(["mount", "-t", "fuse.fusepass", str(src), str(mnt), "-o",
                            "ro,noauto,_netdev,timeout=5,passthrough=on,threads=2"],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        assert (mnt / "f").read_bytes() == b"from fstab"
        st = json.loads(fusepass("status", str(mnt), "--json").stdout)
        assert st["threads"] == 2 and st["options"]["ro"] is True and st["passthrough"]["mode"] == "on"
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
