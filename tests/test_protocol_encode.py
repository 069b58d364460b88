"""Reply and notification encoding, read back at the byte offsets of the kernel's uapi header (fuse.h).

Fields are read with explicit (offset, struct code) pairs, never with
``fusepass.abi``'s Structs, so a wrong layout in abi.py makes these tests fail.
"""

from __future__ import annotations

import errno
import os
import struct
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusepass import protocol as P
from fusepass.ops import DirListing

NS = 1_000_000_000
U64 = 2**64


def get(buf: bytes | bytearray | memoryview, off: int, code: str) -> int:
    return struct.unpack_from("<" + code, buf, off)[0]


def out_header(msg: bytes) -> tuple[int, int, int]:
    """fuse_out_header: len u32 @0, error s32 @4, unique u64 @8."""
    return get(msg, 0, "I"), get(msg, 4, "i"), get(msg, 8, "Q")


# --- whole messages -----------------------------------------------------------------------

ENCODERS = [
    pytest.param(lambda: P.encode_reply(6, b""), id="encode_reply-empty"),
    pytest.param(lambda: P.encode_reply(6, b"x" * 100), id="encode_reply-bytes"),
    pytest.param(lambda: P.encode_reply(6, bytearray(b"y" * 7)), id="encode_reply-bytearray"),
    pytest.param(lambda: P.encode_reply(6, memoryview(b"z" * 4096)[:33]), id="encode_reply-memoryview"),
    pytest.param(lambda: P.reply_header(6, 77) + b"b" * 77, id="reply_header"),
    pytest.param(lambda: P.encode_error(6, errno.ENOENT), id="encode_error"),
    pytest.param(lambda: P.encode_error(6, 0), id="encode_error-zero"),
    pytest.param(lambda: P.encode_notify(P.abi.NotifyCode.RESEND, b""), id="encode_notify"),
    pytest.param(lambda: P.notify_inval_inode(5, -1, 0), id="notify_inval_inode"),
    pytest.param(lambda: P.notify_inval_entry(1, b"name"), id="notify_inval_entry"),
    pytest.param(lambda: P.notify_inval_entry(1, b"n" * 255, expire_only=True), id="notify_inval_entry-expire"),
    pytest.param(lambda: P.notify_delete(1, 9, b"gone"), id="notify_delete"),
    pytest.param(lambda: P.notify_store(9, 4096, b"data" * 100), id="notify_store"),
    pytest.param(lambda: P.notify_retrieve(0x1234, 9, 0, 65536), id="notify_retrieve"),
    pytest.param(lambda: P.notify_inc_epoch(), id="notify_inc_epoch"),
]


def test_every_message_encoder_is_covered():
    covered = {p.id.split("-")[0] for p in ENCODERS}
    encoders = {n for n in vars(P) if n.startswith(("encode_", "notify_")) or n == "reply_header"}
    assert encoders - {"encode_rdev"} == covered


@pytest.mark.parametrize("encode", ENCODERS)
def test_out_header_length_equals_message_length(encode):
    msg = encode()
    assert isinstance(msg, bytes)
    assert len(msg) >= 16
    assert out_header(msg)[0] == len(msg)


def test_encode_reply_puts_unique_and_body_after_the_header():
    msg = P.encode_reply(0xAABB_CCDD_EEFF_0012, b"payload")
    assert out_header(msg) == (23, 0, 0xAABB_CCDD_EEFF_0012)
    assert msg[16:] == b"payload"


def test_reply_header_is_the_header_of_a_body_sent_separately():
    assert P.reply_header(42, 1000) == P.encode_reply(42, b"\0" * 1000)[:16]


@pytest.mark.parametrize(
    ("err", "wire"),
    [
        (errno.ENOENT, -errno.ENOENT), (1, -1), (errno.ENOSYS, -errno.ENOSYS), (511, -511),
        (0, -errno.EIO), (-2, -errno.EIO), (-errno.ENOENT, -errno.EIO), (512, -errno.EIO), (100000, -errno.EIO),
    ],
)
def test_encode_error_sends_negative_errno_and_eio_for_values_the_kernel_refuses(err, wire):
    assert P.encode_error(0x10, err) == struct.pack("<IiQ", 16, wire, 0x10)


@pytest.mark.parametrize(
    ("encode", "code"),
    [
        (lambda: P.notify_inval_inode(5, 0, 0), 2), (lambda: P.notify_inval_entry(1, b"a"), 3),
        (lambda: P.notify_store(5, 0, b""), 4), (lambda: P.notify_retrieve(1, 5, 0, 1), 5),
        (lambda: P.notify_delete(1, 5, b"a"), 6), (lambda: P.encode_notify(P.abi.NotifyCode.RESEND, b""), 7),
        (lambda: P.notify_inc_epoch(), 8),
    ],
)
def test_notifications_have_unique_zero_and_the_code_in_error(encode, code):
    msg = encode()
    assert out_header(msg)[1:] == (code, 0)


def test_notify_inval_inode_payload():
    msg = P.notify_inval_inode(0x55, -1, -7)
    assert len(msg) == 16 + 24
    assert (get(msg, 16, "Q"), get(msg, 24, "q"), get(msg, 32, "q")) == (0x55, -1, -7)


@pytest.mark.parametrize("name", [b"a", b"file.txt", b"x" * 1024])
@pytest.mark.parametrize("expire_only", [False, True])
def test_notify_inval_entry_payload_is_struct_name_and_nul(name, expire_only):
    msg = P.notify_inval_entry(0x77, name, expire_only=expire_only)
    payload = msg[16:]
    assert len(payload) == 16 + len(name) + 1
    assert (get(payload, 0, "Q"), get(payload, 8, "I"), get(payload, 12, "I")) == (0x77, len(name), int(expire_only))
    assert payload[16:] == name + b"\0"


@pytest.mark.parametrize("name", [b"a", b"file.txt", b"x" * 1024])
def test_notify_delete_payload_is_struct_name_and_nul(name):
    msg = P.notify_delete(0x77, 0x88, name)
    payload = msg[16:]
    assert len(payload) == 24 + len(name) + 1
    assert (get(payload, 0, "Q"), get(payload, 8, "Q"), get(payload, 16, "I")) == (0x77, 0x88, len(name))
    assert payload[24:] == name + b"\0"


def test_notify_store_payload_is_struct_then_data():
    msg = P.notify_store(0x99, 8192, b"abc")
    payload = msg[16:]
    assert len(payload) == 24 + 3
    assert (get(payload, 0, "Q"), get(payload, 8, "Q"), get(payload, 16, "I")) == (0x99, 8192, 3)
    assert payload[24:] == b"abc"


def test_notify_retrieve_payload():
    msg = P.notify_retrieve(0xABC, 0x99, 4096, 65536)
    payload = msg[16:]
    assert len(payload) == 32
    assert (get(payload, 0, "Q"), get(payload, 8, "Q"), get(payload, 16, "Q"), get(payload, 24, "I")) == (
        0xABC, 0x99, 4096, 65536,
    )


# --- entries and attributes ---------------------------------------------------------------

ATTR = P.Attr(
    ino=0x1111_2222_3333, mode=0o100644, nlink=3, uid=1000, gid=2000, rdev=os.makedev(259, 0x12345),
    size=0x1_0000_0001, blocks=17, blksize=4096,
    atime_ns=1_700_000_000_123_456_789, mtime_ns=-1, ctime_ns=-1_500_000_000,
)


def check_attr(buf: bytes, base: int) -> None:
    """fuse_attr at ``base``, for ATTR."""
    assert get(buf, base + 0, "Q") == ATTR.ino
    assert get(buf, base + 8, "Q") == ATTR.size
    assert get(buf, base + 16, "Q") == ATTR.blocks
    # Seconds are the floor of the time, as a two's-complement u64; nsec is in [0, 1e9).
    assert (get(buf, base + 24, "Q"), get(buf, base + 48, "I")) == (1_700_000_000, 123_456_789)
    assert (get(buf, base + 32, "Q"), get(buf, base + 52, "I")) == (U64 - 1, 999_999_999)
    assert (get(buf, base + 40, "Q"), get(buf, base + 56, "I")) == (U64 - 2, 500_000_000)
    assert get(buf, base + 60, "I") == 0o100644
    assert get(buf, base + 64, "I") == 3
    assert (get(buf, base + 68, "I"), get(buf, base + 72, "I")) == (1000, 2000)
    # The "new" dev encoding: minor low byte, major, then minor's high bits at 20.
    assert get(buf, base + 76, "I") == 0x45 | 259 << 8 | 0x123 << 20
    assert get(buf, base + 80, "I") == 4096
    assert get(buf, base + 84, "I") == 0


def test_entry_body_layout():
    body = P.entry_body(P.Entry(nodeid=0x42, attr=ATTR, entry_timeout=1.5, attr_timeout=2.25, generation=7))
    assert len(body) == 128
    assert (get(body, 0, "Q"), get(body, 8, "Q")) == (0x42, 7)
    assert (get(body, 16, "Q"), get(body, 32, "I")) == (1, 500_000_000)
    assert (get(body, 24, "Q"), get(body, 36, "I")) == (2, 250_000_000)
    check_attr(body, 40)


def test_attr_body_layout():
    body = P.attr_body(ATTR, 3.75)
    assert len(body) == 104
    assert (get(body, 0, "Q"), get(body, 8, "I"), get(body, 12, "I")) == (3, 750_000_000, 0)
    check_attr(body, 16)


@pytest.mark.parametrize(
    ("timeout", "sec", "nsec"),
    [
        (0, 0, 0), (0.0, 0, 0), (-5.0, 0, 0), (1, 1, 0), (0.5, 0, 500_000_000), (1e-9, 0, 1),
        (2.3, 2, 300_000_000), (0.1, 0, 100_000_000), (86400.25, 86400, 250_000_000),
        (0.9999999999, 1, 0),
    ],
)
def test_timeouts_are_seconds_and_nanoseconds(timeout, sec, nsec):
    attr = P.attr_body(ATTR, timeout)
    assert (get(attr, 0, "Q"), get(attr, 8, "I")) == (sec, nsec)
    entry = P.entry_body(P.Entry(2, ATTR, entry_timeout=timeout, attr_timeout=timeout))
    assert (get(entry, 16, "Q"), get(entry, 32, "I")) == (sec, nsec)
    assert (get(entry, 24, "Q"), get(entry, 36, "I")) == (sec, nsec)


@settings(max_examples=300, deadline=None)
@given(timeout=st.floats(min_value=0, max_value=2**40, allow_nan=False))
def test_timeout_split_is_the_nearest_nanosecond_and_normalised(timeout):
    body = P.attr_body(ATTR, timeout)
    sec, nsec = get(body, 0, "Q"), get(body, 8, "I")
    assert 0 <= nsec < NS
    # The nearest nanosecond (up to the float error of the fraction times 1e9).
    assert abs(sec * NS + nsec - Fraction(timeout) * NS) <= Fraction(1, 2) + Fraction(1, 10**6)


@settings(max_examples=300, deadline=None)
@given(ns=st.integers(-(2**62) * NS, 2**62 * NS))
def test_attr_times_split_into_floor_seconds_and_nanoseconds(ns):
    body = P.attr_body(P.Attr(ino=2, mode=0o100644, atime_ns=ns, mtime_ns=ns, ctime_ns=ns), 0)
    for sec_off, nsec_off in ((16 + 24, 16 + 48), (16 + 32, 16 + 52), (16 + 40, 16 + 56)):
        sec, nsec = get(body, sec_off, "q"), get(body, nsec_off, "I")
        assert 0 <= nsec < NS
        assert sec * NS + nsec == ns


def test_negative_entry_body_has_nodeid_zero_and_the_timeout():
    body = P.negative_entry_body(2.5)
    assert len(body) == 128
    assert get(body, 0, "Q") == 0
    assert (get(body, 16, "Q"), get(body, 32, "I")) == (2, 500_000_000)
    assert (get(body, 24, "Q"), get(body, 36, "I")) == (0, 0)


# --- rdev ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("major", "minor", "wire"),
    [(0, 0, 0), (1, 3, 0x103), (8, 17, 0x811), (259, 0x12345, 0x1231_0345), (4095, 2**20 - 1, 0xFFFF_FFFF)],
)
def test_encode_rdev_uses_the_new_kernel_encoding(major, minor, wire):
    assert P.encode_rdev(os.makedev(major, minor)) == wire
    assert P.decode_rdev(wire) == os.makedev(major, minor)


@settings(max_examples=500, deadline=None)
@given(major=st.integers(0, 4095), minor=st.integers(0, 2**20 - 1))
def test_rdev_round_trips(major, minor):
    dev = os.makedev(major, minor)
    wire = P.encode_rdev(dev)
    assert 0 <= wire < 2**32
    assert wire == (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    assert P.decode_rdev(wire) == dev


# --- other reply bodies -------------------------------------------------------------------


def test_init_body_layout():
    flags = 1 << 0 | 1 << 5 | 1 << 22 | 1 << 30 | 1 << 37  # the prototype's 0x2040400021
    body = P.init_body(
        minor=45, max_readahead=131072, flags=flags, max_background=64, congestion_threshold=48,
        max_write=1 << 20, time_gran=1, max_pages=256, max_stack_depth=1,
    )
    assert len(body) == 64
    assert (get(body, 0, "I"), get(body, 4, "I"), get(body, 8, "I")) == (7, 45, 131072)
    assert get(body, 12, "I") == 0x4040_0021
    assert (get(body, 16, "H"), get(body, 18, "H")) == (64, 48)
    assert (get(body, 20, "I"), get(body, 24, "I")) == (1 << 20, 1)
    assert (get(body, 28, "H"), get(body, 30, "H")) == (256, 0)
    assert get(body, 32, "I") == 0x20
    assert get(body, 36, "I") == 1
    assert get(body, 40, "H") == 0
    assert body[42:] == bytes(22)


def test_init_body_splits_a_full_64_bit_flag_word():
    body = P.init_body(45, 0, 0xFEDC_BA98_7654_3210, 0, 0, 4096, 0, 1, 2)
    assert (get(body, 12, "I"), get(body, 32, "I"), get(body, 36, "I")) == (0x7654_3210, 0xFEDC_BA98, 2)


@pytest.mark.parametrize(("fh", "flags", "backing_id"), [(0, 0, 0), (2**64 - 1, 0x80, 5), (7, 0x81, -5)])
def test_open_body_layout(fh, flags, backing_id):
    body = P.open_body(fh, flags, backing_id)
    assert len(body) == 16
    assert (get(body, 0, "Q"), get(body, 8, "I"), get(body, 12, "i")) == (fh, flags, backing_id)


def test_open_body_backing_id_defaults_to_zero():
    assert P.open_body(3, 1)[12:] == bytes(4)


def test_statfs_body_layout():
    body = P.statfs_body(P.StatfsReply(
        blocks=1001, bfree=1002, bavail=1003, files=1004, ffree=1005, bsize=4096, namelen=255, frsize=512,
    ))
    assert len(body) == 80
    assert [get(body, off, "Q") for off in (0, 8, 16, 24, 32)] == [1001, 1002, 1003, 1004, 1005]
    assert [get(body, off, "I") for off in (40, 44, 48, 52)] == [4096, 255, 512, 0]
    assert body[56:] == bytes(24)


def test_statx_body_layout():
    reply = P.StatxReply(
        mask=0xFFF, blksize=4096, attributes=0x20, nlink=2, uid=1000, gid=2000, mode=0o100755, ino=0x1234,
        size=0x5_0000_0000, blocks=40, attributes_mask=0x7F,
        atime_ns=1_700_000_000_000_000_001, btime_ns=-1, ctime_ns=3 * NS + 7, mtime_ns=0,
        rdev_major=8, rdev_minor=1, dev_major=259, dev_minor=3,
    )
    body = P.statx_body(reply, 1.25)
    assert len(body) == 288
    assert (get(body, 0, "Q"), get(body, 8, "I"), get(body, 12, "I")) == (1, 250_000_000, 0)
    assert body[16:32] == bytes(16)
    s = 32  # fuse_statx
    assert (get(body, s + 0, "I"), get(body, s + 4, "I"), get(body, s + 8, "Q")) == (0xFFF, 4096, 0x20)
    assert (get(body, s + 16, "I"), get(body, s + 20, "I"), get(body, s + 24, "I")) == (2, 1000, 2000)
    assert (get(body, s + 28, "H"), get(body, s + 30, "H")) == (0o100755, 0)
    assert [get(body, s + off, "Q") for off in (32, 40, 48, 56)] == [0x1234, 0x5_0000_0000, 40, 0x7F]
    times = {64: (1_700_000_000, 1), 80: (-1, 999_999_999), 96: (3, 7), 112: (0, 0)}  # atime btime ctime mtime
    for off, (sec, nsec) in times.items():
        assert (get(body, s + off, "q"), get(body, s + off + 8, "I"), get(body, s + off + 12, "i")) == (sec, nsec, 0)
    assert [get(body, s + off, "I") for off in (128, 132, 136, 140)] == [8, 1, 259, 3]
    assert body[s + 144 :] == bytes(112)


def test_lock_body_layout():
    body = P.lock_body(10, 2**63 - 1, 1, 4242)
    assert len(body) == 24
    assert (get(body, 0, "Q"), get(body, 8, "Q"), get(body, 16, "I"), get(body, 20, "I")) == (10, 2**63 - 1, 1, 4242)


def test_join_names_ends_every_name_with_nul():
    assert P.join_names([b"user.a", b"user.bb"]) == b"user.a\0user.bb\0"
    assert P.join_names([]) == b""


# --- directory listings -------------------------------------------------------------------


def read_dirents(buf: bytes, plus: bool) -> list[tuple[int, int, int, int, bytes]]:
    """Walk packed records: (entry nodeid or None, ino, off, type, name)."""
    out = []
    pos = 0
    base = 152 if plus else 24
    while pos < len(buf):
        d = pos + (128 if plus else 0)
        nodeid = get(buf, pos, "Q") if plus else None
        ino, off, namelen, dtype = get(buf, d, "Q"), get(buf, d + 8, "Q"), get(buf, d + 16, "I"), get(buf, d + 20, "I")
        name = bytes(buf[pos + base : pos + base + namelen])
        end = pos + base + namelen
        padded = (end + 7) & ~7
        assert buf[end:padded] == bytes(padded - end), "padding must be zero"
        out.append((nodeid, ino, off, dtype, name))
        pos = padded
    return out


def attr(ino: int, mode: int = 0o100644) -> P.Attr:
    return P.Attr(ino=ino, mode=mode)


@pytest.mark.parametrize(("name", "plus", "size"), [
    (b"a", False, 32), (b"abcdefgh", False, 32), (b"abcdefghi", False, 40), (b"", False, 24),
    (b"a", True, 160), (b"abcdefgh", True, 160), (b"abcdefghi", True, 168),
])
def test_dirent_size_is_name_offset_plus_name_rounded_up_to_8(name, plus, size):
    assert P.dirent_size(name, plus) == size


def test_readdir_records_are_8_byte_aligned_with_zero_padding():
    buf = bytearray(b"\xaa" * 4096)
    listing = DirListing(buf, 4096, plus=False)
    names = [b".", b"..", b"a", b"seven77", b"eight888", b"nine99999"]
    for i, name in enumerate(names):
        assert listing.add(name, i + 1, attr(100 + i, 0o040755 if i < 2 else 0o100644))
    out = listing.result().tobytes()
    assert len(out) == sum(P.dirent_size(n, False) for n in names) == 32 + 32 + 32 + 32 + 32 + 40
    assert read_dirents(out, plus=False) == [
        (None, 100 + i, i + 1, 4 if i < 2 else 8, name) for i, name in enumerate(names)
    ]


def test_readdir_type_is_the_mode_file_type():
    buf = bytearray(256)
    listing = DirListing(buf, 256, plus=False)
    for i, mode in enumerate((0o120777, 0o060600, 0o140755)):
        listing.add(b"n%d" % i, i + 1, attr(5, mode))
    assert [r[3] for r in read_dirents(listing.result().tobytes(), False)] == [10, 6, 12]


@pytest.mark.parametrize("plus", [False, True])
def test_listing_stops_when_the_next_record_does_not_fit(plus):
    one = P.dirent_size(b"abc", plus)
    buf = bytearray(one * 3 - 1)  # room for two records, not three
    listing = DirListing(buf, 10**6, plus=plus)  # limited by the buffer
    assert listing.add(b"abc", 1, attr(11))
    assert listing.add(b"abd", 2, attr(12))
    assert not listing.add(b"abe", 3, attr(13))
    assert not listing.add(b"x", 4, attr(14))  # a shorter record would not fit either
    assert len(listing.result()) == 2 * one
    assert [r[4] for r in read_dirents(listing.result().tobytes(), plus)] == [b"abc", b"abd"]


@pytest.mark.parametrize("plus", [False, True])
def test_listing_respects_the_requested_size_below_the_buffer(plus):
    one = P.dirent_size(b"abc", plus)
    listing = DirListing(bytearray(65536), one, plus=plus)
    assert listing.add(b"abc", 1, attr(11))  # exactly fills the reply
    assert not listing.add(b"d", 2, attr(12))
    assert len(listing.result()) == one


def test_readdirplus_calls_lookup_only_for_records_that_fit_and_never_for_dot_entries():
    calls = []

    def lookup_of(name: bytes, nodeid: int):
        def lookup() -> P.Entry:
            calls.append(name)
            return P.Entry(nodeid, attr(nodeid), entry_timeout=1.5, attr_timeout=2.0, generation=9)
        return lookup

    size = P.dirent_size(b".", True) + P.dirent_size(b"..", True) + P.dirent_size(b"file", True)
    listing = DirListing(bytearray(size + 100), size, plus=True)
    assert listing.add(b".", 1, attr(1, 0o040755), lookup_of(b".", 1))
    assert listing.add(b"..", 2, attr(1, 0o040755), lookup_of(b"..", 1))
    assert listing.add(b"file", 3, attr(50), lookup_of(b"file", 50))
    assert not listing.add(b"next", 4, attr(51), lookup_of(b"next", 51))
    assert calls == [b"file"]

    out = listing.result().tobytes()
    records = read_dirents(out, plus=True)
    assert [(r[0], r[1], r[2], r[4]) for r in records] == [(0, 1, 1, b"."), (0, 1, 2, b".."), (50, 50, 3, b"file")]
    file_entry = out[size - P.dirent_size(b"file", True) :]
    assert (get(file_entry, 8, "Q"), get(file_entry, 16, "Q"), get(file_entry, 32, "I")) == (9, 1, 500_000_000)
    assert get(file_entry, 40, "Q") == 50  # attr.ino of the looked-up entry


def test_readdirplus_without_lookup_lists_nodeid_zero_entries():
    buf = bytearray(b"\xaa" * 1024)
    listing = DirListing(buf, 1024, plus=True)
    assert listing.add(b"unlinked", 7, attr(77, 0o100600))
    out = listing.result().tobytes()
    assert len(out) == P.dirent_size(b"unlinked", True) == 160
    assert read_dirents(out, plus=True) == [(0, 77, 7, 8, b"unlinked")]
    # No lookup counted, and nothing cached: zero timeouts, the given attributes.
    assert [get(out, off, "Q") for off in (0, 8, 16, 24)] == [0, 0, 0, 0]
    assert (get(out, 32, "I"), get(out, 36, "I")) == (0, 0)
    assert (get(out, 40, "Q"), get(out, 40 + 60, "I")) == (77, 0o100600)


@settings(max_examples=200, deadline=None)
@given(
    names=st.lists(st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b and b"/" not in b), max_size=30),
    plus=st.booleans(), size=st.integers(0, 4096),
)
def test_listing_round_trips_what_fits(names, plus, size):
    listing = DirListing(bytearray(b"\xaa" * 4096), size, plus=plus)
    added = []
    for i, name in enumerate(names):
        if not listing.add(name, i + 1, attr(1000 + i)):
            break
        added.append((0 if plus else None, 1000 + i, i + 1, 8, name))
    out = listing.result().tobytes()
    assert len(out) <= size
    assert len(out) % 8 == 0
    assert read_dirents(out, plus) == added
    if len(added) < len(names):
        assert len(out) + P.dirent_size(names[len(added)], plus) > size


@pytest.mark.parametrize("timeout, expected", [(float("inf"), (1 << 62, 0)), (float("nan"), (0, 0)),
                                               (1e300, (1 << 62, 0)), (-1.0, (0, 0))])
def test_extreme_timeouts_encode_instead_of_raising(timeout: float, expected: tuple[int, int]) -> None:
    attr = P.Attr(ino=5, mode=0o100644)
    body = P.entry_body(P.Entry(2, attr, timeout, timeout))
    entry_valid, attr_valid, entry_nsec, attr_nsec = struct.unpack_from("<QQII", body, 16)
    assert (entry_valid, entry_nsec) == expected and (attr_valid, attr_nsec) == expected
