"""A read-only view of a directory on the path-based layer, its file data passed through.

Run: ``python -m fusepass.examples.path_readonly SOURCE MOUNTPOINT``. ``open`` returns the
source file's path: the layer opens it and the kernel reads it directly, at the speed of
the source filesystem. Anything that would change the tree fails with EROFS (the mount is
also read-only, so most such calls never reach the server).
"""

from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Iterator, Sequence

from fusepass import MountOptions
from fusepass.pathfs import DirEntry, PathFS, PathOperations
from fusepass.serve import run_foreground


class ReadOnly(PathOperations):
    readdirplus = True  # readdir yields every name's stat
    entry_timeout = attr_timeout = 5.0  # nothing changes through the mount

    def __init__(self, source: str) -> None:
        self.source = os.path.realpath(source)

    def getattr(self, path: str, fh: int | None) -> os.stat_result:
        return os.lstat(self.source + path)

    def readlink(self, path: str) -> str:
        return os.readlink(self.source + path)

    def readdir(self, path: str, fh: int) -> Iterator[DirEntry]:
        with os.scandir(self.source + path) as entries:
            for entry in entries:
                yield entry.name, entry.stat(follow_symlinks=False)

    def open(self, path: str, flags: int) -> str:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, "read-only filesystem", path)
        return self.source + path  # passed through: the kernel reads the source file itself

    def statfs(self, path: str) -> os.statvfs_result:
        return os.statvfs(self.source + path)


def main(argv: Sequence[str] | None = None) -> int:
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", help="the directory to show")

    return run_foreground(lambda args: PathFS(ReadOnly(args.source)), argv, description=__doc__.splitlines()[0],
                          configure=configure,
                          defaults=MountOptions(fsname="path_readonly", subtype="path_readonly", ro=True,
                                                default_permissions=True))


if __name__ == "__main__":
    raise SystemExit(main())
