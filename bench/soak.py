"""``python -m bench.soak --minutes N [--source DIR]``: a long mixed workload through two mirror mounts,
checked against an exact model, with the servers' descriptors, backing ids and memory watched.

It mounts SOURCE twice in the background with ``fusepass mount``: with ``--passthrough auto`` (file
data through the kernel) and with ``--passthrough off`` (every read and write served by Python).
Worker processes then run for the chosen time, each in a directory of its own on one of the mounts,
so each keeps an exact model of what its files must hold:

- ``data``: eight files, written at random offsets, appended to, truncated, fsynced, read back whole,
  and used through a descriptor held for a burst of reads and writes;
- ``meta``: files created, renamed (also over each other), hard-linked, unlinked, directories made
  and removed, sizes, link counts and listings checked;
- ``mmap``: two files mapped shared and written through the mapping, msynced, read back with pread,
  closed and mapped again;
- ``read``: a set of static files read through both mounts and checked against their digests.

Every few seconds it asks each server for its status (open descriptors, backing ids, the mirror's
descriptor counts) and reads its VmRSS. At the end it verifies every file of every model through its
mount and in the source, waits for the servers to see every close, and compares their figures with
those after minute 1 (or after a third of a shorter run): a count that grew beyond a small tolerance
is reported as a leak. It always unmounts, in a finally. Exit status 0 means no error, no mismatch,
no leak and no error in the servers' logs.

Options: ``--seconds S`` (instead of minutes, for short runs), ``--workers N`` (default 8),
``--seed N``, ``--json FILE`` (the summary, machine-readable), ``--keep`` (keep the work directory
and the soak's files in SOURCE).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import mmap
import multiprocessing
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from fusepass import control
from fusepass import mount as mountmod

KINDS = ("data:pt", "data:served", "meta:pt", "mmap:pt", "read:both", "meta:served", "mmap:served", "data:pt")
SAMPLE_EVERY = 5.0
STATIC_FILES, STATIC_SIZE = 8, 1 << 20
MAX_FILE = 512 << 10
MMAP_SIZE, MMAP_FILES = 256 << 10, 2
META_MAX_FILES, META_MAX_DIRS = 300, 20
ERROR_SAMPLES = 20
# Growth from minute 1 to the end that counts as a leak: counts may grow by 5% + 32, RSS by 10% + 8 MiB.
COUNT_TOLERANCE = (1.05, 32)
RSS_TOLERANCE = (1.10, 8 << 10)


# --- workers (each in its own process, forked before the parent starts any thread) -----------------


class Worker:
    """A worker's loop: ``step`` does one operation and updates the model; errors are recorded, not raised."""

    def __init__(self, root: str, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.errors: list[str] = []
        self.error_count = 0

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def fail(self, what: str) -> None:
        self.error_count += 1
        if len(self.errors) < ERROR_SAMPLES:
            self.errors.append(f"{self.root}: {what}")

    def check_pread(self, fd: int, model: bytes | bytearray, offset: int, label: str) -> None:
        """Read a random span at ``offset`` and compare it with the model."""
        size = self.rng.randrange(1, 65537)
        if os.pread(fd, size, offset) != model[offset:offset + size]:
            self.fail(f"{label}: pread({size}, {offset}) differs from the model")

    def setup(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    def step(self) -> int:  # returns how many operations it did
        raise NotImplementedError

    def finish(self) -> None:
        pass

    def model(self) -> tuple[dict[str, tuple[int, str, int]], list[str]]:
        """(relative file path -> (size, sha256, link count), relative directories)."""
        raise NotImplementedError


def _digest(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_all(path: str) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def _write_all(fd: int, data: bytes | bytearray | memoryview, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


class DataWorker(Worker):
    FILES = 8

    def setup(self) -> None:
        super().setup()
        self.files: dict[str, bytearray] = {}
        for i in range(self.FILES):
            name = f"f{i}"
            os.close(os.open(self.path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            self.files[name] = bytearray()

    def _chunk(self) -> bytes:
        return self.rng.randbytes(self.rng.choice((1, 100, 4096, 10_000, 65536)))

    @staticmethod
    def _put(model: bytearray, offset: int, data: bytes) -> None:
        if offset > len(model):
            model.extend(bytes(offset - len(model)))
        model[offset:offset + len(data)] = data

    def step(self) -> int:
        rng = self.rng
        name = rng.choice(list(self.files))
        model = self.files[name]
        path = self.path(name)
        op = rng.choices(("write", "read", "append", "truncate", "fsync", "held"), (30, 30, 10, 5, 10, 15))[0]
        if op in ("write", "fsync"):
            data = self._chunk()
            offset = rng.randrange(0, min(len(model) + 8192, MAX_FILE - len(data)) + 1)
            fd = os.open(path, os.O_WRONLY)
            try:
                _write_all(fd, data, offset)
                if op == "fsync":
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._put(model, offset, data)
        elif op == "read":
            got = _read_all(path)
            if got != model:
                self.fail(f"{name}: read {len(got)} bytes (sha {_digest(got)[:12]}), model has {len(model)} "
                          f"(sha {_digest(model)[:12]})")
                self.files[name] = bytearray(got)  # go on from what the file holds
        elif op == "append":
            data = self._chunk()
            if len(model) + len(data) > MAX_FILE:
                os.truncate(path, 0)
                model.clear()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            model.extend(data)
        elif op == "truncate":
            size = rng.randrange(0, MAX_FILE)
            os.truncate(path, size)
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
        else:  # a descriptor held for a burst of reads and writes
            fd = os.open(path, os.O_RDWR)
            try:
                for _ in range(20):
                    if rng.random() < 0.5:
                        data = self._chunk()
                        offset = rng.randrange(0, min(len(model) + 4096, MAX_FILE - len(data)) + 1)
                        _write_all(fd, data, offset)
                        self._put(model, offset, data)
                    elif model:
                        self.check_pread(fd, model, rng.randrange(0, len(model)), name)
            finally:
                os.close(fd)
            return 20
        return 1

    def model(self) -> tuple[dict[str, tuple[int, str, int]], list[str]]:
        return {n: (len(m), _digest(m), 1) for n, m in self.files.items()}, []


class MetaWorker(Worker):
    def setup(self) -> None:
        super().setup()
        self.names: dict[str, int] = {}  # relative path -> inode key
        self.content: dict[int, bytes] = {}  # inode key -> content (never changed after creation)
        self.dirs: set[str] = set()
        self.counter = 0
        # Start near the steady state, so that the servers' inode counts after minute 1 compare with the end.
        for _ in range(META_MAX_DIRS - 2):
            self._mkdir()
        for _ in range(META_MAX_FILES):
            self._create()

    def _create(self) -> None:
        name, data = self._new_name(), self.rng.randbytes(self.rng.randrange(0, 4097))
        fd = os.open(self.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        self.counter += 1
        self.names[name] = self.counter
        self.content[self.counter] = data

    def _mkdir(self) -> None:
        self.counter += 1
        name = f"d{self.counter}"
        os.mkdir(self.path(name))
        self.dirs.add(name)

    def _new_name(self) -> str:
        self.counter += 1
        where = self.rng.choice(sorted(self.dirs) + [""] * 3)
        return os.path.join(where, f"n{self.counter}")

    def _nlink(self, key: int) -> int:
        return sum(1 for k in self.names.values() if k == key)

    def step(self) -> int:
        rng = self.rng
        full = len(self.names) >= META_MAX_FILES
        ops = ("create", "rename", "link", "unlink", "mkdir", "rmdir", "stat", "list")
        weights = (5 if full else 25, 20, 0 if full else 10, 35 if full else 15, 5, 5, 15, 5)
        op = rng.choices(ops, weights)[0]
        if op not in ("create", "mkdir") and not self.names:
            op = "create"
        if op == "create":
            self._create()
        elif op == "rename":
            old = rng.choice(sorted(self.names))
            new = rng.choice(sorted(self.names)) if rng.random() < 0.3 else self._new_name()
            os.rename(self.path(old), self.path(new))
            if self.names.get(new) != self.names[old]:  # renaming onto another link of itself does nothing
                self.names[new] = self.names.pop(old)
        elif op == "link":
            old, new = rng.choice(sorted(self.names)), self._new_name()
            os.link(self.path(old), self.path(new))
            self.names[new] = self.names[old]
        elif op == "unlink":
            name = rng.choice(sorted(self.names))
            os.unlink(self.path(name))
            del self.names[name]
        elif op == "mkdir":
            if len(self.dirs) < META_MAX_DIRS:
                self._mkdir()
        elif op == "rmdir":
            empty = [d for d in sorted(self.dirs) if not any(n.startswith(d + "/") for n in self.names)]
            if empty:
                name = rng.choice(empty)
                os.rmdir(self.path(name))
                self.dirs.remove(name)
        elif op == "stat":
            name = rng.choice(sorted(self.names))
            key = self.names[name]
            st = os.stat(self.path(name))
            want = (len(self.content[key]), self._nlink(key))
            if (st.st_size, st.st_nlink) != want:
                self.fail(f"{name}: size and links {(st.st_size, st.st_nlink)}, model {want}")
        else:
            where = rng.choice(sorted(self.dirs) + [""])
            got = sorted(os.listdir(self.path(where)))
            listed = sorted([os.path.basename(n) for n in self.names if os.path.dirname(n) == where]
                            + ([d for d in self.dirs] if where == "" else []))
            if got != listed:
                self.fail(f"listing of {where or '.'}: {len(got)} names, model {len(listed)}: "
                          f"extra {sorted(set(got) - set(listed))[:3]}, missing {sorted(set(listed) - set(got))[:3]}")
        if op in ("rename", "unlink"):  # an inode whose last name went is gone
            live = set(self.names.values())
            self.content = {k: v for k, v in self.content.items() if k in live}
        return 1

    def model(self) -> tuple[dict[str, tuple[int, str, int]], list[str]]:
        files = {n: (len(self.content[k]), _digest(self.content[k]), self._nlink(k)) for n, k in self.names.items()}
        return files, sorted(self.dirs)


class MmapWorker(Worker):
    def setup(self) -> None:
        super().setup()
        self.models: list[bytearray] = []
        self.fds: list[int] = []
        self.maps: list[mmap.mmap] = []
        for i in range(MMAP_FILES):
            data = bytearray(self.rng.randbytes(MMAP_SIZE))
            fd = os.open(self.path(f"m{i}"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, data, 0)
            finally:
                os.close(fd)
            self.models.append(data)
        for i in range(MMAP_FILES):
            self._map(i)

    def _map(self, i: int) -> None:
        fd = os.open(self.path(f"m{i}"), os.O_RDWR)
        if i < len(self.fds):
            self.fds[i], self.maps[i] = fd, mmap.mmap(fd, MMAP_SIZE)
        else:
            self.fds.append(fd)
            self.maps.append(mmap.mmap(fd, MMAP_SIZE))

    def _unmap(self, i: int) -> None:
        self.maps[i].flush()
        self.maps[i].close()
        os.close(self.fds[i])

    def step(self) -> int:
        rng = self.rng
        i = rng.randrange(MMAP_FILES)
        model, mapping, fd = self.models[i], self.maps[i], self.fds[i]
        op = rng.choices(("poke", "flush", "pread", "remap"), (50, 10, 35, 5))[0]
        if op == "poke":
            size = rng.choice((1, 64, 4096, 20_000))
            offset = rng.randrange(0, MMAP_SIZE - size + 1)
            data = rng.randbytes(size)
            mapping[offset:offset + size] = data
            model[offset:offset + size] = data
        elif op == "flush":
            mapping.flush()
        elif op == "pread":  # what was written through the mapping, read through the fd
            self.check_pread(fd, model, rng.randrange(0, MMAP_SIZE), f"m{i}")
        else:
            self._unmap(i)
            got = _read_all(self.path(f"m{i}"))
            if got != model:
                self.fail(f"m{i}: after msync and close the file differs from the model")
            self._map(i)
        return 1

    def finish(self) -> None:
        for i in range(len(self.maps)):
            self._unmap(i)
        self.maps, self.fds = [], []

    def model(self) -> tuple[dict[str, tuple[int, str, int]], list[str]]:
        return {f"m{i}": (len(m), _digest(m), 1) for i, m in enumerate(self.models)}, []


class ReadWorker(Worker):
    """Reads the static files through both mounts (``root`` is a list of the two static directories)."""

    def __init__(self, roots: list[str], digests: dict[str, str], rng: random.Random) -> None:
        super().__init__(roots[0], rng)
        self.roots = roots
        self.digests = digests

    def setup(self) -> None:
        pass

    def step(self) -> int:
        root = self.rng.choice(self.roots)
        name = self.rng.choice(sorted(self.digests))
        got = _digest(_read_all(os.path.join(root, name)))
        if got != self.digests[name]:
            self.fail(f"static {name} through {root}: sha {got[:12]}, want {self.digests[name][:12]}")
        if self.rng.random() < 0.1 and sorted(os.listdir(root)) != sorted(self.digests):
            self.fail(f"listing of {root} differs")
        return 1

    def model(self) -> tuple[dict[str, tuple[int, str, int]], list[str]]:
        return {}, []


def _worker_main(make: Callable[[], Worker], index: int, stop: Any, counts: Any, results: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us through ``stop``
    worker = make()
    ops = 0
    try:
        worker.setup()
        while not stop.is_set():
            try:
                ops += worker.step()
            except OSError as e:
                worker.fail(f"{type(worker).__name__}: {e!r}")
                counts[2 * index + 1] = worker.error_count
                if worker.error_count > 1000:
                    break
            counts[2 * index] = ops
        worker.finish()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        worker.fail(f"{type(worker).__name__} stopped: {e!r}")
    counts[2 * index], counts[2 * index + 1] = ops, worker.error_count
    try:
        files, dirs = worker.model()
    except Exception as e:  # noqa: BLE001
        worker.fail(f"no model: {e!r}")
        files, dirs = {}, []
    results.put({"index": index, "ops": ops, "errors": worker.error_count, "samples": worker.errors,
                 "files": files, "dirs": dirs})


# --- the servers --------------------------------------------------------------------------------


class Mounted:
    """A background ``fusepass mount``; ``close`` always leaves nothing mounted and no server running."""

    def __init__(self, name: str, source: str, mountpoint: str, mode: str, log: str) -> None:
        self.name, self.source, self.mountpoint, self.log = name, source, mountpoint, log
        self.pid: int | None = None
        self.pidfd: int | None = None
        r = _fusepass("mount", "--passthrough", mode, "--log", log, source, mountpoint)
        if r.returncode != 0:
            raise RuntimeError(f"fusepass mount {mountpoint} failed: {r.stderr.strip()}")
        self.connection = mountmod.connection_id(mountpoint)
        self.pid = int(control.query(mountpoint)["pid"])
        self.pidfd = os.pidfd_open(self.pid)

    def figures(self) -> dict[str, int]:
        st = control.query(self.mountpoint)
        d = st["filesystem"]["descriptors"]
        return {"open_fds": st["open_fds"], "backing_ids": st["passthrough"]["backing_ids"], "path_fds": d["path"],
                "open_files": d["files"], "open_dirs": d["dirs"], "inodes": d["inodes"],
                "rss_kib": _rss_kib(self.pid) if self.pid else -1,
                "passthrough_opens": st["passthrough"]["opens"], "served_opens": st["passthrough"]["served_opens"],
                "requests": sum(r["count"] for r in st["requests"].values())}

    def close(self) -> list[str]:
        """Unmount (``fusepass umount``; lazily if busy), wait for the server; abort and kill it if stuck."""
        notes = []
        if mountmod.mount_entry(self.mountpoint) is not None:
            r = _fusepass("umount", self.mountpoint)
            if r.returncode != 0:
                notes.append(f"umount {self.mountpoint}: {r.stderr.strip()}; detaching")
                with contextlib.suppress(OSError):
                    mountmod.unmount(self.mountpoint, lazy=True)
        if self.pidfd is not None:
            if not select.select([self.pidfd], [], [], 10)[0]:
                notes.append(f"server {self.pid} still running after the unmount: aborting its connection")
                if self.connection is not None:
                    with contextlib.suppress(OSError):
                        mountmod.abort_connection(self.connection)
                if not select.select([self.pidfd], [], [], 5)[0]:
                    notes.append(f"killing server {self.pid}")
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            os.close(self.pidfd)
            self.pidfd = None
        if mountmod.mount_entry(self.mountpoint) is not None:
            with contextlib.suppress(OSError):
                mountmod.unmount(self.mountpoint, lazy=True)
        return notes

    def logged_errors(self) -> list[str]:
        try:
            with open(self.log, errors="replace") as f:
                return [line.rstrip() for line in f if " ERROR " in line or "Traceback" in line]
        except OSError:
            return []


def _fusepass(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fusepass.cli", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, check=False)


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


# --- progress ---------------------------------------------------------------------------------------


class Progress:
    """A rich or tqdm bar if either is installed and stdout is a terminal, else a plain line now and then."""

    def __init__(self, total: float) -> None:
        self.total = total
        self.kind = "plain"
        self.bar: Any = None
        self.last_line = 0.0
        self.every = max(5.0, min(30.0, total / 20))
        if sys.stdout.isatty():
            try:
                from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
                from rich.progress import Progress as RichProgress

                self.bar = RichProgress(TextColumn("soak"), BarColumn(), TimeRemainingColumn(),
                                        TextColumn("{task.description}"))
                self.bar.start()
                self.task = self.bar.add_task("", total=total)
                self.kind = "rich"
            except ImportError:
                try:
                    from tqdm import tqdm

                    self.bar = tqdm(total=round(total), unit="s", desc="soak", dynamic_ncols=True)
                    self.kind = "tqdm"
                except ImportError:
                    pass

    def update(self, elapsed: float, text: str) -> None:
        if self.kind == "rich":
            self.bar.update(self.task, completed=min(elapsed, self.total), description=text)
        elif self.kind == "tqdm":
            self.bar.n = min(round(elapsed), round(self.total))
            self.bar.set_postfix_str(text, refresh=True)
        elif elapsed - self.last_line >= self.every or elapsed >= self.total:
            self.last_line = elapsed
            print(f"soak {elapsed:6.0f}s/{self.total:.0f}s  {text}", flush=True)

    def close(self) -> None:
        if self.kind == "rich":
            self.bar.stop()
        elif self.kind == "tqdm":
            self.bar.close()


# --- the run --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    duration = args.seconds if args.seconds is not None else args.minutes * 60
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    work = tempfile.mkdtemp(prefix="fusepass-soak-")
    source = os.path.realpath(args.source) if args.source else os.path.join(work, "src")
    os.makedirs(source, exist_ok=True)
    tree = f"soak-{os.getpid()}"  # the soak's own files, in the source
    mounts: dict[str, Mounted] = {}
    procs: list[multiprocessing.process.BaseProcess] = []
    summary: dict[str, Any] = {"seed": seed, "source": source, "workdir": work, "workers": args.workers,
                               "kinds": [KINDS[i % len(KINDS)] for i in range(args.workers)]}
    failed = True
    try:
        os.mkdir(os.path.join(source, tree))
        static = os.path.join(source, tree, "static")
        os.mkdir(static)
        digests = {}
        rng = random.Random(seed)
        for i in range(STATIC_FILES):
            data = rng.randbytes(STATIC_SIZE)
            with open(os.path.join(static, f"s{i}"), "wb") as f:
                f.write(data)
            digests[f"s{i}"] = _digest(data)
        for name, mode in (("pt", "auto"), ("served", "off")):
            mnt = os.path.join(work, f"mnt-{name}")
            os.mkdir(mnt)
            mounts[name] = Mounted(name, source, mnt, mode, os.path.join(work, f"{name}.log"))
        roots = {name: os.path.join(m.mountpoint, tree) for name, m in mounts.items()}

        def maker(i: int) -> Callable[[], Worker]:
            kind, where = KINDS[i % len(KINDS)].split(":")
            wrng = random.Random(seed + i + 1)
            if kind == "read":
                return lambda: ReadWorker([os.path.join(roots["pt"], "static"),
                                           os.path.join(roots["served"], "static")], digests, wrng)
            cls = {"data": DataWorker, "meta": MetaWorker, "mmap": MmapWorker}[kind]
            return lambda: cls(os.path.join(roots[where], f"w{i}-{kind}"), wrng)

        ctx = multiprocessing.get_context("fork")
        stop = ctx.Event()
        counts = ctx.RawArray("q", 2 * args.workers)
        results = ctx.Queue()
        for i in range(args.workers):
            proc = ctx.Process(target=_worker_main, args=(maker(i), i, stop, counts, results), daemon=True)
            proc.start()
            procs.append(proc)

        start = time.monotonic()
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in mounts}
        progress = Progress(duration)
        next_sample = 0.0
        try:
            while (elapsed := time.monotonic() - start) < duration:
                if elapsed >= next_sample:
                    for name, m in mounts.items():
                        samples[name].append({"t": round(elapsed, 1), **m.figures()})
                    next_sample += args.sample_every
                ops = sum(counts[0::2])
                errors = sum(counts[1::2])
                pt = samples["pt"][-1]
                progress.update(elapsed, f"{ops:,} ops ({ops / max(elapsed, 1e-9):,.0f}/s), {errors} errors; "
                                f"pt server: {pt['open_fds']} fds, {pt['backing_ids']} backing ids, "
                                f"{pt['rss_kib'] / 1024:.0f} MiB")
                if not all(p.is_alive() for p in procs):
                    break
                time.sleep(min(1.0, max(0.0, duration - elapsed)))
            ran = time.monotonic() - start
        finally:
            stop.set()
            progress.close()

        collected: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + 60
        while len(collected) < len(procs) and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                r = results.get(timeout=max(0.1, deadline - time.monotonic()))
                collected[r["index"]] = r
        for p in procs:
            p.join(10)
        summary.update(_verify(collected, args.workers, roots, source, tree, mounts))
        summary["seconds"] = round(ran, 1)
        summary["minutes"] = round(ran / 60, 2)
        summary["operations"] = sum(r["ops"] for r in collected.values())
        summary["ops_per_s"] = round(summary["operations"] / max(ran, 1e-9))
        summary["errors"] = sum(r["errors"] for r in collected.values()) + (args.workers - len(collected))
        summary["error_samples"] = [s for r in collected.values() for s in r["samples"]][:ERROR_SAMPLES]
        if len(collected) < args.workers:
            summary["error_samples"].append(f"{args.workers - len(collected)} workers sent no result")
        summary["servers"] = _leaks(mounts, samples, duration)
        summary["leaks_found"] = sum(len(s["leaks"]) for s in summary["servers"].values())
        failed = bool(summary["errors"] or summary["mismatches"] or summary["leaks_found"])
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        notes = []
        for m in mounts.values():
            notes += m.close()
        logged = [line for m in mounts.values() for line in m.logged_errors()]
        summary["server_log_errors"] = len(logged)
        summary["server_log_samples"] = logged[:ERROR_SAMPLES]
        summary["unmount_notes"] = notes
        summary["left_mounted"] = [m.mountpoint for m in mounts.values() if mountmod.mount_entry(m.mountpoint)]
        failed = failed or bool(logged or summary["left_mounted"])
        if not args.keep and not summary["left_mounted"]:
            shutil.rmtree(os.path.join(source, tree), ignore_errors=True)
            if not failed:
                shutil.rmtree(work, ignore_errors=True)
    summary["ok"] = not failed
    return summary


def _verify(collected: dict[int, dict[str, Any]], workers: int, roots: dict[str, str], source: str, tree: str,
            mounts: dict[str, Mounted]) -> dict[str, Any]:
    """Every model file through its mount and in the source: content, size and link count; every
    worker directory's names (recursively) against the model."""
    mismatches: list[str] = []
    verified = 0
    for i, r in sorted(collected.items()):
        kind, where = KINDS[i % len(KINDS)].split(":")
        if kind == "read":
            continue
        rel = f"w{i}-{kind}"
        for base in (os.path.join(roots[where], rel), os.path.join(source, tree, rel)):
            seen: set[str] = set()
            for dirpath, dirnames, filenames in os.walk(base):
                sub = os.path.relpath(dirpath, base)
                seen.update(os.path.normpath(os.path.join(sub, n)) for n in filenames)
                seen.update(os.path.normpath(os.path.join(sub, n)) + "/" for n in dirnames)
            want = set(r["files"]) | {d + "/" for d in r["dirs"]}
            if seen != want:
                mismatches.append(f"{base}: extra {sorted(seen - want)[:3]}, missing {sorted(want - seen)[:3]}")
            for name, (size, digest, nlink) in r["files"].items():
                path = os.path.join(base, name)
                try:
                    data = _read_all(path)
                    links = os.stat(path).st_nlink
                except OSError as e:
                    mismatches.append(f"{path}: {e!r}")
                    continue
                verified += 1
                if (len(data), _digest(data), links) != (size, digest, nlink):
                    mismatches.append(f"{path}: {len(data)} bytes, {links} links, sha {_digest(data)[:12]}; "
                                      f"model {size} bytes, {nlink} links, sha {digest[:12]}")
    return {"mismatches": len(mismatches), "mismatch_samples": mismatches[:ERROR_SAMPLES], "files_verified": verified}


def _settled(m: Mounted, timeout: float = 30.0) -> dict[str, int]:
    """The server's figures once it has seen every RELEASE (the kernel sends them asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        f = m.figures()
        if (f["backing_ids"] == 0 and f["open_files"] == 0 and f["open_dirs"] == 0) or time.monotonic() > deadline:
            return f
        time.sleep(0.1)


def _leaks(mounts: dict[str, Mounted], samples: dict[str, list[dict[str, Any]]], duration: float) -> dict[str, Any]:
    """Figures after minute 1 (or a third of a shorter run) and at the end, once every file is closed."""
    out: dict[str, Any] = {}
    mark = min(60.0, duration / 3)
    for name, m in mounts.items():
        early = next((s for s in samples[name] if s["t"] >= mark), samples[name][-1])
        end = _settled(m)
        leaks = []
        for key in ("open_fds", "path_fds", "inodes"):
            factor, extra = COUNT_TOLERANCE
            if end[key] > early[key] * factor + extra:
                leaks.append(f"{key}: {early[key]} after {early['t']:.0f}s, {end[key]} at the end")
        for key in ("backing_ids", "open_files", "open_dirs"):
            if end[key]:
                leaks.append(f"{key}: {end[key]} still held once every file was closed")
        factor, extra = RSS_TOLERANCE
        if end["rss_kib"] > early["rss_kib"] * factor + extra:
            leaks.append(f"RSS: {early['rss_kib']} KiB after {early['t']:.0f}s, {end['rss_kib']} KiB at the end")
        peak = {k: max(s[k] for s in samples[name]) for k in ("open_fds", "backing_ids", "rss_kib")}
        out[name] = {"pid": m.pid, "early": early, "end": end, "peak": peak, "leaks": leaks,
                     "samples": len(samples[name])}
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"soak: {s.get('minutes', 0):.2f} minutes ({s.get('seconds', 0):.0f}s), {s['workers']} workers "
        f"({', '.join(s['kinds'])}), seed {s['seed']}",
        f"  operations: {s.get('operations', 0):,} ({s.get('ops_per_s', 0):,}/s); errors: {s.get('errors', '?')}; "
        f"mismatches: {s.get('mismatches', '?')} ({s.get('files_verified', 0):,} file checks through the mounts "
        f"and in the source); server log errors: {s.get('server_log_errors', '?')}",
    ]
    for name, srv in s.get("servers", {}).items():
        e, n, p = srv["early"], srv["end"], srv["peak"]
        lines.append(
            f"  {name} server (pid {srv['pid']}, {n['passthrough_opens']:,} passthrough opens, "
            f"{n['served_opens']:,} served opens, {n['requests']:,} requests): after {e['t']:.0f}s -> at the end "
            f"(all closed): open fds {e['open_fds']} -> {n['open_fds']} (peak {p['open_fds']}), "
            f"backing ids {e['backing_ids']} -> {n['backing_ids']} (peak {p['backing_ids']}), "
            f"path fds {e['path_fds']} -> {n['path_fds']}, inodes {e['inodes']} -> {n['inodes']}, "
            f"RSS {e['rss_kib'] / 1024:.1f} -> {n['rss_kib'] / 1024:.1f} MiB (peak {p['rss_kib'] / 1024:.1f})")
    leaks = [f"{name}: {leak}" for name, srv in s.get("servers", {}).items() for leak in srv["leaks"]]
    lines.append(f"  leaks found: {len(leaks)}" + "".join(f"\n    {leak}" for leak in leaks))
    for key in ("error_samples", "mismatch_samples", "server_log_samples", "unmount_notes"):
        for item in s.get(key, []):
            lines.append(f"  {key.split('_')[0]}: {item}")
    if s.get("left_mounted"):
        lines.append(f"  LEFT MOUNTED: {s['left_mounted']}")
    lines.append("  result: " + ("ok" if s.get("ok") else f"FAILED (work directory kept: {s['workdir']})"))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0].strip("`"))
    length = p.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    length.add_argument("--seconds", type=float, help="how long to run, in seconds (for short runs)")
    p.add_argument("--source", help="the directory to mirror (default: a new one); the soak works in a "
                   "subdirectory of its own there and removes it afterwards")
    p.add_argument("--workers", type=int, default=len(KINDS), help=f"worker processes (default {len(KINDS)})")
    p.add_argument("--seed", type=int, help="random seed (default: a random one, printed)")
    p.add_argument("--sample-every", type=float, default=SAMPLE_EVERY, help="seconds between server samples")
    p.add_argument("--json", help="also write the summary to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory and the soak's files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    summary = run(args)
    print(format_summary(summary), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
