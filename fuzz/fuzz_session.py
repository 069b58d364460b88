"""Coverage-guided fuzzing (atheris) of request parsing and dispatch through the real worker loop.

Run:  python fuzz/fuzz_session.py -max_total_time=600      (or -runs=N; any libFuzzer flag)
Each input becomes one request (opcode, node id, body) sent through a socket standing in for
/dev/fuse to a worker serving memfs; the harness fails on a reply that is malformed, a reply
where none is due (or none where one is), or a worker that stops answering. A crash input is
saved by libFuzzer as crash-*; turn it into a case in tests/test_hostile_input.py.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

with atheris.instrument_imports(include=["fusepass"]):
    from fusepass import abi
    from fusepass.examples.memfs import MemFS

from fakekernel import FakeKernel  # noqa: E402

OPCODES = [int(op) for op in abi.Opcode] + [0, 7, 54, 4096]
NO_REPLY = {int(op) for op in abi.NO_REPLY_OPCODES}
KERNEL = FakeKernel(MemFS())
assert KERNEL.init().error == 0


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    opcode = fdp.PickValueInList(OPCODES)
    nodeid = fdp.ConsumeIntInRange(0, 6)
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    unique, msg = KERNEL.message(opcode, body, nodeid)
    KERNEL.send_raw(msg)
    replies = KERNEL.replies_until_sentinel()
    if opcode in NO_REPLY:
        assert replies == [], f"reply to a {opcode} request, which takes none"
        return
    assert len(replies) == 1, f"{len(replies)} replies to one request"
    reply = replies[0]
    assert reply.unique == unique
    assert reply.length == reply.received, "length field disagrees with the bytes written"
    assert -abi.MAX_ERRNO <= reply.error <= 0
    assert not (reply.error and reply.payload), "error reply with a payload"


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
