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
