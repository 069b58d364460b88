"""Shared fixtures: filesystem servers in child processes, with a teardown that never leaves a mount behind."""

from __future__ import annotations

import errno
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fusepass import mount as mountmod

REPO = Path(__file__).resolve().parent.parent
SERVERS = Path(__file__).resolve().parent / "servers"
READY_TIMEOUT = 30.0
URING_PARAMETER = Path("/sys/module/fuse/parameters/enable_uring")
#: FUSEPASS_TEST_IO_URING=1 runs every server of the suite over io_uring: the module parameter is
#: turned on for the run (and put back after it), and servers get FUSEPASS_IO_URING=require, so that
#: a server left to the default fails rather than falls back to /dev/fuse unnoticed (those that ask
#: for a transport themselves, ``-o io_uring`` or ``--supervise``, get what they ask for).
TEST_IO_URING = os.environ.get("FUSEPASS_TEST_IO_URING") == "1"


@contextmanager
def uring_parameter(value: str) -> Iterator[None]:
    """The fuse module parameter enable_uring set to ``value`` (Y or N) inside the block, and put
    back to what it was after it, whatever happens."""
    if not URING_PARAMETER.exists():
        pytest.skip("this kernel has no FUSE over io_uring (no enable_uring parameter)")
    if os.geteuid() != 0:
        pytest.skip("setting enable_uring needs root")
    old = URING_PARAMETER.read_text().strip()
    URING_PARAMETER.write_text(value)
    try:
        yield
    finally:
        URING_PARAMETER.write_text(old)


@pytest.fixture(scope="session", autouse=True)
def _suite_over_io_uring() -> Iterator[None]:
    if not TEST_IO_URING:
        yield
        return
    saved = os.environ.get("FUSEPASS_IO_URING")
    os.environ["FUSEPASS_IO_URING"] = "require"
    try:
        with uring_parameter("Y"):
            yield
    finally:
        if saved is None:
            os.environ.pop("FUSEPASS_IO_URING", None)
        else:
            os.environ["FUSEPASS_IO_URING"] = saved


def expected_threads(status: dict[str, Any], dev_fuse_workers: int) -> int:
    """The threads a status document counts: the /dev/fuse workers asked for, or over io_uring
    the one /dev/fuse worker and the ring's threads."""
    transport = status["transport"]
    return dev_fuse_workers if transport["kind"] == "/dev/fuse" else 1 + transport["threads"]


#: What a caller gets from the mount of a killed server: ENOTCONN; over io_uring ECONNABORTED or
#: ECANCELED too, for a request queued while the dead process's rings still held its /dev/fuse file
#: (the kernel cancels their commands after the process has gone).
DEAD_SERVER_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED) if TEST_IO_URING else (errno.ENOTCONN,)


@pytest.fixture
def enable_uring() -> Iterator[None]:
    """enable_uring on for the test (put back after it)."""
    with uring_parameter("Y"):
        yield


@pytest.fixture
def disable_uring() -> Iterator[None]:
    """enable_uring off for the test (put back after it)."""
    with uring_parameter("N"):
        yield


class ServerProcess:
    """A FUSE server in a child process. ``start`` returns once the server reports the
    filesystem answers (INIT done), through a pipe; ``stop`` unmounts, and escalates to
    aborting the connection and killing the process (by pid) if it does not end."""

    def __init__(self, argv: Sequence[str], mountpoint: Path, *, user: tuple[int, int] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.mountpoint = Path(mountpoint)
        self.user = user
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.connection: int | None = None
        self.stderr_path = self.mountpoint.parent / f"{self.mountpoint.name}.server.log"

    def start(self) -> ServerProcess:
        r, w = os.pipe()
        kwargs: dict[str, Any] = {}
        env = self.env
        if self.user is not None:
            kwargs.update(user=self.user[0], group=self.user[1], extra_groups=[])
            # Its status socket goes under XDG_RUNTIME_DIR, here beside the mount point (the default,
            # /tmp/fusepass-UID, would outlive the test).
            run = self.mountpoint.parent / f"{self.mountpoint.name}.run"
            run.mkdir(mode=0o700, exist_ok=True)
            os.chown(run, *self.user)
            env = {**(os.environ if env is None else env), "XDG_RUNTIME_DIR": str(run)}
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.command(w), pass_fds=(w,), stdin=subprocess.DEVNULL,
                stdout=err, stderr=err, env=env, **kwargs,
            )
        os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], READY_TIMEOUT)
            line = os.read(r, 64) if ready else b""
        finally:
            os.close(r)
        if line != b"ready\n":
            self.stop()
            raise RuntimeError(f"server did not become ready ({line!r}); log:\n{self.log()}")
        self.connection = mountmod.connection_id(str(self.mountpoint))
        return self

    def command(self, ready_fd: int) -> list[str]:
        """The server's command line, telling it where to report readiness."""
        return self.argv + ["--ready-fd", str(ready_fd)]

    def log(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def mounted(self) -> bool:
        return mountmod.mount_entry(str(self.mountpoint)) is not None

    def stop(self, timeout: float = 10.0) -> int | None:
        """Unmount and wait for the server; abort and kill it if it hangs. Returns its exit status."""
        if self.mounted():
            try:
                mountmod.unmount(str(self.mountpoint), lazy=True)
            except OSError:
                pass
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        if self.connection is not None:
            try:
                mountmod.abort_connection(self.connection)
            except OSError:
                pass
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def cleanup(self) -> None:
        """Teardown that always runs: nothing may stay mounted or running."""
        try:
            self.stop()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            if self.mounted():
                if self.connection is not None:
                    mountmod.abort_connection(self.connection)
                mountmod.unmount(str(self.mountpoint), lazy=True)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)


@pytest.fixture
def start_server(tmp_path: Path, _public_dirs: _PublicDirs) -> Iterator[Callable[..., ServerProcess]]:
    """Start a server: ``start_server(argv_without_mountpoint, mountpoint=None, user=None)``."""
    servers: list[ServerProcess] = []

    def start(argv: Sequence[str], mountpoint: Path | None = None, **kw: Any) -> ServerProcess:
        mnt = mountpoint or tmp_path / f"mnt{len(servers)}"
        mnt.mkdir(exist_ok=True)
        server = ServerProcess([*argv, str(mnt)], mnt, **kw)
        servers.append(server)
        return server.start()

    yield start
    for server in reversed(servers):
        server.cleanup()


def python_module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", name, *args]


def server_script(name: str, *args: str) -> list[str]:
    """A test server from tests/servers/, run as a script with the repo importable."""
    return [sys.executable, str(SERVERS / f"{name}.py"), *args]


@pytest.fixture
def memfs(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server(python_module("fusepass.examples.memfs"))


NOBODY = (65534, 65534)


class _PublicDirs:
    """Directories every user can traverse, removed once no server is mounted in them."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def make(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="fusepass-test-"))
        path.chmod(0o755)
        self.paths.append(path)
        return path

    def remove(self) -> None:
        with open("/proc/self/mounts") as f:
            mounted = [line.split()[1].replace("\\040", " ") for line in f]
        for path in self.paths:
            if not any(m.startswith(str(path) + "/") for m in mounted):
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def _public_dirs() -> Iterator[_PublicDirs]:
    dirs = _PublicDirs()
    yield dirs
    dirs.remove()  # start_server depends on this fixture, so its servers are stopped by now


@pytest.fixture
def public_tmp(_public_dirs: _PublicDirs) -> Path:
    """A fresh directory that every user can traverse (pytest's tmp_path is 0700), for mount
    points that another uid must reach. Removed after the servers of the test are stopped;
    a directory that is somehow still mounted on is left alone."""
    return _public_dirs.make()


def run_as(uid: int, gid: int, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Run ``fn`` in a forked child with the given uid and gid (no supplementary groups)
    and return its result; an exception in the child is re-raised here (OSError keeps its errno)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only system calls, then _exit
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            result: Any = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - shipped to the parent
            result = ("err", e if isinstance(e, OSError) else RuntimeError(traceback.format_exc()))
        with os.fdopen(w, "wb") as f:
            pickle.dump(result, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        ready, _, _ = select.select([f], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"child as uid {uid} did not finish in {timeout}s")
        kind, value = pickle.load(f)
    os.waitpid(pid, 0)
    if kind == "err":
        raise value
    return value


def mirror_argv(source: Path, *args: str) -> list[str]:
    """``fusepass mount --foreground SOURCE ... MOUNTPOINT`` (the fixture appends the mount point)."""
    return [sys.executable, "-m", "fusepass.cli", "mount", "--foreground", *args, str(source)]


@pytest.fixture
def mirror(start_server: Callable[..., ServerProcess], tmp_path: Path) -> ServerProcess:
    """A mirror of ``tmp_path/src`` with default options; the source is ``server.source``."""
    src = tmp_path / "src"
    src.mkdir()
    server = start_server(mirror_argv(src))
    server.source = src  # type: ignore[attr-defined]
    return server


def fusepass_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``fusepass ARGS...`` (as ``python -m fusepass.cli``) and capture its output."""
    return subprocess.run([sys.executable, "-m", "fusepass.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def stop_background(mnt: Path) -> None:
    """Teardown for a background ``fusepass mount``: unmount; if its server lingers, abort the
    connection and then kill the server by its pid (from the status socket)."""
    from fusepass import cli, control

    if mountmod.mount_entry(str(mnt)) is None:
        return
    conn = mountmod.connection_id(str(mnt))
    pid = None
    try:
        pid = int(control.query(str(mnt), timeout=2)["pid"])
    except (OSError, ValueError, KeyError):
        pass
    mountmod.unmount(str(mnt), lazy=True)
    if pid is not None and not cli.wait_for_exit(pid, 10):
        if conn is not None:
            mountmod.abort_connection(conn)
        if not cli.wait_for_exit(pid, 5):
            os.kill(pid, signal.SIGKILL)


def poll_until(probe: Callable[[], Any], done: Callable[[Any], bool], what: str, timeout: float = 10.0) -> Any:
    """Call ``probe`` every 20 ms until ``done`` holds of its result, and return that result; fail
    with ``what`` after ``timeout``. Only for state that changes without an event to wait on
    (the kernel sends RELEASE and FORGET asynchronously and tells no one when it has)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"{what} (after {timeout}s; last seen: {value!r})"
        time.sleep(0.02)


def wait_unmounted(path: Path, timeout: float = 20.0) -> None:
    """Wait until nothing is mounted at ``path``. /proc/self/mountinfo polls with POLLPRI on
    every change of the mount table, so this sleeps on an event, not on a timer."""
    deadline = time.monotonic() + timeout
    with open("/proc/self/mountinfo", "rb") as f:
        poller = select.poll()
        poller.register(f, select.POLLPRI | select.POLLERR)
        while mountmod.mount_entry(str(path)) is not None:
            left = deadline - time.monotonic()
            assert left > 0, f"{path} is still mounted after {timeout}s"
            poller.poll(left * 1000)
