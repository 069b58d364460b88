"""The fuse module parameter enable_uring, turned on for a benchmark's io_uring mounts and put back
afterwards (root only): fusepass itself never changes it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fusepass.uring_transport import MODULE_PARAMETER


@contextlib.contextmanager
def uring_parameter(value: str) -> Iterator[None]:
    """enable_uring set to ``value`` inside the block, put back after it, whatever happens."""
    with open(MODULE_PARAMETER) as f:
        old = f.read().strip()
    with open(MODULE_PARAMETER, "w") as f:
        f.write(value)
    try:
        yield
    finally:
        with open(MODULE_PARAMETER, "w") as f:
            f.write(old)
