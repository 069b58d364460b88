"""User-space instructions per request (client + server), counted by callgrind.

Mounts a trivial filesystem in this process (one worker), then a forked child makes N system
calls that each cost exactly one request of the chosen kind; callgrind counts every user-space
instruction of both processes (the child is forked, so it runs under callgrind too; a client
thread in the server's process would deadlock, because callgrind holds its lock across stat).
Two runs with different N cancel the start-up cost:

    python -m bench.request_cost            # runs callgrind twice per kind and prints the figures

Kinds: GETATTR and LOOKUP answered by plain handlers, and GETATTR by an ``async def`` one that
never awaits (what the event loop adds to a request). ``--transport io_uring`` (or ``both``) serves
them over FUSE over io_uring (one entry per queue; the module parameter enable_uring is turned on
for the run and put back afterwards):

    python -m bench.request_cost --transport both --kinds getattr

``python -m bench.request_cost --serve getattr 20000 /dev/fuse`` is the measured program itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import stat
import subprocess
import sys
import tempfile

from bench.enable_uring import uring_parameter
from fusepass import Attr, Context, Entry, Operations
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


KINDS = ("getattr", "lookup", "getattr-async")


TRANSPORTS = ("/dev/fuse", "io_uring")


def serve(kind: str, n: int, transport: str) -> None:
    fs = CheapAsync() if kind == "getattr-async" else Cheap()
    ring = transport == "io_uring"
    with tempfile.TemporaryDirectory() as mnt, Session(fs, mnt, threads=1, passthrough="off", io_uring=ring,
                                                       io_uring_depth=1) as session:
        if ring and not session.over_io_uring:
            raise RuntimeError(f"io_uring not used: {session.io_uring_why_not}")
        pid = os.fork()
        if pid == 0:
            try:
                if kind != "lookup":
                    for _ in range(n):
                        os.stat(mnt)
                else:
                    for i in range(n):
                        os.stat(f"{mnt}/f{i}")
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


def instructions(kind: str, n: int, transport: str) -> int:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p", sys.executable, "-m",
             "bench.request_cost", "--serve", kind, str(n), transport],
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
    parser.add_argument("--serve", nargs=3, metavar=("KIND", "N", "TRANSPORT"), help=argparse.SUPPRESS)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=12000)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--transport", choices=(*TRANSPORTS, "both"), default="/dev/fuse")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.serve[2])
        return
    transports = TRANSPORTS if args.transport == "both" else (args.transport,)
    with contextlib.ExitStack() as stack:
        if "io_uring" in transports:
            stack.enter_context(uring_parameter("Y"))
        for kind in args.kinds.split(","):
            for transport in transports:
                small, large = instructions(kind, args.small, transport), instructions(kind, args.large, transport)
                print(f"{kind.upper():14} {transport:<10} {(large - small) / (args.large - args.small):10,.0f} "
                      "instructions per request", flush=True)


if __name__ == "__main__":
    main()
