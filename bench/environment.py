"""The benchmark's own environment: Debian packages, a virtualenv holding the peers, their example filesystems.

The project never depends on any of it. Everything lands in ``bench/.venv`` (git-ignored): the peers
pyfuse3 and mfusepy from PyPI, matplotlib and tqdm, pyfuse3's ``examples/passthroughfs.py`` taken from
its sdist, and libfuse's ``example/passthrough_hp`` built with meson and ninja (from PyPI) from a libfuse
source tarball when one is at hand (``--libfuse-tarball``). What was installed, and every error met on
the way, is kept in ``bench/.venv/bench-setup.json`` so that a later run skips what already worked and
the report can say why a peer is missing.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
VENV = BENCH_DIR / ".venv"
PEERS_DIR = VENV / "peers"
STATE_FILE = VENV / "bench-setup.json"
IN_VENV = "FUSEPASS_BENCH_IN_VENV"  # set in the environment of the re-executed benchmark

PYFUSE3_EXAMPLE = PEERS_DIR / "pyfuse3_passthroughfs.py"
MFUSEPY_LOOPBACK = BENCH_DIR / "peers" / "mfusepy_loopback.py"
# The libfuse source whose example/passthrough_hp is the C reference: taken from this variable, else the
# newest libfuse-*.tar.gz in the shared peers folder beside the repository.
LIBFUSE_TARBALL_ENV = "FUSEPASS_BENCH_LIBFUSE"
LIBFUSE_BUILD_TOOLS = ("meson", "ninja")

# What the benchmark itself imports inside the venv (charts, progress), and the peers.
TOOLS = ("matplotlib", "tqdm")
PEERS = ("pyfuse3", "mfusepy")

Log = Callable[[str], None]


def venv_python() -> Path:
    return VENV / "bin" / "python"


def load_state() -> dict[str, Any]:
    try:
        with open(STATE_FILE) as f:
            state: dict[str, Any] = json.load(f)
            return state
    except (OSError, ValueError):
        return {"packages": {}, "system": {}}


def default_libfuse_tarball() -> str | None:
    if os.environ.get(LIBFUSE_TARBALL_ENV):
        return os.environ[LIBFUSE_TARBALL_ENV]
    found = sorted(glob.glob(str(REPO.parent / "shared" / "peers" / "libfuse-*.tar.gz")))
    return found[-1] if found else None


def passthrough_hp_binary(tarball: str) -> Path:
    """Where the build of ``tarball`` puts passthrough_hp (one build per tarball name)."""
    stem = Path(tarball).name.removesuffix(".tar.gz")
    return PEERS_DIR / stem / "build" / "example" / "passthrough_hp"


def ensure(log: Log, libfuse_tarball: str | None = None) -> dict[str, Any]:
    """Install what is missing (Debian packages as root, then the venv and its packages, then passthrough_hp
    when ``libfuse_tarball`` is given); return the state."""
    state = load_state()
    state.setdefault("packages", {})
    build_hp = bool(libfuse_tarball) and not passthrough_hp_binary(libfuse_tarball or "").exists()
    state["system"] = _ensure_system(state, log, build_hp)
    venv_error = _ensure_venv(log)
    if venv_error:
        state["venv_error"] = venv_error
        for name in TOOLS + PEERS:
            state["packages"][name] = {"ok": False, "error": f"no benchmark virtualenv: {venv_error}"}
        return state
    state.pop("venv_error", None)
    for name in TOOLS + PEERS:
        entry = state["packages"].get(name, {})
        if entry.get("ok") and _installed_version(name):
            continue
        log(f"setup: installing {name} into {VENV}")
        state["packages"][name] = _pip_install(name)
        _save(state)
    entry = state["packages"]["pyfuse3"]
    if entry.get("ok") and not PYFUSE3_EXAMPLE.exists():
        log("setup: extracting examples/passthroughfs.py from the pyfuse3 sdist")
        error = _extract_pyfuse3_example(entry.get("version"))
        if error:
            state["packages"]["pyfuse3"] = dict(entry, ok=False, error=error)
    state["passthrough_hp"] = _ensure_passthrough_hp(libfuse_tarball, log)
    _save(state)
    return state


def reexec_in_venv(argv: list[str]) -> None:
    """Replace this process by the same benchmark run under the venv's Python (never returns)."""
    env = dict(os.environ, **{IN_VENV: "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    python = str(venv_python())
    os.execve(python, [python, "-m", "bench", *argv], env)


def running_in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


# --- Debian packages ----------------------------------------------------------------------------


def _ensure_system(state: dict[str, Any], log: Log, build_hp: bool) -> dict[str, Any]:
    """apt-get install what the run needs and the machine lacks: fio, fusermount3 and, while pyfuse3 still
    has to be built, pkg-config, libfuse3-dev and gcc, while passthrough_hp has to be, pkg-config, g++,
    liburing-dev and libnuma-dev (without the last two libfuse leaves io_uring out);
    python3-venv if ``venv`` cannot bootstrap pip."""
    wanted = []
    if not shutil.which("fio"):
        wanted.append("fio")
    if not shutil.which("fusermount3"):
        wanted.append("fuse3")
    if not state["packages"].get("pyfuse3", {}).get("ok"):
        if not shutil.which("pkg-config"):
            wanted.append("pkg-config")
        if not shutil.which("pkg-config") or _run(["pkg-config", "--exists", "fuse3"]).returncode != 0:
            wanted.append("libfuse3-dev")
        if not (shutil.which("gcc") or shutil.which("cc")):
            wanted.append("gcc")
    if build_hp:
        if not shutil.which("pkg-config") and "pkg-config" not in wanted:
            wanted.append("pkg-config")
        if not shutil.which("c++"):
            wanted.append("g++")
        # libfuse builds its FUSE over io_uring (passthrough_hp -o io_uring, bench.uring) only with these.
        if not shutil.which("pkg-config") or _run(["pkg-config", "--exists", "liburing"]).returncode != 0:
            wanted.append("liburing-dev")
        if not os.path.exists("/usr/include/numa.h"):
            wanted.append("libnuma-dev")
    if not VENV.exists() and _run([sys.executable, "-c", "import ensurepip"]).returncode != 0:
        wanted.append("python3-venv")
    out: dict[str, Any] = {"apt_installed": wanted}
    if not wanted:
        return out
    if os.geteuid() != 0:
        out["error"] = f"missing Debian packages {wanted} and not root: install them with apt-get"
        log(f"setup: {out['error']}")
        return out
    log(f"setup: apt-get install -y {' '.join(wanted)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = _run(["apt-get", "install", "-y", *wanted], env=env, timeout=900)
    if proc.returncode != 0:  # a fresh machine has no package lists yet
        _run(["apt-get", "update"], env=env, timeout=600)
        proc = _run(["apt-get", "install", "-y", *wanted], env=env, timeout=900)
    if proc.returncode != 0:
        out["error"] = f"apt-get install {' '.join(wanted)} failed: {_tail(proc.stdout + proc.stderr)}"
        log(f"setup: {out['error']}")
    return out


# --- the virtualenv -----------------------------------------------------------------------------


def _ensure_venv(log: Log) -> str | None:
    if venv_python().exists():
        return None
    log(f"setup: python3 -m venv {VENV}")
    proc = _run([sys.executable, "-m", "venv", str(VENV)], timeout=300)
    if proc.returncode != 0:
        shutil.rmtree(VENV, ignore_errors=True)
        return f"python -m venv failed: {_tail(proc.stdout + proc.stderr)}"
    _run([str(venv_python()), "-m", "pip", "install", "-q", "--upgrade", "pip"], timeout=600)
    return None


def _pip_install(name: str) -> dict[str, Any]:
    proc = _run([str(venv_python()), "-m", "pip", "install", "-q", name], timeout=1200)
    if proc.returncode != 0:
        return {"ok": False, "error": f"pip install {name} failed: {_tail(proc.stdout + proc.stderr)}"}
    version = _installed_version(name)
    if version is None:
        return {"ok": False, "error": f"pip install {name} succeeded but it does not import"}
    return {"ok": True, "version": version}


def _installed_version(name: str) -> str | None:
    code = f"import importlib.metadata as m, {name}; print(m.version({name!r}))"
    proc = _run([str(venv_python()), "-c", code], timeout=120)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _extract_pyfuse3_example(version: str | None) -> str | None:
    """Download the pyfuse3 sdist matching the installed version and keep its passthroughfs example."""
    spec = f"pyfuse3=={version}" if version else "pyfuse3"
    with tempfile.TemporaryDirectory(prefix="fusepass-bench-sdist-") as tmp:
        proc = _run([str(venv_python()), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "pyfuse3",
                     spec, "-d", tmp], timeout=600)
        archives = glob.glob(os.path.join(tmp, "pyfuse3-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            return f"pip download of the pyfuse3 sdist failed: {_tail(proc.stdout + proc.stderr)}"
        with tarfile.open(archives[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/examples/passthroughfs.py")), None)
            if member is None:
                return "the pyfuse3 sdist has no examples/passthroughfs.py"
            data = tar.extractfile(member)
            assert data is not None
            PEERS_DIR.mkdir(parents=True, exist_ok=True)
            PYFUSE3_EXAMPLE.write_bytes(data.read())
    return None


# --- libfuse's passthrough_hp ---------------------------------------------------------------------


def _ensure_passthrough_hp(tarball: str | None, log: Log) -> dict[str, Any]:
    """Build passthrough_hp from ``tarball`` under the venv's peers folder (once per tarball)."""
    if not tarball:
        return {"ok": False, "error": f"no libfuse source tarball (give --libfuse-tarball or {LIBFUSE_TARBALL_ENV})"}
    if not os.path.isfile(tarball):
        return {"ok": False, "error": f"no libfuse source tarball at {tarball}"}
    binary = passthrough_hp_binary(tarball)
    if binary.exists():
        return {"ok": True, "binary": str(binary), "tarball": tarball}
    for tool in LIBFUSE_BUILD_TOOLS:
        if not (VENV / "bin" / tool).exists():
            log(f"setup: installing {tool} into {VENV}")
            proc = _run([str(venv_python()), "-m", "pip", "install", "-q", tool], timeout=600)
            if proc.returncode != 0:
                return {"ok": False, "error": f"pip install {tool} failed: {_tail(proc.stdout + proc.stderr)}"}
    if not shutil.which("pkg-config") or not shutil.which("c++"):
        return {"ok": False, "error": "building passthrough_hp needs pkg-config and a C++ compiler "
                "(apt-get install pkg-config g++)"}
    top = binary.parent.parent.parent
    log(f"setup: building libfuse's passthrough_hp from {tarball} in {top}")
    shutil.rmtree(top, ignore_errors=True)
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=PEERS_DIR) as tmp:
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        roots = [p for p in Path(tmp).iterdir() if (p / "meson.build").exists()]
        if len(roots) != 1:
            return {"ok": False, "error": f"{tarball} holds no single source tree with a meson.build"}
        roots[0].rename(top)
    env = dict(os.environ, PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    for cmd in (["meson", "setup", "build", "-Dutils=false", "-Dtests=false", "-Dexamples=true"],
                ["ninja", "-C", "build", "example/passthrough_hp"]):
        proc = subprocess.run([str(VENV / "bin" / cmd[0]), *cmd[1:]], cwd=top, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=1800, check=False)
        if proc.returncode != 0:
            return {"ok": False, "error": f"{' '.join(cmd)} failed: {_tail(proc.stdout + proc.stderr)}"}
    if not binary.exists():
        return {"ok": False, "error": f"the build made no {binary}"}
    return {"ok": True, "binary": str(binary), "tarball": tarball}


# --- helpers ------------------------------------------------------------------------------------


def _save(state: dict[str, Any]) -> None:
    VENV.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(STATE_FILE)


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(cmd, 127, "", str(e))


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())
