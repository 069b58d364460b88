"""``fusepass`` (the command line), whose server kills itself in the one instant a journal cannot
cover: after the kernel registered a backing file and before its id is recorded.

``dies_registering.py MARKER ARGS...``: while the file MARKER exists, the next server to register
a backing file removes MARKER and SIGKILLs itself right after FUSE_DEV_IOC_BACKING_OPEN returned.
Successors (forked by the supervisor, so patched too) find no marker and serve normally.
"""

from __future__ import annotations

import os
import signal
import sys

from fusepass import cli, journal

_record = journal.Journal.backing


def _backing(self: journal.Journal, nodeid: int, backing_id: int) -> None:
    try:
        os.unlink(MARKER)
    except FileNotFoundError:
        _record(self, nodeid, backing_id)
    else:
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    MARKER = sys.argv[1]
    journal.Journal.backing = _backing  # type: ignore[method-assign]
    raise SystemExit(cli.main(sys.argv[2:]))
