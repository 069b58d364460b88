"""User-space instructions per request (client + server), counted by callgrind.

Mounts a trivial filesystem in this process (one worker), then a forked child makes N system
calls that each cost exactly one request of the chosen kind; callgrind counts every user-space
instruction of both processes (the child is forked, so it runs under callgrind too; a client
thread in the server's process would deadlock, because callgrind holds its lock across stat).
Two runs with different N cancel the start-up cost:

    python -m bench.request_cost            # runs callgrind twice per kind and prints the figures

Kinds: GETATTR and LOOKUP answered by plain handlers, and GETATTR by an ``async def`` one that
never awaits (what the event loop adds to a request). The ``mirror-*`` kinds count per file, on the
mirror of a scratch directory with its defaults (watcher on): ``mirror-lookup`` is a stat of a name
not yet known (LOOKUP), ``mirror-create`` an exclusive create and close (LOOKUP, CREATE, GETATTR of
the directory, RELEASE), ``mirror-delete`` a stat then an unlink (LOOKUP, UNLINK, GETATTR of the
directory, FORGET): less ``mirror-lookup``, what a delete of a known name costs.

``python -m bench.request_cost --serve getattr 20000`` is the measured program itself.

Only /dev/fuse: valgrind (3.19, Debian 12's) keeps its big lock while a thread waits in
io_uring_enter, so a server whose ring threads must all register before the first request deadlocks
under it. ``python -m bench.getattr_rate`` gives the server's CPU time per request over both transports.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import subprocess
import sys
import tempfile

from fusepass import Attr, Context, Entry, Operations
from fusepass.mirror import Mirror
from fusepass.mount import MountOptions
from fusepass.session import Session

ROOT = Attr(ino=1, mode=stat.S_IFDIR | 0o755, nlink=2)


class Cheap(Operations):
    """GETATTR of the root is never cached; every new name is one LOOKUP, cached for ever."""

    attr_timeout = 0.0

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> Attr:
        return ROOT if ino == 1 else Attr(ino=ino, mode=stat.S_IFREG | 0o644)

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        ino = int(name[1:]) + 2
        return Entry(ino, Attr(ino=ino, mode=stat.S_IFREG | 0o644), 1e6, 1e6)


class CheapAsync(Cheap):
    """``Cheap`` with a coroutine getattr that never awaits anything: only the event loop's price."""

    async def getattr(self, ctx: Context, ino: int, fh: int | None) -> Attr:  # type: ignore[override]
        return Cheap.getattr(self, ctx, ino, fh)


KINDS = ("getattr", "lookup", "getattr-async", "mirror-lookup", "mirror-create", "mirror-delete")


def serve(kind: str, n: int) -> None:
    with tempfile.TemporaryDirectory() as mnt, tempfile.TemporaryDirectory(dir="/var/tmp") as source:
        if kind.startswith("mirror-"):
            fs: Operations = Mirror(source)
            options = MountOptions(fsname=source, subtype="fusepass", default_permissions=True)
            if kind != "mirror-create":
                for i in range(n):
                    os.close(os.open(f"{source}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
        else:
            fs, options = CheapAsync() if kind == "getattr-async" else Cheap(), None
        with Session(fs, mnt, options, threads=1, passthrough="off" if options is None else "auto"):
            pid = os.fork()
            if pid == 0:
                try:
                    client(kind, mnt, n)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)


def client(kind: str, mnt: str, n: int) -> None:
    if kind in ("getattr", "getattr-async"):
        for _ in range(n):
            os.stat(mnt)
    elif kind in ("lookup", "mirror-lookup"):
        for i in range(n):
            os.stat(f"{mnt}/f{i}")
    elif kind == "mirror-create":
        for i in range(n):
            os.close(os.open(f"{mnt}/f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    else:
        for i in range(n):
            os.stat(f"{mnt}/f{i}")
            os.unlink(f"{mnt}/f{i}")


def instructions(kind: str, n: int) -> int:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p", sys.executable, "-m",
             "bench.request_cost", "--serve", kind, str(n)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800,
        )
        total = 0
        for name in os.listdir(out):
            with open(os.path.join(out, name)) as f:
                m = re.search(r"^(?:summary|totals): (\d+)", f.read(), re.M)
            assert m, f"no instruction total in {name}"
            total += int(m.group(1))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=12000)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"a subset of {','.join(KINDS)}")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    for kind in args.kinds.split(","):
        small, large = instructions(kind, args.small), instructions(kind, args.large)
        unit = "file" if kind.startswith("mirror-") else "request"
        print(f"{kind.upper():14} {(large - small) / (args.large - args.small):10,.0f} instructions per {unit}")


if __name__ == "__main__":
    main()
