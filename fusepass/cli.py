"""The ``fusepass`` command: mount a mirror of a directory, unmount it."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import logging.handlers
import os
import select
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from . import control
from . import mount as mountmod
from .mirror import Mirror
from .mount import MountError, MountOptions
from .negotiate import PASSTHROUGH_MODES
from .serve import describe, parse_mount_options, serve
from .session import DEFAULT_THREADS, Session, SessionError

PROG = "fusepass"


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def _mirror_options(unknown: list[str]) -> dict[str, float | int]:
    """fusepass's own -o options: ``timeout=SECONDS`` (entry/attribute cache), ``max_path_fds=N``,
    ``max_stack_depth=1|2`` (default: 2 if the source is on FUSE or overlayfs, else 1)."""
    out: dict[str, float | int] = {}
    for item in unknown:
        key, _, value = item.partition("=")
        try:
            if key == "timeout":
                out["timeout"] = float(value)
            elif key in ("max_path_fds", "max_stack_depth"):
                out[key] = int(value)
            else:
                raise UsageError(f"unknown mount option: {item}")
        except ValueError:
            raise UsageError(f"bad value in mount option: {item}") from None
    return out


def _prepare(args: argparse.Namespace) -> Session:
    source = os.path.abspath(args.source)
    if not os.path.exists(source):
        raise UsageError(f"source {source} does not exist")
    if not os.path.isdir(source):
        raise UsageError(f"source {source} is not a directory")
    mnt = os.path.abspath(args.mountpoint)
    real_src, real_mnt = os.path.realpath(source), os.path.realpath(mnt)
    if real_mnt == real_src or real_mnt.startswith(real_src.rstrip("/") + "/"):
        raise UsageError(f"mount point {mnt} is inside the source {source}: that would loop")
    options = MountOptions(fsname=source.replace(",", "_").replace(" ", "_") or "fusepass",
                           subtype="fusepass", default_permissions=True)
    extra: list[str] = []
    for text in args.options:
        extra += parse_mount_options(text, options)
    fs_options = _mirror_options(extra)
    depth = fs_options.pop("max_stack_depth", None)
    if depth not in (None, 1, 2):
        raise UsageError("max_stack_depth must be 1 or 2")
    fs = Mirror(source, **fs_options)  # type: ignore[arg-type]
    if depth is None:
        depth = 2 if fs.stacked else 1
    return Session(fs, mnt, options, threads=args.threads, passthrough=args.passthrough,
                   max_stack_depth=int(depth), debug=args.debug)


def cmd_mount(args: argparse.Namespace) -> int:
    mountmod.check_mountpoint(args.mountpoint)
    if not os.path.exists(mountmod.DEVICE):
        raise MountError(errno.ENODEV, f"{mountmod.DEVICE} does not exist: load the fuse module (modprobe fuse)")
    if not mountmod.has_cap_sys_admin() and mountmod.fusermount_path() is None:
        raise MountError(errno.EPERM,
                         "mounting needs root (CAP_SYS_ADMIN) or the fusermount3 helper (Debian package fuse3)")
    session = _prepare(args)
    if args.foreground:
        return serve(session, args.ready_fd, PROG)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the background server
        os.close(r)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        _log_in_background(args.log, args.debug)
        os._exit(serve(session, w, PROG))
    os.close(w)
    ready, _, _ = select.select([r], [], [], 60)
    message = os.read(r, 4096).decode(errors="replace") if ready else "timed out waiting for the server"
    os.close(r)
    if message.startswith("ready"):
        return 0
    print(f"{PROG}: {message.strip() or 'the server exited before the mount was ready'}", file=sys.stderr)
    return 1


def _log_in_background(path: str | None, debug: bool) -> None:
    """Send warnings (everything with --debug) to ``path``, else to syslog, else nowhere."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if path:
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s fusepass[%(process)d] %(levelname)s %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("fusepass[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)


def cmd_umount(args: argparse.Namespace) -> int:
    mnt = os.path.abspath(args.mountpoint)
    entry = mountmod.mount_entry(mnt)
    if entry is None:
        raise UsageError(f"{mnt} is not mounted")
    if not entry[1].startswith("fuse"):
        raise UsageError(f"{mnt} is not a FUSE mount ({entry[1]})")
    try:
        pid: int | None = int(control.query(mnt, timeout=2)["pid"])
    except (OSError, ValueError, KeyError):
        pid = None  # the server is gone (or not a fusepass server): unmounting cleans up
    try:
        mountmod.unmount(mnt, lazy=args.lazy)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise UsageError(f"{mnt} is busy (files are open on it); use --lazy to detach it now") from None
        raise
    if pid is None:
        print(f"unmounted {mnt} (no server was answering)")
        return 0
    if wait_for_exit(pid, 10.0):
        print(f"unmounted {mnt}; server {pid} stopped")
    else:
        print(f"unmounted {mnt}; server {pid} still serving files that are open on the detached mount")
    return 0


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait for a process we did not start to exit (pidfd: no polling)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(pidfd)


def fusepass_mounts() -> list[str]:
    """Mount points of every fusepass mount."""
    return [point for point, fstype in mountmod.fuse_mounts() if fstype == "fuse.fusepass"]


def cmd_status(args: argparse.Namespace) -> int:
    mounts = [os.path.abspath(args.mountpoint)] if args.mountpoint else fusepass_mounts()
    report: list[dict[str, object]] = []
    failed = False
    for mnt in mounts:
        try:
            report.append(control.query(mnt))
        except OSError as e:
            failed = True
            report.append({"mountpoint": mnt, "error": str(e)})
    if args.json:
        print(json.dumps(report if not args.mountpoint else report[0], indent=2))
    else:
        for st in report:
            print(_format_status(st))
        if not report:
            print("no fusepass mounts")
    return 1 if failed else 0


def _format_status(st: dict[str, Any]) -> str:
    if "error" in st:
        return f"{st['mountpoint']}: {st['error']}"
    pt = st["passthrough"]
    fs = st.get("filesystem", {})
    lines = [
        f"{st['mountpoint']}  (source {fs.get('source', st['fsname'])}, pid {st['pid']}, up {st['uptime_s']:.0f}s,"
        f" {st['threads']} threads, {st['open_fds']} open fds)",
        "  passthrough: " + ("on" if pt["negotiated"] else f"off ({pt['why_not']})")
        + f"; opens {pt['opens']} passed through, {pt['served_opens']} served; backing ids now {pt['backing_ids']}",
    ]
    for reason, n in pt["served_reasons"].items():
        lines.append(f"    served {n}x: {reason}")
    lines.append(f"  {'request':<16}{'count':>10}{'errors':>8}{'p50 us':>10}{'p99 us':>10}")
    for name, r in sorted(st["requests"].items(), key=lambda kv: -kv[1]["count"]):
        lines.append(f"  {name:<16}{r['count']:>10}{r['errors']:>8}{r['p50_us']:>10.0f}{r['p99_us']:>10.0f}")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """Mount a mirror of SOURCE (or of a generated tree), use it, show its status."""
    import hashlib
    import tempfile

    work = tempfile.mkdtemp(prefix="fusepass-demo-")
    source = os.path.abspath(args.source) if args.source else _make_demo_tree(os.path.join(work, "source"))
    mnt = os.path.join(work, "mnt")
    os.mkdir(mnt)
    print(f"mounting a mirror of {source} at {mnt}")
    status = main(["mount", source, mnt] + (["--debug"] if args.debug else []))
    if status:
        return status
    try:
        files = 0
        digest = hashlib.sha256()
        for root, _, names in os.walk(mnt):
            for name in names:
                path = os.path.join(root, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as f:
                        while chunk := f.read(1 << 20):
                            digest.update(chunk)
                    files += 1
        print(f"read {files} files through the mount (sha256 of all: {digest.hexdigest()[:16]}...)\n")
        main(["status", mnt])
    finally:
        if args.keep:
            print(f"\nstill mounted; unmount with: fusepass umount {mnt}")
        else:
            main(["umount", mnt])
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _make_demo_tree(root: str) -> str:
    os.makedirs(root)
    for d in range(10):
        sub = os.path.join(root, f"dir{d}")
        os.mkdir(sub)
        for i in range(50):
            with open(os.path.join(sub, f"file{i}.txt"), "w") as f:
                f.write(f"demo file {d}/{i}\n" * 20)
    with open(os.path.join(root, "big.bin"), "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    os.symlink("big.bin", os.path.join(root, "link-to-big"))
    return root


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Mirror a directory through FUSE with kernel passthrough.")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mount", help="mount a mirror of SOURCE at MOUNTPOINT")
    m.add_argument("source")
    m.add_argument("mountpoint")
    m.add_argument("-o", dest="options", action="append", default=[],
                   help="comma-separated options: ro, allow_other, default_permissions, fsname=, timeout=SECONDS")
    m.add_argument("-f", "--foreground", action="store_true", help="stay attached; Ctrl-C unmounts")
    m.add_argument("--passthrough", choices=PASSTHROUGH_MODES, default="auto")
    m.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    m.add_argument("--debug", action="store_true", help="trace every request and reply")
    m.add_argument("--log", help="in the background, log to this file (default: syslog)")
    m.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # for tests, with -f
    m.set_defaults(func=cmd_mount)
    u = sub.add_parser("umount", help="unmount MOUNTPOINT")
    u.add_argument("mountpoint")
    u.add_argument("-z", "--lazy", action="store_true", help="detach now even if busy")
    u.set_defaults(func=cmd_umount)
    s = sub.add_parser("status", help="show what fusepass mounts are doing")
    s.add_argument("mountpoint", nargs="?")
    s.add_argument("--json", action="store_true", help="machine-readable output (schema in README)")
    s.set_defaults(func=cmd_status)
    d = sub.add_parser("demo", help="mount a mirror of SOURCE (default: a generated tree), read it, show status")
    d.add_argument("source", nargs="?")
    d.add_argument("--keep", action="store_true", help="leave it mounted")
    d.add_argument("--debug", action="store_true")
    d.set_defaults(func=cmd_demo)
    h = sub.add_parser("install-helper", help="link mount.fuse.fusepass into /sbin (for fstab)")
    h.add_argument("--dir", default="/sbin")
    h.set_defaults(func=cmd_install_helper)
    return parser


# Options mount(8) and fstab pass that mean nothing to the filesystem itself.
_FSTAB_ONLY = ("defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "_netdev", "nofail",
               "comment", "x-", "rw")


def mount_helper_main(argv: Sequence[str] | None = None) -> int:
    """``mount.fuse.fusepass SOURCE MOUNTPOINT [-o OPTIONS] [-n] [-s] [-f] [-v]``: what mount(8) runs for
    ``mount -t fuse.fusepass`` and fstab lines. fusepass's own options ``passthrough=auto|on|off``,
    ``threads=N``, ``debug`` and ``log=FILE`` may be given with -o."""
    parser = argparse.ArgumentParser(prog="mount.fuse.fusepass")
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", action="append", default=[])
    for flag in ("-n", "-s", "-f", "-v"):  # no mtab, sloppy, fake, verbose: mount(8)'s own
        parser.add_argument(flag, action="store_true")
    args = parser.parse_args(argv)
    if args.f:
        return 0
    passed: list[str] = []
    extra: list[str] = []
    for item in ",".join(args.options).split(","):
        key, _, value = item.partition("=")
        if not item or key in _FSTAB_ONLY or key.startswith("x-"):
            continue
        if key in ("passthrough", "threads", "log") and value:
            extra += [f"--{key}", value]
        elif key == "debug" and not value:
            extra.append("--debug")
        else:
            passed.append(item)
    return main(["mount", args.source, args.mountpoint, *extra] + (["-o", ",".join(passed)] if passed else []))


def cmd_install_helper(args: argparse.Namespace) -> int:
    """Link /sbin/mount.fuse.fusepass to this installation's helper, so fstab lines work."""
    helper = shutil.which("mount.fuse.fusepass") or os.path.join(os.path.dirname(sys.argv[0]), "mount.fuse.fusepass")
    if not os.path.exists(helper):
        raise UsageError("the mount.fuse.fusepass script is not installed next to this command")
    target = os.path.join(args.dir, "mount.fuse.fusepass")
    if os.path.lexists(target):
        os.unlink(target)
    os.symlink(os.path.abspath(helper), target)
    print(f"{target} -> {os.path.abspath(helper)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "debug", False) else logging.WARNING,
                        format=f"{PROG}: %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except (MountError, SessionError, OSError) as e:
        print(f"{PROG}: {describe(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
