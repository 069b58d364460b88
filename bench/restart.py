"""Time to recover: from the SIGKILL of a supervised mount's server to the first request answered after it.

Mounts a mirror with ``fusepass mount --supervise --foreground -o timeout=0`` (every stat is a
request), then N times: SIGKILL the server (the supervisor's child), wait for its death (a pidfd),
and time a stat of a name in the mount, which blocks until the successor answers. The time runs
from the kill to that answer: death, fork, the successor's start (journal read and compacted,
mirror and watcher made, node table restored), FUSE_NOTIFY_RESEND, the request served. Also
prints the cost of keeping the journal on the request path (``--cost``): the time per LOOKUP,
FORGET, OPEN and RELEASE through the dispatcher and the mirror, with and without a journal, in
one run. ``--restarts N`` times the planned restart instead: N times ``fusepass restart`` while a
caller loops a stat and a read of a file in the mount, and gives the longest call of each restart
(the time a caller waited while the old server handed over and the new one took over; a new
server's start, an interpreter's, happens before that and costs callers nothing).

    python -m bench.restart [--kills 100] [--cost [--cost-files 4000]] [--no-kills] [--restarts 50]
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fusepass import control
from fusepass import mount as mountmod

REPO = Path(__file__).resolve().parent.parent


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def ready_server(mnt: Path, old: int) -> None:
    """Wait until a server other than ``old`` answers ``status`` (it then counts as ready)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if control.query(str(mnt))["pid"] != old:
                return
        except OSError:
            pass
        time.sleep(0.005)
    raise TimeoutError("no new server became ready")


@contextmanager
def supervised_mount(files: int) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A supervised mirror of ``files`` one-byte files, every one held by the kernel, with no
    attribute cache (every stat is a request); unmounted and its processes ended afterwards."""
    with tempfile.TemporaryDirectory(prefix="fusepass-restart-") as work:
        src, mnt = Path(work, "src"), Path(work, "mnt")
        src.mkdir()
        mnt.mkdir()
        for i in range(files):
            (src / f"f{i}").write_bytes(b"x")
        r, w = os.pipe()
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "fusepass.cli", "mount", "--supervise", "--foreground", "-o", "timeout=0",
             "--ready-fd", str(w), str(src), str(mnt)], pass_fds=(w,), stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], 30)
            assert ready and os.read(r, 64) == b"ready\n", "the mount did not become ready"
            for i in range(files):  # the kernel holds every file: the successor restores them all
                os.stat(mnt / f"f{i}")
            yield supervisor, mnt
        finally:
            os.close(r)
            if mountmod.mount_entry(str(mnt)) is not None:
                mountmod.unmount(str(mnt), lazy=True)
            try:
                supervisor.wait(20)
            except subprocess.TimeoutExpired:
                for pid in children(supervisor.pid):
                    os.kill(pid, signal.SIGKILL)
                supervisor.kill()
                supervisor.wait(5)


def recovery(kills: int, files: int) -> list[float]:
    with supervised_mount(files) as (supervisor, mnt):
        times = []
        for k in range(kills):
            (server,) = children(supervisor.pid)
            pidfd = os.pidfd_open(server)
            t0 = time.monotonic()
            os.kill(server, signal.SIGKILL)
            select.select([pidfd], [], [], 30)
            os.close(pidfd)
            os.stat(mnt / f"f{k % files}")
            times.append((time.monotonic() - t0) * 1000)
            ready_server(mnt, server)  # before the next kill: one killed before it is ready counts as failing
        return times


class Caller:
    """A thread that stats and reads a file in the mount in a loop, keeping when each call began and
    how long it took."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.calls: list[tuple[float, float]] = []  # (began, seconds)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                os.stat(self.path)
                with open(self.path, "rb") as f:
                    f.read()
            except OSError as e:
                self.errors.append(repr(e))
            with self._done:
                self.calls.append((t0, time.monotonic() - t0))
                self._done.notify_all()

    def wait_past(self, t: float) -> None:
        """Wait until a call that began after ``t`` has ended: every call under way at ``t`` has too."""
        with self._done:
            assert self._done.wait_for(lambda: self.calls[-1][0] > t if self.calls else False, 60)

    def longest(self, since: float, until: float) -> float:
        """The longest call that began in [since, until], in ms (0 if none did)."""
        return max((d for t, d in self.calls if since <= t <= until), default=0.0) * 1000

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def planned(restarts: int, files: int) -> tuple[list[float], list[float], int, list[str]]:
    """(longest caller wait per restart ms, the supervisor's hand-over-to-ready ms, calls, errors)."""
    with supervised_mount(files) as (_, mnt):
        caller = Caller(mnt / "f0")
        waits, reported = [], []
        try:
            for _ in range(restarts):
                t0 = time.monotonic()
                r = subprocess.run([sys.executable, "-m", "fusepass.cli", "restart", str(mnt)], capture_output=True,
                                   text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
                assert r.returncode == 0, r.stderr
                reported.append(float(r.stdout.rsplit("at most ", 1)[1].split()[0]))
                t1 = time.monotonic()
                caller.wait_past(t1)
                waits.append(caller.longest(t0, t1))
        finally:
            caller.stop()
        return waits, reported, len(caller.calls), caller.errors


def request_cost(n: int) -> dict[str, tuple[float, float]]:
    """Microseconds per request through the dispatcher and a mirror, (without, with) a journal."""
    sys.path.insert(0, str(REPO / "tests"))
    from fakekernel import FakeKernel  # type: ignore[import-not-found]  # tests/ is not a package

    from fusepass import abi
    from fusepass.journal import Journal, create_files
    from fusepass.mirror import Mirror

    out: dict[str, list[float]] = {"LOOKUP": [], "FORGET": [], "OPEN": [], "RELEASE": []}
    with tempfile.TemporaryDirectory(prefix="fusepass-cost-") as src:
        for i in range(n):
            Path(src, f"f{i}").write_bytes(b"x")
        for journaled in (False, True, False, True):  # interleaved: the machine's load hits both
            fs = Mirror(src, watch=False)
            k = FakeKernel(fs)
            if journaled:
                journal = Journal(create_files())
                fs.persist(journal, 10000)
                k.dispatcher.journal = journal
            k.init()
            times = {}
            t = time.perf_counter()
            nodes = [abi.ENTRY_OUT.unpack_from(k.call(abi.Opcode.LOOKUP, b"f%d\0" % i).payload)[0] for i in range(n)]
            times["LOOKUP"] = time.perf_counter() - t
            t = time.perf_counter()
            fhs = [abi.OPEN_OUT.unpack_from(k.call(abi.Opcode.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0),
                                                   nodeid=node).payload)[0] for node in nodes]
            times["OPEN"] = time.perf_counter() - t
            t = time.perf_counter()
            for node, fh in zip(nodes, fhs, strict=True):
                k.call(abi.Opcode.RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid=node)
            times["RELEASE"] = time.perf_counter() - t
            t = time.perf_counter()
            for node in nodes:
                k.send(k.message(abi.Opcode.FORGET, abi.FORGET_IN.pack(1), nodeid=node)[1])
            times["FORGET"] = time.perf_counter() - t
            fs.destroy()
            for op, seconds in times.items():
                out[op].append(seconds / n * 1e6)
    return {op: (min(v[0::2]), min(v[1::2])) for op, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--files", type=int, default=1000, help="files the kernel holds when the server dies")
    parser.add_argument("--cost", action="store_true", help="also measure the journal's request-path cost")
    parser.add_argument("--cost-files", type=int, default=4000,
                        help="files looked up, opened at once, released and forgotten (below half the fd limit)")
    parser.add_argument("--no-kills", action="store_true", help="only the request-path cost")
    parser.add_argument("--restarts", type=int, default=0,
                        help="time N planned restarts (fusepass restart) under a looping caller, instead of kills")
    args = parser.parse_args()
    if args.restarts:
        waits, reported, calls, errors = planned(args.restarts, args.files)
        print(f"fusepass restart x{len(waits)} ({args.files} nodes held), longest caller wait per restart: "
              f"median {statistics.median(waits):.1f} ms, worst {max(waits):.1f} ms, best {min(waits):.1f} ms; "
              f"hand-over to new server ready (the supervisor's count): median {statistics.median(reported):.1f} ms, "
              f"worst {max(reported):.1f} ms; {calls} calls, {len(errors)} errors {errors[:3]}")
        return
    if not args.no_kills:
        times = recovery(args.kills, args.files)
        print(f"kill -> first answered request over {len(times)} kills, {args.files} nodes held: "
              f"median {statistics.median(times):.1f} ms, worst {max(times):.1f} ms, best {min(times):.1f} ms")
    if args.cost or args.no_kills:
        print("request path, microseconds per request (best of 2 interleaved runs): without / with journal")
        for op, (plain, journaled) in request_cost(args.cost_files).items():
            print(f"  {op:<8} {plain:7.1f} {journaled:7.1f}  (+{journaled - plain:.1f})")


if __name__ == "__main__":
    main()
