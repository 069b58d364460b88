"""Coverage-guided fuzzing (atheris) of request parsing and dispatch, as bytes into the Dispatcher.

Run:     python fuzz/fuzz_dispatch.py -max_total_time=3600 -rss_limit_mb=200
Replay:  python fuzz/fuzz_dispatch.py crash-<hash>      (exact: see below)

Each input is a whole session of up to eight requests (opcode, node id, body) against a
fresh memfs that has just answered INIT, so a saved input replays with the state that led to
it. The harness fails on a reply that is malformed or larger than the kernel would accept,
a reply where none is due (or none where one is), or a dispatcher that stops answering.
"""

from __future__ import annotations

import logging
import os
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from fakekernel import MAX_REPLY, FakeKernel

from fusepass import abi
from fusepass.examples.memfs import MemFS

OPCODES = [int(op) for op in abi.Opcode] + [0, 7, 54, 4096]
NO_REPLY = {int(op) for op in abi.NO_REPLY_OPCODES}


class SmallMemFS(MemFS):
    """memfs keeps file data in memory: its files are kept small, so that what is measured is the
    server's own memory use, not data a fuzzed WRITE at a large offset asked memfs to keep."""

    max_file_size = 4 << 20


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kernel = FakeKernel(SmallMemFS())
    assert kernel.init().error == 0
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        opcode = fdp.PickValueInList(OPCODES)
        nodeid = fdp.ConsumeIntInRange(0, 8)
        body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1024))
        unique, msg = kernel.message(opcode, body, nodeid)
        replies = kernel.send(msg)
        if opcode in NO_REPLY:
            assert replies == [], f"reply to a {opcode} request, which takes none"
            continue
        assert len(replies) == 1, f"{len(replies)} replies to one request"
        reply = replies[0]
        assert reply.unique == unique
        assert reply.length == reply.received, "length field disagrees with the bytes written"
        assert reply.received <= MAX_REPLY, f"a reply of {reply.received} bytes, more than the kernel takes"
        assert -abi.MAX_ERRNO <= reply.error <= 0
        assert not (reply.error and reply.payload), "error reply with a payload"
    assert kernel.still_serving()


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)  # malformed input is logged (rate-limited); here it is only noise
    atheris.instrument_all()  # every module loaded (an editable install bypasses the import hook)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
