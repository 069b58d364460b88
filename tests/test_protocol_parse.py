"""Request parsing on hand-built byte fixtures: no /dev/fuse, no mount.

Every fixture is laid out from the kernel's uapi header (include/uapi/linux/fuse.h) with explicit
(offset, struct code) pairs, never with ``fusepass.abi``'s Structs, so a wrong
layout in abi.py makes these tests fail. Expected requests are whole dataclass
values, so every parsed field is compared.
"""

from __future__ import annotations

import os
import struct
import typing
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusepass import protocol as P
from fusepass.abi import Opcode as O

HEADER_SIZE = 40
UNIQUE = 0x0000_00AB_CDEF_0122
NODEID = 0x0000_0001_0000_0005
UID, GID, PID = 1000, 2000, 31337

# Distinct field values, so a swapped pair of fields cannot go unnoticed.
FH = 0x1122_3344_5566_7788
FH2 = 0x2233_4455_6677_8899
OFFSET = 0x0102_0304_0506_0708
OFFSET2 = 0x0A0B_0C0D_0E0F_1011
OWNER = 0xA1A2_A3A4_A5A6_A7A8
LENGTH = 0x0000_0004_8000_0000
NEWDIR = 0x0000_0000_0000_0042
JUNK32 = 0xDEAD_BEEF  # written into padding and unused fields, which must be ignored
JUNK64 = 0xFEED_FACE_CAFE_BEEF

REQUEST_TYPES = typing.get_args(P.Request)


def fields(size: int, *items: tuple[int, str, int]) -> bytes:
    """``size`` zero bytes with each (offset, struct code, value) written little-endian."""
    buf = bytearray(size)
    for off, code, value in items:
        struct.pack_into("<" + code, buf, off, value)
    return bytes(buf)


def message(opcode: int, body: bytes = b"", *, unique: int = UNIQUE, nodeid: int = NODEID,
            total_extlen: int = 0, length: int | None = None) -> bytes:
    """A whole request: fuse_in_header followed by ``body``."""
    header = fields(
        HEADER_SIZE,
        (0, "I", HEADER_SIZE + len(body) if length is None else length), (4, "I", opcode),
        (8, "Q", unique), (16, "Q", nodeid), (24, "I", UID), (28, "I", GID), (32, "I", PID),
        (36, "H", total_extlen), (38, "H", 0xBEEF),
    )
    return header + body


def header(opcode: int, body_len: int, *, unique: int = UNIQUE, nodeid: int = NODEID,
           total_extlen: int = 0, length: int | None = None) -> P.InHeader:
    return P.InHeader(
        length=HEADER_SIZE + body_len if length is None else length, opcode=opcode, unique=unique,
        nodeid=nodeid, uid=UID, gid=GID, pid=PID, total_extlen=total_extlen,
    )


def parse(msg: bytes | bytearray | memoryview, *, setxattr_ext: bool = False) -> P.Request:
    parser = P.Parser()
    parser.setxattr_ext = setxattr_ext
    return parser.parse(msg)


def reject(msg: bytes, *, setxattr_ext: bool = False) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as info:
        parse(msg, setxattr_ext=setxattr_ext)
    return info.value


# --- fixtures: one valid body per opcode and the request it must parse to ----------------

INIT_EXT = 1 << 30
KERNEL_OFFER = 0x5FD73FFFFFB  # what 6.18.44 offered

GETATTR_IN = fields(16, (0, "I", 1), (4, "I", JUNK32), (8, "Q", FH))
SETATTR_IN = fields(
    88, (0, "I", 0xFFF), (4, "I", JUNK32), (8, "Q", FH), (16, "Q", LENGTH), (24, "Q", OWNER),
    (32, "Q", 1_700_000_001), (40, "Q", 1_700_000_002), (48, "Q", 1_700_000_003),
    (56, "I", 111_111_111), (60, "I", 222_222_222), (64, "I", 333_333_333), (68, "I", 0o104755),
    (72, "I", JUNK32), (76, "I", 4001), (80, "I", 4002), (84, "I", JUNK32),
)
READ_IN = fields(
    40, (0, "Q", FH), (8, "Q", OFFSET), (16, "I", 131072), (20, "I", 2), (24, "Q", OWNER),
    (32, "I", os.O_RDWR | os.O_APPEND), (36, "I", JUNK32),
)
WRITE_DATA = b"hello\0world, with a NUL inside"
WRITE_IN = fields(
    40, (0, "Q", FH), (8, "Q", OFFSET), (16, "I", len(WRITE_DATA)), (20, "I", 2 | 4), (24, "Q", OWNER),
    (32, "I", os.O_WRONLY), (36, "I", JUNK32),
)
OPEN_IN = fields(8, (0, "I", os.O_RDWR | os.O_APPEND | os.O_DIRECT), (4, "I", 1))
CREATE_IN = fields(16, (0, "I", os.O_WRONLY | os.O_TRUNC), (4, "I", 0o100640), (8, "I", 0o027), (12, "I", 1))
RELEASE_IN = fields(24, (0, "Q", FH), (8, "I", os.O_RDWR), (12, "I", 3), (16, "Q", OWNER))
FSYNC_IN = fields(16, (0, "Q", FH), (8, "I", 1), (12, "I", JUNK32))
LK_IN = fields(
    48, (0, "Q", FH), (8, "Q", OWNER), (16, "Q", OFFSET), (24, "Q", OFFSET2), (32, "I", 1),
    (36, "I", 4242), (40, "I", 1), (44, "I", JUNK32),
)
IOCTL_DATA = b"\x01\x02\x03\x00\x05"
IOCTL_IN = fields(
    32, (0, "Q", FH), (8, "I", 16), (12, "I", 0x8008_6601), (16, "Q", 0x7FFF_0000_1234),
    (24, "I", len(IOCTL_DATA)), (28, "I", 8),
)
RETRIEVE_DATA = b"page cache bytes"
NOTIFY_RETRIEVE_IN = fields(
    40, (0, "Q", JUNK64), (8, "Q", OFFSET), (16, "I", len(RETRIEVE_DATA)), (20, "I", JUNK32),
    (24, "Q", JUNK64), (32, "Q", JUNK64),
)
COPY_FILE_RANGE_IN = fields(
    56, (0, "Q", FH), (8, "Q", OFFSET), (16, "Q", 77), (24, "Q", FH2), (32, "Q", OFFSET2),
    (40, "Q", LENGTH), (48, "Q", 0),
)
STATX_IN = fields(24, (0, "I", 1), (4, "I", JUNK32), (8, "Q", FH), (16, "I", 0x800), (20, "I", 0xFFF))
XATTR_VALUE = b"v\0a\0l"  # a value may hold NULs


def _forget_items(*pairs: tuple[int, int]) -> bytes:
    return b"".join(fields(16, (0, "Q", nodeid), (8, "Q", nlookup)) for nodeid, nlookup in pairs)


Expect = Callable[[P.InHeader], P.Request]

#: opcode -> (body, request expected from it). Every opcode of Parser._table appears here.
CASES: dict[int, tuple[bytes, Expect]] = {
    O.INIT: (
        fields(64, (0, "I", 7), (4, "I", 45), (8, "I", 131072), (12, "I", KERNEL_OFFER & 0xFFFFFFFF),
               (16, "I", KERNEL_OFFER >> 32), (20, "I", JUNK32)),
        lambda h: P.Init(h, major=7, minor=45, max_readahead=131072, flags=KERNEL_OFFER),
    ),
    O.DESTROY: (b"", lambda h: P.Destroy(h)),
    O.LOOKUP: (b"file.txt\0", lambda h: P.Lookup(h, b"file.txt")),
    O.FORGET: (fields(8, (0, "Q", 0x1_0000_0003)), lambda h: P.Forget(h, ((NODEID, 0x1_0000_0003),))),
    O.BATCH_FORGET: (
        fields(8, (0, "I", 3), (4, "I", JUNK32)) + _forget_items((10, 1), (11, 2), (2**64 - 1, 2**40)),
        lambda h: P.Forget(h, ((10, 1), (11, 2), (2**64 - 1, 2**40))),
    ),
    O.GETATTR: (GETATTR_IN, lambda h: P.Getattr(h, fh=FH)),
    O.SETATTR: (
        SETATTR_IN,
        lambda h: P.Setattr(
            h, valid=0xFFF, fh=FH, size=LENGTH, lock_owner=OWNER, atime=1_700_000_001, mtime=1_700_000_002,
            ctime=1_700_000_003, atimensec=111_111_111, mtimensec=222_222_222, ctimensec=333_333_333,
            mode=0o104755, uid=4001, gid=4002,
        ),
    ),
    O.READLINK: (b"", lambda h: P.Readlink(h)),
    O.SYMLINK: (b"linkname\0../some/target\0", lambda h: P.Symlink(h, name=b"linkname", target=b"../some/target")),
    O.MKNOD: (
        fields(16, (0, "I", 0o020644), (4, "I", 0x0123_4567), (8, "I", 0o022), (12, "I", JUNK32)) + b"chardev\0",
        lambda h: P.Mknod(h, mode=0o020644, rdev=0x0123_4567, umask=0o022, name=b"chardev"),
    ),
    O.MKDIR: (
        fields(8, (0, "I", 0o755), (4, "I", 0o022)) + b"subdir\0",
        lambda h: P.Mkdir(h, mode=0o755, umask=0o022, name=b"subdir"),
    ),
    O.UNLINK: (b"gone\0", lambda h: P.Unlink(h, b"gone")),
    O.RMDIR: (b"gonedir\0", lambda h: P.Rmdir(h, b"gonedir")),
    O.RENAME: (
        fields(8, (0, "Q", NEWDIR)) + b"old\0new\0",
        lambda h: P.Rename(h, newdir=NEWDIR, flags=0, name=b"old", newname=b"new"),
    ),
    O.RENAME2: (
        fields(16, (0, "Q", NEWDIR), (8, "I", 2), (12, "I", JUNK32)) + b"old\0new\0",
        lambda h: P.Rename(h, newdir=NEWDIR, flags=2, name=b"old", newname=b"new"),
    ),
    O.LINK: (fields(8, (0, "Q", 77)) + b"hardlink\0", lambda h: P.Link(h, oldnodeid=77, newname=b"hardlink")),
    O.OPEN: (OPEN_IN, lambda h: P.Open(h, flags=os.O_RDWR | os.O_APPEND | os.O_DIRECT, open_flags=1)),
    O.OPENDIR: (OPEN_IN, lambda h: P.Open(h, flags=os.O_RDWR | os.O_APPEND | os.O_DIRECT, open_flags=1)),
    O.CREATE: (
        CREATE_IN + b"new.txt\0",
        lambda h: P.Create(h, flags=os.O_WRONLY | os.O_TRUNC, mode=0o100640, umask=0o027, open_flags=1,
                           name=b"new.txt"),
    ),
    O.TMPFILE: (
        CREATE_IN + b"#tmp\0",
        lambda h: P.Create(h, flags=os.O_WRONLY | os.O_TRUNC, mode=0o100640, umask=0o027, open_flags=1,
                           name=b"#tmp"),
    ),
    O.READ: (
        READ_IN,
        lambda h: P.Read(h, fh=FH, offset=OFFSET, size=131072, read_flags=2, lock_owner=OWNER,
                         flags=os.O_RDWR | os.O_APPEND),
    ),
    O.READDIR: (
        READ_IN,
        lambda h: P.Read(h, fh=FH, offset=OFFSET, size=131072, read_flags=2, lock_owner=OWNER,
                         flags=os.O_RDWR | os.O_APPEND),
    ),
    O.READDIRPLUS: (
        READ_IN,
        lambda h: P.Read(h, fh=FH, offset=OFFSET, size=131072, read_flags=2, lock_owner=OWNER,
                         flags=os.O_RDWR | os.O_APPEND),
    ),
    O.WRITE: (
        WRITE_IN + WRITE_DATA,
        lambda h: P.Write(h, fh=FH, offset=OFFSET, write_flags=6, lock_owner=OWNER, flags=os.O_WRONLY,
                          data=memoryview(WRITE_DATA)),
    ),
    O.STATFS: (b"", lambda h: P.Statfs(h)),
    O.RELEASE: (RELEASE_IN, lambda h: P.Release(h, fh=FH, flags=os.O_RDWR, release_flags=3, lock_owner=OWNER)),
    O.RELEASEDIR: (RELEASE_IN, lambda h: P.Release(h, fh=FH, flags=os.O_RDWR, release_flags=3, lock_owner=OWNER)),
    O.FSYNC: (FSYNC_IN, lambda h: P.Fsync(h, fh=FH, datasync=True)),
    O.FSYNCDIR: (FSYNC_IN, lambda h: P.Fsync(h, fh=FH, datasync=True)),
    O.SETXATTR: (  # the 8-byte layout; the 16-byte one is tested on its own
        fields(8, (0, "I", len(XATTR_VALUE)), (4, "I", 2)) + b"user.key\0" + XATTR_VALUE,
        lambda h: P.Setxattr(h, flags=2, setxattr_flags=0, name=b"user.key", value=XATTR_VALUE),
    ),
    O.GETXATTR: (
        fields(8, (0, "I", 4096), (4, "I", JUNK32)) + b"user.key\0",
        lambda h: P.Getxattr(h, size=4096, name=b"user.key"),
    ),
    O.LISTXATTR: (fields(8, (0, "I", 65536), (4, "I", JUNK32)), lambda h: P.Listxattr(h, size=65536)),
    O.REMOVEXATTR: (b"user.key\0", lambda h: P.Removexattr(h, b"user.key")),
    O.FLUSH: (
        fields(24, (0, "Q", FH), (8, "I", JUNK32), (12, "I", JUNK32), (16, "Q", OWNER)),
        lambda h: P.Flush(h, fh=FH, lock_owner=OWNER),
    ),
    O.GETLK: (LK_IN, lambda h: P.Lock(h, FH, OWNER, OFFSET, OFFSET2, 1, 4242, 1)),
    O.SETLK: (LK_IN, lambda h: P.Lock(h, FH, OWNER, OFFSET, OFFSET2, 1, 4242, 1)),
    O.SETLKW: (LK_IN, lambda h: P.Lock(h, FH, OWNER, OFFSET, OFFSET2, 1, 4242, 1)),
    O.ACCESS: (fields(8, (0, "I", 7), (4, "I", JUNK32)), lambda h: P.Access(h, mask=7)),
    O.INTERRUPT: (fields(8, (0, "Q", UNIQUE + 2)), lambda h: P.Interrupt(h, target=UNIQUE + 2)),
    O.BMAP: (
        fields(16, (0, "Q", OFFSET), (8, "I", 4096), (12, "I", JUNK32)),
        lambda h: P.Bmap(h, block=OFFSET, blocksize=4096),
    ),
    O.IOCTL: (
        IOCTL_IN + IOCTL_DATA,
        lambda h: P.Ioctl(h, fh=FH, flags=16, cmd=0x8008_6601, arg=0x7FFF_0000_1234, out_size=8, data=IOCTL_DATA),
    ),
    O.POLL: (
        fields(24, (0, "Q", FH), (8, "Q", FH2), (16, "I", 1), (20, "I", 0x5)),
        lambda h: P.Poll(h, fh=FH, kh=FH2, flags=1, events=0x5),
    ),
    O.NOTIFY_REPLY: (
        NOTIFY_RETRIEVE_IN + RETRIEVE_DATA,
        lambda h: P.NotifyReply(h, offset=OFFSET, data=RETRIEVE_DATA),
    ),
    O.FALLOCATE: (
        fields(32, (0, "Q", FH), (8, "Q", OFFSET), (16, "Q", LENGTH), (24, "I", 0x11), (28, "I", JUNK32)),
        lambda h: P.Fallocate(h, fh=FH, offset=OFFSET, length=LENGTH, mode=0x11),
    ),
    O.LSEEK: (
        fields(24, (0, "Q", FH), (8, "Q", OFFSET), (16, "I", 4), (20, "I", JUNK32)),
        lambda h: P.Lseek(h, fh=FH, offset=OFFSET, whence=4),
    ),
    O.COPY_FILE_RANGE: (
        COPY_FILE_RANGE_IN,
        lambda h: P.CopyFileRange(h, fh_in=FH, off_in=OFFSET, nodeid_out=77, fh_out=FH2, off_out=OFFSET2,
                                  length=LENGTH, flags=0),
    ),
    O.COPY_FILE_RANGE_64: (
        COPY_FILE_RANGE_IN,
        lambda h: P.CopyFileRange(h, fh_in=FH, off_in=OFFSET, nodeid_out=77, fh_out=FH2, off_out=OFFSET2,
                                  length=LENGTH, flags=0),
    ),
    O.SYNCFS: (fields(8, (0, "Q", 0)), lambda h: P.Syncfs(h)),
    O.STATX: (STATX_IN, lambda h: P.Statx(h, fh=FH, sx_flags=0x800, sx_mask=0xFFF)),
}

#: Size of the fixed part of each body (fuse.h). INIT accepts the
#: historic 16-byte form, so 16 is its minimum.
FIXED_SIZE = {
    O.INIT: 16, O.FORGET: 8, O.BATCH_FORGET: 8, O.GETATTR: 16, O.SETATTR: 88, O.MKNOD: 16, O.MKDIR: 8,
    O.RENAME: 8, O.RENAME2: 16, O.LINK: 8, O.OPEN: 8, O.OPENDIR: 8, O.CREATE: 16, O.TMPFILE: 16,
    O.READ: 40, O.READDIR: 40, O.READDIRPLUS: 40, O.WRITE: 40, O.RELEASE: 24, O.RELEASEDIR: 24,
    O.FSYNC: 16, O.FSYNCDIR: 16, O.SETXATTR: 8, O.GETXATTR: 8, O.LISTXATTR: 8, O.FLUSH: 24,
    O.GETLK: 48, O.SETLK: 48, O.SETLKW: 48, O.ACCESS: 8, O.INTERRUPT: 8, O.BMAP: 16, O.IOCTL: 32,
    O.POLL: 24, O.NOTIFY_REPLY: 40, O.FALLOCATE: 32, O.LSEEK: 24, O.COPY_FILE_RANGE: 56,
    O.COPY_FILE_RANGE_64: 56, O.STATX: 24,
}


def test_fixtures_cover_every_parsed_opcode():
    assert set(CASES) == set(P.Parser().body_parsers)


# --- the header ---------------------------------------------------------------------------


def test_header_fields_are_read_at_kernel_offsets():
    raw = bytearray(message(O.GETATTR, GETATTR_IN))
    struct.pack_into("<I", raw, 24, 0xFFFF_FFFF)  # FUSE_INVALID_UIDGID
    struct.pack_into("<H", raw, 36, 0)
    req = parse(bytes(raw))
    assert req.header == P.InHeader(
        length=56, opcode=3, unique=UNIQUE, nodeid=NODEID, uid=0xFFFF_FFFF, gid=GID, pid=PID, total_extlen=0
    )


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_parse_accepts_any_bytes_like_buffer(kind):
    body, expect = CASES[O.READ]
    assert parse(kind(message(O.READ, body))) == expect(header(O.READ, len(body)))


# --- every opcode -------------------------------------------------------------------------


@pytest.mark.parametrize("opcode", list(CASES), ids=lambda op: O(op).name)
def test_every_opcode_parses_to_its_request(opcode):
    body, expect = CASES[opcode]
    nodeid = 0 if opcode in (O.INIT, O.BATCH_FORGET, O.INTERRUPT, O.DESTROY) else NODEID
    unique = UNIQUE | 1 if opcode == O.INTERRUPT else UNIQUE
    req = parse(message(opcode, body, nodeid=nodeid, unique=unique))
    assert req == expect(header(opcode, len(body), nodeid=nodeid, unique=unique))


def test_init_without_init_ext_ignores_flags2():
    body = fields(64, (0, "I", 7), (4, "I", 45), (8, "I", 65536), (12, "I", 0x2000_0021), (16, "I", 0x5FD))
    req = parse(message(O.INIT, body, nodeid=0))
    assert req == P.Init(header(O.INIT, 64, nodeid=0), major=7, minor=45, max_readahead=65536, flags=0x2000_0021)


def test_init_with_init_ext_puts_flags2_in_the_high_word():
    body = fields(64, (0, "I", 7), (4, "I", 45), (8, "I", 0), (12, "I", INIT_EXT), (16, "I", 0x20))
    req = parse(message(O.INIT, body, nodeid=0))
    assert req.flags == INIT_EXT | 1 << 37  # PASSTHROUGH is flags2 bit 5


def test_forget_pairs_the_header_nodeid_with_nlookup():
    req = parse(message(O.FORGET, fields(8, (0, "Q", 5)), nodeid=1234))
    assert req == P.Forget(header(O.FORGET, 8, nodeid=1234), ((1234, 5),))


def test_batch_forget_of_zero_items_is_empty():
    req = parse(message(O.BATCH_FORGET, fields(8, (0, "I", 0)), nodeid=0))
    assert req == P.Forget(header(O.BATCH_FORGET, 8, nodeid=0), ())


def test_batch_forget_ignores_bytes_after_count_items():
    body = fields(8, (0, "I", 1)) + _forget_items((9, 3), (10, 4))
    assert parse(message(O.BATCH_FORGET, body, nodeid=0)).items == ((9, 3),)


@pytest.mark.parametrize("getattr_flags", [0, 2, 0xFFFF_FFFE])
def test_getattr_without_getattr_fh_has_no_fh(getattr_flags):
    body = fields(16, (0, "I", getattr_flags), (8, "Q", FH))
    assert parse(message(O.GETATTR, body)) == P.Getattr(header(O.GETATTR, 16), fh=None)


def test_setattr_without_fattr_fh_has_no_fh():
    body = bytearray(SETATTR_IN)
    struct.pack_into("<I", body, 0, 0xFFF & ~64)
    req = parse(message(O.SETATTR, bytes(body)))
    assert req.valid == 0xFFF & ~64
    assert req.fh is None
    assert (req.size, req.lock_owner, req.mode, req.uid, req.gid) == (LENGTH, OWNER, 0o104755, 4001, 4002)


def test_symlink_name_comes_before_target():
    req = parse(message(O.SYMLINK, b"a\0b\0"))
    assert (req.name, req.target) == (b"a", b"b")


@pytest.mark.parametrize(("fsync_flags", "datasync"), [(0, False), (1, True), (2, False), (3, True)])
def test_fsync_datasync_is_bit_0(fsync_flags, datasync):
    body = fields(16, (0, "Q", FH), (8, "I", fsync_flags))
    for opcode in (O.FSYNC, O.FSYNCDIR):
        assert parse(message(opcode, body)) == P.Fsync(header(opcode, 16), fh=FH, datasync=datasync)


def test_statx_without_getattr_fh_has_no_fh():
    body = fields(24, (0, "I", 0), (8, "Q", FH), (16, "I", 0x2000), (20, "I", 0x800))
    assert parse(message(O.STATX, body)) == P.Statx(header(O.STATX, 24), fh=None, sx_flags=0x2000, sx_mask=0x800)


def test_write_data_is_a_memoryview_of_exactly_size_bytes():
    req = parse(message(O.WRITE, WRITE_IN + WRITE_DATA))
    assert type(req.data) is memoryview
    assert len(req.data) == len(WRITE_DATA)
    assert req.data.tobytes() == WRITE_DATA


def test_write_data_is_a_view_of_the_request_buffer_not_a_copy():
    raw = bytearray(message(O.WRITE, WRITE_IN + WRITE_DATA))
    req = parse(raw)
    raw[-1:] = b"!"
    assert req.data.tobytes() == WRITE_DATA[:-1] + b"!"


def test_write_of_zero_bytes_has_empty_data():
    body = fields(40, (0, "Q", FH), (16, "I", 0))
    assert len(parse(message(O.WRITE, body)).data) == 0


def test_setxattr_ext_layout_reads_16_byte_header():
    body = fields(16, (0, "I", len(XATTR_VALUE)), (4, "I", 1), (8, "I", 1), (12, "I", JUNK32))
    body += b"system.posix_acl_access\0" + XATTR_VALUE
    req = parse(message(O.SETXATTR, body), setxattr_ext=True)
    assert req == P.Setxattr(header(O.SETXATTR, len(body)), flags=1, setxattr_flags=1,
                             name=b"system.posix_acl_access", value=XATTR_VALUE)


def test_setxattr_layouts_differ_by_8_bytes():
    # The 8-byte layout read as the 16-byte one swallows the name's first 8 bytes.
    body = fields(8, (0, "I", 3), (4, "I", 0)) + b"user.abcdefgh\0xyz"
    assert parse(message(O.SETXATTR, body)).name == b"user.abcdefgh"
    ext = parse(message(O.SETXATTR, body), setxattr_ext=True)
    assert (ext.setxattr_flags, ext.name, ext.value) == (int.from_bytes(b"user", "little"), b"defgh", b"xyz")


def test_setxattr_of_empty_value():
    body = fields(8, (0, "I", 0), (4, "I", 0)) + b"user.empty\0"
    req = parse(message(O.SETXATTR, body))
    assert (req.name, req.value) == (b"user.empty", b"")


def test_interrupt_target_comes_from_the_body_not_the_header():
    req = parse(message(O.INTERRUPT, fields(8, (0, "Q", 0x88)), unique=0x1235, nodeid=0))
    assert req.target == 0x88
    assert req.header.unique == 0x1235


def test_ioctl_without_input_data():
    body = fields(32, (0, "Q", FH), (12, "I", 0x5401), (24, "I", 0), (28, "I", 64))
    req = parse(message(O.IOCTL, body))
    assert (req.cmd, req.out_size, req.data) == (0x5401, 64, b"")


@pytest.mark.parametrize("opcode", [7, 19, O.SETUPMAPPING, O.REMOVEMAPPING, 54, 4096, 2**32 - 1])
def test_unknown_opcode_parses_to_unknown_whatever_the_body(opcode):
    body = b"\xff" * 3
    assert parse(message(opcode, body)) == P.Unknown(header(opcode, 3))


# --- creation extensions (total_extlen) ---------------------------------------------------


def _extensions() -> bytes:
    """A security-context block and a supplementary-group record,
    each padded to 8 bytes."""
    ctx_name, ctx = b"security.selinux\0", b"system_u:object_r:tmp_t:s0\0"
    item = fields(8, (0, "I", len(ctx)), (4, "I", 0)) + ctx_name + ctx
    item += bytes(-len(item) % 8)
    secctx = fields(8, (0, "I", 8 + len(item)), (4, "I", 1)) + item
    groups = fields(8, (0, "I", 16), (4, "I", 32)) + fields(8, (0, "I", 1), (4, "I", 4242))
    return secctx + groups


EXTENDED = [
    pytest.param(O.CREATE, CREATE_IN + b"new.txt\0", "name", b"new.txt", id="CREATE"),
    pytest.param(O.TMPFILE, CREATE_IN + b"#tmp\0", "name", b"#tmp", id="TMPFILE"),
    pytest.param(O.MKNOD, CASES[O.MKNOD][0], "name", b"chardev", id="MKNOD"),
    pytest.param(O.MKDIR, CASES[O.MKDIR][0], "name", b"subdir", id="MKDIR"),
    pytest.param(O.SYMLINK, b"l\0target\0", "target", b"target", id="SYMLINK"),
]


@pytest.mark.parametrize(("opcode", "args", "attr", "value"), EXTENDED)
def test_extension_records_after_the_name_are_excluded(opcode, args, attr, value):
    ext = _extensions()
    assert len(ext) % 8 == 0
    req = parse(message(opcode, args + ext, total_extlen=len(ext) // 8))
    assert getattr(req, attr) == value
    assert req.header.total_extlen == len(ext) // 8
    # The same request without extensions parses to the same fields.
    plain = parse(message(opcode, args))
    assert [getattr(req, f) for f in req.__slots__ if f != "header"] == [
        getattr(plain, f) for f in plain.__slots__ if f != "header"
    ]


def test_extension_length_is_counted_in_8_byte_units():
    # One 8-byte record after "new.txt\0": trimming anything more would cut the NUL off the name.
    body = CREATE_IN + b"new.txt\0" + fields(8, (0, "I", 8), (4, "I", 99))
    assert parse(message(O.CREATE, body, total_extlen=1)).name == b"new.txt"
    reject(message(O.CREATE, body, total_extlen=2))


# --- malformed input ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 16, 39])
def test_message_shorter_than_header_is_rejected_without_header(size):
    e = reject(message(O.GETATTR, GETATTR_IN)[:size])
    assert e.header is None


@pytest.mark.parametrize("delta", [-1, 1, 4096])
def test_header_length_disagreeing_with_buffer_is_rejected_with_header(delta):
    claimed = HEADER_SIZE + len(GETATTR_IN) + delta
    e = reject(message(O.GETATTR, GETATTR_IN, length=claimed))
    assert e.header == header(O.GETATTR, len(GETATTR_IN), length=claimed)


def test_header_length_of_zero_is_rejected_with_header():
    e = reject(message(O.LOOKUP, b"x\0", length=0))
    assert e.header is not None
    assert e.header.unique == UNIQUE


TRUNCATED = [pytest.param(op, size, False, id=O(op).name) for op, size in FIXED_SIZE.items()] + [
    pytest.param(O.SETXATTR, 16, True, id="SETXATTR_EXT"),
]


@pytest.mark.parametrize(("opcode", "size", "setxattr_ext"), TRUNCATED)
def test_truncated_fixed_body_is_rejected_with_header(opcode, size, setxattr_ext):
    body = CASES[opcode][0]
    if setxattr_ext:
        body = fields(16, (0, "I", 1)) + b"user.k\0v"
    assert len(body) >= size
    for cut in sorted({0, size // 2, size - 1}):
        e = reject(message(opcode, body[:cut]), setxattr_ext=setxattr_ext)
        assert e.header == header(opcode, cut)


NO_NUL = [
    pytest.param(O.LOOKUP, b"name", id="LOOKUP"),
    pytest.param(O.LOOKUP, b"", id="LOOKUP-empty-body"),
    pytest.param(O.UNLINK, b"name", id="UNLINK"),
    pytest.param(O.RMDIR, b"name", id="RMDIR"),
    pytest.param(O.REMOVEXATTR, b"user.k", id="REMOVEXATTR"),
    pytest.param(O.SYMLINK, b"name\0target", id="SYMLINK-target"),
    pytest.param(O.SYMLINK, b"name", id="SYMLINK-name"),
    pytest.param(O.MKNOD, fields(16, (0, "I", 0o10644)) + b"fifo", id="MKNOD"),
    pytest.param(O.MKDIR, fields(8, (0, "I", 0o755)) + b"dir", id="MKDIR"),
    pytest.param(O.RENAME, fields(8, (0, "Q", 1)) + b"old\0new", id="RENAME-newname"),
    pytest.param(O.RENAME2, fields(16, (0, "Q", 1)) + b"old", id="RENAME2-name"),
    pytest.param(O.LINK, fields(8, (0, "Q", 7)) + b"link", id="LINK"),
    pytest.param(O.CREATE, CREATE_IN + b"file", id="CREATE"),
    pytest.param(O.TMPFILE, CREATE_IN, id="TMPFILE-no-name"),
    pytest.param(O.GETXATTR, fields(8, (0, "I", 10)) + b"user.k", id="GETXATTR"),
    pytest.param(O.SETXATTR, fields(8, (0, "I", 0)) + b"user.k", id="SETXATTR"),
]


@pytest.mark.parametrize(("opcode", "body"), NO_NUL)
def test_name_without_nul_is_rejected(opcode, body):
    e = reject(message(opcode, body))
    assert e.header == header(opcode, len(body))


EMPTY_NAME = [
    pytest.param(O.LOOKUP, b"\0", id="LOOKUP"),
    pytest.param(O.UNLINK, b"\0", id="UNLINK"),
    pytest.param(O.RMDIR, b"\0", id="RMDIR"),
    pytest.param(O.REMOVEXATTR, b"\0", id="REMOVEXATTR"),
    pytest.param(O.SYMLINK, b"\0target\0", id="SYMLINK-name"),
    pytest.param(O.SYMLINK, b"name\0\0", id="SYMLINK-target"),
    pytest.param(O.MKNOD, fields(16, (0, "I", 0o10644)) + b"\0", id="MKNOD"),
    pytest.param(O.MKDIR, fields(8, (0, "I", 0o755)) + b"\0", id="MKDIR"),
    pytest.param(O.RENAME, fields(8, (0, "Q", 1)) + b"\0new\0", id="RENAME-name"),
    pytest.param(O.RENAME2, fields(16, (0, "Q", 1)) + b"old\0\0", id="RENAME2-newname"),
    pytest.param(O.LINK, fields(8, (0, "Q", 7)) + b"\0", id="LINK"),
    pytest.param(O.CREATE, CREATE_IN + b"\0", id="CREATE"),
    pytest.param(O.GETXATTR, fields(8, (0, "I", 10)) + b"\0", id="GETXATTR"),
    pytest.param(O.SETXATTR, fields(8, (0, "I", 1)) + b"\0v", id="SETXATTR"),
]


@pytest.mark.parametrize(("opcode", "body"), EMPTY_NAME)
def test_empty_name_is_rejected(opcode, body):
    e = reject(message(opcode, body))
    assert e.header == header(opcode, len(body))


@pytest.mark.parametrize("data", [WRITE_DATA[:-1], WRITE_DATA + b"x", b""], ids=["short", "long", "none"])
def test_write_size_disagreeing_with_data_is_rejected(data):
    e = reject(message(O.WRITE, WRITE_IN + data))
    assert e.header.opcode == O.WRITE


@pytest.mark.parametrize("setxattr_ext", [False, True])
@pytest.mark.parametrize("value", [b"abcd", b"abcdef"], ids=["short", "long"])
def test_setxattr_size_disagreeing_with_value_is_rejected(setxattr_ext, value):
    head = fields(16 if setxattr_ext else 8, (0, "I", 5))
    e = reject(message(O.SETXATTR, head + b"user.k\0" + value), setxattr_ext=setxattr_ext)
    assert e.header.opcode == O.SETXATTR


@pytest.mark.parametrize("count", [2**32 - 1, 2**28, 4])
def test_batch_forget_count_beyond_the_body_is_rejected(count):
    body = fields(8, (0, "I", count)) + _forget_items((1, 1), (2, 2), (3, 3))
    e = reject(message(O.BATCH_FORGET, body, nodeid=0))
    assert e.header == header(O.BATCH_FORGET, len(body), nodeid=0)


def test_batch_forget_with_a_partial_item_is_rejected():
    body = fields(8, (0, "I", 2)) + _forget_items((1, 1)) + b"\0" * 15
    reject(message(O.BATCH_FORGET, body, nodeid=0))


@pytest.mark.parametrize(
    ("body", "extlen"),
    [(b"\0" * 7, 1), (CREATE_IN + b"n\0", 3), (CREATE_IN + b"n\0", 0xFFFF)],
    ids=["one-byte-short", "longer-than-body", "max"],
)
def test_extension_length_beyond_the_body_is_rejected(body, extlen):
    e = reject(message(O.CREATE, body, total_extlen=extlen))
    assert e.header == header(O.CREATE, len(body), total_extlen=extlen)


@pytest.mark.parametrize("opcode", [O.READLINK, O.STATFS, O.DESTROY])
def test_extension_length_is_checked_even_for_bodiless_opcodes(opcode):
    e = reject(message(opcode, b"", total_extlen=1))
    assert e.header == header(opcode, 0, total_extlen=1)


@pytest.mark.parametrize("in_size", [len(IOCTL_DATA) - 1, len(IOCTL_DATA) + 1, 2**32 - 1])
def test_ioctl_in_size_disagreeing_with_data_is_rejected(in_size):
    body = bytearray(IOCTL_IN)
    struct.pack_into("<I", body, 24, in_size)
    e = reject(message(O.IOCTL, bytes(body) + IOCTL_DATA))
    assert e.header.opcode == O.IOCTL


@pytest.mark.parametrize("size", [len(RETRIEVE_DATA) - 1, len(RETRIEVE_DATA) + 1])
def test_notify_reply_size_disagreeing_with_data_is_rejected(size):
    body = bytearray(NOTIFY_RETRIEVE_IN)
    struct.pack_into("<I", body, 16, size)
    reject(message(O.NOTIFY_REPLY, bytes(body) + RETRIEVE_DATA))


# --- properties ---------------------------------------------------------------------------

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UNKNOWN_OPCODES = [0, 7, 19, O.SETUPMAPPING, O.REMOVEMAPPING, 54, 4096, 2**32 - 1]
ALL_OPCODES = sorted(CASES) + UNKNOWN_OPCODES


def _parse_or_protocol_error(msg: bytes, setxattr_ext: bool) -> P.Request | None:
    try:
        req = parse(msg, setxattr_ext=setxattr_ext)
    except P.ProtocolError:
        return None
    assert isinstance(req, REQUEST_TYPES)
    return req


@PROPERTY
@given(raw=st.binary(max_size=200), setxattr_ext=st.booleans())
def test_arbitrary_bytes_parse_or_raise_protocol_error(raw, setxattr_ext):
    _parse_or_protocol_error(raw, setxattr_ext)


@PROPERTY
@given(
    opcode=st.sampled_from(ALL_OPCODES), body=st.binary(max_size=300), setxattr_ext=st.booleans(),
    total_extlen=st.one_of(st.just(0), st.integers(0, 0xFFFF)), nodeid=st.integers(0, 2**64 - 1),
)
def test_arbitrary_body_behind_a_valid_header_parses_or_raises_protocol_error(
    opcode, body, setxattr_ext, total_extlen, nodeid
):
    req = _parse_or_protocol_error(message(opcode, body, total_extlen=total_extlen, nodeid=nodeid), setxattr_ext)
    if req is not None:
        assert req.header.opcode == opcode
        assert req.header.nodeid == nodeid
        if opcode in UNKNOWN_OPCODES:
            assert type(req) is P.Unknown


@st.composite
def mutated_bodies(draw: st.DrawFn) -> tuple[int, bytes]:
    """A valid fixture body with bytes overwritten, cut off or appended."""
    opcode = draw(st.sampled_from(sorted(CASES)))
    body = bytearray(CASES[opcode][0])
    for _ in range(draw(st.integers(0, 4))):
        if body:
            body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
    body = body[: draw(st.integers(0, len(body)))] + draw(st.binary(max_size=40))
    return opcode, bytes(body)


@PROPERTY
@given(case=mutated_bodies(), setxattr_ext=st.booleans(), total_extlen=st.integers(0, 8))
def test_mutated_valid_bodies_parse_or_raise_protocol_error(case, setxattr_ext, total_extlen):
    opcode, body = case
    req = _parse_or_protocol_error(message(opcode, body, total_extlen=total_extlen), setxattr_ext)
    if req is not None:
        assert req.header.opcode == opcode


NAMES = st.binary(min_size=1, max_size=255).filter(lambda b: b"\0" not in b)


@PROPERTY
@given(name=NAMES, trailing=st.binary(max_size=16))
def test_lookup_name_round_trips(name, trailing):
    # Whatever follows the NUL (padding) is not part of the name.
    assert parse(message(O.LOOKUP, name + b"\0" + trailing)).name == name


@PROPERTY
@given(name=NAMES, value=st.binary(max_size=300), flags=st.integers(0, 2**32 - 1), setxattr_ext=st.booleans())
def test_setxattr_name_and_value_round_trip(name, value, flags, setxattr_ext):
    head = fields(16, (0, "I", len(value)), (4, "I", flags), (8, "I", 1)) if setxattr_ext else fields(
        8, (0, "I", len(value)), (4, "I", flags)
    )
    req = parse(message(O.SETXATTR, head + name + b"\0" + value), setxattr_ext=setxattr_ext)
    assert (req.flags, req.setxattr_flags, req.name, req.value) == (flags, 1 if setxattr_ext else 0, name, value)


@PROPERTY
@given(data=st.binary(max_size=4096), offset=st.integers(0, 2**64 - 1))
def test_write_data_round_trips(data, offset):
    body = fields(40, (0, "Q", FH), (8, "Q", offset), (16, "I", len(data))) + data
    req = parse(message(O.WRITE, body))
    assert (req.offset, req.data.tobytes()) == (offset, data)


@PROPERTY
@given(items=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=40))
def test_batch_forget_items_round_trip(items):
    body = fields(8, (0, "I", len(items))) + _forget_items(*items)
    assert parse(message(O.BATCH_FORGET, body, nodeid=0)).items == tuple(items)
