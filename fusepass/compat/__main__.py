"""The launcher: run a fusepy or mfusepy program, unchanged, on fusepass.

    python -m fusepass.compat [--ready-fd N] PROGRAM [ARGS...]
    python -m fusepass.compat [--ready-fd N] -m MODULE [ARGS...]

``import fuse`` and ``import fusepy`` then give ``fusepass.compat.fusepy``, ``import mfusepy``
gives ``fusepass.compat.mfusepy``; the program runs as ``__main__`` with ``sys.argv`` as it
would have. ``--ready-fd N`` (for supervisors and tests) writes "ready\\n" to descriptor N once
the program's first mount answers, or the reason it failed.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence

from . import bridge, fusepy, mfusepy

USAGE = "usage: python -m fusepass.compat [--ready-fd N] (PROGRAM | -m MODULE) [ARGS...]"


def install() -> None:
    """Make the fusepy and mfusepy module names resolve to fusepass's compatibility modules."""
    sys.modules["fuse"] = sys.modules["fusepy"] = fusepy
    sys.modules["mfusepy"] = mfusepy


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--ready-fd"] and len(args) > 1 and args[1].isdigit():
        bridge.ready_fd = int(args[1])
        del args[:2]
    if not args or args[0] in ("-h", "--help") or (args[0] == "-m" and len(args) < 2):
        print(USAGE, file=sys.stderr if not args else sys.stdout)
        return 2 if not args else 0
    install()
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            program = args[0]
            if not os.path.isfile(program):
                print(f"fusepass.compat: no such program: {program}", file=sys.stderr)
                return 2
            sys.argv = list(args)
            sys.path.insert(0, os.path.dirname(os.path.abspath(program)))
            runpy.run_path(program, run_name="__main__")
    except bridge.Unsupported as e:
        print(f"fusepass.compat: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
