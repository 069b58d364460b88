"""A read-only mirror that logs every open (who opened what) and hides some names.

Run: ``python -m fusepass.examples.readonly_audit SOURCE MOUNTPOINT [--hide NAME]... [--log FILE]``

Built on ``Mirror`` with its two policy hooks: ``check_open`` refuses any open that could
write with EROFS and logs every open, allowed or not, as one line ``uid=U pid=P access=A
result=R path=PATH`` (PATH relative to SOURCE); ``is_hidden`` hides each NAME in every
directory. Every handler that would change the source raises EROFS. Reads still go through
kernel passthrough.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import TextIO

from fusepass import Context, MountOptions
from fusepass.mirror import Mirror
from fusepass.serve import run_foreground

_ACCESS = {os.O_RDONLY: "read", os.O_WRONLY: "write", os.O_RDWR: "read-write"}
_MODIFYING = os.O_TRUNC | os.O_APPEND | os.O_CREAT


def _read_only(*_args: object) -> None:
    raise OSError(errno.EROFS, "read-only file system")


class ReadOnlyAudit(Mirror):
    """Mirror ``source`` read-only, logging opens to ``log`` and hiding ``hidden`` names."""

    mkdir = mknod = symlink = link = unlink = rmdir = rename = _read_only  # type: ignore[assignment]
    setattr = create = tmpfile = setxattr = removexattr = _read_only  # type: ignore[assignment]

    def __init__(self, source: str, log: TextIO, hidden: Iterable[str] = ()) -> None:
        super().__init__(source)
        self.log = log
        self.hidden = {os.fsencode(name) for name in hidden}
        self._log_lock = threading.Lock()

    def check_open(self, ctx: Context, ino: int, flags: int) -> None:
        access = _ACCESS.get(flags & os.O_ACCMODE, "other")
        refused = access != "read" or bool(flags & _MODIFYING)
        path = os.path.relpath(self.source_path(ino), self.source)
        with self._log_lock:
            print(f"uid={ctx.uid} pid={ctx.pid} access={access} result={'EROFS' if refused else 'ok'} path={path}",
                  file=self.log, flush=True)
        if refused:
            _read_only()

    def is_hidden(self, parent: int, name: bytes) -> bool:
        return name in self.hidden


def main(argv: Sequence[str] | None = None) -> int:
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", help="the directory to serve, read-only")
        parser.add_argument("--hide", action="append", default=[], metavar="NAME",
                            help="hide entries called NAME in every directory (repeatable)")
        parser.add_argument("--log", metavar="FILE", help="append the audit log to FILE (default: standard error)")

    def make(args: argparse.Namespace) -> ReadOnlyAudit:
        log = open(args.log, "a", encoding="utf-8") if args.log else sys.stderr  # kept for the mount's life
        return ReadOnlyAudit(args.source, log, args.hide)

    return run_foreground(make, argv, description=__doc__.splitlines()[0], configure=configure,
                          defaults=MountOptions(fsname="readonly_audit", subtype="readonly_audit",
                                                default_permissions=True))


if __name__ == "__main__":
    raise SystemExit(main())
