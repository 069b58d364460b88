"""The ``fusepass`` command: mount a mirror of a directory, unmount it, restart its server, show its status."""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import logging.handlers
import os
import resource
import select
import shutil
import signal
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import control, policy, successor
from . import mount as mountmod
from .audit import AuditLog
from .device import Device
from .journal import Journal
from .mirror import Mirror, stacked_source
from .mount import MountError, MountOptions
from .negotiate import PASSTHROUGH_MODES
from .policy import Policy, RuleError, parse_rules, rules_from_toml
from .policy_mirror import PolicyMirror
from .serve import USAGE, OneLineParser, describe, parse_mount_options, serve, thread_count
from .session import DEFAULT_THREADS, WAKE_SIGNAL, Session, SessionError
from .supervisor import HAND_OVER_SIGNAL, HAND_OVER_TIMEOUT, READY_TIMEOUT, Restarts, ServerMain, Supervisor
from .uring_transport import UringOptions, take_options

PROG = "fusepass"
MAX_TIMEOUT = 365 * 86400  # seconds: a year; the kernel would take more, no operator means it
DEMO_MARKER = ".fusepass-demo"  # in the directory ``demo --keep`` leaves: ``umount`` removes it

log = logging.getLogger("fusepass")


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2 (USAGE); nothing is mounted."""


def _mirror_options(unknown: list[str]) -> dict[str, float | int | bool]:
    """fusepass's own -o options: ``timeout=SECONDS`` (entry/attribute cache), ``max_path_fds=N``,
    ``max_stack_depth=1|2`` (default: 2 if the source is on FUSE or overlayfs, else 1), ``nowatch``."""
    out: dict[str, float | int | bool] = {}
    for item in unknown:
        key, _, value = item.partition("=")
        try:
            if item in ("nowatch", "watch"):
                out["watch"] = item == "watch"
            elif key == "timeout":
                out["timeout"] = float(value)
                if not 0 <= out["timeout"] <= MAX_TIMEOUT:  # also false for NaN
                    raise UsageError(f"timeout must be a number of seconds from 0 to {MAX_TIMEOUT}, not {value}")
            elif key in ("max_path_fds", "max_stack_depth"):
                out[key] = int(value)
                if key == "max_path_fds" and out[key] < 1:
                    raise UsageError(f"max_path_fds must be at least 1, not {value}")
                if key == "max_stack_depth" and out[key] not in (1, 2):
                    raise UsageError(f"max_stack_depth must be 1 or 2, not {value}")
            else:
                raise UsageError(f"unknown mount option: {item}")
        except ValueError:
            raise UsageError(f"bad value in mount option: {item}") from None
    return out


def _fsname(source: str) -> str:
    """The source path as the mount's fsname (what /proc/mounts shows), with the characters a mount
    option string cannot carry replaced."""
    return "".join("_" if c in mountmod.UNSAFE_NAME_CHARS else c for c in source) or "fusepass"


def _check_mountpoint(mountpoint: str) -> str:
    """The absolute mount point, or a UsageError saying why it cannot be mounted on."""
    path = os.path.abspath(mountpoint)
    entry = mountmod.mount_entry(path)
    if entry is not None:
        if entry[1].startswith("fuse") and _dead(path):
            raise UsageError(f"{path} is a FUSE mount whose server is gone: run `{PROG} umount {path}` first")
        raise UsageError(f"{path} is already a mount point ({entry[1]} from {entry[2]})")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UsageError(f"mount point {path} does not exist") from None
    except OSError as e:
        raise UsageError(f"mount point {path}: {describe(e)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mount point {path} is not a directory")
    return path


def _warn_if_not_empty(path: str) -> None:
    try:
        with os.scandir(path) as it:
            if next(it, None) is not None:
                print(f"{PROG}: warning: {path} is not empty; what it holds is hidden while the mirror is mounted",
                      file=sys.stderr)
    except OSError:
        pass  # not ours to list: the kernel decides whether it may be mounted on


def _dead(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def _policy(args: argparse.Namespace) -> tuple[Policy, str | None]:
    """The rules and the audit log path from --rules FILE (or, in a supervised server, the file's
    contents as they were read when the mount or the restart was asked for), --hide, --read-only,
    --deny, --audit-log."""
    try:
        text = getattr(args, "rules_text", None)
        if text is not None:
            rules, audit_path = parse_rules(text.encode(), f"rules file {args.rules}")
        else:
            rules, audit_path = rules_from_toml(args.rules) if args.rules else ([], None)
        rules += [policy.hide(g) for g in args.hide] + [policy.read_only(g) for g in args.read_only]
        rules += [policy.parse_deny(spec) for spec in args.deny]
    except RuleError as e:
        raise UsageError(str(e)) from None
    return Policy(rules), args.audit_log or audit_path


@dataclass(slots=True)
class _Plan:
    """A checked ``mount`` command: where, with which options, and how to make its filesystem
    (once, or in every server a supervisor starts)."""

    mountpoint: str
    options: MountOptions
    make_fs: Callable[[], Mirror]
    max_stack_depth: int
    uring: UringOptions
    args: argparse.Namespace

    def session(self, fs: Mirror | None = None, **kw: Any) -> Session:
        a = self.args
        # A supervised server serves through /dev/fuse: rings die with the server that made them.
        io_uring = False if a.supervise else self.uring.enabled
        return Session(fs or self.make_fs(), self.mountpoint, self.options, threads=a.threads,
                       passthrough=a.passthrough, max_stack_depth=self.max_stack_depth, debug=a.debug,
                       request_timeout=a.request_timeout, io_uring=io_uring, io_uring_depth=self.uring.depth, **kw)

    def supervised(self) -> ServerMain:
        """One server under the supervisor, its filesystem made now (before it has the connection:
        a successor makes it while its predecessor still serves)."""
        return functools.partial(self.serve_supervised, self.make_fs())

    def serve_supervised(self, fs: Mirror, devices: list[Device], files: tuple[int, int, int], restarts: Restarts,
                         ready_fd: int) -> int:
        """Serve ``fs`` under the supervisor (with ``supervised``, a ``supervisor.ServerMain``)."""
        session = self.session(fs, device=devices[0], clones=devices[1:], journal=Journal(files[:2], keeper=files[2]))
        session.restarts = restarts
        status = serve(session, ready_fd, PROG, on_ready=_on_ready)
        return successor.EXIT_HANDED_OVER if session.handed_over else status


#: The options of ``mount --supervise`` that a server is started with (``Supervisor``'s spec).
_SPEC_KEYS = ("source", "mountpoint", "options", "foreground", "passthrough", "threads", "hide", "deny", "read_only",
              "rules", "rules_text", "audit_log", "log", "debug", "supervise", "deadline", "request_timeout")
#: Those ``fusepass restart`` may change: what the server alone holds, not what INIT negotiated or the
#: kernel holds. The rest are refused (``_REFUSED``).
CHANGEABLE = frozenset({"hide", "deny", "read_only", "rules", "rules_text", "audit_log", "log", "debug", "threads",
                        "deadline"})


def _spec(args: argparse.Namespace, plan: _Plan) -> dict[str, Any]:
    """The supervised server's options as a JSON object, with every path absolute and the rules
    file's contents read now: a successor started later must not depend on files changed since."""
    spec = {key: getattr(args, key, None) for key in _SPEC_KEYS}
    spec["mountpoint"] = plan.mountpoint
    spec.update(_absolute_paths(args))
    return spec


def _absolute_paths(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"source": os.path.abspath(args.source)} if getattr(args, "source", None) else {}
    for key in ("audit_log", "log", "rules"):
        if getattr(args, key, None):
            out[key] = os.path.abspath(getattr(args, key))
    if getattr(args, "rules", None):
        try:
            with open(args.rules) as f:
                out["rules_text"] = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"rules file {args.rules}: {describe(e) if isinstance(e, OSError) else e}") from None
    return out


def vet_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why ``restart`` cannot go from spec ``old`` to ``new``, or None. Hiding rules cannot change:
    the kernel keeps the names it has looked up, and those it was told are missing, as long as it
    caches them (a day while the source is watched), and the listings it was given until they change."""
    def hidden(spec: dict[str, Any]) -> set[str]:
        rules = _policy(argparse.Namespace(**{**spec, "audit_log": None}))[0].rules
        return {r.glob.text for r in rules if r.kind == "hide"}

    try:
        if hidden(old) != hidden(new):
            return ("hiding rules cannot change on a restart (rule options replace all the rules: give the "
                    "mount's hiding rules again): the kernel keeps the names it has looked up, and those it was "
                    "told are missing, as long as it caches them; unmount and mount again")
    except UsageError as e:
        return str(e)
    return None


def prepare_supervised(spec: dict[str, Any]) -> ServerMain:
    """In a server a supervisor starts (forked, or executed by ``fusepass.successor``): its logging,
    and its filesystem made from ``spec``, checked (raises with the reason it cannot start)."""
    args = argparse.Namespace(**spec)
    if args.foreground:
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, force=True,
                            format=f"{PROG}: %(levelname)s %(message)s")
    else:
        _log_in_background(args.log, args.debug)
    return _prepare(args, mounted=True).supervised()


def _prepare(args: argparse.Namespace, mounted: bool = False) -> _Plan:
    """A checked plan; ``mounted``: for a supervised server, whose mount point is mounted already
    (by its supervisor) and must not be looked at: nothing may serve it yet."""
    source = os.path.abspath(args.source)
    if not os.path.exists(source):
        raise UsageError(f"source {source} does not exist")
    if not os.path.isdir(source):
        raise UsageError(f"source {source} is not a directory")
    mnt = os.path.abspath(args.mountpoint) if mounted else _check_mountpoint(args.mountpoint)
    if not mounted:
        real_src, real_mnt = os.path.realpath(source), os.path.realpath(mnt)
        if real_mnt == real_src or real_mnt.startswith(real_src.rstrip("/") + "/"):
            raise UsageError(f"mount point {mnt} is inside the source {source}: that would loop")
    options = MountOptions(fsname=_fsname(source), subtype="fusepass", default_permissions=True)
    extra: list[str] = []
    for text in args.options:
        extra += parse_mount_options(text, options)
    try:
        options.check()
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        uring, extra = take_options(extra)
    except ValueError as e:
        raise UsageError(str(e)) from None
    fs_options = _mirror_options(extra)
    depth = fs_options.pop("max_stack_depth", None)
    if args.deadline is not None and not args.supervise:
        raise UsageError("--deadline needs --supervise")
    if args.supervise:
        _check_descriptor_room(int(fs_options.get("max_path_fds", 8192)))
        if uring.enabled:
            raise UsageError("--supervise cannot be combined with -o io_uring yet: the rings die with the "
                             "server that made them")
    rules, audit_path = _policy(args)
    if args.log:
        _writable(args.log, "log")
    if audit_path:
        try:
            AuditLog(audit_path).close()
        except OSError as e:
            raise UsageError(f"cannot open the audit log {audit_path}: {describe(e)}") from None

    def make_fs() -> Mirror:
        audit = AuditLog(audit_path) if audit_path else None
        return (PolicyMirror(source, rules, audit, **fs_options) if rules or audit
                else Mirror(source, **fs_options))  # type: ignore[arg-type]

    if depth is None:
        depth = 2 if stacked_source(source) else 1
    if not mounted:
        _warn_if_not_empty(mnt)
    return _Plan(mnt, options, make_fs, int(depth), uring, args)


def _seconds(text: str) -> float:
    """``--deadline``: a number of seconds from 0.1 to a day."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"must be a number of seconds from 0.1 to 86400, not {text!r}")
    return value


def _seconds_or_none(text: str) -> float:
    """``restart --deadline``: as ``--deadline``, or 0: none."""
    return 0.0 if text.strip() in ("0", "0.0") else _seconds(text)


def _timeout(text: str) -> int:
    """``--request-timeout``: whole seconds from 1 to 65535 (the kernel's field is 16 bits)."""
    if not text.isdigit() or not 1 <= int(text) <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds from 1 to 65535, not {text!r}")
    return int(text)


def _check_descriptor_room(max_path_fds: int) -> None:
    """Under a supervisor open files' descriptors live in the upper half of the descriptor limit
    (``session.fh_base``): the cached ones, and the rest, must fit below it."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if max_path_fds + _OTHER_DESCRIPTORS > hard // 2:
        raise UsageError(f"--supervise needs max_path_fds ({max_path_fds}) + {_OTHER_DESCRIPTORS} below half the "
                         f"descriptor limit ({hard}): lower max_path_fds or raise the limit (ulimit -Hn)")


#: Descriptors a server holds besides its cached O_PATH ones and its open files (a generous bound).
_OTHER_DESCRIPTORS = 1024


def _writable(path: str, what: str) -> None:
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write the {what} {path}: {describe(e)}") from None


def cmd_mount(args: argparse.Namespace) -> int:
    if not os.path.exists(mountmod.DEVICE):
        raise MountError(errno.ENODEV, f"{mountmod.DEVICE} does not exist: load the fuse module (modprobe fuse)")
    if not mountmod.has_cap_sys_admin() and mountmod.fusermount_path() is None:
        raise MountError(errno.EPERM,
                         "mounting needs root (CAP_SYS_ADMIN) or the fusermount3 helper (Debian package fuse3)")
    plan = _prepare(args)
    run: Callable[[int | None], int]
    if args.supervise:
        supervisor = Supervisor(plan.mountpoint, plan.options, _spec(args, plan), prepare_supervised, CHANGEABLE,
                                vet_change)
        run = supervisor.run
    else:
        session = plan.session()

        def run(ready_fd: int | None) -> int:
            return serve(session, ready_fd, PROG, on_ready=_on_ready)

    if args.foreground:
        return run(args.ready_fd)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the background server
        os.close(r)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        _log_in_background(args.log, args.debug)
        os._exit(run(w))
    os.close(w)
    ready, _, _ = select.select([r], [], [], 60)
    message = os.read(r, 4096).decode(errors="replace") if ready else "timed out waiting for the server"
    os.close(r)
    if message.startswith("ready"):
        return 0
    print(f"{PROG}: {message.strip() or 'the server exited before the mount was ready'}", file=sys.stderr)
    return 1


def _on_ready(session: Session) -> None:
    """Once the server serves: SIGHUP reopens the audit log (after rotation); without one it is
    ignored, so a hang-up of the terminal never kills a server and leaves a dead mount. Under a
    supervisor, the server that took over counts its recovery, and HAND_OVER_SIGNAL has it hand
    the connection over to a successor (``fusepass restart``)."""
    audit = getattr(session.fs, "audit", None)

    def on_hangup(signum: int, frame: object) -> None:
        if audit is not None:
            audit.reopen()

    signal.signal(signal.SIGHUP, on_hangup)
    if session.restarts is not None:
        session.restarts.recovered()
        started: list[threading.Thread] = []

        def on_hand_over(signum: int, frame: object) -> None:
            if not started:  # once; the thread wakes the workers with WAKE_SIGNAL
                started.append(threading.Thread(target=session.hand_over, args=(HAND_OVER_TIMEOUT,), daemon=True))
                started[0].start()

        signal.signal(WAKE_SIGNAL, lambda signum, frame: None)  # only to interrupt a worker's read
        signal.signal(HAND_OVER_SIGNAL, on_hand_over)


def _log_in_background(path: str | None, debug: bool) -> None:
    """Send warnings (everything with --debug) to ``path``, else to syslog, else nowhere. The file is
    reopened when it is rotated away."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if path:
        handler = logging.handlers.WatchedFileHandler(path)
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
    supervisor = None
    try:
        st = control.query(mnt, timeout=2)
        pid: int | None = int(st["pid"])
        if st.get("restarts"):
            supervisor = int(st["restarts"]["supervisor_pid"])
    except (OSError, ValueError, KeyError, TypeError):
        pid = None  # the server is gone (or not a fusepass server): unmounting cleans up
    server = f"server {pid}" if pid is not None else "its server"
    try:
        mountmod.unmount(mnt, lazy=False)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        if not args.lazy:
            raise UsageError(f"{mnt} is busy (files are open on it); use --lazy to detach it now") from None
        mountmod.unmount(mnt, lazy=True)
        print(f"detached {mnt}; {server} goes on serving the files open on it and exits at the last close")
        return 0
    if pid is None:
        print(f"unmounted {mnt} (no server was answering)")
    elif wait_for_exit(pid, 10.0) and (supervisor is None or wait_for_exit(supervisor, 10.0)):
        print(f"unmounted {mnt}; server {pid} stopped")
    else:
        print(f"unmounted {mnt}; server {pid} has not exited yet")
    _remove_demo_dir(mnt)
    return 0


#: Options of ``mount`` that ``restart`` refuses, and why.
_REFUSED = {
    "options": "-o options are the mount's: the kernel holds them (ro, allow_other, default_permissions, fsname) or "
               "the caches it keeps were granted under them (timeout, nowatch, max_path_fds, max_stack_depth)",
    "passthrough": "--passthrough was negotiated with the kernel at INIT, and its backing ids are registered",
    "request_timeout": "--request-timeout was negotiated with the kernel at INIT",
    "supervise": "--supervise is what the mount is, not its server",
    "foreground": "--foreground is what the mount is, not its server",
}


def cmd_restart(args: argparse.Namespace) -> int:
    """Ask a supervised mount's supervisor for a new server (new code; new options where they may change)."""
    refused = [key for key in _REFUSED if getattr(args, f"refused_{key}", None)]
    if refused:
        raise UsageError(f"{_REFUSED[refused[0]]}; to change it, unmount and mount again (nothing was restarted)")
    changes = _restart_changes(args)
    mnt = os.path.abspath(args.mountpoint)
    entry = mountmod.mount_entry(mnt)
    if entry is None or not entry[1].startswith("fuse"):
        raise UsageError(f"{mnt} is not a FUSE mount")
    connection = mountmod.connection_id(mnt)
    assert connection is not None
    path = control.supervisor_socket_path(connection)
    try:
        st: dict[str, Any] | None = control.query(mnt, timeout=5)
    except OSError:
        st = None  # between servers, or not fusepass's: the supervisor socket decides
    if st is not None and not st.get("restarts"):
        raise UsageError(f"{mnt} is not supervised (mounted without --supervise): its server cannot be replaced "
                         "without unmounting")
    if not os.path.exists(path):
        why = "its server is not answering either" if st is None else "it was started by an older fusepass"
        raise UsageError(f"no supervisor of {mnt} takes restart requests ({why})")
    reply = control.ask(path, {"command": "restart", "options": changes}, 3 * READY_TIMEOUT + HAND_OVER_TIMEOUT,
                        f"the supervisor of {mnt}")
    if reply.get("refused"):
        raise UsageError(f"restart of {mnt} refused: {reply['error']} (nothing was restarted)")
    if "error" in reply:
        print(f"{PROG}: restart of {mnt} failed: {reply['error']}", file=sys.stderr)
        return 1
    how = "handed over" if reply["handed_over"] else "killed (it did not hand over in time), replaced"
    print(f"restarted the server of {mnt}: pid {reply['previous_pid']} {how} to pid {reply['pid']}; "
          f"callers waited at most {reply['waited_ms']:.0f} ms")
    return 0


def _restart_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The options ``restart`` was given, checked, as changes to the supervised server's spec. The
    rules are replaced as a whole if any rule option is given (``--no-rules``: none)."""
    changes: dict[str, Any] = {}
    if args.no_rules or args.rules or args.hide or args.deny or args.read_only:
        if args.no_rules and (args.rules or args.hide or args.deny or args.read_only):
            raise UsageError("--no-rules cannot be combined with rules")
        changes.update(hide=args.hide or [], deny=args.deny or [], read_only=args.read_only or [], rules=None,
                       rules_text=None)
        changes.update(_absolute_paths(argparse.Namespace(rules=args.rules)))
        _policy(argparse.Namespace(**changes, audit_log=None))
    if args.audit_log is not None:
        changes["audit_log"] = os.path.abspath(args.audit_log) if args.audit_log else None
        if args.audit_log:
            try:
                AuditLog(args.audit_log).close()
            except OSError as e:
                raise UsageError(f"cannot open the audit log {args.audit_log}: {describe(e)}") from None
    if args.log:
        _writable(args.log, "log")
        changes["log"] = os.path.abspath(args.log)
    if args.debug is not None:
        changes["debug"] = args.debug
    if args.threads is not None:
        changes["threads"] = args.threads
    if args.deadline is not None:
        changes["deadline"] = args.deadline or None
    return changes


def _remove_demo_dir(mnt: str) -> None:
    """After ``demo --keep``: remove the directory the demo made, once its mount is gone."""
    work = os.path.dirname(mnt)
    try:
        with open(os.path.join(work, DEMO_MARKER)) as f:
            ours = f.read().strip() == mnt
    except OSError:
        return
    if ours and not any(point == mnt or point.startswith(work + "/") for point, _ in mountmod.fuse_mounts()):
        shutil.rmtree(work, ignore_errors=True)
        print(f"removed the demo's directory {work}")


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
            report.append({"mountpoint": mnt, "error": describe(e)})
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
    what = f"source {fs['source']}" if "source" in fs else f"fsname {st['fsname']}"
    lines = [
        f"{st['mountpoint']}  ({what}, pid {st['pid']}, up {st['uptime_s']:.0f}s,"
        f" {st['threads']} threads, {st['open_fds']} open fds)",
    ]
    if fs.get("source_state", "present") != "present":
        lines.append(f"  SOURCE {fs['source_state'].upper()}: new lookups fail; what the server holds is still served")
    lines.append(_format_transport(st.get("transport")))
    lines.append("  passthrough: " + ("on" if pt["negotiated"] else f"off ({pt['why_not']})")
                 + f"; opens {pt['opens']} passed through, {pt['served_opens']} served; "
                 f"backing ids now {pt['backing_ids']}")
    for reason, n in pt["served_reasons"].items():
        lines.append(f"    served {n}x: {reason}")
    lines += _format_policy(fs.get("policy"))
    restarts = st.get("restarts")
    if restarts:
        line = f"  supervised by pid {restarts['supervisor_pid']}; restarts: {restarts['count']}"
        if restarts["count"]:
            line += (f" (last {restarts['last_at']}: {restarts['last_cause']}; recovered in "
                     f"{restarts['last_recovery_ms']:.1f} ms, median {restarts['median_recovery_ms']:.1f} ms, "
                     f"worst {restarts['worst_recovery_ms']:.1f} ms)")
        lines.append(line)
    if st.get("malformed_requests"):
        lines.append(f"  malformed requests refused: {st['malformed_requests']}")
    # "answers": errors that are the kernel's ordinary business (ENOENT to LOOKUP, ENOSYS, ...);
    # latencies are the upper edges of 1/8-octave buckets (at most 12.5% above the true value).
    lines.append(f"  {'request':<16}{'count':>10}{'failed':>8}{'answers':>9}{'p50 us':>10}{'p99 us':>10}")
    for name, r in sorted(st["requests"].items(), key=lambda kv: -kv[1]["count"]):
        lines.append(f"  {name:<16}{r['count']:>10}{r['errors']:>8}{r.get('expected_errors', 0):>9}"
                     f"{r['p50_us']:>10.0f}{r['p99_us']:>10.0f}")
    return "\n".join(lines)


def _format_policy(pol: dict[str, Any] | None) -> list[str]:
    if not pol:
        return []
    lines = ["  rules: " + ("; ".join(pol["rules"]) or "none")]
    by_rule = ", ".join(f"{n} by {rule}" for rule, n in sorted(pol["denials_by_rule"].items(), key=lambda kv: -kv[1]))
    lines.append(f"  denials: {pol['denials']}" + (f" ({by_rule})" if by_rule else ""))
    audit = pol.get("audit")
    if audit:
        lines.append(f"  audit log {audit['log']}: {audit['written']} records written, {audit['dropped']} dropped")
    return lines


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
        shutil.rmtree(work, ignore_errors=True)
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
            with open(os.path.join(work, DEMO_MARKER), "w") as f:
                f.write(mnt + "\n")
            print(f"\nstill mounted; unmount (and remove {work}) with: {PROG} umount {mnt}")
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
    parser = OneLineParser(prog=PROG, description="Mirror a directory through FUSE with kernel passthrough.",
                           epilog="Exit status: 0 done, 1 the mount or the server failed, "
                                  f"{USAGE} bad input (nothing was done).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    m = sub.add_parser("mount", help="mount a mirror of SOURCE at MOUNTPOINT",
                       description="Mirror SOURCE at MOUNTPOINT; return once it answers, the server in the "
                                   "background. Regular files are passed through to the kernel.")
    m.add_argument("source", help="the directory to mirror")
    m.add_argument("mountpoint", help="an existing directory to mount the mirror on")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="comma-separated options (repeatable): ro, allow_other, default_permissions (on), "
                        "fsname=NAME, timeout=SECONDS (entry and attribute cache; default 86400 while the "
                        "source is watched for changes, else 1), nowatch (do not watch the source: short "
                        "caches), max_path_fds=N (cached descriptors, default 8192), max_stack_depth=1|2, "
                        "io_uring (take requests through FUSE over io_uring where the kernel allows; status "
                        "says why not), io_uring_depth=N (ring entries per CPU, default 1)")
    m.add_argument("-f", "--foreground", action="store_true", help="stay attached; Ctrl-C unmounts")
    m.add_argument("--supervise", action="store_true",
                   help="keep the mount in a supervisor process that starts a new server when the server dies "
                        "(a signal, an exception, an out-of-memory kill): callers see no error")
    m.add_argument("--request-timeout", type=_timeout, default=0, metavar="SECONDS",
                   help="have the kernel abort the connection (callers get ENOTCONN) when a request stays "
                        "unanswered this long (FUSE_REQUEST_TIMEOUT, Linux 6.14+; checked every 15 s or so)")
    m.add_argument("--deadline", type=_seconds, default=None, metavar="SECONDS",
                   help="with --supervise: replace a server that leaves requests waiting this long without "
                        "making progress (stopped, deadlocked, stuck); default: never")
    m.add_argument("--passthrough", choices=PASSTHROUGH_MODES, default="auto",
                   help="kernel passthrough of file data: auto (where the kernel and privileges allow), "
                        "on (fail if it cannot be had) or off (serve reads and writes from Python)")
    m.add_argument("--threads", type=thread_count, default=DEFAULT_THREADS, metavar="N",
                   help=f"worker threads, each with its own /dev/fuse queue (default {DEFAULT_THREADS})")
    m.add_argument("--hide", action="append", default=[], metavar="GLOB",
                   help="hide names matching GLOB: they look missing and cannot be created (repeatable)")
    m.add_argument("--deny", action="append", default=[], metavar="SPEC",
                   help="deny access: GLOB[,access=read|write|any][,uid=N][,gid=N][,errno=NAME], e.g. "
                        "'private/**,uid=1000'; write access includes every change (repeatable)")
    m.add_argument("--read-only", action="append", default=[], metavar="GLOB",
                   help="refuse every change to what GLOB covers with EROFS (repeatable)")
    m.add_argument("--rules", metavar="FILE", help="read rules (and the audit log's path) from a TOML file")
    m.add_argument("--audit-log", metavar="FILE",
                   help="append a JSON line per open, creation, rename, removal and denial to FILE "
                        "(reopened on SIGHUP)")
    m.add_argument("--debug", action="store_true", help="trace every request and reply")
    m.add_argument("--log", metavar="FILE",
                   help="in the background, log warnings (everything with --debug) to FILE (default: syslog)")
    m.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # for tests, with -f
    m.set_defaults(func=cmd_mount)
    u = sub.add_parser("umount", help="unmount MOUNTPOINT and stop its server",
                       description="Unmount MOUNTPOINT and wait for its server to exit.")
    u.add_argument("mountpoint", help="where the mirror is mounted")
    u.add_argument("-z", "--lazy", action="store_true",
                   help="if files are open on it, detach it now and return at once; the server exits at the "
                        "last close")
    u.set_defaults(func=cmd_umount)
    r = sub.add_parser("restart", help="replace the server of a supervised mount: new code, new options where "
                                       "they may change; requests in flight are finished first",
                       description="Replace the server of a mount made with --supervise by one started afresh "
                                   "(the code installed now), with the options given changed and the others as "
                                   "they were. The old server answers the requests it has read and exits; "
                                   "callers wait meanwhile and see no error. If the new server cannot start, the "
                                   "old one serves on. Rule options replace all the rules.")
    r.add_argument("mountpoint", help="where the supervised mirror is mounted")
    r.add_argument("--hide", action="append", metavar="GLOB", help="as for mount (repeatable)")
    r.add_argument("--deny", action="append", metavar="SPEC", help="as for mount (repeatable)")
    r.add_argument("--read-only", action="append", metavar="GLOB", help="as for mount (repeatable)")
    r.add_argument("--rules", metavar="FILE", help="as for mount")
    r.add_argument("--no-rules", action="store_true", help="no rules at all")
    r.add_argument("--audit-log", metavar="FILE", help="as for mount; '' for none")
    r.add_argument("--log", metavar="FILE", help="as for mount (the supervisor's own warnings stay where they went)")
    r.add_argument("--debug", action=argparse.BooleanOptionalAction, default=None,
                   help="trace every request and reply (or no longer)")
    r.add_argument("--threads", type=thread_count, metavar="N", help="worker threads")
    r.add_argument("--deadline", type=_seconds_or_none, metavar="SECONDS", help="as for mount; 0 for none")
    for flag, key, kind in (("-o", "options", "append"), ("--passthrough", "passthrough", "store"),
                            ("--request-timeout", "request_timeout", "store"),
                            ("--supervise", "supervise", "store_true"), ("--foreground", "foreground", "store_true")):
        r.add_argument(flag, dest=f"refused_{key}", action=kind, help=argparse.SUPPRESS)
    r.set_defaults(func=cmd_restart)
    s = sub.add_parser("status", help="show what fusepass mounts are doing")
    s.add_argument("mountpoint", nargs="?", help="one mount (default: every fusepass mount)")
    s.add_argument("--json", action="store_true", help="machine-readable output (schema in README)")
    s.set_defaults(func=cmd_status)
    d = sub.add_parser("demo", help="mount a mirror of SOURCE (default: a generated tree), read it, show status")
    d.add_argument("source", nargs="?", help="a directory to mirror (default: a generated tree of 501 files)")
    d.add_argument("--keep", action="store_true", help=f"leave it mounted ({PROG} umount then cleans up)")
    d.add_argument("--debug", action="store_true", help="trace every request and reply")
    d.set_defaults(func=cmd_demo)
    h = sub.add_parser("install-helper", help="link mount.fuse.fusepass into /sbin (for mount -t and fstab)")
    h.add_argument("--dir", default="/sbin", help="where mount(8) looks for helpers (default /sbin)")
    h.set_defaults(func=cmd_install_helper)
    return parser


def _format_transport(tr: dict[str, Any] | None) -> str:
    if not tr:
        return "  transport: /dev/fuse"
    if tr["kind"] == "io_uring":
        per_queue = ", ".join(f"{q['qid']}: {q['requests']}" for q in tr["queues"])
        depth = tr["queues"][0]["entries"] if tr["queues"] else 0
        return f"  transport: io_uring, {len(tr['queues'])} queues of {depth} entries; requests per queue {per_queue}"
    why = f" (io_uring not used: {tr['io_uring_why_not']})" if tr["io_uring_requested"] else ""
    return f"  transport: /dev/fuse{why}"


# Options mount(8) and fstab pass that mean nothing to the filesystem itself.
_FSTAB_ONLY = ("defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "_netdev", "nofail",
               "comment", "x-", "rw")


def mount_helper_main(argv: Sequence[str] | None = None) -> int:
    """``mount.fuse.fusepass SOURCE MOUNTPOINT [-o OPTIONS] [-n] [-s] [-f] [-v]``: what mount(8) runs for
    ``mount -t fuse.fusepass`` and fstab lines. fusepass's own options ``passthrough=auto|on|off``,
    ``threads=N``, ``debug``, ``supervise``, ``log=FILE``, ``rules=FILE``, ``audit_log=FILE``, ``hide=GLOB`` and
    ``read_only=GLOB`` may be given with -o."""
    parser = OneLineParser(prog="mount.fuse.fusepass", description="What mount(8) runs for fuse.fusepass.")
    parser.add_argument("source", help="the directory to mirror")
    parser.add_argument("mountpoint", help="where to mount it")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                        help="mount options, and fusepass's own (see fusepass mount --help)")
    for flag, what in (("-n", "no mtab (ignored)"), ("-s", "sloppy (ignored)"), ("-f", "fake: do nothing"),
                       ("-v", "verbose (ignored)")):  # mount(8)'s own
        parser.add_argument(flag, action="store_true", help=what)
    args = parser.parse_args(argv)
    if args.f:
        return 0
    passed: list[str] = []
    extra: list[str] = []
    for item in ",".join(args.options).split(","):
        key, _, value = item.partition("=")
        if not item or key in _FSTAB_ONLY or key.startswith("x-"):
            continue
        if key in ("passthrough", "threads", "log", "rules", "audit_log", "hide", "read_only") and value:
            extra += [f"--{key.replace('_', '-')}", value]
        elif key in ("debug", "supervise") and not value:
            extra.append(f"--{key}")
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
    print(f"{target} -> {os.path.abspath(helper)} (remove it with: rm {target})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "debug", False) else logging.WARNING,
                        format=f"{PROG}: %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except (UsageError, ValueError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return USAGE
    except BrokenPipeError:  # the reader of our output went away (``fusepass status | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (MountError, SessionError, OSError) as e:
        print(f"{PROG}: {describe(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
