"""Per-opcode request counters and latency histograms, kept per worker so recording takes no lock."""

from __future__ import annotations

from dataclasses import dataclass

from . import abi

_OPS = 64  # opcodes fit below this; others are counted in slot 0
_BUCKETS = 40  # latency bucket b holds requests that took [2**(b-1), 2**b) ns


class WorkerStats:
    """One worker's counters. Only its own thread writes them; readers sum snapshots."""

    __slots__ = ("count", "errors", "time_ns", "hist")

    def __init__(self) -> None:
        self.count = [0] * _OPS
        self.errors = [0] * _OPS
        self.time_ns = [0] * _OPS
        self.hist = [[0] * _BUCKETS for _ in range(_OPS)]

    def record(self, opcode: int, failed: bool, elapsed_ns: int) -> None:
        if opcode >= _OPS:
            opcode = 0
        self.count[opcode] += 1
        if failed:
            self.errors[opcode] += 1
        self.time_ns[opcode] += elapsed_ns
        self.hist[opcode][min(elapsed_ns.bit_length(), _BUCKETS - 1)] += 1


@dataclass(slots=True, frozen=True)
class OpSummary:
    name: str
    requests: int
    errors: int
    total_ns: int
    p50_ns: int
    p99_ns: int


def _percentile(hist: list[int], total: int, q: float) -> int:
    """Upper edge of the bucket holding the q-th request (within a factor of two)."""
    if total == 0:
        return 0
    rank = q * total
    seen = 0
    for bucket, n in enumerate(hist):
        seen += n
        if seen >= rank:
            return 1 << bucket
    return 1 << (len(hist) - 1)


def summarize(workers: list[WorkerStats]) -> dict[str, OpSummary]:
    """Sum the workers' counters into one summary per opcode that saw requests."""
    out: dict[str, OpSummary] = {}
    for op in range(_OPS):
        count = sum(w.count[op] for w in workers)
        if not count:
            continue
        hist = [sum(w.hist[op][b] for w in workers) for b in range(_BUCKETS)]
        try:
            name = abi.Opcode(op).name
        except ValueError:
            name = "OTHER" if op == 0 else f"OP{op}"
        out[name] = OpSummary(
            name, count, sum(w.errors[op] for w in workers), sum(w.time_ns[op] for w in workers),
            _percentile(hist, count, 0.5), _percentile(hist, count, 0.99),
        )
    return out
