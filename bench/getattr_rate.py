"""GETATTR requests per second with 1, 2 and 4 callers, over /dev/fuse and over io_uring (issue 17).

The server (``bench.request_cost.Cheap``: attributes never cached, so every ``stat`` of the root is
one GETATTR) runs in this process; each caller is a forked process that stats the mount point for
the same number of seconds. Transports and caller counts are interleaved, round by round, each
measurement on a fresh mount. The fuse module parameter enable_uring is turned on for the
io_uring mounts and put back to what it was afterwards (root only)::

    python -m bench.getattr_rate --rounds 3 --seconds 3

Prints one line per measurement and a table of medians (requests/s, all callers together), with
the server's CPU time per request (user + system of this process, whose only busy threads are the
server's): what a request costs the server, whatever the machine's other load does to the rates.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import struct
import tempfile
import time
from typing import Any

from bench.enable_uring import uring_parameter
from bench.request_cost import Cheap
from fusepass import Operations, uring_transport
from fusepass.session import Session

TRANSPORTS = ("/dev/fuse", "io_uring")


def stat_for(path: str, seconds: float) -> int:
    """stat(2) ``path`` in a loop for ``seconds``; how many were made (the clock read every 64)."""
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(64):
            os.stat(path)
        n += 64
    return n


def _caller(mnt: str, go: int, out: int, seconds: float) -> None:
    """A forked caller: wait for the start byte, stat ``mnt`` for ``seconds``, report the count."""
    try:
        os.read(go, 1)
        os.write(out, struct.pack("<Q", stat_for(mnt, seconds)))
    finally:
        os._exit(0)


def stat_rate(fs: Operations, callers: int, seconds: float, **session_kw: Any) -> float:
    """stat(2)s per second of the root of ``fs``, mounted afresh in this process, by ``callers``
    processes together (forked before the server's threads exist). ``session_kw`` go to the
    Session; one asked for io_uring fails unless it got it."""
    return stat_rate_and_cost(fs, callers, seconds, **session_kw)[0]


def stat_rate_and_cost(fs: Operations, callers: int, seconds: float, **session_kw: Any) -> tuple[float, float]:
    """``stat_rate``, and the server's CPU time (user and system, every thread of this process: the
    callers are other processes) per request, in microseconds."""
    with tempfile.TemporaryDirectory() as mnt:
        go_r, go_w = os.pipe()
        out_r, out_w = os.pipe()
        pids = []
        for _ in range(callers):
            pid = os.fork()
            if pid == 0:
                _caller(mnt, go_r, out_w, seconds)
            pids.append(pid)
        os.close(out_w)
        os.close(go_r)
        try:
            with Session(fs, mnt, passthrough="off", **session_kw) as session:
                if session_kw.get("io_uring") and not session.over_io_uring:
                    raise RuntimeError(f"io_uring not used: {session.io_uring_why_not}")
                os.stat(mnt)  # the first request after INIT (waits for every queue to register, and the loop to run)
                start, used = time.monotonic(), _cpu_seconds()
                os.write(go_w, b"x" * callers)
                counts = [struct.unpack("<Q", os.read(out_r, 8))[0] for _ in range(callers)]
                elapsed, used = time.monotonic() - start, _cpu_seconds() - used
        finally:
            os.close(go_w)
            os.close(out_r)
            for pid in pids:
                os.waitpid(pid, 0)
        total = sum(counts)
        return total / max(elapsed, seconds), used * 1e6 / max(total, 1)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(transport: str, callers: int, seconds: float, depth: int) -> tuple[float, float]:
    """GETATTR requests per second of ``callers`` processes together over ``transport``, and the
    server's CPU microseconds per request."""
    return stat_rate_and_cost(Cheap(), callers, seconds, io_uring=transport == "io_uring", io_uring_depth=depth)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--callers", default="1,2,4")
    parser.add_argument("--depth", type=int, default=uring_transport.DEFAULT_DEPTH, help="io_uring entries per queue")
    args = parser.parse_args()
    callers = [int(c) for c in args.callers.split(",")]
    results: dict[tuple[str, int], list[float]] = {}
    costs: dict[tuple[str, int], list[float]] = {}
    with uring_parameter("Y"):
        for r in range(args.rounds):
            for n in callers:
                for transport in (TRANSPORTS if r % 2 == 0 else TRANSPORTS[::-1]):
                    rate, cost = measure(transport, n, args.seconds, args.depth)
                    results.setdefault((transport, n), []).append(rate)
                    costs.setdefault((transport, n), []).append(cost)
                    print(f"round {r + 1} {transport:<9} {n} callers: {rate:10.0f} GETATTR/s, server CPU "
                          f"{cost:5.1f} us/request", flush=True)
    print(f"\nmedians over {args.rounds} rounds of {args.seconds:g} s (GETATTR/s, all callers together; "
          "the server's CPU time per request, user + system, in us)")
    print(f"{'callers':>8}{'/dev/fuse':>12}{'io_uring':>12}{'ratio':>8}{'cpu dev':>10}{'cpu ring':>10}")
    for n in callers:
        dev = statistics.median(results[("/dev/fuse", n)])
        ring = statistics.median(results[("io_uring", n)])
        cpu_dev = statistics.median(costs[("/dev/fuse", n)])
        cpu_ring = statistics.median(costs[("io_uring", n)])
        print(f"{n:>8}{dev:>12.0f}{ring:>12.0f}{ring / dev:>8.2f}{cpu_dev:>10.1f}{cpu_ring:>10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
