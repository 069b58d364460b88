"""Changes made to the source behind the mount's back, read from fanotify and handed on in batches.

The kernel may cache a mirror's entries, attributes and listings for long only if the server tells it
when the source changes by other means. ``SourceWatcher`` turns fanotify events into ``Change`` records
that name objects by the same file-handle bytes as ``syscalls.name_to_handle`` (4-byte little-endian
handle type, then the handle), so a dict keyed by handle maps each record to an inode.

Why inode marks, not one filesystem mark: a mark on each directory the mount knows (with
FAN_EVENT_ON_CHILD, so the changes to its entries and to its children's data and attributes are
reported) makes the kernel generate events only for those directories. Changes elsewhere on the
filesystem cost its writers one flag test per operation and this process nothing; a filesystem mark
(which needs CAP_SYS_ADMIN) would make the kernel build, queue and copy an event for every change on the
whole filesystem, which this process would then parse just to drop, and a busy filesystem would overflow
the queue, forcing a full invalidation for changes that do not concern the mount. Inode marks with
file-handle reports also work without privilege (the caller needs read permission on what it marks).
The price is one mark per known directory: each pins that directory's inode in memory, and without
CAP_SYS_ADMIN they count against ``fs.fanotify.max_user_marks``. Changes inside the watched directories
do cost their writers: every write to a watched directory's child (the mount's own passthrough writes
among them) makes the kernel build a MODIFY event, merged into the one still queued; the ``coalesce``
pause keeps this process to a few hundred wake-ups a second however fast the writes come
(``python -m bench.watchcost --rewrites N`` measures both sides).

How the mirror uses it:

- Make one ``SourceWatcher(source, on_changes)`` at mount time; ``SourceWatcher.why_not(source)`` (or
  the ``WatcherUnavailable`` it raises) says in words why none can be had, and the mount then keeps its
  short timeouts. The constructor watches the source root itself (``root_handle``).
- Call ``watch(fd)`` for a directory *before* the stat or readdir whose result goes to the kernel (when
  LOOKUP or READDIRPLUS first hands out its node id): the mark is in place when ``watch`` returns, so
  every change after the stat is reported, and a change between the mark and the stat is reported too
  (a harmless extra invalidation). ``unwatch(fd)`` when the kernel forgets the directory. ``watch`` on a
  regular file marks the file itself: changes made through its other hard links, outside the known
  directories, are then reported too. ``watch`` raising ENOSPC (too many marks) means that directory
  cannot be kept true: serve it with short timeouts.
- ``on_changes`` runs on the watcher's thread with a list of ``Change``. For each: ``dir``/``name`` (and
  ``new_dir``/``new_name`` of a RENAME) known -> INVAL_ENTRY of that name (DELETE when the kernel must drop
  a name it holds); ``handle`` known -> INVAL_INODE (attributes; data too, for served files whose pages
  the kernel keeps); OVERFLOW -> FUSE_NOTIFY_INC_EPOCH and INVAL_INODE of every known inode. Changes
  made through the mount itself arrive as well; the kernel already knows them, and invalidating again
  only costs a lookup.
- The kernel merges events for the same name and object while they wait in its queue: one record may
  carry several ``Event`` bits (CREATE and DELETE of the same name, say) in no particular order. Look at
  the source to know where things stand now.
- Deleting a directory the mirror holds a descriptor of reports DELETE in its parent at once, but
  DELETE_SELF only when the last descriptor is closed.
- ``stop()`` (or leaving the ``with`` block) closes the group and joins the thread.

What it cannot see: sources on network filesystems (other hosts' changes are never reported here) and
on FUSE (its server's own changes are not); ``why_not`` refuses those. A change to a hard-linked file
made through a name outside the known directories is seen only when that file itself is watched.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import select
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from . import syscalls

log = logging.getLogger("fusepass.watcher")

# fanotify_init flags
FAN_CLOEXEC, FAN_NONBLOCK = 0x1, 0x2
FAN_UNLIMITED_MARKS = 0x20
FAN_REPORT_FID, FAN_REPORT_DIR_FID, FAN_REPORT_NAME, FAN_REPORT_TARGET_FID = 0x200, 0x400, 0x800, 0x1000
# the directory and name, the object, and for directory-entry events the object too (not the directory)
REPORT_FLAGS = FAN_REPORT_FID | FAN_REPORT_DIR_FID | FAN_REPORT_NAME | FAN_REPORT_TARGET_FID
# fanotify_mark flags
FAN_MARK_ADD, FAN_MARK_REMOVE, FAN_MARK_FILESYSTEM = 0x1, 0x2, 0x100
# event bits
FAN_MODIFY, FAN_ATTRIB, FAN_CLOSE_WRITE = 0x2, 0x4, 0x8
FAN_CREATE, FAN_DELETE, FAN_DELETE_SELF, FAN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
FAN_Q_OVERFLOW, FAN_RENAME = 0x4000, 0x10000000
FAN_EVENT_ON_CHILD, FAN_ONDIR = 0x08000000, 0x40000000
# info record types
_FID, _DFID_NAME, _DFID, _OLD_DFID_NAME, _NEW_DFID_NAME = 1, 2, 3, 10, 12
_METADATA_VERSION = 3


class Event(enum.IntFlag):
    """What happened, as fanotify's event bits (a record may carry several, merged by the kernel)."""

    MODIFY = FAN_MODIFY  # data written
    ATTRIB = FAN_ATTRIB  # mode, owner, times, link count, extended attributes
    CLOSE_WRITE = FAN_CLOSE_WRITE  # a descriptor open for writing was closed
    CREATE = FAN_CREATE  # ``name`` appeared in ``dir`` (also link, mkdir, mknod, symlink)
    DELETE = FAN_DELETE  # ``name`` left ``dir``
    RENAME = FAN_RENAME  # ``dir``/``name`` became ``new_dir``/``new_name``
    DELETE_SELF = FAN_DELETE_SELF  # a watched object itself was deleted
    MOVE_SELF = FAN_MOVE_SELF  # a watched object itself was moved
    OVERFLOW = FAN_Q_OVERFLOW  # events were lost: assume anything changed


DIRECTORY_MASK = (FAN_CREATE | FAN_DELETE | FAN_RENAME | FAN_MODIFY | FAN_ATTRIB | FAN_CLOSE_WRITE | FAN_DELETE_SELF
                  | FAN_MOVE_SELF | FAN_ONDIR | FAN_EVENT_ON_CHILD)
FILE_MASK = FAN_MODIFY | FAN_ATTRIB | FAN_CLOSE_WRITE | FAN_DELETE_SELF | FAN_MOVE_SELF
_EVENT_BITS = sum(Event)


@dataclass(frozen=True, slots=True)
class Change:
    """One fanotify event. Handles are ``syscalls.name_to_handle`` bytes; ``dir``/``name`` is the entry
    that changed or through which the object was changed (None for a change to a watched object seen
    without a name, e.g. a directory's own attributes); ``new_*`` only for RENAME."""

    events: Event
    handle: bytes | None = None
    dir: bytes | None = None
    name: bytes | None = None
    is_dir: bool = False
    new_dir: bytes | None = None
    new_name: bytes | None = None
    #: The process whose action caused the event (the server's own: a change made through the mount).
    pid: int = 0


OVERFLOW = Change(Event.OVERFLOW)


class WatcherUnavailable(Exception):
    """No watcher can be had for this source; the message says why, in words."""


# Filesystems whose changes need not pass through this kernel's VFS (statfs f_type).
_REMOTE = {
    0x6969: "NFS", 0xFF534D42: "CIFS", 0xFE534D42: "SMB", 0x517B: "SMB", 0x00C36400: "Ceph",
    0x6B414653: "AFS", 0x5346414F: "AFS", 0x01021997: "9p", 0x73757245: "Coda", 0x01161970: "GFS2",
    0x7461636F: "OCFS2", 0x0BD00BD0: "Lustre", 0x20030528: "OrangeFS",
}
_FUSE_MAGIC = 0x65735546

_META = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata
_INFO = struct.Struct("=BBH")  # struct fanotify_event_info_header
_FH = struct.Struct("=Ii")  # struct file_handle: handle_bytes, handle_type (after the 8-byte fsid)
_HANDLE_TYPE = struct.Struct("<i")  # as syscalls.name_to_handle encodes it
_BUFFER_SIZE = 256 * 1024


def parse_events(data: bytes | bytearray | memoryview, ignore_pid: int = -1) -> list[Change]:
    """The records in bytes read from an fanotify group made with ``REPORT_FLAGS``; those caused by
    process ``ignore_pid`` are dropped after their first 24 bytes (the cheap way to skip one's own)."""
    view = memoryview(data)
    out = []
    offset, end = 0, len(view)
    while offset + _META.size <= end:
        event_len, version, _, meta_len, mask, fd, pid = _META.unpack_from(view, offset)
        if event_len < _META.size or offset + event_len > end or version != _METADATA_VERSION:
            break  # not a record this code understands: never guess past it
        if fd >= 0:
            os.close(fd)  # only groups without file-handle reports get descriptors; never leak one
        if pid == ignore_pid and not mask & FAN_Q_OVERFLOW:
            offset += event_len
            continue
        if mask & FAN_Q_OVERFLOW:
            out.append(OVERFLOW)
            offset += event_len
            continue
        handle = directory = name = new_dir = new_name = None
        pos, stop = offset + meta_len, offset + event_len
        while pos + _INFO.size <= stop:
            kind, _, info_len = _INFO.unpack_from(view, pos)
            if info_len < _INFO.size + 8 + _FH.size or pos + info_len > stop:
                break
            size, htype = _FH.unpack_from(view, pos + 12)
            body = pos + 12 + _FH.size
            key = _HANDLE_TYPE.pack(htype) + bytes(view[body:body + size])
            entry = None
            if kind in (_DFID_NAME, _OLD_DFID_NAME, _NEW_DFID_NAME):
                raw = bytes(view[body + size:pos + info_len])
                entry = raw[:raw.find(b"\0")] if b"\0" in raw else raw
            if kind == _FID:
                handle = key
            elif kind in (_DFID_NAME, _OLD_DFID_NAME):
                if entry == b".":  # an event on a watched directory itself
                    handle = key
                else:
                    directory, name = key, entry
            elif kind == _DFID:
                directory = key
            elif kind == _NEW_DFID_NAME:
                new_dir, new_name = key, entry
            pos += info_len
        out.append(Change(Event(mask & _EVENT_BITS), handle, directory, name, bool(mask & FAN_ONDIR),
                          new_dir, new_name, pid))
        offset += event_len
    return out


class SourceWatcher:
    """Reports changes to watched directories of ``source`` (and their children) to ``on_changes``,
    a batch at a time, from its own thread once ``start``ed. ``coalesce`` seconds pass after each batch
    before the next read, so that a burst of writes reaches the callback as a few merged records rather
    than one wake-up per write."""

    def __init__(self, source: str, on_changes: Callable[[list[Change]], None], *, coalesce: float = 0.002,
                 ignore_pid: int = -1) -> None:
        self.source = source
        self.on_changes = on_changes
        self.coalesce = coalesce
        #: Changes this process makes are not reported (the mount's own, for the mirror).
        self.ignore_pid = ignore_pid
        self.counts = {"events": 0, "batches": 0, "overflows": 0, "callback_errors": 0}
        self._lock = threading.Lock()
        self._marked: set[bytes] = set()
        self._stopping = threading.Event()
        self._lost = threading.Event()  # ``report_lost``: the thread delivers an overflow
        self._thread: threading.Thread | None = None
        self._closes_itself = False
        self._fd = self._wake_r = self._wake_w = -1
        root = _open_source(source)
        try:
            self._fd = _open_group()
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                self.root_handle = self.watch(root)
            except OSError as e:
                raise WatcherUnavailable(_mark_error(e)) from None
        except BaseException:
            self._close_fds()
            raise
        finally:
            os.close(root)

    @staticmethod
    def why_not(source: str) -> str | None:
        """Why no watcher can be had for ``source``, in words; None if one can."""
        try:
            SourceWatcher(source, lambda changes: None).stop()
        except WatcherUnavailable as e:
            return str(e)
        return None

    def start(self) -> SourceWatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fusepass-watcher", daemon=True)
            self._thread.start()
        return self

    def watch(self, fd: int) -> bytes:
        """Mark the directory (its entries and its children too) or the file ``fd`` refers to (O_PATH is
        fine); return the handle records name it by. Changes after this returns are reported."""
        mask = DIRECTORY_MASK if stat.S_ISDIR(os.fstat(fd).st_mode) else FILE_MASK
        handle = syscalls.name_to_handle(fd)
        try:
            syscalls.fanotify_mark(self._fd, FAN_MARK_ADD, mask, syscalls.AT_FDCWD, b"/proc/self/fd/%d" % fd)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, "too many fanotify marks (fs.fanotify.max_user_marks)") from None
            raise
        with self._lock:
            self._marked.add(handle)
        return handle

    def unwatch(self, fd: int) -> None:
        """Remove the mark of what ``fd`` refers to (nothing if it had none)."""
        handle = syscalls.name_to_handle(fd)
        mask = DIRECTORY_MASK if stat.S_ISDIR(os.fstat(fd).st_mode) else FILE_MASK
        try:
            syscalls.fanotify_mark(self._fd, FAN_MARK_REMOVE, mask, syscalls.AT_FDCWD, b"/proc/self/fd/%d" % fd)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
        with self._lock:
            self._marked.discard(handle)

    def report_lost(self) -> None:
        """Changes may have been made while nothing watched (a server that took over from another
        marks the directories afresh): the thread delivers one overflow, as if events had been lost."""
        self._lost.set()
        try:
            os.write(self._wake_w, b"l")
        except BlockingIOError:
            pass  # the pipe is full: the thread wakes anyway

    @property
    def marks(self) -> int:
        with self._lock:
            return len(self._marked)

    def stop(self) -> None:
        """Stop the thread and close the group; every mark goes with it. Idempotent."""
        self._stopping.set()
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass
        if self._thread is threading.current_thread():
            self._closes_itself = True  # called from on_changes: the thread closes the group as it ends
            return
        if self._thread is not None:
            self._thread.join()
        self._close_fds()

    def __enter__(self) -> SourceWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        buf = bytearray(_BUFFER_SIZE)
        while not self._stopping.is_set():
            if any(fd == self._wake_r for fd, _ in poller.poll()):
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 64)
            changes: list[Change] = []
            if self._lost.is_set():
                self._lost.clear()
                changes.append(OVERFLOW)
            while not self._stopping.is_set():
                try:
                    n = os.readv(self._fd, [buf])
                except BlockingIOError:
                    break
                changes += parse_events(memoryview(buf)[:n], self.ignore_pid)
            if changes and not self._stopping.is_set():
                self._deliver(changes)
            if self.coalesce:
                self._stopping.wait(self.coalesce)
        if self._closes_itself:
            self._close_fds()

    def _deliver(self, changes: list[Change]) -> None:
        self.counts["events"] += len(changes)
        self.counts["batches"] += 1
        self.counts["overflows"] += sum(1 for c in changes if c.events & Event.OVERFLOW)
        try:
            self.on_changes(changes)
        except Exception:
            self.counts["callback_errors"] += 1
            log.exception("source watcher callback failed; watching goes on")

    def _close_fds(self) -> None:
        for name in ("_fd", "_wake_r", "_wake_w"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def _open_source(source: str) -> int:
    try:
        fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise WatcherUnavailable(f"cannot open the source {source}: {e.strerror}") from None
    magic = syscalls.fs_magic(fd)
    why = None
    if magic in _REMOTE:
        why = f"the source is on {_REMOTE[magic]}, a network filesystem: changes made on other hosts are never reported"
    elif magic == _FUSE_MAGIC:
        why = "the source is on a FUSE filesystem: changes its server makes are never reported to this host"
    else:
        try:
            syscalls.name_to_handle(fd)
        except OSError as e:
            why = f"the source's filesystem gives no file handles to name changed files by ({e.strerror})"
    if why:
        os.close(fd)
        raise WatcherUnavailable(why)
    return fd


def _open_group() -> int:
    flags = FAN_CLOEXEC | FAN_NONBLOCK | REPORT_FLAGS
    event_flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        # With CAP_SYS_ADMIN no per-user bound on marks; without it, the bound of the sysctl.
        return syscalls.fanotify_init(flags | FAN_UNLIMITED_MARKS, event_flags)
    except OSError as e:
        if e.errno != errno.EPERM:
            raise WatcherUnavailable(_init_error(e)) from None
    try:
        return syscalls.fanotify_init(flags, event_flags)
    except OSError as e:
        raise WatcherUnavailable(_init_error(e)) from None


_INIT_ERRORS = {
    errno.ENOSYS: "this kernel has no fanotify",
    errno.EINVAL: "this kernel's fanotify cannot report file handles of changed entries (needs Linux 5.17)",
    errno.EMFILE: "too many fanotify groups for this user (fs.fanotify.max_user_groups)",
    errno.EPERM: "fanotify is not permitted to this process",
}
_MARK_ERRORS = {
    errno.ENODEV: "the source's filesystem has no filesystem id, so fanotify cannot name its files",
    errno.EOPNOTSUPP: "the source's filesystem cannot report changes with file handles",
    errno.EXDEV: "the source is on a subvolume whose filesystem id differs from its filesystem's",
    errno.EACCES: "no permission to watch the source (fanotify needs read permission on it)",
    errno.EPERM: "no permission to watch the source (fanotify needs read permission on it)",
}


def _init_error(e: OSError) -> str:
    return _INIT_ERRORS.get(e.errno or 0, f"fanotify_init failed: {e.strerror}")


def _mark_error(e: OSError) -> str:
    return _MARK_ERRORS.get(e.errno or 0, f"fanotify_mark on the source failed: {e.strerror}")
