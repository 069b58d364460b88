"""Per-opcode request counters and latency histograms, kept per worker so recording takes no lock.

Errors are split in two: answers the kernel expects as part of normal work (ENOENT to a
LOOKUP, ENODATA to a GETXATTR, ENOSYS that switches an operation off, ...) and real
failures. Latencies go into buckets an eighth of an octave wide, so a percentile is
reported as the upper edge of its bucket: at most 12.5% above the exact value.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from . import abi

_OPS = 64  # opcodes fit below this; others are counted in slot 0
_SUB = 8  # buckets per octave
_OCTAVES = 40  # up to 2**40 ns (18 minutes)
_BUCKETS = _OCTAVES * _SUB

O = abi.Opcode
#: Errors that are an ordinary answer to the kernel for that opcode, not a failure.
EXPECTED_ERRORS: dict[int, frozenset[int]] = {
    O.LOOKUP: frozenset({errno.ENOENT}),
    O.GETXATTR: frozenset({errno.ENODATA, errno.EOPNOTSUPP, errno.ERANGE}),
    O.LISTXATTR: frozenset({errno.ERANGE, errno.EOPNOTSUPP}),
    O.SETXATTR: frozenset({errno.EOPNOTSUPP}),
    O.REMOVEXATTR: frozenset({errno.ENODATA, errno.EOPNOTSUPP}),
    O.IOCTL: frozenset({errno.ENOTTY}),
    O.SETLK: frozenset({errno.EAGAIN}),
    O.SETLKW: frozenset({errno.EINTR}),
}
_ALWAYS_EXPECTED = frozenset({errno.ENOSYS, errno.EINTR})  # not implemented; the caller gave up
del O


def bucket(elapsed_ns: int) -> int:
    """The histogram slot of a latency: the top four bits of the value pick it."""
    b = elapsed_ns.bit_length()
    if b <= 4:
        return elapsed_ns
    return min((b - 3) * _SUB + ((elapsed_ns >> (b - 4)) & (_SUB - 1)), _BUCKETS - 1)


def bucket_upper_edge(slot: int) -> int:
    """The largest latency (ns) that falls in ``slot``."""
    if slot < 2 * _SUB:
        return slot
    octave, sub = divmod(slot, _SUB)
    return ((_SUB + sub + 1) << (octave - 1)) - 1


class WorkerStats:
    """One worker's counters. Only its own thread writes them; readers sum snapshots."""

    __slots__ = ("count", "errors", "expected", "time_ns", "hist", "malformed")

    def __init__(self) -> None:
        self.count = [0] * _OPS
        self.errors = [0] * _OPS
        self.expected = [0] * _OPS
        self.time_ns = [0] * _OPS
        self.hist = [[0] * _BUCKETS for _ in range(_OPS)]
        self.malformed = 0

    def record(self, opcode: int, err: int, elapsed_ns: int) -> None:
        """Count one request: ``err`` is the errno it was answered with (0: success)."""
        if opcode >= _OPS:
            opcode = 0
        self.count[opcode] += 1
        if err:
            if err in _ALWAYS_EXPECTED or err in EXPECTED_ERRORS.get(opcode, ()):
                self.expected[opcode] += 1
            else:
                self.errors[opcode] += 1
        self.time_ns[opcode] += elapsed_ns
        b = elapsed_ns.bit_length()  # bucket(), inlined: this runs for every request
        slot = elapsed_ns if b <= 4 else min((b - 3) * _SUB + ((elapsed_ns >> (b - 4)) & (_SUB - 1)), _BUCKETS - 1)
        self.hist[opcode][slot] += 1


@dataclass(slots=True, frozen=True)
class OpSummary:
    name: str
    requests: int
    errors: int  # real failures
    expected: int  # errors that are ordinary answers (see EXPECTED_ERRORS)
    total_ns: int
    p50_ns: int  # upper edges of the buckets holding the percentiles
    p99_ns: int


def _percentile(hist: list[int], total: int, q: float) -> int:
    if total == 0:
        return 0
    rank = q * total
    seen = 0
    for slot, n in enumerate(hist):
        seen += n
        if seen >= rank:
            return bucket_upper_edge(slot)
    return bucket_upper_edge(len(hist) - 1)


def summarize(workers: list[WorkerStats]) -> dict[str, OpSummary]:
    """Sum the workers' counters into one summary per opcode that saw requests."""
    out: dict[str, OpSummary] = {}
    for op in range(_OPS):
        count = sum(w.count[op] for w in workers)
        if not count:
            continue
        hist = [sum(col) for col in zip(*(w.hist[op] for w in workers), strict=True)]
        name = "OTHER" if op == 0 else abi.opname(op).replace("opcode ", "OP")
        out[name] = OpSummary(
            name, count, sum(w.errors[op] for w in workers), sum(w.expected[op] for w in workers),
            sum(w.time_ns[op] for w in workers), _percentile(hist, count, 0.5), _percentile(hist, count, 0.99),
        )
    return out
