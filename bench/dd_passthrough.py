"""dd throughput of one file three ways: directly, through passthrough, through the Python server.

Creates a random file (1 GiB by default) in a fresh source directory, mounts the mirror twice
(``--passthrough on`` and ``--passthrough off``), warms the page cache, then runs
``dd if=FILE of=/dev/null bs=1M`` on the backing file, through the passthrough mount and
through the served mount, interleaved, for a few rounds. Prints the median MiB/s of each and
its ratio to the direct read, with the READ requests each mount received (passthrough: none).
Everything is unmounted and removed at the end, whatever happens.

    sudo python bench/dd_passthrough.py [--size-mib 1024] [--rounds 3] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

from fusepass import control
from fusepass import mount as mountmod

MiB = 1 << 20
_DD_RESULT = re.compile(rb"(\d+) bytes .* copied, ([0-9.e+-]+) s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to make the work directory (default: $TMPDIR)")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="fusepass-dd-", dir=args.dir)
    src, mnt_pt, mnt_served = (os.path.join(work, name) for name in ("src", "passthrough", "served"))
    for d in (src, mnt_pt, mnt_served):
        os.mkdir(d)
    mounted: list[str] = []
    try:
        print(f"creating a {args.size_mib} MiB random file in {src} ...", flush=True)
        make_random_file(os.path.join(src, "data"), args.size_mib)
        for mnt, mode in ((mnt_pt, "on"), (mnt_served, "off")):
            fusepass("mount", src, mnt, "--passthrough", mode)
            mounted.append(mnt)
        paths = {
            "backing file directly": os.path.join(src, "data"),
            "FUSE passthrough": os.path.join(mnt_pt, "data"),
            "FUSE served by Python": os.path.join(mnt_served, "data"),
        }
        for path in paths.values():  # warm cache: every run below finds the backing file in memory
            dd(path)
        runs: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(args.rounds):
            for name, path in paths.items():
                runs[name].append(dd(path))
            print(f"round {r + 1}: " + ", ".join(f"{name} {runs[name][-1]:.0f}" for name in paths), flush=True)
        reads = {mnt: requests(mnt, "READ") for mnt in (mnt_pt, mnt_served)}
        report(runs, args, reads[mnt_pt], reads[mnt_served])
        if not control.query(mnt_pt)["passthrough"]["negotiated"] or reads[mnt_pt] != 0:
            print("warning: the passthrough mount served READ requests", file=sys.stderr)
            return 1
        return 0
    finally:
        for mnt in reversed(mounted):
            if mountmod.mount_entry(mnt) is not None:
                fusepass("umount", "--lazy", mnt)
        if not any(mountmod.mount_entry(m) for m in (mnt_pt, mnt_served)):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"warning: {work} still has a mount; left in place", file=sys.stderr)


def make_random_file(path: str, size_mib: int) -> None:
    chunk = 16 * MiB
    with open(path, "wb") as f:
        left = size_mib * MiB
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def fusepass(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "fusepass.cli", *args], check=True, stdin=subprocess.DEVNULL)


def dd(path: str) -> float:
    """Read ``path`` with dd bs=1M; return MiB/s from dd's own byte count and time."""
    proc = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], capture_output=True, check=True)
    m = _DD_RESULT.search(proc.stderr)
    if m is None:
        raise RuntimeError(f"cannot parse dd output: {proc.stderr!r}")
    return int(m.group(1)) / MiB / float(m.group(2))


def requests(mnt: str, opcode: str) -> int:
    return control.query(mnt)["requests"].get(opcode, {}).get("count", 0)


def report(runs: dict[str, list[float]], args: argparse.Namespace, pt_reads: int, served_reads: int) -> None:
    direct = statistics.median(runs["backing file directly"])
    print(f"\ndd if=FILE of=/dev/null bs=1M, {args.size_mib} MiB random file, warm cache, "
          f"{args.rounds} interleaved rounds; MiB/s")
    print(f"{'path':<24}{'median':>9}{'min':>9}{'max':>9}{'vs direct':>11}")
    for name, values in runs.items():
        med = statistics.median(values)
        print(f"{name:<24}{med:>9.0f}{min(values):>9.0f}{max(values):>9.0f}{med / direct:>10.2f}x")
    total = args.rounds + 1
    print(f"READ requests received over {total} reads: passthrough mount {pt_reads}, served mount {served_reads}")


if __name__ == "__main__":
    raise SystemExit(main())
