"""Coverage-guided fuzzing (atheris) of the control socket's request handling.

Run:     python fuzz/fuzz_control.py -max_total_time=3600 -rss_limit_mb=200
Replay:  python fuzz/fuzz_control.py crash-<hash>

Each input is one request line as a client could send it (what ``fusepass status`` sends is
``{"command": "status"}``); the answer must be one JSON object, whatever the bytes, and a
command's own failure must come back as an error in words.
"""

from __future__ import annotations

import json
import logging
import sys

import atheris

from fusepass import control

COMMANDS: control.Commands = {
    "status": lambda: {"pid": 1, "requests": {}},
    "failing": lambda: {"never": [][0]},
}


def one_input(data: bytes) -> None:
    reply = control.answer(data[: control.MAX_REQUEST], COMMANDS)
    assert isinstance(reply, dict), reply
    json.dumps(reply)
    if "error" in reply:
        assert isinstance(reply["error"], str) and reply["error"]


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)
    atheris.instrument_all()  # every module loaded (an editable install bypasses the import hook)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
