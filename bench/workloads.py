"""The workloads: the input data they share, and one timed step per figure.

All data lives in a work directory on the machine's own disk: ``src/`` is the source every configuration
presents, ``tree.tar`` and ``pysrc/`` sit beside it. Read workloads use ``src/data`` and ``src/tree``
(shared, never written); write workloads use ``src/scratch/<config>-r<round>/``, made natively before the
configuration is mounted and removed natively after it is unmounted. The coherence workloads change the
source directly (``visibility``) or write beside it (``churn``, in ``churn-<config>-r<round>/`` of the work
directory: the same filesystem, outside the source). The host page cache is warm for
every configuration: each one's inputs are read natively just before it is mounted, and nothing drops
caches; dirty data is synced before each configuration starts, so none is still being written back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import environment as envmod

MiB = 1 << 20
MARKER = ".fusepass-bench"  # marks a work directory as the benchmark's own (so it may be removed)


@dataclass(frozen=True)
class Params:
    """Sizes of one run. ``compile_files`` 0 means every stdlib .py file that compiles cleanly (~1,750)."""

    seq_mib: int
    rand_runtime: int
    meta_files: int
    tree_files: int
    compile_files: int
    rounds: int
    visibility_changes: int
    churn_files: int


# The tree stays under 20,000 entries: passthrough_hp holds a descriptor per inode the kernel knows, and a
# descriptor limit of 20,000 is common.
FULL = Params(seq_mib=1024, rand_runtime=10, meta_files=10_000, tree_files=18_000, compile_files=0, rounds=3,
              visibility_changes=1000, churn_files=100_000)
QUICK = Params(seq_mib=128, rand_runtime=3, meta_files=1_000, tree_files=2_000, compile_files=200, rounds=1,
               visibility_changes=50, churn_files=10_000)
VISIBILITY_GIVE_UP = 3.0  # seconds after which a change counts as not seen
VISIBILITY_MAX_MISSES = 3  # consecutive changes not seen before the step stops: the mount never shows them


class StepFailed(Exception):
    """The step ran but failed; the message says how."""


class StepTimeout(StepFailed):
    """The step ran past its time limit and was killed: the mount may be stuck."""


@dataclass
class Context:
    base: str  # where the configuration presents the source
    scratch: str  # this configuration's and round's writable directory, under ``base``
    work: str  # the work directory (outside the source)
    params: Params
    timeout: float  # seconds this step may take before it is killed
    source_scratch: str = ""  # ``scratch`` as a path in the source itself, to change it behind the mount's back
    server_pid: int | None = None  # the FUSE server's process, if there is one
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    id: str
    workload: str  # the name --workloads takes
    family: str  # one chart per family
    label: str
    unit: str
    higher_better: bool
    timeout: Callable[[Params], float]
    run: Callable[[Context], float]
    needs_server: bool = False  # only for configurations with a server process (not native)


# --- running commands -------------------------------------------------------------------------------


def run_cmd(cmd: list[str], timeout: float, cwd: str = "/") -> subprocess.CompletedProcess[str]:
    """Run a workload command in its own process group; kill the group if it outlives ``timeout``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(envmod.REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # stuck in the kernel on the mount: the caller aborts the connection
        raise StepTimeout(f"{os.path.basename(cmd[0])} timed out after {timeout:.0f} s") from None
    except BaseException:  # interrupted: the workload must not outlive the run
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    if proc.returncode != 0:
        tail = " | ".join((err or out).strip().splitlines()[-4:])
        raise StepFailed(f"{os.path.basename(cmd[0])} exited with status {proc.returncode}: {tail}")
    return subprocess.CompletedProcess(cmd, 0, out, err)


def _timed(cmd: list[str], timeout: float) -> float:
    start = time.perf_counter()
    run_cmd(cmd, timeout)
    return time.perf_counter() - start


# --- fio ------------------------------------------------------------------------------------------


def _fio(ctx: Context, name: str, path: str, args: list[str]) -> dict[str, Any]:
    cmd = ["fio", f"--name={name}", f"--filename={path}", f"--size={ctx.params.seq_mib}M", "--ioengine=psync",
           "--invalidate=0", "--fallocate=none", "--output-format=json", *args]
    out = run_cmd(cmd, ctx.timeout).stdout
    try:
        report = json.loads(out[out.index("{"):])
        job: dict[str, Any] = report["jobs"][0]
    except (ValueError, KeyError, IndexError) as e:
        raise StepFailed(f"fio printed no JSON report ({e}): {out[:200]!r}") from None
    if job.get("error"):
        raise StepFailed(f"fio job error {job['error']}")
    return job


def _fio_timeout(p: Params) -> float:
    return 60 + p.seq_mib / 5  # a floor of 5 MiB/s


def seq_read(ctx: Context) -> float:
    job = _fio(ctx, "seqread", os.path.join(ctx.base, "data", "seq.dat"), ["--rw=read", "--bs=1M"])
    ctx.extra.update(runtime_ms=job["read"]["runtime"], io_bytes=job["read"]["io_bytes"])
    return float(job["read"]["bw_bytes"]) / MiB


def seq_write(ctx: Context) -> float:
    job = _fio(ctx, "seqwrite", os.path.join(ctx.scratch, "write.dat"), ["--rw=write", "--bs=1M", "--unlink=1"])
    ctx.extra.update(runtime_ms=job["write"]["runtime"], io_bytes=job["write"]["io_bytes"])
    return float(job["write"]["bw_bytes"]) / MiB


def _rand_read(ctx: Context, jobs: int) -> float:
    args = ["--rw=randread", "--bs=4k", f"--numjobs={jobs}", "--time_based", f"--runtime={ctx.params.rand_runtime}",
            "--norandommap", "--group_reporting"]
    job = _fio(ctx, f"randread{jobs}", os.path.join(ctx.base, "data", "seq.dat"), args)
    ctx.extra.update(runtime_ms=job["read"]["runtime"], clat_p50_ns=job["read"].get("clat_ns", {})
                     .get("percentile", {}).get("50.000000"))
    return float(job["read"]["iops"])


# --- metadata, trees --------------------------------------------------------------------------------


def _meta(phase: str) -> Callable[[Context], float]:
    def run(ctx: Context) -> float:
        n = ctx.params.meta_files
        out = run_cmd([sys.executable, "-m", "bench.metaops", phase, os.path.join(ctx.scratch, "meta"), str(n)],
                      ctx.timeout).stdout
        seconds = float(json.loads(out)["seconds"])
        ctx.extra["seconds"] = seconds
        return n / seconds
    run.__name__ = f"meta_{phase}"
    return run


def _tree_timeout(p: Params) -> float:
    return 60 + p.tree_files / 50


def tar_create(ctx: Context) -> float:
    # GNU tar does not read file data when the archive is /dev/null itself, so the archive goes to a pipe.
    script = 'set -o pipefail; tar -cf - -C "$1" . | cat > /dev/null'
    return _timed(["bash", "-c", script, "tar", os.path.join(ctx.base, "tree")], ctx.timeout)


def untar(ctx: Context) -> float:
    return _timed(["tar", "-xf", os.path.join(ctx.work, "tree.tar"), "-C", os.path.join(ctx.scratch, "untar")],
                  ctx.timeout)


def rm_rf(ctx: Context) -> float:
    return _timed(["rm", "-rf", os.path.join(ctx.scratch, "rmrf")], ctx.timeout)


def compileall(ctx: Context) -> float:
    return _timed([sys.executable, "-m", "compileall", "-q", os.path.join(ctx.scratch, "compile")], ctx.timeout)


# --- coherence --------------------------------------------------------------------------------------


def visibility(ctx: Context) -> float:
    """Median milliseconds from a change made in the source to its sight through the mount."""
    n = ctx.params.visibility_changes
    out = run_cmd([sys.executable, "-m", "bench.coherence", os.path.join(ctx.source_scratch, "vis"),
                   os.path.join(ctx.scratch, "vis"), str(n), "--give-up", str(VISIBILITY_GIVE_UP),
                   "--max-misses", str(VISIBILITY_MAX_MISSES)], ctx.timeout).stdout
    result = json.loads(out)
    ctx.extra.update(result)
    if result["misses"]:
        raise StepFailed(f"never visible: {result['misses']} of {result['changes']} changes not seen within "
                         f"{VISIBILITY_GIVE_UP:g} s (the mount keeps what it cached)")
    return float(result["p50_ms"])


def _visibility_timeout(p: Params) -> float:
    return 60 + p.visibility_changes * 1.5 + VISIBILITY_GIVE_UP * VISIBILITY_MAX_MISSES


def churn_cpu(ctx: Context) -> float:
    """The server's CPU milliseconds while another process writes small files beside the source."""
    assert ctx.server_pid is not None
    churn = os.path.join(ctx.work, "churn-" + os.path.basename(ctx.scratch))
    shutil.rmtree(churn, ignore_errors=True)
    os.makedirs(churn)
    try:
        before = process_cpu_s(ctx.server_pid)
        out = run_cmd([sys.executable, "-m", "bench.churn", churn, str(ctx.params.churn_files)], ctx.timeout).stdout
        after = process_cpu_s(ctx.server_pid)
    finally:
        shutil.rmtree(churn, ignore_errors=True)
    writer = json.loads(out)
    ctx.extra.update(writer_s=writer["seconds"], writer_cpu_s=writer["cpu_s"], files=writer["files"])
    return (after - before) * 1000


def process_cpu_s(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far (all its threads), from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError as e:
        raise StepFailed(f"cannot read the server's CPU time: {e}") from None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _meta_step(phase: str, label: str) -> Step:
    return Step(f"meta-{phase}", "metadata", "metadata", label, "files/s", True, lambda p: 60 + p.meta_files / 100,
                _meta(phase))


STEPS: list[Step] = [
    Step("seqread", "seqread", "sequential", "fio sequential read, bs=1M", "MiB/s", True, _fio_timeout, seq_read),
    Step("seqwrite", "seqwrite", "sequential", "fio sequential write, bs=1M", "MiB/s", True, _fio_timeout,
         seq_write),
    Step("randread1", "randread", "random", "fio random read 4 KiB, 1 job", "IOPS", True,
         lambda p: p.rand_runtime + 90, lambda ctx: _rand_read(ctx, 1)),
    Step("randread2", "randread", "random", "fio random read 4 KiB, 2 jobs", "IOPS", True,
         lambda p: p.rand_runtime + 90, lambda ctx: _rand_read(ctx, 2)),
    _meta_step("create", "create empty files"),
    _meta_step("stat", "stat each file"),
    _meta_step("list", "list the directory"),
    _meta_step("delete", "delete each file"),
    Step("tar", "tar", "trees", "tar the tree (to a pipe)", "s", False, _tree_timeout, tar_create),
    Step("untar", "untar", "trees", "untar the tree", "s", False, _tree_timeout, untar),
    Step("compileall", "compileall", "trees", "python -m compileall", "s", False,
         lambda p: 60 + (p.compile_files or 2000) / 5, compileall),
    Step("rmrf", "rmrf", "trees", "rm -rf of the tree", "s", False, _tree_timeout, rm_rf),
    Step("visibility", "visibility", "coherence", "a change in the source seen through the mount (median)", "ms",
         False, _visibility_timeout, visibility),
    Step("churn-cpu", "churn", "coherence", "server CPU while another process writes small files beside the source",
         "ms", False, lambda p: 120 + p.churn_files / 200, churn_cpu, needs_server=True),
]
WORKLOADS = list(dict.fromkeys(s.workload for s in STEPS))


def describe_params(p: Params, data: dict[str, Any]) -> dict[str, str]:
    """What each workload does at these sizes, for the report."""
    return {
        "seqread": f"fio, one pass over a {p.seq_mib} MiB file, bs=1M, psync",
        "seqwrite": f"fio, a new {p.seq_mib} MiB file, bs=1M, psync, no fsync (page cache), unlinked after",
        "randread": f"fio, 4 KiB random reads over the {p.seq_mib} MiB file, psync, {p.rand_runtime} s time-based, "
                    "1 and 2 jobs",
        "metadata": f"{p.meta_files:,} empty files in one directory: create, stat, list (one scandir pass), delete; "
                    "one process per phase",
        "tar": f"tar -cf - of a tree of {data.get('tree_files', p.tree_files):,} files "
               f"({data.get('tree_mib', 0):.0f} MiB, stdlib .py files) piped to cat",
        "untar": "tar -xf of that tree's archive into a new directory",
        "compileall": f"python -m compileall -q over {data.get('compile_chosen', 0):,} stdlib .py files "
                      f"({data.get('compile_mib', 0):.0f} MiB)",
        "rmrf": "rm -rf of a copy of that tree (made natively before mounting)",
        "visibility": f"{p.visibility_changes:,} changes of a file's size made in the source directly, each followed "
                      "by stat through the mount (every 0.2 ms) until the new size shows: median and p99 ms; "
                      f"a change unseen after {VISIBILITY_GIVE_UP:g} s is a miss, {VISIBILITY_MAX_MISSES} "
                      "misses in a row end the step",
        "churn": f"the server's CPU time (/proc/PID/stat) while another process creates and writes "
                 f"{p.churn_files:,} files of 100 bytes beside the source on the same filesystem",
    }


# --- input data -------------------------------------------------------------------------------------


def prepare(work: str, p: Params, log: Callable[[str], None]) -> dict[str, Any]:
    """Make (or reuse, when the sizes match) the inputs under ``work``; return facts about them."""
    src = os.path.join(work, "src")
    manifest_path = os.path.join(work, "manifest.json")
    wanted = {"seq_mib": p.seq_mib, "tree_files": p.tree_files, "compile_files": p.compile_files, "version": 1}
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        if {k: manifest.get(k) for k in wanted} == wanted:
            log("data: reusing the inputs in " + work)
            return dict(manifest)
    except (OSError, ValueError):
        pass
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    open(os.path.join(work, MARKER), "w").close()
    for d in ("data", "tree", "scratch"):
        os.makedirs(os.path.join(src, d))
    log(f"data: writing a {p.seq_mib} MiB file")
    with open(os.path.join(src, "data", "seq.dat"), "wb") as f:
        for _ in range(p.seq_mib):
            f.write(os.urandom(MiB))
    stdlib = sysconfig.get_paths()["stdlib"]
    files = _stdlib_py_files(stdlib)
    log(f"data: a tree of {p.tree_files:,} files from the stdlib's .py files")
    tree_bytes = 0
    for i in range(p.tree_files):
        copy, index = divmod(i, len(files))
        dst = os.path.join(src, "tree", f"c{copy:02d}", files[index])
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(stdlib, files[index]), dst)
        tree_bytes += os.path.getsize(dst)
    run_cmd(["tar", "-cf", os.path.join(work, "tree.tar"), "-C", os.path.join(src, "tree"), "."], 600)
    log("data: choosing stdlib .py files that compile cleanly")
    chosen = _compilable(stdlib, files, p.compile_files)
    compile_bytes = 0
    for rel in chosen:
        dst = os.path.join(work, "pysrc", rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(stdlib, rel), dst)
        compile_bytes += os.path.getsize(dst)
    manifest = dict(wanted, tree_mib=tree_bytes / MiB, compile_chosen=len(chosen), compile_mib=compile_bytes / MiB)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    return manifest


def _stdlib_py_files(stdlib: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        out += [os.path.relpath(os.path.join(root, n), stdlib) for n in sorted(names) if n.endswith(".py")]
    return out


def _compilable(stdlib: str, files: list[str], limit: int) -> list[str]:
    """Files that compile without an error or a warning (compileall then prints nothing and exits 0)."""
    chosen = []
    for rel in files:
        try:
            with open(os.path.join(stdlib, rel), "rb") as f:
                source = f.read()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                compile(source, rel, "exec", dont_inherit=True)
        except (SyntaxError, ValueError, Warning):
            continue
        chosen.append(rel)
        if limit and len(chosen) >= limit:
            break
    return chosen


def prepare_round(work: str, tag: str, steps: list[Step]) -> str:
    """Make ``src/scratch/<tag>`` for one configuration's round and warm the inputs it reads; return it."""
    src = os.path.join(work, "src")
    scratch = os.path.join(src, "scratch", tag)
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(os.path.join(scratch, "meta"))
    os.makedirs(os.path.join(scratch, "untar"))
    os.makedirs(os.path.join(scratch, "vis"))
    ids = {s.id for s in steps}
    if "rmrf" in ids:
        os.makedirs(os.path.join(scratch, "rmrf"))
        run_cmd(["tar", "-xf", os.path.join(work, "tree.tar"), "-C", os.path.join(scratch, "rmrf")], 600)
    if "compileall" in ids:
        shutil.copytree(os.path.join(work, "pysrc"), os.path.join(scratch, "compile"))
    if ids & {"seqread", "randread1", "randread2"}:
        _read_all(os.path.join(src, "data", "seq.dat"))
    if "tar" in ids:
        for root, _, names in os.walk(os.path.join(src, "tree")):
            for name in names:
                _read_all(os.path.join(root, name))
    os.sync()  # no writeback of the previous configuration's files may run into this one's figures
    return scratch


def cleanup_round(work: str, tag: str) -> None:
    shutil.rmtree(os.path.join(work, "src", "scratch", tag), ignore_errors=True)
    shutil.rmtree(os.path.join(work, f"churn-{tag}"), ignore_errors=True)


def _read_all(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(MiB):
            pass


def params_dict(p: Params) -> dict[str, Any]:
    return asdict(p)
