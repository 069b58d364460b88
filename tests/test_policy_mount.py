"""Rules and the audit log through real mounts of the installed command, on an ``allow_other`` mount,
for root and for another user: every rule kind, the other names a file could be reached by (hard
links, renames of it or of a directory above it), the denial count in status, and one audit line
per audited operation, across a log rotation."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import NOBODY, ServerProcess, poll_until, run_as

from fusepass import control

FUSEPASS = str(Path(sys.executable).parent / "fusepass")
Outcomes = dict[str, int]


def make_tree(src: Path) -> None:
    """Directories everyone may write and files everyone may read and write, so that what refuses
    an operation is a rule, never a permission."""
    src.chmod(0o777)
    for d in ("pub", "pub/inner", "private", "releases", "shared", ".git"):
        (src / d).mkdir(parents=True)
        (src / d).chmod(0o777)
    for f in ("pub/notes.txt", "pub/inner/hidden", "pub/root-file", "pub/nobody-file", "private/secret.txt",
              "releases/v1", "a.key", ".git/config"):
        (src / f).write_bytes(b"contents of " + f.encode())
        (src / f).chmod(0o666)


def mount_with(start_server: Callable[..., ServerProcess], base: Path, *flags: str) -> Path:
    src = base / "src"
    src.mkdir()
    make_tree(src)
    server = start_server([FUSEPASS, "mount", "--foreground", "-o", "allow_other", *flags, str(src)],
                          mountpoint=base / "mnt")
    return Path(server.mountpoint)


def outcome(fn: Callable[[], Any]) -> int:
    """0 if ``fn`` succeeds, else its errno."""
    try:
        fn()
    except OSError as e:
        return e.errno or -1
    return 0


def write(path: Path) -> None:
    with open(path, "w") as f:
        f.write("x")


def both_users(mnt: Path, ops: Callable[[Path, str], Outcomes]) -> dict[str, Outcomes]:
    """``ops`` as root, then as nobody; ``who`` names what each may leave behind."""
    return {"root": ops(mnt, "root"), "nobody": run_as(*NOBODY, lambda: ops(mnt, "nobody"))}


def denials(mnt: Path) -> dict[str, Any]:
    return control.query(str(mnt))["filesystem"]["policy"]  # type: ignore[no-any-return]


# --- hiding --------------------------------------------------------------------------------------


def hide_ops(mnt: Path, who: str) -> Outcomes:
    return {
        "listed": int(sorted(os.listdir(mnt)) == ["private", "pub", "releases", "shared"]
                      and sorted(os.listdir(mnt / "pub")) == ["inner", "nobody-file", "notes.txt", "root-file"]
                      and os.listdir(mnt / "pub" / "inner") == []),
        "stat hidden": outcome(lambda: os.stat(mnt / "a.key")),
        "read in a hidden directory": outcome(lambda: (mnt / ".git" / "config").read_bytes()),
        "stat anchored": outcome(lambda: os.stat(mnt / "pub" / "inner" / "hidden")),
        "create hidden name": outcome(lambda: write(mnt / "shared" / "new.key")),
        "mkdir hidden name": outcome(lambda: os.mkdir(mnt / "shared" / "d.key")),
        "rename onto hidden name": outcome(lambda: os.rename(mnt / "pub" / "notes.txt", mnt / "pub" / "n.key")),
        "link to hidden name": outcome(lambda: os.link(mnt / "pub" / "notes.txt", mnt / "shared" / "l.key")),
        "link the hidden file": outcome(lambda: os.link(mnt / "a.key", mnt / "shared" / "visible")),
        "rename the hidden file": outcome(lambda: os.rename(mnt / "a.key", mnt / "shared" / "visible")),
        # pub/inner/hidden would become visible as moved/hidden, pub2/inner/hidden, ...
        "rename its directory": outcome(lambda: os.rename(mnt / "pub" / "inner", mnt / "shared" / "moved")),
        "rename a directory above": outcome(lambda: os.rename(mnt / "pub", mnt / "pub2")),
        "rename another directory": outcome(lambda: (os.mkdir(mnt / "shared" / who),
                                                     os.rename(mnt / "shared" / who, mnt / "shared" / "e"),
                                                     os.rmdir(mnt / "shared" / "e"))),
    }


def test_hidden_names_cannot_be_seen_made_or_reached_by_another_name(
    start_server: Callable[..., ServerProcess], public_tmp: Path
) -> None:
    mnt = mount_with(start_server, public_tmp, "--hide", "*.key", "--hide", ".git", "--hide", "/pub/inner/hidden")
    expected = {
        "listed": 1, "stat hidden": errno.ENOENT, "read in a hidden directory": errno.ENOENT,
        "stat anchored": errno.ENOENT, "create hidden name": errno.EACCES, "mkdir hidden name": errno.EACCES,
        "rename onto hidden name": errno.EACCES, "link to hidden name": errno.EACCES,
        "link the hidden file": errno.ENOENT, "rename the hidden file": errno.ENOENT,
        "rename its directory": errno.EXDEV, "rename a directory above": errno.EXDEV, "rename another directory": 0,
    }
    assert both_users(mnt, hide_ops) == {"root": expected, "nobody": expected}
    src = public_tmp / "src"
    assert (src / "a.key").exists() and (src / "pub" / "inner" / "hidden").exists()
    assert not any(p.name in ("new.key", "d.key", "n.key", "l.key", "visible", "moved") for p in src.rglob("*"))
    pol = denials(mnt)
    assert pol["rules"] == ["hide *.key", "hide .git", "hide /pub/inner/hidden"]
    # per user: 4 creations of hidden names (EACCES) and 2 directory renames (EXDEV)
    assert pol["denials"] == 12
    assert pol["denials_by_rule"] == {"hide *.key": 8, "rename or link across rules -> EXDEV": 4}


# --- deny and read-only -------------------------------------------------------------------------


def deny_ops(mnt: Path, who: str) -> Outcomes:
    secret, notes, v1 = mnt / "private" / "secret.txt", mnt / "pub" / "notes.txt", mnt / "releases" / "v1"
    return {
        "read denied file": outcome(secret.read_bytes),
        "list its directory": outcome(lambda: os.listdir(mnt / "private")),
        "link denied file elsewhere": outcome(lambda: os.link(secret, mnt / "shared" / "s")),
        "rename denied file elsewhere": outcome(lambda: os.rename(secret, mnt / "shared" / "s")),
        "rename its directory": outcome(lambda: os.rename(mnt / "private", mnt / "shared" / "p")),
        "read under write deny": outcome(notes.read_bytes),
        "write under write deny": outcome(lambda: write(notes)),
        "create under write deny": outcome(lambda: write(mnt / "pub" / f"new-{who}")),
        "truncate under write deny": outcome(lambda: os.truncate(notes, 0)),
        "unlink under write deny": outcome(lambda: os.unlink(mnt / "pub" / f"{who}-file")),
        "read read-only": outcome(v1.read_bytes),
        "write read-only": outcome(lambda: write(v1)),
        "create in read-only": outcome(lambda: write(mnt / "releases" / "v2")),
        "mkdir in read-only": outcome(lambda: os.mkdir(mnt / "releases" / "d")),
        "chmod read-only": outcome(lambda: os.chmod(v1, 0o666)),
        "xattr on read-only": outcome(lambda: os.setxattr(v1, "user.note", b"x")),
        "unlink read-only": outcome(lambda: os.unlink(v1)),
        "move out of read-only": outcome(lambda: os.rename(v1, mnt / "shared" / "v1")),
        "move into read-only": outcome(lambda: os.rename(mnt / "shared", mnt / "releases" / "shared")),
        "write elsewhere": outcome(lambda: (write(mnt / "shared" / who), os.unlink(mnt / "shared" / who))),
    }


def test_deny_rules_by_path_uid_gid_and_access_and_read_only_subtrees(
    start_server: Callable[..., ServerProcess], public_tmp: Path
) -> None:
    mnt = mount_with(start_server, public_tmp, "--deny", f"private/**,uid={NOBODY[0]},errno=EPERM",
                     "--deny", f"pub/**,access=write,gid={NOBODY[1]}", "--read-only", "releases")
    got = both_users(mnt, deny_ops)
    rofs = errno.EROFS
    root = {
        "read denied file": 0, "list its directory": 0,
        # root may change the file, but not give it a name the rule does not cover
        "link denied file elsewhere": errno.EXDEV, "rename denied file elsewhere": errno.EXDEV,
        "rename its directory": errno.EXDEV,
        "read under write deny": 0, "write under write deny": 0, "create under write deny": 0,
        "truncate under write deny": 0, "unlink under write deny": 0,
        "read read-only": 0, "write read-only": rofs, "create in read-only": rofs, "mkdir in read-only": rofs,
        "chmod read-only": rofs, "xattr on read-only": rofs, "unlink read-only": rofs,
        "move out of read-only": rofs, "move into read-only": rofs, "write elsewhere": 0,
    }
    nobody = root | {
        "read denied file": errno.EPERM, "link denied file elsewhere": errno.EPERM,
        "rename denied file elsewhere": errno.EPERM, "write under write deny": errno.EACCES,
        "create under write deny": errno.EACCES, "truncate under write deny": errno.EACCES,
        "unlink under write deny": errno.EACCES,
        "chmod read-only": errno.EPERM,  # the kernel's own check comes first: not the owner
    }
    assert got == {"root": root, "nobody": nobody}
    src = public_tmp / "src"
    assert (src / "private" / "secret.txt").read_bytes() == b"contents of private/secret.txt"
    assert (src / "releases" / "v1").read_bytes() == b"contents of releases/v1"
    assert sorted(os.listdir(src / "releases")) == ["v1"] and sorted(os.listdir(src / "shared")) == []
    assert sorted(os.listdir(src / "pub")) == ["inner", "new-root", "nobody-file", "notes.txt"]
    pol = denials(mnt)
    assert pol["rules"] == ["read-only releases", f"deny private/** for uid {NOBODY[0]} -> EPERM",
                            f"deny write pub/** for gid {NOBODY[1]} -> EACCES"]
    assert pol["denials_by_rule"] == {
        "read-only releases": 15,  # 8 refusals for root, 7 for nobody
        "rename or link across rules -> EXDEV": 4,  # 3 for root, 1 for nobody
        f"deny private/** for uid {NOBODY[0]} -> EPERM": 3,
        f"deny write pub/** for gid {NOBODY[1]} -> EACCES": 4,
    }
    assert pol["denials"] == 26 and pol["audit"] is None


# --- the audit log ------------------------------------------------------------------------------


def test_audit_log_has_one_line_per_operation_and_survives_rotation(
    start_server: Callable[..., ServerProcess], public_tmp: Path
) -> None:
    log = public_tmp / "audit.jsonl"
    mnt = mount_with(start_server, public_tmp, "--audit-log", str(log), "--deny", f"private/**,uid={NOBODY[0]}")
    server_pid = control.query(str(mnt))["pid"]

    f, g, h, d = (mnt / "shared" / n for n in "fghd")
    write(f)  # create
    f.read_bytes()  # open
    os.stat(f)  # not audited
    os.rename(f, g)
    os.link(g, h)
    os.unlink(g)
    os.unlink(h)
    os.mkdir(d)
    os.rmdir(d)
    nobody_pid = run_as(*NOBODY, lambda: (outcome((mnt / "private" / "secret.txt").read_bytes), os.getpid())[1])

    def lines(path: Path) -> list[dict[str, Any]]:
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    records = poll_until(lambda: lines(log), lambda r: len(r) >= 9, "nine audit records")
    assert [(r["op"], r["path"], r.get("to"), r["result"]) for r in records] == [
        ("create", "shared/f", None, "ok"), ("open", "shared/f", None, "ok"), ("rename", "shared/f", "shared/g", "ok"),
        ("link", "shared/g", "shared/h", "ok"), ("unlink", "shared/g", None, "ok"), ("unlink", "shared/h", None, "ok"),
        ("mkdir", "shared/d", None, "ok"), ("rmdir", "shared/d", None, "ok"),
        ("open", "private/secret.txt", None, "EACCES"),
    ]
    me = os.readlink("/proc/self/exe")
    for r in records[:8]:
        assert (r["uid"], r["gid"], r["pid"], r["exe"]) == (0, 0, os.getpid(), me)
    assert "O_CREAT" in records[0]["flags"] and records[1]["flags"] == ["O_RDONLY"]
    assert (records[8]["uid"], records[8]["gid"], records[8]["pid"]) == (*NOBODY, nobody_pid)
    assert records[8]["rule"] == f"deny private/** for uid {NOBODY[0]} -> EACCES"
    assert all(set(r) >= {"time", "uid", "gid", "pid", "exe", "op", "path", "flags", "result"} for r in records)

    # logrotate: move the file away, SIGHUP the server; the next record goes to a new file
    log.rename(public_tmp / "audit.jsonl.1")
    os.kill(server_pid, signal.SIGHUP)
    poll_until(log.exists, bool, "the audit log reopened after SIGHUP")
    write(mnt / "shared" / "after")
    after = poll_until(lambda: lines(log), lambda r: len(r) >= 1, "a record in the new audit log")
    assert [(r["op"], r["path"]) for r in after] == [("create", "shared/after")]
    assert len(lines(public_tmp / "audit.jsonl.1")) == 9
    st = control.query(str(mnt))
    assert st["filesystem"]["policy"]["audit"] == {"log": str(log), "written": 10, "dropped": 0, "queued": 0}
    assert st["filesystem"]["policy"]["denials"] == 1
    assert st["pid"] == server_pid  # SIGHUP did not end it
