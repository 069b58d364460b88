"""A server started by a supervisor: it gets ready to take the connection over, then takes it when told.

It works in two steps so that a planned restart (``fusepass restart``) costs callers only the
hand-over itself, and so that a successor that cannot start changes nothing: first it is made
(a freshly executed interpreter imports the code on disk, and its options are checked), while
its predecessor still serves; only once the predecessor has handed the connection over does it
read the journal and serve. After a crash there is no predecessor, and both steps follow at once.

The supervisor and the server talk over two pipes, a line at a time. To the server: the
options (``spec``: one JSON object), then, when the connection is its, the restarts so far
(``Restarts`` as a JSON object; the end of the pipe instead: give up, touching nothing). From
the server: ``prepared`` (or why it cannot start), then ``ready`` (or why it failed).

``python -P -m fusepass.successor --devices FD,... --journal FD,FD,FD --inbox FD --report FD`` is the
server a supervisor executes (the descriptors are inherited); a forked one calls ``run``.
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .device import Device

if TYPE_CHECKING:
    from .supervisor import ServerMain

#: Makes a server from the options, or raises with the reason it cannot start (in one line).
Prepare = Callable[[dict[str, Any]], "ServerMain"]

#: The exit status of a server that handed its connection over when asked (``Session.hand_over``).
EXIT_HANDED_OVER = 75
#: The exit status of one that was told to give up before it served (or could not start).
EXIT_NOT_STARTED = 76


def run(prepare: Prepare, devices: list[Device], files: tuple[int, int, int], inbox: int, report: int) -> int:
    """Both steps, in a server process; returns its exit status."""
    from .supervisor import Restarts

    with os.fdopen(inbox, "rb") as lines:
        try:
            server = prepare(json.loads(lines.readline()))
        except Exception as e:  # noqa: BLE001 - any reason it cannot start is reported, in one line
            _say(report, f"the new server cannot start: {type(e).__name__ if not str(e) else e}")
            os.close(report)
            return EXIT_NOT_STARTED
        _say(report, "prepared")
        line = lines.readline()
        if not line:  # the supervisor gave up on us
            os.close(report)
            return EXIT_NOT_STARTED
        restarts = Restarts(**json.loads(line))
    return server(devices, files, restarts, report)


def command(devices: list[Device], files: tuple[int, int, int], inbox: int, report: int) -> list[str]:
    """The command line of an executed successor (the descriptors must be inheritable)."""
    import sys

    # -P: not the supervisor's working directory first on sys.path, but what is installed.
    return [sys.executable, "-P", "-m", "fusepass.successor", "--devices", ",".join(str(d.fd) for d in devices),
            "--journal", ",".join(map(str, files)), "--inbox", str(inbox), "--report", str(report)]


def _say(fd: int, line: str) -> None:
    os.write(fd, line.replace("\n", " ").encode() + b"\n")


def _fds(text: str) -> list[int]:
    return [int(fd) for fd in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fusepass.successor", description=__doc__)
    parser.add_argument("--devices", type=_fds, required=True)
    parser.add_argument("--journal", type=_fds, required=True)
    parser.add_argument("--inbox", type=int, required=True)
    parser.add_argument("--report", type=int, required=True)
    args = parser.parse_args()
    status = EXIT_NOT_STARTED
    try:
        try:
            from .cli import prepare_supervised  # the code on disk now, which is the point
        except Exception as e:  # noqa: BLE001 - reported in one line; the traceback goes to the log
            traceback.print_exc()
            _say(args.report, f"the new code cannot be imported: {e!r}")
            return
        a, b, keeper = args.journal
        status = run(prepare_supervised, [Device(fd) for fd in args.devices], (a, b, keeper), args.inbox,
                     args.report)
    finally:
        # Never run interpreter shutdown: nothing this process holds may be released on its way out
        # (the connection, and the backing ids registered on it, are the supervisor's and a successor's).
        os._exit(status)


if __name__ == "__main__":
    main()
