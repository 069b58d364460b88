"""How soon a change made in the source shows through the mount: ``python -m bench.coherence SRC_DIR MNT_DIR N``.

SRC_DIR is a directory of the source itself and MNT_DIR the same directory through the mount. The file
``SRC_DIR/f`` is rewritten N times with a new size, back to back, as another program would change the
source behind the mount's back; after each rewrite ``MNT_DIR/f`` is stat'ed every 0.2 ms until it shows
the new size. A mount that caches attributes for a timeout shows a change when its cache expires (the
poller itself keeps the cache fresh, so each change waits about the whole timeout); one that is told of
changes shows it when the notification lands. A change not seen within ``--give-up`` seconds is a miss;
``--max-misses`` misses in a row end the run. Prints ``{"changes", "misses", "p50_ms", "p99_ms",
"max_ms"}`` over the changes that were seen.
"""

from __future__ import annotations

import argparse
import json
import os
import time

POLL_S = 0.0002


def rewrite(path: str, size: int) -> None:
    """Give ``path`` new content of ``size`` bytes, in place (the same inode, as an editor saving in place)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, b"v" * size)
    finally:
        os.close(fd)


def seen_after(path: str, size: int, give_up: float, start: float) -> float | None:
    """Seconds from ``start`` until ``path`` has ``size`` bytes, or None after ``give_up`` seconds."""
    while True:
        try:
            if os.stat(path).st_size == size:
                return time.perf_counter() - start
        except FileNotFoundError:
            pass  # the mount has not seen the file yet
        if time.perf_counter() - start > give_up:
            return None
        time.sleep(POLL_S)


def measure(src_dir: str, mnt_dir: str, n: int, give_up: float, max_misses: int) -> dict[str, float | int | None]:
    src, mnt = os.path.join(src_dir, "f"), os.path.join(mnt_dir, "f")
    rewrite(src, 1)
    seen_after(mnt, 1, give_up, time.perf_counter())  # the first lookup (a mount that caches may miss it)
    latencies: list[float] = []
    misses = in_a_row = changes = 0
    for i in range(n):
        size = 2 + i % 7  # never the size before
        start = time.perf_counter()
        rewrite(src, size)
        changes += 1
        latency = seen_after(mnt, size, give_up, start)
        if latency is None:
            misses += 1
            in_a_row += 1
            if in_a_row >= max_misses:
                break
            continue
        in_a_row = 0
        latencies.append(latency * 1000)
    latencies.sort()

    def pct(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return {"changes": changes, "misses": misses, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "max_ms": latencies[-1] if latencies else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.coherence", description=__doc__.splitlines()[0])
    p.add_argument("source_dir")
    p.add_argument("mount_dir")
    p.add_argument("changes", type=int)
    p.add_argument("--give-up", type=float, default=3.0)
    p.add_argument("--max-misses", type=int, default=3)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.source_dir, args.mount_dir, args.changes, args.give_up, args.max_misses)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
