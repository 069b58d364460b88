"""/dev/fuse against FUSE over io_uring, for fusepass and libfuse's passthrough_hp, interleaved (issue 17).

Four configurations present the same source directory: fusepass's mirror (``fusepass mount
--passthrough off -o timeout=0``, so that every read and every stat reaches the server) over /dev/fuse
and with ``-o io_uring``, and libfuse's ``passthrough_hp --nocache --nopassthrough`` without and with
``-o io_uring``. Each round mounts each configuration afresh, in a rotated order, and runs on it:

- ``create``, ``stat``, ``unlink``: 10,000 empty files in one directory (``bench.metaops``, each phase
  in its own process; caches off, so every stat is a LOOKUP);
- ``untar``: ``tar -xf`` of a tree of small files (``--tree-files``);
- ``randread``: 4 KiB reads at random offsets of a 64 MiB file for ``--seconds``, each read range
  dropped from the page cache after it (so every read is one 4 KiB READ request the server answers);
- ``getattr1/2/4``: stat(2)s of the mount's root per second by 1, 2 and 4 processes together.

The module parameter enable_uring is turned on for the run and put back afterwards (root only). An
io_uring configuration that did not get the ring (fusepass's status, or no io_uring descriptor in
passthrough_hp's process) is an error, not a figure. Prints every measurement, then a table of
medians with the ratios io_uring / /dev/fuse per server, and passthrough_hp / fusepass per transport::

    python -m bench.uring --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench import targets
from bench.enable_uring import uring_parameter
from bench.getattr_rate import stat_for

_REPO = Path(__file__).resolve().parent.parent
RANDREAD_FILE_MIB = 64
WORKLOADS = ("create", "stat", "unlink", "untar", "randread", "getattr1", "getattr2", "getattr4")
UNITS = {"create": "files/s", "stat": "files/s", "unlink": "files/s", "untar": "s", "randread": "IOPS",
         "getattr1": "GETATTR/s", "getattr2": "GETATTR/s", "getattr4": "GETATTR/s"}
HIGHER_IS_BETTER = {w: UNITS[w] != "s" for w in WORKLOADS}


class Config:
    """One server in one transport: ``mounted`` yields the mount point once it answers, and checks
    that an io_uring configuration really serves through the ring."""

    def __init__(self, server: str, ring: bool, hp_binary: str | None, extra: str = "") -> None:
        self.server, self.ring, self.hp_binary, self.extra = server, ring, hp_binary, extra
        self.name = f"{server} {'io_uring' if ring else '/dev/fuse'}" + (f" {extra}" if extra else "")

    @contextlib.contextmanager
    def mounted(self, source: str, mnt: str, logfile: str) -> Iterator[str]:
        target: targets.Target
        if self.server == "fusepass":
            options = "timeout=0" + (",io_uring" if self.ring else ",noio_uring")
            options += f",{self.extra}" if self.extra else ""
            target = targets.Fusepass("off", None, options)
        else:
            assert self.hp_binary is not None
            command = [self.hp_binary, "--foreground", "--nocache", "--nopassthrough"]
            target = targets.Peer("passthrough_hp", "passthrough_hp",
                                  command + (["-o", "io_uring"] if self.ring else []), None)
        with target.mounted(source, mnt, logfile) as m:
            if self.ring:
                self._check_ring(m)
            yield m.path

    def _check_ring(self, m: targets.Mounted) -> None:
        if self.server == "fusepass":
            transport = (m.status() or {}).get("transport", {})
            if transport.get("kind") != "io_uring":
                raise targets.MountFailed(f"fusepass did not get io_uring: {transport.get('io_uring_why_not')}")
        elif m.server_pid is None or not _ring_descriptors(m.server_pid):
            raise targets.MountFailed("passthrough_hp -o io_uring holds no io_uring descriptor")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--files", type=int, default=10_000, help="files for create, stat and unlink")
    parser.add_argument("--tree-files", type=int, default=2_000, help="files in the untarred tree")
    parser.add_argument("--seconds", type=float, default=3.0, help="for randread and each getattr rate")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--passthrough-hp", default=_built_passthrough_hp(),
                        help="the passthrough_hp binary (default: one bench/.venv built with io_uring)")
    parser.add_argument("--workdir", default="/var/tmp/fusepass-bench-uring")
    parser.add_argument("--fusepass-ring-variant", action="append", default=[], metavar="OPTIONS",
                        help="one more fusepass io_uring configuration, with these -o options added "
                             "(e.g. io_uring_depth=2: an old default beside the new, in the same run)")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    configs = [Config("fusepass", False, None), Config("fusepass", True, None)]
    configs += [Config("fusepass", True, None, extra) for extra in args.fusepass_ring_variant]
    if args.passthrough_hp and os.path.exists(args.passthrough_hp):
        configs += [Config("passthrough_hp", False, args.passthrough_hp),
                    Config("passthrough_hp", True, args.passthrough_hp)]
    else:
        print("passthrough_hp not found (--passthrough-hp PATH): fusepass only", flush=True)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict[tuple[str, str], list[float]] = {}
    try:
        tree = _make_tree(work, args.tree_files)
        with uring_parameter("Y"):
            for r in range(args.rounds):
                shift = r % len(configs)
                for config in configs[shift:] + configs[:shift]:
                    for workload, value in _round(config, work, tree, workloads, args):
                        results.setdefault((config.name, workload), []).append(value)
                        print(f"round {r + 1} {config.name:<24} {workload:<9} {value:12,.1f} {UNITS[workload]}",
                              flush=True)
    finally:
        for point in targets.mounts_under(str(work)):
            targets.force_unmount(point)
        shutil.rmtree(work, ignore_errors=True)
    _table(configs, workloads, results, args.rounds)
    return 0


def _round(config: Config, work: Path, tree: Path, workloads: list[str],
           args: argparse.Namespace) -> Iterator[tuple[str, float]]:
    source, mnt = work / "src", work / "mnt"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir()
    mnt.mkdir(exist_ok=True)
    (source / "meta").mkdir()
    (source / "untar").mkdir()
    with open(source / "data", "wb") as f:
        f.write(os.urandom(RANDREAD_FILE_MIB << 20))
    with config.mounted(str(source), str(mnt), str(work / f"{config.name.replace(' ', '_').replace('/', '')}.log")):
        for workload in workloads:
            yield workload, _measure(workload, str(mnt), tree, args)


def _measure(workload: str, mnt: str, tree: Path, args: argparse.Namespace) -> float:
    if workload in ("create", "stat", "unlink"):
        phase = "delete" if workload == "unlink" else workload
        out = subprocess.run([sys.executable, "-m", "bench.metaops", phase, f"{mnt}/meta", str(args.files)],
                             check=True, capture_output=True, text=True, timeout=600, cwd=_REPO,
                             env={**os.environ, "PYTHONPATH": str(_REPO)})
        return args.files / float(json.loads(out.stdout)["seconds"])
    if workload == "untar":
        start = time.perf_counter()
        subprocess.run(["tar", "-xf", str(tree), "-C", f"{mnt}/untar"], check=True, timeout=600)
        return time.perf_counter() - start
    if workload == "randread":
        return _in_children(1, lambda: _random_reads(f"{mnt}/data", args.seconds))
    callers = int(workload.removeprefix("getattr"))
    return _in_children(callers, lambda: stat_for(mnt, args.seconds))


def _random_reads(path: str, seconds: float) -> int:
    """4 KiB reads at random page offsets for ``seconds``; each range then dropped from the page
    cache (with readahead off), so that each read is one READ request."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(4096)
        pages = (RANDREAD_FILE_MIB << 20) // 4096
        rng = random.Random(17)
        n = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(32):
                offset = rng.randrange(pages) * 4096
                os.preadv(fd, [buf], offset)
                os.posix_fadvise(fd, offset, 4096, os.POSIX_FADV_DONTNEED)
            n += 32
        return n
    finally:
        os.close(fd)


def _in_children(n: int, work: Callable[[], int]) -> float:
    """Run ``work`` in ``n`` forked processes at once; the sum of their counts per second."""
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.read(go_r, 1)
                os.write(out_w, struct.pack("<Q", work()))
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(go_r)
    os.close(out_w)
    try:
        start = time.monotonic()
        os.write(go_w, b"x" * n)
        counts = []
        for _ in range(n):
            data = os.read(out_r, 8)
            if len(data) != 8:
                raise RuntimeError("a measuring process failed")
            counts.append(struct.unpack("<Q", data)[0])
        elapsed = time.monotonic() - start
    finally:
        os.close(go_w)
        os.close(out_r)
        for pid in pids:
            os.waitpid(pid, 0)
    return sum(counts) / elapsed


def _make_tree(work: Path, files: int) -> Path:
    """A tarball of ``files`` small files (1 to 8 KiB) in directories of 50."""
    rng = random.Random(17)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        root = Path(tmp) / "tree"
        for i in range(files):
            d = root / f"d{i // 50:03d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i:05d}.txt").write_bytes(rng.randbytes(rng.randint(1024, 8192)))
        tarball = work / "tree.tar"
        with tarfile.open(tarball, "w") as tar:
            tar.add(root, arcname="tree")
    return tarball


def _built_passthrough_hp() -> str | None:
    """A passthrough_hp the benchmark built in bench/.venv/peers, one with io_uring if there is
    (libfuse leaves it out when liburing and libnuma were missing at build time)."""
    binaries = sorted(glob.glob(str(_REPO / "bench/.venv/peers/*/build/example/passthrough_hp")))
    with_ring = [b for b in binaries if glob.glob(str(Path(b).parent.parent / "lib/*.p/fuse_uring.c.o"))]
    found = with_ring or binaries
    return found[0] if found else None


def _ring_descriptors(pid: int) -> int:
    count = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[io_uring]"
    return count


def _table(configs: list[Config], workloads: list[str], results: dict[tuple[str, str], list[float]],
           rounds: int) -> None:
    def median(config: str, workload: str) -> float | None:
        values = results.get((config, workload))
        return statistics.median(values) if values else None

    def ratio(a: float | None, b: float | None, workload: str) -> str:
        """How much better ``a`` is than ``b`` (>1: better), whatever the unit."""
        if not a or not b:
            return "-"
        return f"{(a / b if HIGHER_IS_BETTER[workload] else b / a):.2f}"

    names = [c.name for c in configs]
    print(f"\nmedians over {rounds} rounds; ratios > 1 mean the first is faster")
    header = f"{'workload':<10}{'unit':>10}" + "".join(f"{n:>26}" for n in names)
    header += f"{'fp ring/dev':>13}{'hp ring/dev':>13}{'fp/hp dev':>11}{'fp/hp ring':>12}"
    variants = [c for c in configs if c.extra]
    header += "".join(f"{'fp ' + c.extra + ' ring/dev':>{len(c.extra) + 14}}" for c in variants)
    print(header)
    for w in workloads:
        m = {n: median(n, w) for n in names}
        line = f"{w:<10}{UNITS[w]:>10}" + "".join(f"{(m[n] or 0):>26,.1f}" for n in names)
        fp_dev, fp_ring = m.get("fusepass /dev/fuse"), m.get("fusepass io_uring")
        hp_dev, hp_ring = m.get("passthrough_hp /dev/fuse"), m.get("passthrough_hp io_uring")
        line += f"{ratio(fp_ring, fp_dev, w):>13}{ratio(hp_ring, hp_dev, w):>13}"
        line += f"{ratio(fp_dev, hp_dev, w):>11}{ratio(fp_ring, hp_ring, w):>12}"
        line += "".join(f"{ratio(m[c.name], fp_dev, w):>{len(c.extra) + 14}}" for c in variants)
        print(line)


if __name__ == "__main__":
    raise SystemExit(main())
