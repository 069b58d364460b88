"""The smallest filesystem on the inode API: one read-only file, node ids chosen by hand.

Run: ``python -m fusepass.examples.hello_inodes MOUNTPOINT``, then ``cat MOUNTPOINT/hello``.
"""

import errno
import stat

from fusepass import Attr, Context, DirListing, Entry, Opened, Operations
from fusepass.serve import run_foreground

HELLO = b"hello, world\n"
ROOT, FILE = 1, 2


class Hello(Operations):
    entry_timeout = attr_timeout = 60.0  # nothing ever changes

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> Attr:
        if ino == ROOT:
            return Attr(ino=ROOT, mode=stat.S_IFDIR | 0o755, nlink=2)
        return Attr(ino=FILE, mode=stat.S_IFREG | 0o444, size=len(HELLO))

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        if parent != ROOT or name != b"hello":
            raise OSError(errno.ENOENT, "no such file")
        # FILE lives forever, so the lookups the kernel counts need no bookkeeping here.
        return Entry(FILE, self.getattr(ctx, FILE, None), self.entry_timeout, self.attr_timeout)

    def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        return Opened()

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int, listing: DirListing) -> None:
        names = [(b".", ROOT), (b"..", ROOT), (b"hello", FILE)]
        for cookie, (name, child) in enumerate(names[offset:], offset + 1):  # the cookie is the next index
            if not listing.add(name, cookie, self.getattr(ctx, child, None)):
                break

    def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        if flags & 3 != 0:  # O_WRONLY or O_RDWR
            raise OSError(errno.EACCES, "read-only file")
        return Opened()

    def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> bytes:
        return HELLO[offset:offset + size]


if __name__ == "__main__":
    raise SystemExit(run_foreground(lambda args: Hello()))
