"""The configurations under test, each a way to present the source directory at a path.

``native`` is the source itself. The others are FUSE mounts of it: fusepass (passthrough on, or served
with passthrough off) through its own command, and the peers (libfuse's C passthrough_hp and two Python
filesystems) as child processes of this benchmark. Every mount is torn down in ``Target.mounted``'s exit,
whatever happened: a polite unmount first, then aborting the connection through fusectl and a lazy
unmount, and the server process ends or is stopped by its pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusepass import mount as mountmod
from fusepass.cli import wait_for_exit

from . import environment as envmod


class MountFailed(Exception):
    """The configuration could not be mounted; the message says why."""


@dataclass
class Mounted:
    """A configuration ready for workloads at ``path``."""

    path: str
    conn: int | None = None  # fusectl connection number
    server_pid: int | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    target: Target | None = None

    def status(self) -> dict[str, Any] | None:
        """``fusepass status --json`` for fusepass mounts; None for the others."""
        if self.target is None or not self.target.has_status:
            return None
        proc = _run([sys.executable, "-m", "fusepass.cli", "status", self.path, "--json"], timeout=15)
        if proc.returncode != 0:
            return None
        try:
            out: dict[str, Any] = json.loads(proc.stdout)
            return out
        except ValueError:
            return None


class Target:
    """A configuration: ``name`` in tables and on the command line, ``label`` for people."""

    name = ""
    label = ""
    has_status = False
    unavailable: str | None = None  # why it cannot run at all (a peer that failed to install)

    @contextlib.contextmanager
    def mounted(self, source: str, mnt: str, logfile: str) -> Iterator[Mounted]:
        raise NotImplementedError


class Native(Target):
    name, label = "native", "native (the source directory)"

    @contextlib.contextmanager
    def mounted(self, source: str, mnt: str, logfile: str) -> Iterator[Mounted]:
        yield Mounted(source, target=self)


class Fusepass(Target):
    """fusepass's mirror through ``fusepass mount``; ``passthrough`` is "on" or "off"."""

    has_status = True

    def __init__(self, passthrough: str, threads: int | None, options: str | None) -> None:
        self.passthrough = passthrough
        self.threads = threads
        self.options = options
        self.name = "fusepass-pt" if passthrough == "on" else "fusepass-served"
        self.label = "fusepass passthrough" if passthrough == "on" else "fusepass served (--passthrough off)"

    @contextlib.contextmanager
    def mounted(self, source: str, mnt: str, logfile: str) -> Iterator[Mounted]:
        cmd = [sys.executable, "-m", "fusepass.cli", "mount", source, mnt, "--passthrough", self.passthrough,
               "--log", logfile]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        if self.options:
            cmd += ["-o", self.options]
        proc = _run(cmd, timeout=90)
        conn = connection_of(mnt)
        if proc.returncode != 0:
            if conn is not None:
                force_unmount(mnt)
            raise MountFailed(f"fusepass mount failed (exit {proc.returncode}): {_tail(proc.stderr + proc.stdout)}")
        m = Mounted(mnt, conn=conn, target=self)
        try:
            st = m.status() or {}
            m.server_pid = st.get("pid")
            pt = st.get("passthrough", {})
            m.facts = {"threads": st.get("threads"), "passthrough_negotiated": pt.get("negotiated"),
                       "why_not": pt.get("why_not"), "options": st.get("options")}
            if self.passthrough == "on" and not pt.get("negotiated"):
                raise MountFailed(f"passthrough not negotiated: {pt.get('why_not')}")
            yield m
        finally:
            proc = _run([sys.executable, "-m", "fusepass.cli", "umount", mnt], timeout=40)
            if proc.returncode != 0 or connection_of(mnt) is not None:
                force_unmount(mnt)
            if m.server_pid:
                stop_pid(m.server_pid, grace=10)


class Peer(Target):
    """A peer's example filesystem run as a foreground child process of the benchmark: ``command``
    followed by the source and the mount point."""

    def __init__(self, name: str, label: str, command: list[str], unavailable: str | None) -> None:
        self.name, self.label = name, label
        self.command = command
        self.unavailable = unavailable

    def argv(self, source: str, mnt: str) -> list[str]:
        return [*self.command, source, mnt]

    @contextlib.contextmanager
    def mounted(self, source: str, mnt: str, logfile: str) -> Iterator[Mounted]:
        cmd = self.argv(source, mnt)
        with open(logfile, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while connection_of(mnt) is None:
                if proc.poll() is not None:
                    raise MountFailed(f"{self.name} exited with status {proc.returncode} before mounting: "
                                      f"{_tail(_read(logfile))}")
                if time.monotonic() > deadline:
                    raise MountFailed(f"{self.name} did not mount within 30 s: {_tail(_read(logfile))}")
                time.sleep(0.05)
            if _run(["stat", mnt], timeout=20).returncode != 0:  # the first request: the server answers
                raise MountFailed(f"{self.name} mounted but does not answer: {_tail(_read(logfile))}")
            yield Mounted(mnt, conn=connection_of(mnt), server_pid=proc.pid, target=self)
        finally:
            if connection_of(mnt) is not None:
                if _run(["fusermount3", "-u", mnt], timeout=20).returncode != 0:
                    if _run(["umount", mnt], timeout=20).returncode != 0:
                        force_unmount(mnt)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                stop_pid(proc.pid, grace=5)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)


def make_targets(threads: int | None, fusepass_options: str | None, setup: dict[str, Any]) -> list[Target]:
    """All six configurations, in the order the tables show them."""
    packages = setup.get("packages", {})
    hp = setup.get("passthrough_hp") or {}
    hp_binary = hp.get("binary", "passthrough_hp")
    hp_missing = None if hp.get("ok") and os.path.exists(hp_binary) else (
        hp.get("error") or f"passthrough_hp was not built ({hp_binary} is missing)")

    def why_not(name: str, example: Path) -> str | None:
        entry = packages.get(name, {})
        if not entry.get("ok"):
            return entry.get("error") or f"{name} is not installed in {envmod.VENV}"
        if not example.exists():
            return f"{example} is missing"
        return None

    return [
        Native(),
        Fusepass("on", threads, fusepass_options),
        Fusepass("off", threads, fusepass_options),
        Peer("passthrough_hp", "libfuse example/passthrough_hp (C, low-level API, passthrough, 86,400 s caches)",
             [hp_binary, "--foreground"], hp_missing),
        Peer("pyfuse3", "pyfuse3 examples/passthroughfs.py", [str(envmod.venv_python()), str(envmod.PYFUSE3_EXAMPLE)],
             why_not("pyfuse3", envmod.PYFUSE3_EXAMPLE)),
        Peer("mfusepy", "mfusepy loopback (bench/peers)", [str(envmod.venv_python()), str(envmod.MFUSEPY_LOOPBACK)],
             why_not("mfusepy", envmod.MFUSEPY_LOOPBACK)),
    ]


# --- mounts, read from /proc/self/mountinfo so that a hung mount is never touched --------------


def connection_of(path: str) -> int | None:
    """The fusectl connection number of the FUSE mount at ``path``, or None if none is there."""
    return mountmod.connection_id(path)


def mounts_under(directory: str) -> list[str]:
    """FUSE mount points at or below ``directory``."""
    prefix = os.path.abspath(directory).rstrip("/") + "/"
    return [point for point, _ in mountmod.fuse_mounts() if (point + "/").startswith(prefix)]


def force_unmount(path: str) -> None:
    """Abort the FUSE connection at ``path`` (every request fails, the server's reads end) and detach it."""
    conn = connection_of(path)
    if conn is None:
        return
    with contextlib.suppress(OSError):
        mountmod.abort_connection(conn)
    _run(["umount", "-l", path], timeout=20)


def stop_pid(pid: int, grace: float) -> None:
    """Wait up to ``grace`` seconds for process ``pid`` to exit, then SIGTERM it, then SIGKILL it."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if wait_for_exit(pid, grace if sig is None else 5):
            return


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(envmod.REPO), env.get("PYTHONPATH")]))
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                              env=env, check=False)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {e.timeout} s")


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())
