"""One timed phase of the metadata workload, run as its own process: ``python -m bench.metaops PHASE DIR N``.

Phases, over N files named ``f000000``... in DIR: ``create`` (open with O_CREAT|O_EXCL, close: an empty
file each), ``stat`` (stat each by path), ``list`` (one pass of scandir over DIR, names and types only),
``delete`` (unlink each). Prints ``{"phase": ..., "files": N, "seconds": S}``; the clock covers the
phase's system calls only, not the interpreter's start.
"""

from __future__ import annotations

import json
import os
import sys
import time


def run(phase: str, directory: str, n: int) -> float:
    names = [os.path.join(directory, f"f{i:06d}") for i in range(n)]
    start = time.perf_counter()
    if phase == "create":
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
        for name in names:
            os.close(os.open(name, flags, 0o644))
    elif phase == "stat":
        for name in names:
            os.stat(name)
    elif phase == "list":
        with os.scandir(directory) as it:
            seen = sum(1 for entry in it if entry.is_file(follow_symlinks=False))
        if seen != n:
            raise SystemExit(f"listed {seen} files in {directory}, expected {n}")
    elif phase == "delete":
        for name in names:
            os.unlink(name)
    else:
        raise SystemExit(f"unknown phase {phase!r}")
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m bench.metaops create|stat|list|delete DIR N", file=sys.stderr)
        return 2
    phase, directory, n = argv[0], argv[1], int(argv[2])
    seconds = run(phase, directory, n)
    print(json.dumps({"phase": phase, "files": n, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
