from pathlib import Path

from fusepass import control


def test_memfs_write_then_read_from_another_process(memfs):
    p = Path(memfs.mountpoint) / "hello"
    p.write_bytes(b"hello world")
    assert p.read_bytes() == b"hello world"


def test_mirror_reads_source_through_passthrough(mirror):
    (mirror.source / "f").write_bytes(b"x" * 100_000)
    assert (Path(mirror.mountpoint) / "f").read_bytes() == b"x" * 100_000
    st = control.query(str(mirror.mountpoint))
    assert st["passthrough"]["negotiated"]
    assert "READ" not in st["requests"]
    assert st["passthrough"]["opens"] == 1
