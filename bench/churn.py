"""An unrelated writer: ``python -m bench.churn DIR N [--size BYTES]`` creates N small files under DIR.

It stands for the rest of a busy filesystem while a measurement looks at what a watcher of some other
directory costs. Files go 1,000 to a subdirectory (``DIR/d0000/f0000``...), each created, written and
closed. Prints ``{"files": N, "seconds": S, "cpu_s": C}``: its wall time and its own CPU time (user and
system: the kernel's event work for any watcher is done in the writer's system calls).
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.churn", description=__doc__.splitlines()[0])
    p.add_argument("directory")
    p.add_argument("files", type=int)
    p.add_argument("--size", type=int, default=100, help="bytes per file (default 100)")
    args = p.parse_args(argv)
    seconds = write_files(args.directory, args.files, args.size)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"files": args.files, "seconds": seconds, "cpu_s": usage.ru_utime + usage.ru_stime}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
