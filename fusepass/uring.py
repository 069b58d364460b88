"""One io_uring, from the standard library: set up, the rings mapped, SQEs written and CQEs reaped.

The ring has 128-byte SQEs (IORING_OP_URING_CMD carries its 80-byte command there) and is
made with SINGLE_ISSUER and DEFER_TASKRUN, so it belongs to the thread that made it: only
that thread may submit, and the kernel posts completions only while that thread waits in
``io_uring_enter``. Hence no other thread ever touches the mapped rings while Python reads
or writes them, and no memory barrier beyond the system call is needed, on any architecture.
NO_SQARRAY (Linux 6.6) lets an SQE's slot be the tail itself, without the index array.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable

from . import syscalls

SETUP_SQE128 = 1 << 10
SETUP_SINGLE_ISSUER = 1 << 12
SETUP_DEFER_TASKRUN = 1 << 13
SETUP_NO_SQARRAY = 1 << 16
ENTER_GETEVENTS = 1 << 0
FEAT_SINGLE_MMAP = 1 << 0
OP_URING_CMD = 46
SQE_SIZE = 128
CQE_SIZE = 16
CMD_SIZE = 80  # an URING_CMD's command area, after the SQE's first 48 bytes (SQE128 makes room)
_OFF_SQ_RING = 0
_OFF_SQES = 0x10000000
_FLAGS = SETUP_SQE128 | SETUP_SINGLE_ISSUER | SETUP_DEFER_TASKRUN | SETUP_NO_SQARRAY

#: struct io_uring_params: sq_entries cq_entries flags sq_thread_cpu sq_thread_idle features wq_fd
#: resv[3], then io_sqring_offsets and io_cqring_offsets (eight u32 and a u64 each).
_PARAMS = struct.Struct("<IIIIIII12x8IQ8IQ")
#: The fixed part of an SQE: opcode flags ioprio fd, cmd_op __pad1, addr, len uring_cmd_flags,
#: user_data, buf_index personality file_index; then the 80-byte command area, zero here.
SQE_HEAD_FORMAT = "<BBHiIIQIIQHHi"
_SQE = struct.Struct(SQE_HEAD_FORMAT + f"{CMD_SIZE}x")
_CQE = struct.Struct("<QiI")
_CQE_RES = struct.Struct("<8xi")
_U32 = struct.Struct("<I")


class Ring:
    """An io_uring for ``IORING_OP_URING_CMD`` commands (and plain reads), used from the thread that made it.

    ``push`` (or ``push_packed``) writes an SQE, ``enter`` submits what was pushed and waits for
    completions, and ``reap`` gives ``(user_data, res)`` of each completion posted. ``close`` unmaps the rings
    and closes the descriptor; the kernel then cancels whatever is still in flight.
    """

    def __init__(self, entries: int) -> None:
        params = bytearray(_PARAMS.size)
        _PARAMS.pack_into(params, 0, 0, 0, _FLAGS, 0, 0, 0, 0, *([0] * 8), 0, *([0] * 8), 0)
        self.fd = syscalls.io_uring_setup(entries, params)
        self._maps: list[syscalls.SharedMapping] = []
        try:
            f = _PARAMS.unpack_from(params)
            sq_entries, cq_entries, features = f[0], f[1], f[5]
            sq_off, cq_off = f[7:16], f[16:25]
            if not features & FEAT_SINGLE_MMAP:
                raise OSError(errno.EOPNOTSUPP, "this kernel's io_uring maps its rings separately (before 5.4)")
            size = cq_off[5] + cq_entries * CQE_SIZE
            self._maps.append(syscalls.SharedMapping(self.fd, size, _OFF_SQ_RING))
            self._maps.append(syscalls.SharedMapping(self.fd, sq_entries * SQE_SIZE, _OFF_SQES))
        except BaseException:
            self.close()
            raise
        rings = self._maps[0].view
        assert rings is not None
        self._rings: memoryview | None = rings
        self._sqes: memoryview | None = self._maps[1].view
        self.sq_entries = sq_entries
        self._sq_tail_at = sq_off[1]
        self._sq_mask = _U32.unpack_from(rings, sq_off[2])[0]
        self._cq_head_at, self._cq_tail_at = cq_off[0], cq_off[1]
        self._cq_mask = _U32.unpack_from(rings, cq_off[2])[0]
        self._cqes_at = cq_off[5]
        self._sq_tail = _U32.unpack_from(rings, self._sq_tail_at)[0]
        self._cq_head = _U32.unpack_from(rings, self._cq_head_at)[0]
        self._unsubmitted = 0
        self._enter = syscalls.io_uring_enterer(self.fd, ENTER_GETEVENTS)

    def push(self, opcode: int, fd: int, cmd_op: int, addr: int, length: int, user_data: int) -> None:
        """Queue an SQE on ``fd`` (submitted by the next ``enter``), its command area zero: ``cmd_op``
        for OP_URING_CMD, ``addr`` and ``length`` a buffer or an iovec array."""
        self.push_packed(_SQE, opcode, 0, 0, fd, cmd_op, 0, addr, length, 0, user_data, 0, 0, 0)

    def push_packed(self, sqe: struct.Struct, *fields: int) -> None:
        """Queue an SQE laid out by ``sqe``, a struct of SQE_SIZE bytes starting with SQE_HEAD_FORMAT's
        fields (an URING_CMD's command after them). Raises BufferError if every slot is queued."""
        sqes = self._sqes
        if sqes is None:
            raise ValueError("the ring is closed")
        if self._unsubmitted >= self.sq_entries:
            raise BufferError("the submission queue is full")
        sqe.pack_into(sqes, (self._sq_tail & self._sq_mask) * SQE_SIZE, *fields)
        self._sq_tail = (self._sq_tail + 1) & 0xFFFFFFFF
        self._unsubmitted += 1

    def prefill(self, sqe: bytes) -> None:
        """Write ``sqe`` (SQE_SIZE bytes) into every submission slot, for ``cycle``."""
        sqes = self._sqes
        if sqes is None:
            raise ValueError("the ring is closed")
        for i in range(self.sq_entries):
            sqes[i * SQE_SIZE:(i + 1) * SQE_SIZE] = sqe

    def cycle(self, field: struct.Struct, at: int, answer: Callable[[int], int | None]) -> int:
        """Keep one command in flight, for ever: submit what was queued, wait for its completion, call
        ``answer`` with its ``res``; then queue the SQE ``prefill`` wrote again, with ``field`` at byte
        ``at`` of it set to the value ``answer`` returned, and so on. Returns the ``res`` that
        ``answer`` returned None for. The request path of a ring entry: one system call and a few
        struct operations per turn, on locals (the kernel has read an SQE by the time its submission
        returns, so the slot may be written again)."""
        rings, sqes = self._rings, self._sqes
        if rings is None or sqes is None:
            raise ValueError("the ring is closed")
        if self._unsubmitted >= self.sq_entries:
            raise BufferError("the submission queue is full")
        enter, put = self._enter, field.pack_into
        pack_u32, unpack_u32, unpack_res = _U32.pack_into, _U32.unpack_from, _CQE_RES.unpack_from
        sq_tail_at, sq_mask = self._sq_tail_at, self._sq_mask
        cq_tail_at, cq_head_at, cq_mask, cqes_at = self._cq_tail_at, self._cq_head_at, self._cq_mask, self._cqes_at
        tail, head, pending = self._sq_tail, self._cq_head, self._unsubmitted
        try:
            while True:
                pack_u32(rings, sq_tail_at, tail)
                while True:
                    taken = enter(pending, 1)
                    if taken < 0:
                        if taken == -errno.EINTR:  # nothing was submitted: again
                            continue
                        raise OSError(-taken, f"io_uring_enter: {os.strerror(-taken)}")
                    pending -= taken
                    if unpack_u32(rings, cq_tail_at)[0] != head:
                        break
                res: int = unpack_res(rings, cqes_at + (head & cq_mask) * CQE_SIZE)[0]
                head = (head + 1) & 0xFFFFFFFF
                pack_u32(rings, cq_head_at, head)
                value = answer(res)
                if value is None:
                    return res
                put(sqes, (tail & sq_mask) * SQE_SIZE + at, value)
                tail = (tail + 1) & 0xFFFFFFFF
                pending += 1
        finally:
            self._sq_tail, self._cq_head, self._unsubmitted = tail, head, pending

    def enter(self, wait: int) -> None:
        """Submit what was pushed and wait until at least ``wait`` completions are posted (0: do not
        wait). A signal only restarts the wait."""
        rings = self._rings
        if rings is None:
            raise ValueError("the ring is closed")
        _U32.pack_into(rings, self._sq_tail_at, self._sq_tail)
        while True:
            try:
                taken = syscalls.io_uring_enter(self.fd, self._unsubmitted, wait, ENTER_GETEVENTS)
            except InterruptedError:
                continue
            self._unsubmitted -= taken
            if not self._unsubmitted:
                return

    def reap(self) -> list[tuple[int, int]]:
        """The ``(user_data, res)`` of each completion posted since the last call, oldest first."""
        rings = self._rings
        if rings is None:
            raise ValueError("the ring is closed")
        tail = _U32.unpack_from(rings, self._cq_tail_at)[0]
        head = self._cq_head
        done = []
        while head != tail:
            user_data, res, _ = _CQE.unpack_from(rings, self._cqes_at + (head & self._cq_mask) * CQE_SIZE)
            done.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        if done:
            self._cq_head = head
            _U32.pack_into(rings, self._cq_head_at, head)
        return done

    def close(self) -> None:
        self._sqes = self._rings = None
        for m in self._maps:
            m.close()
        self._maps = []
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
