"""A mirror that enforces an operator's rules (``fusepass.policy``) and keeps an audit log.

Rules hold for every way the mount reaches a file. Every node id the kernel can use came from
an entry this mirror returned (lookup, a READDIRPLUS listing, a creation, a link), so each one
gets the mask of rules that covered the path it was reached by, kept until the kernel forgets
it. An open is decided by that mask together with the rules of the file's current path in the
source (when the kernel can tell it: a file reopened from its handle may have lost its name),
so a file moved behind the mount's back stays covered. Through the mount a file cannot change
the rules that cover it: a rename or hard link between places covered by different rules is
refused with EXDEV (``mv`` then copies, and the copy is checked like any other access), as is
renaming a directory when a rule anchored at the root covers part of what is beneath it.

Hidden names look missing (ENOENT) and cannot be created (EACCES); lookups of hidden names are
not counted or logged. Denials are counted by rule and logged when there is an audit log.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from .audit import AuditLog, errno_name
from .mirror import Mirror
from .ops import ROOT_ID, AttrLike, Changes, ConnectionInfo, Context, DirListing, Entry, Opened
from .policy import READ, WRITE, Policy, Rule

log = logging.getLogger("fusepass.policy")

T = TypeVar("T")
ACROSS_RULES = "rename or link across rules -> EXDEV"
_RENAME_EXCHANGE = 2
_UNKNOWN = "path unknown under rules -> EACCES"


def open_access(flags: int) -> int:
    """READ and/or WRITE, as an open with ``flags`` asks."""
    mode = flags & os.O_ACCMODE
    access = WRITE if mode != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT) else 0
    return access | (READ if mode != os.O_WRONLY else 0)


class PolicyMirror(Mirror):
    """Mirror ``source`` under ``policy``, logging to ``audit`` if given (Mirror's keywords too)."""

    def __init__(self, source: str, policy: Policy, audit: AuditLog | None = None, **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        self.policy = policy
        self.audit = audit
        self._tags: dict[int, int] = {ROOT_ID: policy.mask("")}
        self._tag_lock = threading.Lock()
        self.denials: Counter[str] = Counter()
        # Whether an operation needs paths: for anchored rules, or to log them.
        self._paths = policy.needs_paths or audit is not None

    # --- paths and masks --------------------------------------------------------------------

    def relative_path(self, ino: int) -> str | None:
        """``ino``'s path relative to the source root ("" for the root), or None if it cannot be told
        (a file reopened from its handle after the kernel dropped its name, or one unlinked)."""
        path = self.source_path(ino)
        root = self.source
        if not path.startswith(root):
            root = self.source_path(ROOT_ID)  # the source directory was moved: paths start there now
        if path == root:
            return ""
        if path.startswith(root.rstrip("/") + "/") and not path.endswith(" (deleted)"):
            return path[len(root.rstrip("/")) + 1:]
        return None

    def _child(self, parent: int, name: bytes, parent_path: str | None = None,
               want_path: bool = True) -> tuple[str | None, int]:
        """The path and mask of ``name`` in directory ``parent``."""
        text = os.fsdecode(name)
        with self._tag_lock:
            inherited = self._tags.get(parent, 0)
        if not (want_path and self._paths or self.policy.needs_paths):
            return None, inherited | self.policy.name_mask(text)
        base = self.relative_path(parent) if parent_path is None else parent_path
        if base is None:
            return None, inherited | self.policy.name_mask(text)
        path = f"{base}/{text}" if base else text
        return path, inherited | self.policy.mask(path)

    def _node(self, ino: int) -> tuple[str | None, int]:
        """The path and mask of node ``ino``: the rules it was reached by and those of its path now."""
        if not self.policy:  # an audit log alone
            return self.relative_path(ino), 0
        with self._tag_lock:
            mask = self._tags.get(ino)
        path = self.relative_path(ino) if self._paths or mask is None else None
        if path is not None:
            mask = (mask or 0) | self.policy.mask(path)
        if mask is None:
            # Never returned in an entry, and with no path to judge it by: refuse rather than guess.
            log.warning("node %d: no rules known and no path; refused", ino)
            self._count(_UNKNOWN)
            raise OSError(errno.EACCES, "path unknown under rules")
        return path, mask

    def _tagged(self, entry: Entry, mask: int) -> Entry:
        if not self.policy:
            return entry
        with self._tag_lock:
            self._tags[entry.nodeid] = self._tags.get(entry.nodeid, 0) | mask
        return entry

    # --- refusing and logging ------------------------------------------------------------

    def _count(self, reason: str) -> None:
        with self._tag_lock:
            self.denials[reason] += 1

    def _refuse(self, ctx: Context, op: str, err: int, reason: str, path: str | None, flags: int = 0,
                to: str | None = None) -> OSError:
        self._count(reason)
        if self.audit is not None:
            self.audit.record(ctx.uid, ctx.gid, ctx.pid, op, path, flags, errno_name(err), to, reason)
        return OSError(err, os.strerror(err))

    def _enforce(self, ctx: Context, op: str, mask: int, access: int, path: str | None, flags: int = 0,
                 to: str | None = None, hidden_errno: int = errno.ENOENT) -> None:
        """Raise if a rule in ``mask`` hides the file or refuses this caller ``access``."""
        if not mask:
            return
        rule: Rule | None = self.policy.hidden_by(mask)
        err = hidden_errno
        if rule is None:
            rule = self.policy.denial(mask, ctx.uid, ctx.gid, access)
            if rule is None:
                return
            err = rule.errno
        raise self._refuse(ctx, op, err, rule.describe(), path, flags, to)

    def _audited(self, ctx: Context, op: str, path: str | None, flags: int, call: Callable[[], T],
                 to: str | None = None) -> T:
        """Run ``call``; log one record with its outcome."""
        if self.audit is None:
            return call()
        try:
            result = call()
        except OSError as e:
            self.audit.record(ctx.uid, ctx.gid, ctx.pid, op, path, flags, errno_name(e.errno or errno.EIO), to)
            raise
        except BaseException:
            self.audit.record(ctx.uid, ctx.gid, ctx.pid, op, path, flags, "EIO", to)
            raise
        self.audit.record(ctx.uid, ctx.gid, ctx.pid, op, path, flags, "ok", to)
        return result

    # --- names ----------------------------------------------------------------------------------

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        if not self.policy:
            return super().lookup(ctx, parent, name)
        _, mask = self._child(parent, name, want_path=False)
        if mask & self.policy.hide_mask:
            raise OSError(errno.ENOENT, "no such file")
        return self._tagged(super().lookup(ctx, parent, name), mask)

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        super().forget(items)
        if not self.policy:
            return
        with self._tag_lock:
            for nodeid, _ in items:
                if nodeid != ROOT_ID and nodeid not in self._inodes:
                    self._tags.pop(nodeid, None)

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int, listing: DirListing) -> None:
        if self.policy:
            listing = cast(DirListing, _RuledListing(self, ino, listing))
        super().readdir(ctx, ino, fh, offset, listing)

    def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        path, mask = self._node(ino)
        self._enforce(ctx, "opendir", mask, READ, path, flags)
        return super().opendir(ctx, ino, flags)

    def _creating(self, ctx: Context, op: str, parent: int, name: bytes, flags: int = 0) -> tuple[str | None, int]:
        path, mask = self._child(parent, name)
        self._enforce(ctx, op, mask, WRITE, path, flags, hidden_errno=errno.EACCES)
        return path, mask

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int) -> Entry:
        path, mask = self._creating(ctx, "mknod", parent, name)
        return self._tagged(self._audited(ctx, "mknod", path, 0,
                                          lambda: Mirror.mknod(self, ctx, parent, name, mode, rdev, umask)), mask)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        path, mask = self._creating(ctx, "mkdir", parent, name)
        return self._tagged(self._audited(ctx, "mkdir", path, 0,
                                          lambda: Mirror.mkdir(self, ctx, parent, name, mode, umask)), mask)

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        path, mask = self._creating(ctx, "symlink", parent, name)
        return self._tagged(self._audited(ctx, "symlink", path, 0,
                                          lambda: Mirror.symlink(self, ctx, parent, name, target)), mask)

    def link(self, ctx: Context, ino: int, newparent: int, newname: bytes) -> Entry:
        old_path, old_mask = self._node(ino)
        path, mask = self._child(newparent, newname)
        self._enforce(ctx, "link", old_mask, WRITE, old_path, to=path)
        self._enforce(ctx, "link", mask, WRITE, old_path, to=path, hidden_errno=errno.EACCES)
        if mask != old_mask:
            raise self._refuse(ctx, "link", errno.EXDEV, ACROSS_RULES, old_path, to=path)
        return self._tagged(self._audited(ctx, "link", old_path, 0,
                                          lambda: Mirror.link(self, ctx, ino, newparent, newname), path), mask)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        path, mask = self._child(parent, name)
        self._enforce(ctx, "unlink", mask, WRITE, path)
        self._audited(ctx, "unlink", path, 0, lambda: Mirror.unlink(self, ctx, parent, name))

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        path, mask = self._child(parent, name)
        self._enforce(ctx, "rmdir", mask, WRITE, path)
        self._audited(ctx, "rmdir", path, 0, lambda: Mirror.rmdir(self, ctx, parent, name))

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        path, mask = self._child(parent, name)
        to, to_mask = self._child(newparent, newname)
        self._enforce(ctx, "rename", mask, WRITE, path, flags, to)
        self._enforce(ctx, "rename", to_mask, WRITE, path, flags, to, hidden_errno=errno.EACCES)
        if mask != to_mask or self.policy.needs_paths and self._moves_covered_tree(
                parent, name, path, newparent, newname, to, flags):
            raise self._refuse(ctx, "rename", errno.EXDEV, ACROSS_RULES, path, flags, to)
        self._audited(ctx, "rename", path, flags,
                      lambda: Mirror.rename(self, ctx, parent, name, newparent, newname, flags), to)

    def _moves_covered_tree(self, parent: int, name: bytes, path: str | None, newparent: int, newname: bytes,
                            to: str | None, flags: int) -> bool:
        """Whether the rename moves a directory beneath which anchored rules cover only part."""
        if path is None or to is None:
            return True  # cannot tell: refuse
        moved = [(parent, name)] + ([(newparent, newname)] if flags & _RENAME_EXCHANGE else [])
        if not any(self._is_dir(p, n) for p, n in moved):
            return False
        return self.policy.reaches_below(path) or self.policy.reaches_below(to)

    def _is_dir(self, parent: int, name: bytes) -> bool:
        with self._pinned(parent) as pfd:
            try:
                return stat.S_ISDIR(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode)
            except FileNotFoundError:
                return False

    # --- attributes ---------------------------------------------------------------------------

    def setattr(self, ctx: Context, ino: int, changes: Changes, fh: int | None) -> os.stat_result:
        path, mask = self._node(ino)
        self._enforce(ctx, "setattr", mask, WRITE, path)
        return super().setattr(ctx, ino, changes, fh)

    def setxattr(self, ctx: Context, ino: int, name: bytes, value: bytes, flags: int) -> None:
        path, mask = self._node(ino)
        self._enforce(ctx, "setxattr", mask, WRITE, path)
        super().setxattr(ctx, ino, name, value, flags)

    def removexattr(self, ctx: Context, ino: int, name: bytes) -> None:
        path, mask = self._node(ino)
        self._enforce(ctx, "removexattr", mask, WRITE, path)
        super().removexattr(ctx, ino, name)

    # --- files ----------------------------------------------------------------------------------

    def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        path, mask = self._node(ino)
        self._enforce(ctx, "open", mask, open_access(flags), path, flags)
        return self._audited(ctx, "open", path, flags, lambda: Mirror.open(self, ctx, ino, flags))

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int, flags: int) -> tuple[Entry, Opened]:
        path, mask = self._creating(ctx, "create", parent, name, flags)
        entry, opened = self._audited(ctx, "create", path, flags,
                                      lambda: Mirror.create(self, ctx, parent, name, mode, umask, flags))
        return self._tagged(entry, mask), opened

    def tmpfile(self, ctx: Context, parent: int, mode: int, umask: int, flags: int) -> tuple[Entry, Opened]:
        path, mask = self._node(parent)
        self._enforce(ctx, "tmpfile", mask, WRITE, path, flags, hidden_errno=errno.EACCES)
        entry, opened = self._audited(ctx, "tmpfile", path, flags,
                                      lambda: Mirror.tmpfile(self, ctx, parent, mode, umask, flags))
        return self._tagged(entry, mask), opened

    # --- lifecycle ----------------------------------------------------------------------------

    def init(self, conn: ConnectionInfo) -> None:
        super().init(conn)
        if self.audit is not None:
            self.audit.start()

    def destroy(self) -> None:
        super().destroy()
        if self.audit is not None:
            self.audit.close()

    def status(self) -> dict[str, object]:
        out = super().status()
        with self._tag_lock:
            denials = dict(self.denials)
        out["policy"] = {
            "rules": [r.describe() for r in self.policy.rules],
            "denials": sum(denials.values()),
            "denials_by_rule": denials,
            "audit": self.audit.status() if self.audit is not None else None,
        }
        return out


class _RuledListing:
    """A directory listing that leaves out hidden names and tags the entries it hands out."""

    __slots__ = ("plus", "_mirror", "_parent", "_listing", "_base")

    def __init__(self, mirror: PolicyMirror, parent: int, listing: DirListing) -> None:
        self.plus = listing.plus
        self._mirror = mirror
        self._parent = parent
        self._listing = listing
        self._base: str | None = None

    def add(self, name: bytes, next_offset: int, attr: AttrLike, lookup: Callable[[], Entry] | None = None) -> bool:
        if name in (b".", b".."):
            return self._listing.add(name, next_offset, attr, lookup)
        mirror = self._mirror
        if mirror.policy.needs_paths and self._base is None:
            self._base = mirror.relative_path(self._parent)
        _, mask = mirror._child(self._parent, name, self._base, want_path=False)
        if mask & mirror.policy.hide_mask:
            return True  # left out; the listing goes on
        if lookup is not None:
            found = lookup
            lookup = lambda: mirror._tagged(found(), mask)  # noqa: E731
        return self._listing.add(name, next_offset, attr, lookup)
