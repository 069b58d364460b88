"""The mirror's metadata round trips under several fusepass configurations mounted at once (issue 17).

``bench.uring`` mounts one configuration at a time, so drift of a shared machine between two mounts
lands in their ratio. Here every configuration is mounted for the whole run (each over a source of
its own) and the phases alternate between them within each round, in a rotated order: ``create``
(open O_CREAT|O_EXCL, close), ``stat``, ``delete`` (unlink) of ``--files`` files, timed call by
call in this process. Per configuration and phase: files per second, the median call's latency
(which a burst of other work barely moves) and the server's CPU time per file::

    python -m bench.uring_meta --config dev=timeout=0,noio_uring --config ring=timeout=0,io_uring

Turns the module parameter enable_uring on for the run and puts it back (root only).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import time

from bench import targets
from bench.enable_uring import uring_parameter

PHASES = ("create", "stat", "delete")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, metavar="LABEL=OPTIONS",
                        help="a mirror mounted with --passthrough off -o OPTIONS (repeatable)")
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--workdir", default="/var/tmp/fusepass-bench-uring-meta",
                        help="a tmpfs keeps the host filesystem's inode allocation out of the figures")
    args = parser.parse_args()
    configs = [tuple(c.split("=", 1)) for c in args.config]
    phases = args.phases.split(",")
    work = args.workdir
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with uring_parameter("Y"), contextlib.ExitStack() as stack:
        mounted = []
        for i, (label, options) in enumerate(configs):
            source, mnt = f"{work}/src{i}", f"{work}/mnt{i}"
            shutil.rmtree(source, ignore_errors=True)
            os.makedirs(f"{source}/meta")
            os.makedirs(mnt, exist_ok=True)
            m = stack.enter_context(targets.Fusepass("off", None, options).mounted(source, mnt, f"{work}/log{i}"))
            print(f"{label}: {(m.status() or {}).get('transport', {}).get('kind')}", flush=True)
            mounted.append((label, m))
        for r in range(args.rounds):
            for label, m in mounted[r % len(mounted):] + mounted[:r % len(mounted)]:
                assert m.server_pid is not None
                for phase in phases:
                    before = _cpu_ticks(m.server_pid)
                    seconds, median_us = _timed(phase, f"{m.path}/meta", args.files)
                    cpu_us = (_cpu_ticks(m.server_pid) - before) * 1e6 / os.sysconf("SC_CLK_TCK") / args.files
                    results.setdefault((label, phase), []).append((args.files / seconds, median_us, cpu_us))
    print(f"\nmedians over {args.rounds} rounds: files/s, the median call (us), server CPU per file (us)")
    for phase in phases:
        for label, _ in configs:
            v = results[(label, phase)]
            print(f"{phase:<7} {label:<16} {statistics.median(x[0] for x in v):8,.0f}/s "
                  f"{statistics.median(x[1] for x in v):6.0f} us {statistics.median(x[2] for x in v):6.0f} us cpu")
    return 0


def _timed(phase: str, directory: str, n: int) -> tuple[float, float]:
    """The phase over ``n`` files: its seconds and the median call's microseconds."""
    names = [os.path.join(directory, f"f{i:06d}") for i in range(n)]
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    clock = time.perf_counter_ns
    calls = []
    start = time.perf_counter()
    for name in names:
        t = clock()
        if phase == "create":
            os.close(os.open(name, flags, 0o644))
        elif phase == "stat":
            os.stat(name)
        else:
            os.unlink(name)
        calls.append(clock() - t)
    return time.perf_counter() - start, statistics.median(calls) / 1000


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


if __name__ == "__main__":
    raise SystemExit(main())
