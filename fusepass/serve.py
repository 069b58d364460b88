"""Run a filesystem in the foreground from a command line: the shared main of examples and servers."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .control import ControlServer, status_document
from .mount import MountError, MountOptions
from .negotiate import PASSTHROUGH_MODES
from .ops import Operations
from .session import DEFAULT_THREADS, Session, SessionError
from .uring_transport import take_options


def describe(e: BaseException) -> str:
    """An error as one line for an operator: the explanation, without Python's "[Errno N]"."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``PROG: what is wrong (see PROG --help)``)
    and exit status 2, the status of every usage error of fusepass's commands."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


USAGE = 2  # exit status of a usage error: nothing was done
MAX_THREADS = 256


def thread_count(text: str) -> int:
    """``--threads``: a whole number from 1 to MAX_THREADS."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_THREADS}, not {text!r}")
    return n


def parse_mount_options(text: str, options: MountOptions) -> list[str]:
    """Apply a comma-separated ``-o`` string to ``options``; return the options it did not know."""
    unknown = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        if key in ("allow_other", "default_permissions", "ro", "nosuid", "nodev", "noexec", "noatime") and not value:
            setattr(options, key, True)
        elif key in ("suid", "dev", "exec", "atime") and not value:
            setattr(options, "no" + key, False)
        elif key == "rw" and not value:
            options.ro = False
        elif key in ("fsname", "subtype") and value:
            setattr(options, key, value)
        elif key == "max_read" and value.isdigit():
            options.max_read = int(value)
        else:
            unknown.append(item)
    return unknown


def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", help="an existing directory to mount the filesystem on")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                        help="comma-separated mount options: ro, allow_other, default_permissions, fsname=NAME, "
                             "nosuid, nodev, noexec, noatime, max_read=BYTES; io_uring (take requests through "
                             "FUSE over io_uring where possible), io_uring_depth=N (ring entries per CPU, "
                             "default 2) (repeatable)")
    parser.add_argument("--threads", type=thread_count, default=DEFAULT_THREADS, metavar="N",
                        help=f"worker threads, each with its own /dev/fuse queue (default {DEFAULT_THREADS})")
    parser.add_argument("--passthrough", choices=PASSTHROUGH_MODES, default="auto",
                        help="kernel passthrough of file data: auto (where the kernel and privileges allow), "
                             "on (fail if it cannot be had) or off (serve reads and writes from Python)")
    parser.add_argument("--max-in-flight", type=int, default=None, metavar="N",
                        help="for async def handlers: requests they may serve at once (default 4096)")
    parser.add_argument("--debug", action="store_true", help="trace every request and reply to standard error")
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)


def run_foreground(
    make_fs: Callable[[argparse.Namespace], Operations], argv: Sequence[str] | None = None,
    description: str = "", configure: Callable[[argparse.ArgumentParser], None] | None = None,
    defaults: MountOptions | None = None, on_ready: Callable[[Session], None] | None = None,
) -> int:
    """Parse arguments, mount, serve until unmounted or interrupted; return an exit status.

    ``on_ready`` is called with the session once the mount answers (INIT done), in the main
    thread: the place to keep the session for notifications or statistics.
    """
    parser = OneLineParser(description=description)
    if configure:
        configure(parser)
    add_session_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = defaults or MountOptions()
    unknown = []
    for text in args.options:
        unknown += parse_mount_options(text, options)
    try:
        uring, unknown = take_options(unknown)
    except ValueError as e:
        parser.error(str(e))
    if unknown:
        parser.error(f"unknown mount option(s): {', '.join(unknown)}")
    try:
        options.check()
    except ValueError as e:
        parser.error(str(e))
    try:
        fs = make_fs(args)
        session = Session(fs, args.mountpoint, options, threads=args.threads, passthrough=args.passthrough,
                          debug=args.debug, max_in_flight=args.max_in_flight, io_uring=uring.enabled,
                          io_uring_depth=uring.depth)
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: {describe(e)}", file=sys.stderr)
        return 1
    return serve(session, args.ready_fd, parser.prog, on_ready=on_ready)


def serve(session: Session, ready_fd: int | None, prog: str, *,
          on_ready: Callable[[Session], None] | None = None) -> int:
    """Mount, report readiness on ``ready_fd`` (b"ready\n", or the error text), answer status
    queries on the control socket, and serve until unmounted. Returns an exit status."""
    try:
        session.start()
        session.wait_ready()
    except (MountError, SessionError, OSError, ValueError) as e:
        session.close()
        if ready_fd is not None:
            os.write(ready_fd, f"{describe(e)}\n".encode())
            os.close(ready_fd)
        print(f"{prog}: {describe(e)}", file=sys.stderr)
        return 1
    control = None
    if session.connection_id is not None:
        try:
            control = ControlServer({"status": lambda: status_document(session)}, session.connection_id)
        except OSError as e:
            logging.getLogger("fusepass").warning("no status socket: %s", e)

    def announce() -> None:
        # Called by session.run once its SIGINT/SIGTERM handlers are installed, so whoever
        # waits for "ready" may signal at once and still get a clean unmount.
        if on_ready is not None:
            on_ready(session)
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)

    try:
        session.run(on_ready=announce)
    except SessionError as e:
        print(f"{prog}: {describe(e)}", file=sys.stderr)
        return 1
    finally:
        if control is not None:
            control.close()
    return 0
