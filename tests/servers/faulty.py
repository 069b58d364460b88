"""memfs with handlers that misbehave on request, for the session tests.

Names that trigger behaviour (everything else is plain memfs):

* LOOKUP of ``boom``: raises RuntimeError (the caller must see EIO).
* LOOKUP of ``errno-N``: raises OSError(N).
* GETXATTR of ``user.boom`` / ``user.errno.N``: the same for getxattr.
* GETXATTR of ``user.block``: reports ``event started block``, waits until the request is
  interrupted (``ctx.wait_interrupted``), reports ``event interrupted block`` and fails with EINTR.
* GETXATTR of ``user.slow``: reports ``event started slow``, then blocks until the test sends
  the ``release`` command, and returns b"slow-done".

Control commands (see _control.py): ``release``, ``stats PATH``.
"""

from __future__ import annotations

import errno
import threading

from _control import Control, run_with_control

from fusepass import Context, Entry
from fusepass.examples.memfs import MemFS

BLOCK_LIMIT = 60.0  # a handler never outlives a failed test by more than this


class FaultyFS(MemFS):
    # Nothing cached: every stat reaches the server, so a dead server shows at once.
    entry_timeout = 0.0
    attr_timeout = 0.0

    def __init__(self, control: Control) -> None:
        super().__init__()
        self.control = control
        self.released = threading.Event()
        control.commands["release"] = self.released.set

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        _misbehave(name, b"boom", b"errno-")
        return super().lookup(ctx, parent, name)

    def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes:
        _misbehave(name, b"user.boom", b"user.errno.")
        if name == b"user.block":
            self.control.event("started block")
            if not ctx.wait_interrupted(BLOCK_LIMIT):
                self.control.event("never interrupted block")
                raise OSError(errno.ETIMEDOUT, "never interrupted")
            self.control.event("interrupted block")
            raise OSError(errno.EINTR, "interrupted")
        if name == b"user.slow":
            self.control.event("started slow")
            if not self.released.wait(BLOCK_LIMIT):
                raise OSError(errno.ETIMEDOUT, "never released")
            return b"slow-done"
        return super().getxattr(ctx, ino, name)


def _misbehave(name: bytes, boom: bytes, errno_prefix: bytes) -> None:
    if name == boom:
        raise RuntimeError(f"injected failure for {name.decode()}")
    if name.startswith(errno_prefix):
        code = int(name[len(errno_prefix):])
        raise OSError(code, f"injected errno {code}")


def main() -> int:
    return run_with_control(FaultyFS, "faulty", required=False)


if __name__ == "__main__":
    raise SystemExit(main())
