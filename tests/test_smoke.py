from pathlib import Path


def test_memfs_write_then_read_from_another_process(memfs):
    p = Path(memfs.mountpoint) / "hello"
    p.write_bytes(b"hello world")
    assert p.read_bytes() == b"hello world"
