"""A loopback filesystem on the path-based layer: SOURCE re-served at MOUNTPOINT, file data
passed through the kernel.

Run: ``python -m fusepass.examples.path_loopback SOURCE MOUNTPOINT`` (foreground; Ctrl-C unmounts).
Every handler is one ``os`` call on the same path under SOURCE. ``open`` and ``create`` return
that path, so read, write and mmap go to the source file inside the kernel; where passthrough
cannot be had the layer serves them from the same descriptor. Unlike ``fusepass.mirror`` it
rebuilds paths and follows them (a symlink swapped into SOURCE behind its back is followed),
and it runs everything with the server's credentials: mount it with ``default_permissions``
(the default here) so the kernel checks permissions, and use it for trusted trees only.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence

from fusepass import MountOptions, syscalls
from fusepass.pathfs import DirEntry, PathFS, PathOperations, context
from fusepass.serve import run_foreground

AT_FDCWD = -100


class Loopback(PathOperations):
    readdirplus = True  # readdir yields every name's stat
    def __init__(self, source: str) -> None:
        self.source = os.path.realpath(source)
        if not os.path.isdir(self.source):
            raise NotADirectoryError(f"{source} is not a directory")
        os.umask(0)  # modes arrive with the caller's umask already applied by the kernel

    def _real(self, path: str) -> str:
        return self.source + path

    def _give_to_caller(self, real: str) -> None:
        """A new file belongs to whoever made it, as on a local filesystem."""
        ctx = context()
        if ctx is not None and os.geteuid() == 0:
            os.chown(real, ctx.uid, ctx.gid, follow_symlinks=False)

    def getattr(self, path: str, fh: int | None) -> os.stat_result:
        return os.fstat(fh) if fh is not None else os.lstat(self._real(path))

    def chmod(self, path: str, mode: int, fh: int | None) -> None:
        os.chmod(self._real(path), mode)

    def chown(self, path: str, uid: int, gid: int, fh: int | None) -> None:
        os.chown(self._real(path), uid, gid, follow_symlinks=False)

    def truncate(self, path: str, length: int, fh: int | None) -> None:
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._real(path), length)

    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None, fh: int | None) -> None:
        syscalls.utimens(os.fsencode(self._real(path)), atime_ns, mtime_ns)

    def readlink(self, path: str) -> str:
        return os.readlink(self._real(path))

    def statfs(self, path: str) -> os.statvfs_result:
        return os.statvfs(self._real(path))

    def mknod(self, path: str, mode: int, rdev: int) -> None:
        os.mknod(self._real(path), mode, rdev)
        self._give_to_caller(self._real(path))

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._real(path), mode)
        self._give_to_caller(self._real(path))

    def symlink(self, path: str, target: str) -> None:
        os.symlink(target, self._real(path))
        self._give_to_caller(self._real(path))

    def link(self, path: str, existing: str) -> None:
        os.link(self._real(existing), self._real(path), follow_symlinks=False)

    def unlink(self, path: str) -> None:
        os.unlink(self._real(path))

    def rmdir(self, path: str) -> None:
        os.rmdir(self._real(path))

    def rename(self, old: str, new: str, flags: int) -> None:
        syscalls.renameat2(AT_FDCWD, os.fsencode(self._real(old)), AT_FDCWD, os.fsencode(self._real(new)), flags)

    def open(self, path: str, flags: int) -> str:
        return self._real(path)  # the layer opens it with the caller's flags and passes it through

    def create(self, path: str, mode: int, flags: int) -> str:
        os.close(os.open(self._real(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, mode))
        self._give_to_caller(self._real(path))
        return self._real(path)

    def fsync(self, path: str, datasync: bool, fh: int) -> None:
        (os.fdatasync if datasync else os.fsync)(fh)

    def readdir(self, path: str, fh: int) -> Iterator[DirEntry]:
        yield from (".", "..")
        with os.scandir(self._real(path)) as it:
            for entry in it:
                yield entry.name, entry.stat(follow_symlinks=False)

    def getxattr(self, path: str, name: str) -> bytes:
        return os.getxattr(self._real(path), name, follow_symlinks=False)

    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        os.setxattr(self._real(path), name, value, flags, follow_symlinks=False)

    def listxattr(self, path: str) -> list[str]:
        return os.listxattr(self._real(path), follow_symlinks=False)

    def removexattr(self, path: str, name: str) -> None:
        os.removexattr(self._real(path), name, follow_symlinks=False)


def main(argv: Sequence[str] | None = None) -> int:
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", help="the directory to serve")

    return run_foreground(lambda args: PathFS(Loopback(args.source)), argv, description=__doc__.splitlines()[0],
                          configure=configure,
                          defaults=MountOptions(fsname="path_loopback", subtype="path_loopback",
                                                default_permissions=True))


if __name__ == "__main__":
    raise SystemExit(main())
