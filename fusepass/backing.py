"""Kernel passthrough: the per-inode registry of backing ids, which keeps the kernel's rules.

The kernel's rules: an inode open in passthrough has exactly one backing object, so every
concurrent open of it must name the same backing id; an id closed while its file is open
locks the inode until every fd is closed; closing right after the OPEN reply races the
opener. ``BackingRegistry`` therefore keeps one id per inode, counts the opens using it,
and closes it at the last RELEASE. An inode that cannot be passed through is served for
all its opens, with the reason recorded.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .device import BackingDevice, BackingError, BackingId

if TYPE_CHECKING:
    from .journal import Journal

log = logging.getLogger("fusepass")


@dataclass(slots=True)
class _InodeState:
    opens: int = 0
    backing: BackingId | None = None  # None while the inode is served
    served_because: str | None = None  # sticky: this inode is never passed through


class BackingRegistry:
    """One backing id per inode, shared by its concurrent opens and closed at the last release.

    ``acquire`` is called for every open of a file and returns the id to put in the reply,
    or 0 (serve it) and why; ``release`` is called for every RELEASE. Thread-safe. It starts
    unavailable; ``enable`` (after INIT) says whether passthrough was negotiated.
    """

    def __init__(self, device: BackingDevice | None, why_not: str | None = "not negotiated yet") -> None:
        self.device = device
        self.why_not = why_not
        self._lock = threading.Lock()
        self._inodes: dict[int, _InodeState] = {}
        self.passthrough_opens = 0
        self.served_opens: Counter[str] = Counter()
        #: Under a supervisor: where registrations are recorded for a successor.
        self.journal: Journal | None = None

    @property
    def available(self) -> bool:
        return self.why_not is None

    def enable(self, why_not: str | None) -> None:
        """Set what INIT decided: passthrough available (None) or the reason it is not."""
        if why_not is None and self.device is None:
            why_not = "no /dev/fuse device to register backing files on"
        self.why_not = why_not

    def acquire(self, ino: int, fd: int | None, why_no_fd: str | None = None) -> tuple[int, str | None]:
        """Account one open of ``ino`` (``why_no_fd``: the filesystem's reason for offering no
        descriptor); return (backing id or 0, reason it is served)."""
        with self._lock:
            st = self._inodes.get(ino)
            if st is None:
                st = self._inodes[ino] = _InodeState()
            if st.opens and st.backing is not None:
                reason = None  # join the inode's passthrough mode, whatever the filesystem offered
            elif self.why_not is not None or self.device is None:
                reason = self.why_not or "passthrough unavailable"
            elif st.opens:
                reason = st.served_because or "inode already open in served mode"
            elif st.served_because:
                reason = st.served_because
            elif fd is None:
                reason = why_no_fd or "the filesystem gave no backing file"
            else:
                try:
                    st.backing = self.device.backing_open(fd)
                    reason = None
                    if self.journal is not None:
                        self.journal.backing(ino, st.backing.id)
                except BackingError as e:
                    reason = st.served_because = f"{errno.errorcode.get(e.errno or 0, e.errno)}: {e.strerror}"
            st.opens += 1
            if reason is None:
                self.passthrough_opens += 1
            else:
                self.served_opens[reason] += 1
            return (st.backing.id if st.backing is not None else 0), reason

    def release(self, ino: int) -> None:
        """Account the end of one open of ``ino``; close its id at the last one."""
        with self._lock:
            st = self._inodes.get(ino)
            if st is None or st.opens == 0:
                return
            st.opens -= 1
            if st.opens:
                return
            backing, st.backing = st.backing, None
            if not st.served_because:
                del self._inodes[ino]
            if backing is not None:
                if self.journal is not None:
                    self.journal.unbacked(ino)
                _close(backing)

    def restore(self, backing: Mapping[int, int], opens: Mapping[int, int], highest: int = 0) -> None:
        """Take over a predecessor's registrations (``backing``: inode -> backing id) and how many
        opens of each inode the kernel holds. An inode open without an id stays served.

        ``highest``: the highest id the predecessor recorded. It may have been killed between
        registering a file and recording its id; the kernel hands ids out in turn (the next free
        one after the last, ``idr_alloc_cyclic``) and registrations are made one at a time, so such
        an id can only be the one after ``highest``: closed here (if it was never registered,
        the kernel says ENOENT and nothing happens), or it would stay registered until unmount."""
        if self.device is None:
            return
        if highest and highest + 1 not in backing.values():
            try:
                self.device.backing_close(highest + 1)
                log.warning("closed backing id %d, registered by the previous server just before it died",
                            highest + 1)
            except BackingError:
                pass
        with self._lock:
            for ino, count in opens.items():
                backing_id = backing.get(ino)
                self._inodes[ino] = _InodeState(
                    opens=count, backing=BackingId(self.device, backing_id) if backing_id else None)
            for ino, backing_id in list(backing.items()):
                if ino not in opens:  # registered, but the open that did it never reached the kernel
                    _close(BackingId(self.device, backing_id))
                    if self.journal is not None:
                        self.journal.unbacked(ino)

    def forget(self, ino: int) -> None:
        """Drop what is remembered about ``ino`` (a sticky served reason) once nothing has it open."""
        with self._lock:
            st = self._inodes.get(ino)
            if st is not None and st.opens == 0:
                del self._inodes[ino]

    def served_reason(self, ino: int) -> str | None:
        with self._lock:
            st = self._inodes.get(ino)
            return st.served_because if st else None

    @property
    def registered(self) -> int:
        """Backing ids registered now."""
        with self._lock:
            return sum(1 for st in self._inodes.values() if st.backing is not None)

    def close_all(self) -> None:
        """Release every id (at session end)."""
        with self._lock:
            for st in self._inodes.values():
                if st.backing is not None:
                    _close(st.backing)
                st.backing = None
                st.opens = 0
            self._inodes.clear()


def _close(backing: BackingId) -> None:
    try:
        backing.close()
    except BackingError:
        pass  # the connection is gone; its ids went with it
