"""``python -m bench.aio``: what ``async def`` handlers cost and what they buy (issue 15).

``getattr``: requests per second of a cheap GETATTR (the root, never cached) answered by a plain
handler and by an ``async def`` one, in this process (``bench.request_cost``'s filesystem), while
``--clients`` forked processes call stat(2) on it for ``--seconds``: the price of the event loop.

``slow-source``: whole files per second read from ``fusepass.examples.slow_source`` and from the same
filesystem on pyfuse3 and trio (``bench/peers/pyfuse3_slow_source.py``, run by ``--pyfuse3-python``,
``pyfuse3.main(max_tasks=--readers)``: its default, 99, would cap it below the readers), by
``--readers`` threads each opening and reading objects one after the other for ``--seconds``;
every read of the store awaits ``--latency``. Prints Markdown tables; ``--rounds`` alternates the
configurations and reports medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import environment as envmod
from .getattr_rate import stat_rate
from .request_cost import Cheap, CheapAsync
from .targets import Peer

PYFUSE3_SLOW_SOURCE = envmod.BENCH_DIR / "peers" / "pyfuse3_slow_source.py"


class Program(Peer):
    """A filesystem program that takes its mount point and options (no source directory)."""

    def argv(self, source: str, mnt: str) -> list[str]:
        return [*self.command, mnt]


def read_rate(mnt: str, objects: int, size: int, readers: int, seconds: float) -> float:
    """Whole objects per second read from ``mnt`` by ``readers`` threads; every byte is checked."""
    from fusepass.examples.slow_source import contents

    counts = [0] * readers
    errors: list[str] = []
    start = threading.Barrier(readers + 1)
    deadline = [0.0]

    def reader(i: int) -> None:
        start.wait()
        k = i
        while time.monotonic() < deadline[0]:
            key = f"object-{k % objects}"
            with open(os.path.join(mnt, key), "rb", buffering=0) as f:
                data = f.read()
            if data != contents(key, 0, size):
                errors.append(key)
                return
            counts[i] += 1
            k += readers
        return

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(readers)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + seconds
    start.wait()
    for t in threads:
        t.join(seconds + 60)
    if errors:
        raise RuntimeError(f"wrong contents read from {mnt}: {errors[:3]}")
    return sum(counts) / seconds


def slow_sources(args: argparse.Namespace) -> list[Program]:
    options = ["--objects", str(args.objects), "--size", str(args.size), "--latency", str(args.latency)]
    pyfuse3 = Path(args.pyfuse3_python)
    return [
        Program("fusepass", "fusepass.examples.slow_source (4 workers, one event loop)",
                [sys.executable, "-m", "fusepass.examples.slow_source", *options], None),
        Program("pyfuse3", "bench/peers/pyfuse3_slow_source.py (pyfuse3 on trio)",
                [str(pyfuse3), str(PYFUSE3_SLOW_SOURCE), *options, "--max-tasks", str(args.readers)],
                None if pyfuse3.exists() else f"{pyfuse3} is missing"),
    ]


def rounds(n: int, configs: list[str], measure: Callable[[str], float]) -> dict[str, list[float]]:
    """``n`` rounds over ``configs``, each round starting one further along; every value measured."""
    values: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(n):
        for c in configs[r % len(configs):] + configs[:r % len(configs)]:
            values[c].append(measure(c))
            print(f"r{r + 1} {c:<16} {values[c][-1]:,.0f}", flush=True)
    return values


def table(title: str, unit: str, values: dict[str, list[float]]) -> str:
    lines = [f"| {title} | {unit} |", "|---|---|"]
    for name, vs in values.items():
        spread = f" ({min(vs):,.0f}–{max(vs):,.0f})" if len(vs) > 1 else ""
        lines.append(f"| {name} | **{statistics.median(vs):,.0f}**{spread} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aio", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=2, help="stat(2) processes for getattr")
    parser.add_argument("--readers", type=int, default=1000, help="reader threads for slow-source")
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--pyfuse3-python", default=str(envmod.venv_python()),
                        help="an interpreter with pyfuse3 and trio (default: the benchmark's virtualenv)")
    parser.add_argument("--workdir", default="/var/tmp/fusepass-bench-aio", help="mount points and server logs")
    parser.add_argument("--only", choices=("getattr", "slow-source"), default=None)
    args = parser.parse_args(argv)
    # The pyfuse3 peer imports the example's contents() from this repository.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(envmod.REPO), os.environ.get("PYTHONPATH")]))
    out = []
    if args.only in (None, "getattr"):
        kinds: dict[str, Callable[[], Cheap]] = {"plain getattr": Cheap, "async def getattr": CheapAsync}
        values = rounds(args.rounds, list(kinds), lambda c: stat_rate(kinds[c](), args.clients, args.seconds))
        out.append(table(f"cheap GETATTR, {args.clients} stat(2) processes", "requests/s", values))
    if args.only in (None, "slow-source"):
        os.makedirs(args.workdir, exist_ok=True)
        programs = {p.name: p for p in slow_sources(args) if p.unavailable is None}
        for p in slow_sources(args):
            if p.unavailable:
                print(f"{p.name} not run: {p.unavailable}", file=sys.stderr)

        def measure(name: str) -> float:
            mnt = os.path.join(args.workdir, name)
            os.makedirs(mnt, exist_ok=True)
            with programs[name].mounted("", mnt, os.path.join(args.workdir, f"{name}.log")) as m:
                return read_rate(m.path, args.objects, args.size, args.readers, args.seconds)

        values = rounds(args.rounds, list(programs), measure)
        out.append(table(f"slow source, {args.readers} readers, {args.latency * 1000:g} ms a read, "
                         f"{args.size:,}-byte objects", "objects/s", values))
    print()
    print("\n\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
