"""Run a compat test program on the real library, reporting readiness as the launcher does:
``python reference.py --ready-fd N PROGRAM ARGS...`` (the mount point is the last argument)."""

import os
import runpy
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from fusepass import mount  # noqa: E402


def report_when_mounted(fd: int, mountpoint: str) -> None:
    with open("/proc/self/mountinfo", "rb") as f:
        import select
        poller = select.poll()
        poller.register(f, select.POLLPRI | select.POLLERR)
        while mount.mount_entry(mountpoint) is None:
            poller.poll(30_000)
    os.write(fd, b"ready\n")
    os.close(fd)


fd, program, args = int(sys.argv[2]), sys.argv[3], sys.argv[4:]
threading.Thread(target=report_when_mounted, args=(fd, os.path.abspath(args[-1])), daemon=True).start()
sys.argv = [program, *args]
runpy.run_path(program, run_name="__main__")
