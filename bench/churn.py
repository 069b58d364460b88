"""An unrelated writer: ``python -m bench.churn DIR N [--size BYTES]`` creates N small files under DIR.

It stands for the rest of a busy filesystem while a measurement looks at what a watcher of some other
directory costs. Files go 1,000 to a subdirectory (``DIR/d0000/f0000``...), each created, written and
closed. With ``--rewrites`` it instead writes N times ``--size`` bytes into the one file ``DIR/data``
(kept open, offsets cycling over 1 MiB): the writes a mount passes through to a watched source file.
Prints ``{"files": N, "seconds": S, "cpu_s": C}``: its wall time and its own CPU time (user and system:
the kernel's event work for any watcher is done in the writer's system calls).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

PER_DIR = 1000


def write_files(directory: str, n: int, size: int) -> float:
    """Create ``n`` files of ``size`` bytes under ``directory``; return the seconds it took."""
    data = b"x" * size
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    start = time.perf_counter()
    for d in range(0, n, PER_DIR):
        sub = os.path.join(directory, f"d{d // PER_DIR:04d}")
        os.makedirs(sub, exist_ok=True)
        for i in range(d, min(n, d + PER_DIR)):
            fd = os.open(os.path.join(sub, f"f{i:06d}"), flags, 0o644)
            os.write(fd, data)
            os.close(fd)
    return time.perf_counter() - start


def rewrite_file(path: str, n: int, size: int) -> float:
    """``n`` pwrites of ``size`` bytes into ``path``, cycling over its first MiB; return the seconds."""
    data = b"y" * size
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    slots = max(1, (1 << 20) // size)
    start = time.perf_counter()
    try:
        for i in range(n):
            os.pwrite(fd, data, (i % slots) * size)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.churn", description=__doc__.splitlines()[0])
    p.add_argument("directory")
    p.add_argument("files", type=int)
    p.add_argument("--size", type=int, default=100, help="bytes per file or write (default 100)")
    p.add_argument("--rewrites", action="store_true", help="N writes into DIR/data instead of N new files")
    args = p.parse_args(argv)
    if args.rewrites:
        seconds = rewrite_file(os.path.join(args.directory, "data"), args.files, args.size)
    else:
        seconds = write_files(args.directory, args.files, args.size)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"files": args.files, "seconds": seconds, "cpu_s": usage.ru_utime + usage.ru_stime}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
