"""Mounting and unmounting: mount(2) with CAP_SYS_ADMIN, fusermount3 without, and aborting a stuck connection."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
from dataclasses import dataclass, field

from . import syscalls
from .device import DEVICE, Device, DeviceError

__all__ = ["DEVICE", "Mount", "MountError", "MountOptions", "mount", "unmount"]

FUSECTL = "/sys/fs/fuse/connections"
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_NOATIME = 1, 2, 4, 8, 1024
MNT_DETACH = 2
CAP_SYS_ADMIN = 21


class MountError(OSError):
    """Mounting failed; the message says why in words."""


@dataclass(slots=True)
class MountOptions:
    """The options a FUSE mount takes. ``fsname`` shows as the source in /proc/mounts,
    ``subtype`` as the type suffix (``fuse.SUBTYPE``)."""

    fsname: str = "fusepass"
    subtype: str = "fusepass"
    allow_other: bool = False
    default_permissions: bool = False
    ro: bool = False
    max_read: int | None = None
    nosuid: bool = True
    nodev: bool = True
    noexec: bool = False
    noatime: bool = False
    extra: list[str] = field(default_factory=list)

    def kernel_data(self, fd: int, uid: int, gid: int) -> str:
        opts = [f"fd={fd}", "rootmode=40000", f"user_id={uid}", f"group_id={gid}"]
        return ",".join(opts + self._shared())

    def fusermount_options(self) -> str:
        opts = [f"fsname={self.fsname}", f"subtype={self.subtype}"]
        for on, name in ((self.ro, "ro"), (self.nosuid, "nosuid"), (self.nodev, "nodev"),
                         (self.noexec, "noexec"), (self.noatime, "noatime")):
            if on:
                opts.append(name)
        return ",".join(opts + self._shared())

    def flags(self) -> int:
        flags = 0
        for on, bit in ((self.ro, MS_RDONLY), (self.nosuid, MS_NOSUID), (self.nodev, MS_NODEV),
                        (self.noexec, MS_NOEXEC), (self.noatime, MS_NOATIME)):
            if on:
                flags |= bit
        return flags

    def _shared(self) -> list[str]:
        opts = []
        if self.allow_other:
            opts.append("allow_other")
        if self.default_permissions:
            opts.append("default_permissions")
        if self.max_read:
            opts.append(f"max_read={self.max_read}")
        return opts + list(self.extra)

    def check(self) -> None:
        """Raise ValueError, one line saying what is wrong, for options no mount would accept."""
        for value, what in ((self.fsname, "fsname"), (self.subtype, "subtype")):
            if not value or any(c in value for c in UNSAFE_NAME_CHARS):
                raise ValueError(f"{what} {value!r} must be non-empty and free of commas, '=', spaces and "
                                 "backslashes (mount options are separated by them)")


#: Characters a name carried in a mount option string cannot hold.
UNSAFE_NAME_CHARS = ",= \t\n\\"


@dataclass(slots=True)
class Mount:
    """A live mount: the /dev/fuse descriptor serving it and how it was made. As a context
    manager it unmounts (lazily) and closes the descriptor on leaving."""

    device: Device
    mountpoint: str
    method: str  # "mount(2)" or "fusermount3"

    def unmount(self, lazy: bool = True) -> None:
        unmount(self.mountpoint, lazy=lazy, method=self.method)

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if mount_entry(self.mountpoint) is not None:
                self.unmount(lazy=True)
        finally:
            self.device.close()


def has_cap_sys_admin() -> bool:
    """Whether this process holds CAP_SYS_ADMIN in its effective set."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def mount_entry(path: str) -> tuple[str, str, str] | None:
    """The (device "major:minor", fstype, source) of the mount whose mount point is ``path``, if any.
    Read from /proc/self/mountinfo, so it never touches the (possibly hung) mount itself."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            if _unescape(parts[4]) == path:
                rparts = right.split()
                found = (parts[2], rparts[0], _unescape(rparts[1]))
    return found  # the last entry is the one on top


def fuse_mounts() -> list[tuple[str, str]]:
    """(mount point, fstype) of every FUSE mount, from /proc/self/mountinfo (never touching them)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype = right.split()[0]
            if fstype.startswith("fuse") and fstype != "fusectl":
                out.append((_unescape(left.split()[4]), fstype))
    return out


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def check_mountpoint(mountpoint: str) -> str:
    """Return the absolute mount point path, or raise a clear error if it cannot be used."""
    path = os.path.abspath(mountpoint)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise MountError(errno.ENOENT, f"mount point {path} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(errno.ENOTDIR, f"mount point {path} is not a directory")
    if mount_entry(path) is not None:
        raise MountError(errno.EBUSY, f"{path} is already a mount point")
    return path


def mount(mountpoint: str, options: MountOptions) -> Mount:
    """Mount a new FUSE connection at ``mountpoint`` and return its device descriptor.

    With CAP_SYS_ADMIN this calls mount(2) directly; otherwise it asks the setuid
    ``fusermount3`` helper, which hands the descriptor back over a socket.
    """
    options.check()
    path = check_mountpoint(mountpoint)
    if has_cap_sys_admin():
        return _mount_kernel(path, options)
    return _mount_fusermount(path, options)


def _mount_kernel(path: str, options: MountOptions) -> Mount:
    try:
        device = Device.open()
    except DeviceError as e:
        raise MountError(e.errno, e.strerror) from None
    data = options.kernel_data(device.fd, os.getuid(), os.getgid())
    fstype = f"fuse.{options.subtype}"
    err = syscalls.mount(options.fsname.encode(), path.encode(), fstype.encode(), options.flags(), data.encode())
    if err:
        device.close()
        raise MountError(err, f"mount({path}) failed: {os.strerror(err)} (options {data})")
    return Mount(device, path, "mount(2)")


def fusermount_path() -> str | None:
    return shutil.which("fusermount3")


def _mount_fusermount(path: str, options: MountOptions) -> Mount:
    helper = fusermount_path()
    if helper is None:
        raise MountError(errno.EPERM, "mounting needs CAP_SYS_ADMIN or the fusermount3 helper (Debian package fuse3)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.run(
            [helper, "-o", options.fusermount_options(), "--", path],
            env=env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            capture_output=True, text=True, check=False,
        )
        theirs.close()
        fds: list[int] = []
        if proc.returncode == 0:
            try:
                _, fds, _, _ = socket.recv_fds(ours, 1, 1)
            except OSError:
                fds = []
    if proc.returncode != 0 or not fds:
        msg = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        raise MountError(errno.EPERM, f"fusermount3 could not mount {path}: {msg}")
    fd = fds[0]
    os.set_inheritable(fd, False)
    return Mount(Device(fd), path, "fusermount3")


def unmount(mountpoint: str, lazy: bool = True, method: str | None = None) -> None:
    """Unmount ``mountpoint``. A busy mount is detached (lazy) when ``lazy`` is set,
    otherwise EBUSY is raised. Without privileges this goes through ``fusermount3 -u``."""
    path = os.path.abspath(mountpoint)
    if method != "fusermount3" and has_cap_sys_admin():
        err = syscalls.umount2(path.encode(), 0)
        if err == errno.EBUSY and lazy:
            err = syscalls.umount2(path.encode(), MNT_DETACH)
        if err:
            raise OSError(err, f"unmounting {path} failed: {os.strerror(err)}")
        return
    helper = fusermount_path()
    if helper is None:
        raise OSError(errno.EPERM, "unmounting without CAP_SYS_ADMIN needs fusermount3")
    args = [helper, "-u"] + (["-z"] if lazy else []) + ["--", path]
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(errno.EBUSY, f"fusermount3 -u {path}: {proc.stderr.strip()}")


def connection_id(mountpoint: str) -> int | None:
    """The fusectl connection number of the FUSE mount at ``mountpoint`` (the minor
    device number of its anonymous superblock), or None if nothing is mounted there."""
    entry = mount_entry(os.path.abspath(mountpoint))
    if entry is None or not entry[1].startswith("fuse"):
        return None
    major, minor = (int(x) for x in entry[0].split(":"))
    return os.makedev(major, minor) if major else minor


def ensure_fusectl() -> str:
    """Mount the fusectl filesystem if it is not there yet; return its path."""
    if not os.path.exists(os.path.join(FUSECTL, "")) or mount_entry(FUSECTL) is None:
        err = syscalls.mount(b"fusectl", FUSECTL.encode(), b"fusectl", 0, None)
        if err and err != errno.EBUSY:
            raise OSError(err, f"cannot mount fusectl at {FUSECTL}: {os.strerror(err)}")
    return FUSECTL


def abort_connection(conn: int) -> bool:
    """Abort FUSE connection ``conn``: every waiting and future request fails with
    ENOTCONN and the server's reads end. Returns False if no such connection exists."""
    path = os.path.join(ensure_fusectl(), str(conn), "abort")
    try:
        with open(path, "w") as f:
            f.write("1")
    except FileNotFoundError:
        return False
    return True
