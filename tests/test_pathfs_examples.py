"""The path-layer examples the tutorial shows, run as their users would run them."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ServerProcess, python_module

from fusepass import control

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("example, write_errno", [("hello", errno.ENOSYS), ("hello_inodes", errno.ENOSYS)])
def test_hello_shows_one_file(start_server: Callable[..., ServerProcess], example: str, write_errno: int) -> None:
    mnt = Path(start_server(python_module(f"fusepass.examples.{example}")).mountpoint)
    assert os.listdir(mnt) == ["hello"]
    assert (mnt / "hello").read_bytes() == b"hello, world\n"
    assert os.stat(mnt / "hello").st_size == 13
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "other")
    with pytest.raises(OSError) as info:
        (mnt / "new").write_bytes(b"x")
    assert info.value.errno == write_errno


def test_readonly_view_passes_data_through_and_refuses_changes(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    data = os.urandom(1 << 20)
    (src / "sub" / "data").write_bytes(data)
    (src / "link").symlink_to("sub/data")
    server = start_server(python_module("fusepass.examples.path_readonly", str(src)))
    mnt = Path(server.mountpoint)
    assert sorted(os.listdir(mnt)) == ["link", "sub"]
    assert (mnt / "link").read_bytes() == data
    assert os.readlink(mnt / "link") == "sub/data"
    for attempt in (lambda: open(mnt / "sub" / "data", "r+b"), lambda: (mnt / "new").write_bytes(b""),
                    lambda: os.mkdir(mnt / "d"), lambda: os.unlink(mnt / "link")):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    status = control.query(str(mnt), timeout=5)
    if status["passthrough"]["negotiated"]:
        assert status["passthrough"]["opens"] >= 1 and "READ" not in status["requests"]
    assert (src / "sub" / "data").read_bytes() == data and sorted(os.listdir(src)) == ["link", "sub"]


def test_counter_stays_true_under_an_hour_long_cache(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(python_module("fusepass.examples.counter"))
    mnt = Path(server.mountpoint)
    count = mnt / "count"
    assert count.read_bytes() == b"0\n"
    reads = control.query(str(mnt), timeout=5)["requests"]["READ"]["count"]
    assert count.read_bytes() == b"0\n"  # from the kernel's cache: keep_cache
    assert control.query(str(mnt), timeout=5)["requests"]["READ"]["count"] == reads
    for n in range(1, 11):
        with open(mnt / "bump", "wb") as f:
            f.write(b"+")
        assert count.read_bytes() == f"{n}\n".encode()  # the bump dropped the cached data
    assert os.stat(count).st_size == 3  # and the cached size: "10\n"


def test_invalidating_a_path_the_kernel_never_looked_up_is_a_no_op() -> None:
    from fusepass.examples.counter import Counter
    from fusepass.pathfs import PathFS

    layer = PathFS(Counter())
    assert layer.nodeid("/") == 1 and layer.nodeid("/count") is None
    assert layer.invalidate("/count") is False and layer.invalidate_name("/dir/count") is False
    with pytest.raises(OSError) as info:  # a known node before INIT: nothing to send it through
        layer.invalidate_name("/count")
    assert info.value.errno == errno.ENOTCONN
