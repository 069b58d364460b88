"""The example filesystems, run as their users would run them: ``python -m fusepass.examples.NAME``."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import NOBODY, ServerProcess, python_module, run_as

pytestmark = pytest.mark.timeout(60)


# --- readonly_audit --------------------------------------------------------------------------------


def _snapshot(root: Path) -> list[tuple[str, int, int, int, int, int, bytes, list[str]]]:
    """Everything about the tree that a write could change."""
    out = []
    for path in sorted([root, *root.rglob("*")]):
        st = os.lstat(path)
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        xattrs = sorted(os.listxattr(path, follow_symlinks=False)) if not path.is_symlink() else []
        out.append((str(path.relative_to(root)), st.st_mode, st.st_uid, st.st_nlink, st.st_size,
                    st.st_mtime_ns, data, xattrs))
    return out


@pytest.fixture
def audited(public_tmp: Path, start_server: Callable[..., ServerProcess]) -> tuple[Path, Path, Path]:
    """(source, mount point, log) of readonly_audit hiding ``secret`` and ``.git``."""
    src = public_tmp / "src"
    (src / "sub" / "secret").mkdir(parents=True)
    (src / ".git").mkdir()
    (src / ".git" / "config").write_text("[core]\n")
    (src / "a.txt").write_bytes(b"alpha")
    (src / "sub" / "b.txt").write_bytes(b"beta")
    (src / "sub" / "b.txt").chmod(0o666)  # writable by anyone, as far as permissions go
    (src / "secret").write_bytes(b"hidden")
    (src / "link").symlink_to("a.txt")
    os.setxattr(src / "a.txt", "user.tag", b"x")
    for path in (src, src / "sub"):
        path.chmod(0o755)
    log = public_tmp / "audit.log"
    server = start_server(
        python_module("fusepass.examples.readonly_audit", str(src), "--hide", "secret", "--hide", ".git",
                      "--log", str(log), "-o", "allow_other"),
        mountpoint=public_tmp / "mnt",
    )
    return src, Path(server.mountpoint), log


def _log_lines(log: Path) -> list[dict[str, str]]:
    lines = []
    for line in log.read_text().splitlines():
        head, _, path = line.partition(" path=")
        fields = dict(item.split("=", 1) for item in head.split())
        fields["path"] = path
        lines.append(fields)
    return lines


def test_readonly_audit_refuses_every_write_with_erofs(audited: tuple[Path, Path, Path]) -> None:
    src, mnt, _ = audited
    before = _snapshot(src)
    a, sub = mnt / "a.txt", mnt / "sub"
    attempts: dict[str, Callable[[], object]] = {
        "open for writing": lambda: open(a, "r+b"),
        "open for appending": lambda: open(a, "ab"),
        "open write-only": lambda: os.open(a, os.O_WRONLY),
        "open read-only with O_TRUNC": lambda: os.open(a, os.O_RDONLY | os.O_TRUNC),
        "create": lambda: (mnt / "new").write_bytes(b"x"),
        "O_TMPFILE": lambda: os.open(mnt, os.O_TMPFILE | os.O_WRONLY, 0o600),
        "mkdir": lambda: os.mkdir(mnt / "newdir"),
        "mkfifo": lambda: os.mkfifo(mnt / "fifo"),
        "bind a socket": lambda: socket.socket(socket.AF_UNIX).bind(str(mnt / "sock")),
        "symlink": lambda: os.symlink("a.txt", mnt / "newlink"),
        "hard link": lambda: os.link(a, mnt / "hard"),
        "unlink": lambda: os.unlink(a),
        "unlink a symlink": lambda: os.unlink(mnt / "link"),
        "rmdir": lambda: os.rmdir(sub),
        "rename": lambda: os.rename(a, mnt / "renamed"),
        "rename into a directory": lambda: os.rename(a, sub / "a.txt"),
        "chmod": lambda: os.chmod(a, 0o600),
        "chown": lambda: os.chown(a, 1, 1),
        "utime": lambda: os.utime(a, ns=(1, 1)),
        "truncate": lambda: os.truncate(a, 0),
        "setxattr": lambda: os.setxattr(a, "user.tag", b"y"),
        "removexattr": lambda: os.removexattr(a, "user.tag"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS, what
    # as another user, on a file its mode lets anyone write
    assert run_as(*NOBODY, lambda: (mnt / "a.txt").read_bytes()) == b"alpha"
    for mode in ("ab", "r+b", "wb"):
        with pytest.raises(OSError) as e:
            run_as(*NOBODY, lambda m=mode: open(mnt / "sub" / "b.txt", m))
        assert e.value.errno == errno.EROFS
    assert _snapshot(src) == before
    assert (mnt / "a.txt").read_bytes() == b"alpha" and os.getxattr(a, "user.tag") == b"x"


def test_readonly_audit_hides_the_names_it_was_given(audited: tuple[Path, Path, Path]) -> None:
    src, mnt, _ = audited
    assert sorted(os.listdir(mnt)) == ["a.txt", "link", "sub"]
    assert sorted(os.listdir(mnt / "sub")) == ["b.txt"]
    assert sorted(e.name for e in os.scandir(mnt)) == ["a.txt", "link", "sub"]
    for hidden in (mnt / "secret", mnt / ".git", mnt / ".git" / "config", mnt / "sub" / "secret"):
        assert not os.path.lexists(hidden)
        with pytest.raises(FileNotFoundError):
            os.stat(hidden)
        with pytest.raises(FileNotFoundError):
            open(hidden, "rb")
    assert (src / "secret").read_bytes() == b"hidden"  # still there, just not served


def test_readonly_audit_logs_one_line_per_open(audited: tuple[Path, Path, Path]) -> None:
    src, mnt, log = audited
    assert not log.exists() or log.read_text() == ""

    def read(path: Path) -> int:
        assert path.read_bytes()
        return os.getpid()

    def write(path: Path) -> int:
        try:
            open(path, "r+b")
        except OSError as e:
            assert e.errno == errno.EROFS
        else:
            raise AssertionError("a write open succeeded")
        return os.getpid()

    expected = [
        ("0", str(read(mnt / "a.txt")), "read", "ok", "a.txt"),
        (str(NOBODY[0]), str(run_as(*NOBODY, lambda: read(mnt / "sub" / "b.txt"))), "read", "ok", "sub/b.txt"),
        ("0", str(read(mnt / "link")), "read", "ok", "a.txt"),  # the symlink resolves to the file it names
        ("0", str(write(mnt / "sub" / "b.txt")), "read-write", "EROFS", "sub/b.txt"),
    ]
    # renamed behind the mount's back: the log names the file where it is now
    dirfd = os.open(mnt / "sub", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(src / "sub", src / "moved")
        os.close(os.open("b.txt", os.O_RDONLY, dir_fd=dirfd))
    finally:
        os.close(dirfd)
    expected.append(("0", str(os.getpid()), "read", "ok", "moved/b.txt"))
    got = [(f["uid"], f["pid"], f["access"], f["result"], f["path"]) for f in _log_lines(log)]
    assert got == expected
