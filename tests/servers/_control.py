"""The control channel shared by the test servers: two FIFOs in a directory the test made.

``DIR/cmd`` carries commands from the test, one per line: ``ID WORD ARGS...``. A thread in
the server runs them and answers on ``DIR/events`` with ``ID ok RESULT`` or ``ID error TEXT``.
Handlers also write ``event ...`` lines there, e.g. when a blocking handler has started, so
the test learns of it without sleeping. The server opens both FIFOs read-write, so neither
open blocks and nothing written is lost before the test opens its end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import threading
import traceback
from collections.abc import Callable

from fusepass import MountOptions, Operations, Session
from fusepass.serve import run_foreground

Command = Callable[..., object]


class Control:
    def __init__(self, directory: str | None) -> None:
        self.session: Session | None = None
        self.commands: dict[str, Command] = {"stats": self.dump_stats}
        self._lock = threading.Lock()
        if directory is None:
            self._cmd = self._events = -1
            return
        self._cmd = os.open(os.path.join(directory, "cmd"), os.O_RDWR)
        self._events = os.open(os.path.join(directory, "events"), os.O_RDWR)

    def attach(self, session: Session) -> None:
        """``on_ready`` of run_foreground: from now on commands may use the session."""
        self.session = session
        if self._cmd >= 0:
            threading.Thread(target=self._loop, name="test-control", daemon=True).start()

    def event(self, text: str) -> None:
        if self._events >= 0:
            with self._lock:
                os.write(self._events, f"event {text}\n".encode())

    def dump_stats(self, path: str) -> str:
        """Write Session.op_stats() as JSON: {"LOOKUP": {"requests": n, "errors": n, ...}, ...}."""
        assert self.session is not None
        stats = {name: dataclasses.asdict(s) for name, s in self.session.op_stats().items()}
        with open(path + ".tmp", "w") as f:
            json.dump(stats, f)
        os.replace(path + ".tmp", path)
        return path

    def _loop(self) -> None:
        with os.fdopen(self._cmd, "r", buffering=1) as commands:
            for line in commands:
                ident, word, *args = line.split()
                try:
                    reply = f"{ident} ok {self.commands[word](*args)}"
                except Exception:
                    reply = f"{ident} error " + traceback.format_exc().replace("\n", " | ")
                with self._lock:
                    os.write(self._events, (reply + "\n").encode())


def run_with_control(make_fs: Callable[[Control], Operations], name: str, *, required: bool) -> int:
    """The main of a test server: ``--control DIR`` (required or not), the filesystem built
    around its Control, mounted in the foreground; commands run once the mount answers."""
    control: list[Control] = []

    def make(args: argparse.Namespace) -> Operations:
        control.append(Control(args.control))
        return make_fs(control[0])

    return run_foreground(
        make, configure=lambda p: p.add_argument("--control", required=required, default=None),
        defaults=MountOptions(fsname=name, subtype=name, default_permissions=True),
        on_ready=lambda session: control[0].attach(session),
    )
