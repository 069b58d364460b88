"""memfs whose names and data the test changes behind the kernel's back, then tells the kernel.

Entries and attributes are cached for an hour, so without a notification the kernel keeps
showing the old state. Control commands (see _control.py), all on names in the root directory;
they run on the control thread, never inside a request handler:

* ``replace NAME DATA``: point NAME at a new file holding DATA (no notification); answers its ino.
* ``set NAME DATA``: replace the data of NAME's file in place, times untouched (no notification);
  answers its ino.
* ``detach NAME``: remove NAME (no notification); answers the ino it named.
* ``inval_entry NAME``: notifier.invalidate_entry(root, NAME).
* ``inval_inode INO``: notifier.invalidate_inode(INO) (attributes and all cached data).
* ``notify_delete INO NAME``: notifier.notify_delete(root, INO, NAME).

The notifier is the one INIT hands the filesystem (``conn.notifier`` in ``init``).
* ``stats PATH``: Session.op_stats() as JSON.
"""

from __future__ import annotations

import stat
import time

from _control import Control, run_with_control

from fusepass.examples.memfs import MemFS, Node
from fusepass.notify import Notifier
from fusepass.ops import ROOT_ID, ConnectionInfo


class NotifyingFS(MemFS):
    entry_timeout = 3600.0
    attr_timeout = 3600.0

    def __init__(self, control: Control) -> None:
        super().__init__()
        self.control = control
        self.notifier: Notifier | None = None
        control.commands.update(
            replace=self.replace, set=self.set_data, detach=self.detach, inval_entry=self.inval_entry,
            inval_inode=self.inval_inode, notify_delete=self.notify_delete,
        )

    def replace(self, name: str, data: str) -> int:
        with self.lock:
            root = self.nodes[ROOT_ID]
            old = self._child(ROOT_ID, name.encode())
            now = time.time_ns()
            node = Node(self.next_ino, stat.S_IFREG | 0o644, old.uid, old.gid, data=bytearray(data.encode()),
                        atime_ns=now, mtime_ns=now, ctime_ns=now)
            self.next_ino += 1
            self.nodes[node.ino] = node
            root.children[name.encode()] = node.ino
            old.nlink -= 1
            self._maybe_free(old)
            return node.ino

    def set_data(self, name: str, data: str) -> int:
        with self.lock:
            node = self._child(ROOT_ID, name.encode())
            node.data[:] = data.encode()  # times left alone: nothing tells the kernel
            return node.ino

    def detach(self, name: str) -> int:
        with self.lock:
            node = self._child(ROOT_ID, name.encode())
            self._unlink_node(self.nodes[ROOT_ID], name.encode(), node, time.time_ns())
            return node.ino

    def init(self, conn: ConnectionInfo) -> None:
        super().init(conn)
        self.notifier = conn.notifier

    def inval_entry(self, name: str) -> str:
        self._notifier().invalidate_entry(ROOT_ID, name.encode())
        return "sent"

    def inval_inode(self, ino: str) -> str:
        self._notifier().invalidate_inode(int(ino))
        return "sent"

    def notify_delete(self, ino: str, name: str) -> str:
        self._notifier().notify_delete(ROOT_ID, int(ino), name.encode())
        return "sent"

    def _notifier(self) -> Notifier:
        assert self.notifier is not None, "INIT has not been answered"
        return self.notifier


def main() -> int:
    return run_with_control(NotifyingFS, "notifying", required=True)


if __name__ == "__main__":
    raise SystemExit(main())
