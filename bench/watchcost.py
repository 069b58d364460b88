"""What watching a source costs while the rest of its filesystem is busy: ``python -m bench.watchcost``.

A source directory with ``--dirs`` known subdirectories is watched by one of three designs, each in its
own process; meanwhile an unrelated process (``bench.churn``) writes ``--files`` small files in a sibling
directory on the same filesystem. Figures per design: the watcher process's CPU time, the events it
parsed and kept, queue overflows, and the writer's wall and CPU time (the kernel builds events in the
writer's system calls, so a watcher's kernel-side cost shows there).

- ``none``: no watcher, the writer alone.
- ``inode-marks``: ``fusepass.watcher.SourceWatcher`` with a mark on the source and on each known
  directory (the design fusepass uses).
- ``filesystem-mark``: the same reader with one FAN_MARK_FILESYSTEM mark instead, keeping only the
  records whose directory or object is known (the alternative: every event on the filesystem reaches the
  process).

With ``--rewrites N`` the writer instead makes N writes of 4 KiB into one file of a watched directory:
what the watcher costs the writes a mount passes through to its source.

Rounds visit the designs in a rotated order; the table shows medians (min-max).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
from typing import Any

from fusepass import syscalls
from fusepass import watcher as watchmod

from . import environment as envmod

DESIGNS = ["none", "inode-marks", "filesystem-mark"]
SENTINEL = b"watchcost-sentinel"


def serve(design: str, source: str, dirs: int) -> int:
    """The watcher process: mark, say ready, count until the sentinel arrives, print the figures."""
    known: set[bytes] = set()
    counts = {"parsed": 0, "kept": 0, "overflows": 0}
    done = threading.Event()

    def on_changes(changes: list[watchmod.Change]) -> None:
        counts["parsed"] += len(changes)
        for c in changes:
            if c.handle is None and c.dir is None:  # overflow
                counts["overflows"] += 1
            elif c.dir in known or c.new_dir in known or c.handle in known:
                counts["kept"] += 1
                if c.name == SENTINEL:
                    done.set()

    watcher = watchmod.SourceWatcher(source, on_changes)
    known.add(watcher.root_handle)
    for i in range(dirs):
        fd = os.open(os.path.join(source, f"k{i:05d}"), os.O_PATH | os.O_CLOEXEC)
        known.add(watcher.watch(fd) if design == "inode-marks" else syscalls.name_to_handle(fd))
        os.close(fd)
    if design == "filesystem-mark":
        # The reader is SourceWatcher's; only the mark differs (this design is measured, not shipped).
        mask = watchmod.DIRECTORY_MASK & ~watchmod.FAN_EVENT_ON_CHILD
        syscalls.fanotify_mark(watcher._fd, watchmod.FAN_MARK_ADD | watchmod.FAN_MARK_FILESYSTEM, mask,
                               syscalls.AT_FDCWD, source.encode())
    start = resource.getrusage(resource.RUSAGE_SELF)
    watcher.start()
    print("ready", flush=True)
    done.wait()
    watcher.stop()
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
    print(json.dumps(dict(counts, cpu_s=cpu, batches=watcher.counts["batches"])), flush=True)
    return 0


def one(design: str, work: str, files: int, dirs: int, tag: str, rewrites: int) -> dict[str, Any]:
    source = os.path.join(work, "src")
    churn = os.path.join(source, "k00000") if rewrites else os.path.join(work, f"churn-{tag}")
    writer_cmd = [sys.executable, "-m", "bench.churn", churn, str(files)]
    if rewrites:
        writer_cmd = [sys.executable, "-m", "bench.churn", churn, str(rewrites), "--rewrites", "--size", "4096"]
    else:
        os.makedirs(churn)
    env = dict(os.environ, PYTHONPATH=str(envmod.REPO))
    watcher = None
    try:
        if design != "none":
            watcher = subprocess.Popen([sys.executable, "-m", "bench.watchcost", "--serve", design, source,
                                        "--dirs", str(dirs)], stdout=subprocess.PIPE, text=True, env=env)
            assert watcher.stdout is not None
            if watcher.stdout.readline().strip() != "ready":
                raise SystemExit(f"watchcost: the {design} watcher did not start")
        out = subprocess.run(writer_cmd, capture_output=True, text=True, env=env, check=True, timeout=1800).stdout
        result: dict[str, Any] = {"design": design, "writer": json.loads(out)}
        if watcher is not None:
            assert watcher.stdout is not None
            open(os.path.join(source, SENTINEL.decode()), "w").close()
            result["watcher"] = json.loads(watcher.stdout.readline())
            watcher.wait(60)
            os.unlink(os.path.join(source, SENTINEL.decode()))
        return result
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        if rewrites:
            os.unlink(os.path.join(churn, "data"))
        else:
            shutil.rmtree(churn, ignore_errors=True)


def _cell(rows: list[dict[str, Any]], key: str, fmt: str) -> str:
    """Median (min-max) of ``key`` over ``rows``, or a dash for none."""
    values = [row[key] for row in rows]
    if not values:
        return "–"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.watchcost", description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=100_000, help="files the unrelated writer creates (100,000)")
    p.add_argument("--dirs", type=int, default=1000, help="known directories in the source (1,000)")
    p.add_argument("--rewrites", type=int, default=0, help="instead: this many 4 KiB writes into a watched file")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--designs", default=",".join(DESIGNS))
    p.add_argument("--workdir", default="/var/tmp/fusepass-watchcost")
    p.add_argument("--json", help="also write every measurement to this file")
    p.add_argument("--serve", nargs=2, metavar=("DESIGN", "SOURCE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        return serve(args.serve[0], args.serve[1], args.dirs)
    designs = [d for d in args.designs.split(",") if d]
    if any(d not in DESIGNS for d in designs):
        p.error(f"designs are {','.join(DESIGNS)}")
    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    for i in range(args.dirs):
        os.makedirs(os.path.join(work, "src", f"k{i:05d}"))
    results: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            for design in designs[r % len(designs):] + designs[:r % len(designs)]:
                res = one(design, work, args.files, args.dirs, f"{design}-r{r}", args.rewrites)
                results.append(res)
                print(f"round {r + 1} {design}: {json.dumps(res)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    what = (f"{args.rewrites:,} writes of 4 KiB into a file of a watched directory" if args.rewrites
            else f"{args.files:,} files written beside the source")
    print(f"\n{what}; {args.dirs:,} known directories; {args.rounds} rounds, median (min-max)\n")
    print("| design | watcher CPU s | events parsed | events kept | overflows | writer s | writer CPU s |")
    print("|---|---|---|---|---|---|---|")
    for design in designs:
        rows = [r for r in results if r["design"] == design]
        watched = [r["watcher"] for r in rows if "watcher" in r]
        writer = [r["writer"] for r in rows]
        print(f"| {design} | {_cell(watched, 'cpu_s', '{:.3f}')} | {_cell(watched, 'parsed', '{:,.0f}')} "
              f"| {_cell(watched, 'kept', '{:,.0f}')} | {_cell(watched, 'overflows', '{:,.0f}')} "
              f"| {_cell(writer, 'seconds', '{:.2f}')} | {_cell(writer, 'cpu_s', '{:.2f}')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
