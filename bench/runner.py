"""The run: rounds of every configuration over every workload, recorded as they happen.

Round r visits the configurations in an order rotated by r, so drift on a busy machine hits all of them
alike. A configuration is mounted afresh for each workload of a round (the steps of one workload share
the mount: the metadata phases see what create left in the kernel's caches), so no server carries one
workload's inodes into the next (passthrough_hp holds a descriptor for each); a step that times out
kills its process group, the mount is torn down (aborted if need be) and mounted again for the steps
left. ``raw.json`` is rewritten after every measurement, so even an interrupted run leaves its data.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import environment as envmod
from . import report, workloads
from .targets import Mounted, MountFailed, Target, force_unmount, make_targets, mounts_under
from .workloads import Context, Params, Step, StepFailed, StepTimeout


class _Remount(Exception):
    pass


class Progress:
    """A tqdm bar on a terminal, and a line per finished step either way (it reads well under nohup)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def begin(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(self, text: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        self.line(f"[{self.done}/{self.total} {elapsed / 60:4.1f}m eta {eta / 60:4.1f}m] {text}")
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Recorder:
    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path, self.raw = path, raw

    def add(self, record: dict[str, Any]) -> None:
        self.raw["measurements"].append(record)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.raw, indent=1))
        tmp.replace(self.path)


def run(args: Any, setup: dict[str, Any], argv: list[str]) -> int:
    params: Params = workloads.QUICK if args.quick else workloads.FULL
    if args.rounds:
        params = replace(params, rounds=args.rounds)
    if args.visibility_changes:
        params = replace(params, visibility_changes=args.visibility_changes)
    if args.churn_files:
        params = replace(params, churn_files=args.churn_files)
    steps = [s for s in workloads.STEPS if s.workload in args.workloads]
    targets = [t for t in make_targets(args.threads, args.fusepass_opts, setup) if t.name in args.configs]
    work = os.path.abspath(args.workdir)
    if os.path.isdir(work) and os.listdir(work) and not os.path.exists(os.path.join(work, workloads.MARKER)):
        print(f"bench: {work} exists and is not a benchmark work directory: choose another --workdir", file=sys.stderr)
        return 2
    lock = _lock(work)
    if lock is None:
        print(f"bench: another benchmark run is using {work}: wait for it, or give another --workdir", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y-%m-%d_%H%M%S")
    outdir = Path(args.results) / stamp
    (outdir / "logs").mkdir(parents=True)
    raw: dict[str, Any] = {
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": " ".join(["python -m bench", *argv]),
                 "machine": machine(work), "fusepass": fusepass_version(), "peers": peers_note(setup),
                 "load_samples": [], "load_note": ""},
        "params": workloads.params_dict(params), "steps": [s.id for s in steps],
        "configs": {t.name: {"label": t.label, "unavailable": t.unavailable} for t in targets},
        "workload_notes": {}, "setup": setup, "errors": [], "measurements": [],
    }
    rec = Recorder(outdir / "raw.json", raw)
    for t in targets:
        if t.unavailable:
            raw["errors"].append({"config": t.name, "error": f"not run: {t.unavailable}"})
    active = [t for t in targets if not t.unavailable]
    progress = Progress(params.rounds * len(active) * len(steps))
    progress.line(f"results: {outdir}")
    for t in targets:
        if t.unavailable:
            progress.line(f"{t.name}: NOT RUN: {t.unavailable}")
    _sigterm_as_interrupt()
    started = time.monotonic()
    status = 0
    try:
        for stale in mounts_under(work):
            progress.line(f"unmounting a stale mount at {stale}")
            force_unmount(stale)
        data = workloads.prepare(work, params, progress.line)
        raw["data"] = data
        raw["workload_notes"] = {k: v for k, v in workloads.describe_params(params, data).items()
                                 if k in args.workloads}
        for r in range(params.rounds):
            order = active[r % len(active):] + active[:r % len(active)] if active else []
            for t in order:
                _config_round(t, r, params, steps, work, outdir, rec, progress, args.timeout_scale)
    except KeyboardInterrupt:
        raw["errors"].append({"error": "interrupted: the report covers what was measured"})
        status = 130
    finally:
        for mnt in mounts_under(work):
            force_unmount(mnt)
        if not args.keep_data and not mounts_under(work):
            shutil.rmtree(work, ignore_errors=True)
        _unlock(work, lock)
        progress.close()
        raw["meta"]["duration_min"] = (time.monotonic() - started) / 60
        raw["meta"]["load_note"] = load_note(raw["meta"]["load_samples"])
        raw["charts"], chart_error = report.charts(raw, outdir)
        if chart_error:
            raw["errors"].append({"error": chart_error})
        rec.save()
        (outdir / "report.md").write_text(report.markdown(raw))
        left = mounts_under(work)
        print(f"\nreport: {outdir / 'report.md'}")
        if left:
            print(f"WARNING: still mounted: {left}", file=sys.stderr)
            status = status or 1
    return status


def _config_round(t: Target, r: int, params: Params, steps: list[Step], work: str, outdir: Path, rec: Recorder,
                  progress: Progress, timeout_scale: float) -> None:
    tag = f"{t.name}-r{r + 1}"
    mnt = os.path.join(work, "mnt", t.name)
    os.makedirs(mnt, exist_ok=True)
    src = os.path.join(work, "src")
    rec.raw["meta"]["load_samples"].append(os.getloadavg()[0])
    workloads.prepare_round(work, tag, steps)
    remaining = list(steps)
    retries = 2
    try:
        while remaining:
            workload = remaining[0].workload
            try:
                progress.begin(f"r{r + 1} {t.name} mounting")
                with t.mounted(src, mnt, str(outdir / "logs" / f"{tag}.log")) as m:
                    if m.facts:
                        rec.raw["configs"][t.name]["facts"] = m.facts
                    while remaining and remaining[0].workload == workload:
                        step = remaining.pop(0)
                        _one_step(t, m, step, r, tag, params, work, rec, progress, timeout_scale)
            except _Remount:
                if retries == 0:
                    break
                retries -= 1
            except MountFailed as e:
                _skip(t, r, remaining, f"mount failed: {e}", rec, progress)
                remaining = []
            except Exception as e:  # a bug or a surprise in one configuration must not end the whole run
                _skip(t, r, remaining, f"{type(e).__name__}: {e}", rec, progress)
                remaining = []
        _skip(t, r, remaining, "not run: the configuration was remounted too often", rec, progress)
    finally:
        workloads.cleanup_round(work, tag)
        rec.raw["meta"]["load_samples"].append(os.getloadavg()[0])


def _skip(t: Target, r: int, steps: list[Step], why: str, rec: Recorder, progress: Progress) -> None:
    for step in steps:
        rec.add({"round": r + 1, "config": t.name, "step": step.id, "value": None, "error": why})
        progress.step(f"r{r + 1} {t.name:<16} {step.id:<12} SKIPPED: {why}")


def _one_step(t: Target, m: Mounted, step: Step, r: int, tag: str, params: Params, work: str, rec: Recorder,
              progress: Progress, timeout_scale: float) -> None:
    progress.begin(f"r{r + 1} {t.name} {step.id}")
    if step.needs_server and m.server_pid is None:
        progress.step(f"r{r + 1} {t.name:<16} {step.id:<12} n/a (no server process)")
        return
    ctx = Context(base=m.path, scratch=os.path.join(m.path, "scratch", tag), work=work, params=params,
                  timeout=step.timeout(params) * timeout_scale,
                  source_scratch=os.path.join(work, "src", "scratch", tag), server_pid=m.server_pid)
    before = m.status()
    start = time.perf_counter()
    value: float | None = None
    error = None
    timed_out = False
    try:
        value = step.run(ctx)
    except StepTimeout as e:
        error, timed_out = str(e), True
    except StepFailed as e:
        error = str(e)
    wall = time.perf_counter() - start
    after = m.status() if not timed_out else None
    record = {"round": r + 1, "config": t.name, "step": step.id, "value": value, "unit": step.unit,
              "wall_s": wall, "error": error, "extra": ctx.extra, "load1": os.getloadavg()[0],
              "requests": request_delta(before, after)}
    if before is not None and after is not None:
        record["passthrough_opens"] = (after["passthrough"]["opens"] - before["passthrough"]["opens"],
                                       after["passthrough"]["served_opens"] - before["passthrough"]["served_opens"])
    rec.add(record)
    shown = f"{report.fmt(value)} {step.unit}" if error is None else f"ERROR: {error}"
    progress.step(f"r{r + 1} {t.name:<16} {step.id:<12} {shown} ({wall:.1f} s)")
    if timed_out:
        raise _Remount  # the mount may be stuck: tear it down (aborting it if need be) and mount afresh


def request_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """Per-opcode counts, errors and handling time between two ``fusepass status --json`` snapshots."""
    if before is None or after is None:
        return None
    out = {}
    old = before.get("requests", {})
    for op, r in after.get("requests", {}).items():
        o = old.get(op, {"count": 0, "errors": 0, "total_ms": 0.0})
        count = r["count"] - o["count"]
        if count > 0:
            out[op] = {"count": count, "errors": r["errors"] - o["errors"],
                       "total_ms": round(r["total_ms"] - o["total_ms"], 3)}
    return out


# --- facts for the report -----------------------------------------------------------------------


def machine(work: str) -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        with open("/proc/meminfo") as f:
            mem_kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    except (OSError, StopIteration, ValueError):
        mem_kib = 0
    probe = work if os.path.exists(work) else os.path.dirname(work)
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", probe], capture_output=True, text=True,
                        check=False).stdout
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem_kib / 2**20:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}, work directory {work} on {fs.strip() or '?'}, "
            f"{_tool_version(['fio', '--version'])}, {_tool_version(['tar', '--version'])}")


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return f"{cmd[0]} missing"
    return out.splitlines()[0].strip() if out else cmd[0]


def fusepass_version() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(envmod.REPO), *a], capture_output=True, text=True,
                              check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no", "fusepass") else ""
    return f"commit {head}{dirty}"


def peers_note(setup: dict[str, Any]) -> str:
    parts = []
    for name in envmod.PEERS:
        entry = setup.get("packages", {}).get(name, {})
        parts.append(f"{name} {entry['version']}" if entry.get("ok") else f"{name} unavailable")
    return ", ".join(parts)


def load_note(samples: list[float]) -> str:
    if not samples:
        return "no samples"
    return (f"1-minute load average {min(samples):.2f}–{max(samples):.2f} (median {statistics.median(samples):.2f}) "
            f"sampled before and after each configuration's round, on {os.cpu_count()} CPUs; the benchmark itself "
            "keeps one or two busy, load beyond that is other work on the machine")


def _lock(work: str) -> int | None:
    """Hold an exclusive lock beside ``work`` for the whole run (None if another run holds it)."""
    os.makedirs(os.path.dirname(work) or "/", exist_ok=True)
    fd = os.open(work.rstrip("/") + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd  # released when the process exits, if not before


def _unlock(work: str, fd: int) -> None:
    """Remove the lock file (nothing is left behind) and release it."""
    try:
        os.unlink(work.rstrip("/") + ".lock")
    except FileNotFoundError:
        pass
    os.close(fd)


def _sigterm_as_interrupt() -> None:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
