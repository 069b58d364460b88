"""The notifications that keep the kernel's caches of a mirror true when its source changes behind its back.

``Coherence.apply`` takes a batch of ``watcher.Change`` records and sends, at most once each per
batch: INVAL_ENTRY for every name that appeared, went or moved in a directory the kernel knows
(DELETE where the kernel holds the name's inode, so that a process inside a removed directory
sees it deleted, as on the source); INVAL_INODE for every known object whose attributes or data
changed, and for every directory whose listing changed (its cached listing and attributes go).
Changes the server made itself (everything done through the mount) never arrive: the watcher
drops them, and the kernel knows them already. Skipped here is the close of a file by a process
that opened it through the mount in passthrough: the caller closes its backing file itself, and a
close changes nothing the kernel caches. (That caller's writes are invalidated all the same, which
costs little: after a passthrough write the kernel asks for the attributes anyway.) A lost-events
overflow makes every cached name stale at once (FUSE_NOTIFY_INC_EPOCH) and invalidates every
known inode.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable

from .notify import Notifier
from .watcher import Change, Event

log = logging.getLogger("fusepass.coherence")

_ENTRY_EVENTS = Event.CREATE | Event.DELETE | Event.RENAME
_INODE_EVENTS = Event.MODIFY | Event.ATTRIB | Event.CLOSE_WRITE | Event.DELETE_SELF | Event.MOVE_SELF


class Coherence:
    """Turns source changes into notifications.

    ``resolve(handle)`` gives the node id the kernel knows a file handle by, or None; ``known()``
    every node id it knows (for an overflow); ``opened_by(node, pid)`` whether that process opened
    the node through the mount.
    """

    def __init__(self, notifier: Notifier, resolve: Callable[[bytes], int | None],
                 known: Callable[[], Iterable[int]], opened_by: Callable[[int, int], bool]) -> None:
        self.notifier = notifier
        self.resolve = resolve
        self.known = known
        self.opened_by = opened_by
        #: Counters for status and for tests that wait on an invalidation rather than sleep.
        self.counts = {"changes": 0, "closes": 0, "entries": 0, "inodes": 0, "deletes": 0, "overflows": 0,
                       "unknown": 0}

    def apply(self, changes: list[Change]) -> None:
        entries: dict[tuple[int, bytes], int | None] = {}  # (parent, name) -> the child, when known
        inodes: set[int] = set()
        counts = self.counts
        resolve = self.resolve
        for c in changes:
            if c.events & Event.OVERFLOW:
                self._everything()
                continue
            counts["changes"] += 1
            child = resolve(c.handle) if c.handle is not None else None
            if child is not None and c.events == Event.CLOSE_WRITE and self.opened_by(child, c.pid):
                counts["closes"] += 1  # a passthrough caller closing what it opened through the mount
                continue
            if child is not None and c.events & (_INODE_EVENTS | _ENTRY_EVENTS):
                inodes.add(child)  # its attributes (nlink, ctime, mode, size) or data changed
            if c.events & _ENTRY_EVENTS:
                for directory, name in ((c.dir, c.name), (c.new_dir, c.new_name)):
                    parent = resolve(directory) if directory is not None else None
                    if parent is None or name is None:
                        continue
                    entries[parent, name] = child if c.events & Event.DELETE else None
                    inodes.add(parent)  # its listing, mtime and link count changed
            elif child is None and c.dir is not None and resolve(c.dir) is None:
                counts["unknown"] += 1
        for (parent, name), gone in entries.items():
            self._entry(parent, name, gone)
        for ino in inodes:
            self._inode(ino)

    def _everything(self) -> None:
        log.warning("changes to the source may have gone unseen (the watcher lost events, or this server took "
                    "over from another): every cached name and attribute is dropped")
        try:
            self.notifier.increment_epoch()
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            log.warning("this kernel has no FUSE_NOTIFY_INC_EPOCH; names stay until their inodes are invalidated")
        for ino in list(self.known()):
            self._inode(ino)
        self.counts["overflows"] += 1  # counted once all is dropped: a test may wait on it
    def _entry(self, parent: int, name: bytes, gone: int | None) -> None:
        if gone is not None:
            try:
                self.notifier.notify_delete(parent, gone, name)
                self.counts["deletes"] += 1
                return
            except OSError as e:  # not held, held as another inode, or a directory still holding names
                if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ENOTEMPTY, errno.EBUSY):
                    raise
        try:
            self.notifier.invalidate_entry(parent, name)
        except OSError as e:
            if e.errno != errno.ENOENT:  # the kernel does not hold that name: nothing to drop
                raise
        self.counts["entries"] += 1

    def _inode(self, ino: int) -> None:
        try:
            self.notifier.invalidate_inode(ino, 0, 0)
        except OSError as e:
            if e.errno != errno.ENOENT:  # the kernel forgot it already
                raise
        self.counts["inodes"] += 1
