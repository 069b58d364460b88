"""The FUSE kernel ABI, protocol 7.45: opcodes, flag words and struct layouts.

Everything here mirrors ``include/uapi/linux/fuse.h``; nothing here does I/O.
Structs are precompiled ``struct.Struct`` objects named after the kernel struct
(``fuse_entry_out`` -> ``ENTRY_OUT``) so the hot path never re-parses a format.
"""

from __future__ import annotations

import enum
import struct

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 45
#: The oldest minor version we serve; older kernels lack fields we rely on.
MIN_KERNEL_MINOR_VERSION = 31

ROOT_ID = 1
#: Largest WRITE payload we ask for; the read buffer must hold it plus headers.
MAX_WRITE = 1 << 20
MAX_PAGES = 256
PAGE_SIZE = 4096
#: The largest extended attribute value, and list of names, the kernel's VFS allows.
XATTR_SIZE_MAX = 65536
#: Replies with an errno at or beyond this are refused by the kernel.
MAX_ERRNO = 511
#: The bit the kernel sets in ``unique`` of a request it queues again after FUSE_NOTIFY_RESEND.
UNIQUE_RESEND = 1 << 63


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53


def opname(opcode: int) -> str:
    """The opcode's name for messages and logs (``opcode N`` for an unknown one)."""
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode}"


#: Opcodes the kernel never expects an answer to.
NO_REPLY_OPCODES = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT, Opcode.NOTIFY_REPLY})


class InitFlag(enum.IntFlag):
    """The 64-bit INIT flag word: ``flags`` holds bits 0-31, ``flags2`` bits 32-63."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41
    REQUEST_TIMEOUT = 1 << 42


#: Minor version that introduced each flag we may ask for; below it we drop the flag.
INIT_FLAG_MINOR = {
    InitFlag.MAX_PAGES: 28,
    InitFlag.CACHE_SYMLINKS: 28,
    InitFlag.NO_OPENDIR_SUPPORT: 29,
    InitFlag.EXPLICIT_INVAL_DATA: 30,
    InitFlag.HANDLE_KILLPRIV_V2: 33,
    InitFlag.SETXATTR_EXT: 33,
    InitFlag.INIT_EXT: 36,
    InitFlag.SECURITY_CTX: 36,
    InitFlag.CREATE_SUPP_GROUP: 38,
    InitFlag.HAS_EXPIRE_ONLY: 38,
    InitFlag.DIRECT_IO_ALLOW_MMAP: 39,
    InitFlag.PASSTHROUGH: 40,
    InitFlag.NO_EXPORT_SUPPORT: 40,
    InitFlag.HAS_RESEND: 40,
    InitFlag.ALLOW_IDMAP: 40,
    InitFlag.OVER_IO_URING: 42,
    InitFlag.REQUEST_TIMEOUT: 43,
}


class FopenFlag(enum.IntFlag):
    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6
    PASSTHROUGH = 1 << 7


#: The only FOPEN bits the kernel accepts together with PASSTHROUGH (others give EIO).
FOPEN_PASSTHROUGH_COMPATIBLE = (
    FopenFlag.PASSTHROUGH | FopenFlag.DIRECT_IO | FopenFlag.PARALLEL_DIRECT_WRITES | FopenFlag.NOFLUSH
)


class FattrFlag(enum.IntFlag):
    MODE = 1 << 0
    UID = 1 << 1
    GID = 1 << 2
    SIZE = 1 << 3
    ATIME = 1 << 4
    MTIME = 1 << 5
    FH = 1 << 6
    ATIME_NOW = 1 << 7
    MTIME_NOW = 1 << 8
    LOCKOWNER = 1 << 9
    CTIME = 1 << 10
    KILL_SUIDGID = 1 << 11


class RenameFlag(enum.IntFlag):
    NOREPLACE = 1 << 0
    EXCHANGE = 1 << 1
    WHITEOUT = 1 << 2


class NotifyCode(enum.IntEnum):
    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7
    INC_EPOCH = 8
    PRUNE = 9


GETATTR_FH = 1
RELEASE_FLOCK_UNLOCK = 2
WRITE_CACHE = 1
WRITE_KILL_SUIDGID = 4
FSYNC_FDATASYNC = 1
LK_FLOCK = 1
OPEN_KILL_SUIDGID = 1
EXPIRE_ONLY = 1

# ioctl numbers on /dev/fuse (magic 229).
DEV_IOC_CLONE = 0x8004E500
DEV_IOC_BACKING_OPEN = 0x4010E501
DEV_IOC_BACKING_CLOSE = 0x4004E502

# --- structs (little-endian, natural alignment, no hidden padding) ----------

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
#: FUSE over io_uring (7.42): the command in an SQE's command area (flags commit_id qid padding[6]),
#: and struct fuse_uring_req_header, one per ring entry: in_out (the in header, then the out header),
#: op_in (the request's first argument), ring_ent_in_out (flags commit_id payload_sz padding reserved).
URING_CMD_REQ = struct.Struct("<QQH6x")
URING_CMD_REGISTER = 1
URING_CMD_COMMIT_AND_FETCH = 2
URING_HEADER_SIZE = 288
URING_OP_IN = 128  # offset of op_in, also its size
URING_ENT_IN_OUT = 256
URING_ENT_IN_OUT_FORMAT = struct.Struct("<QQII8x")

INIT_IN = struct.Struct("<IIIII44x")  # major minor max_readahead flags flags2 unused[11]
INIT_IN_MIN = struct.Struct("<IIII")  # the pre-7.36 16-byte form
# major minor max_readahead flags max_background congestion_threshold max_write
# time_gran max_pages map_alignment flags2 max_stack_depth request_timeout unused
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")

# fuse_attr: ino size blocks atime mtime ctime atimensec mtimensec ctimensec
#            mode nlink uid gid rdev blksize flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
# fuse_entry_out: nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec + attr
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])
# fuse_attr_out: attr_valid attr_valid_nsec dummy + attr
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])

FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
GETATTR_IN = struct.Struct("<IIQ")
# valid padding fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec
# mode unused4 uid gid unused5
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")  # mode umask
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")  # flags open_flags
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")  # fh unused padding lock_owner
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize pad spare
FSYNC_IN = struct.Struct("<QII")
SETXATTR_IN = struct.Struct("<IIII")  # size flags setxattr_flags padding (SETXATTR_EXT)
SETXATTR_IN_COMPAT = struct.Struct("<II")  # size flags
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
FILE_LOCK = struct.Struct("<QQII")  # start end type pid
LK_IN = struct.Struct("<QQQQIIII")  # fh owner start end type pid lk_flags padding
LK_OUT = FILE_LOCK
ACCESS_IN = struct.Struct("<II")
INTERRUPT_IN = struct.Struct("<Q")
BMAP_IN = struct.Struct("<QII")
IOCTL_IN = struct.Struct("<QIIQII")  # fh flags cmd arg in_size out_size
POLL_IN = struct.Struct("<QQII")  # fh kh flags events
FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("<QQII")  # fh offset whence padding
LSEEK_OUT = struct.Struct("<Q")
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")  # fh_in off_in nodeid_out fh_out off_out len flags
COPY_FILE_RANGE_OUT = struct.Struct("<Q")
STATX_IN = struct.Struct("<IIQII")  # getattr_flags reserved fh sx_flags sx_mask
# fuse_statx: mask blksize attributes nlink uid gid mode spare0 ino size blocks attributes_mask
#             atime(16) btime(16) ctime(16) mtime(16) rdev_major rdev_minor dev_major dev_minor spare2[14]
STATX = struct.Struct("<IIQIIIHHQQQQqIiqIiqIiqIiIIII112x")
STATX_OUT = struct.Struct("<QII16x" + STATX.format[1:])  # attr_valid attr_valid_nsec flags spare[2] stat
NOTIFY_RETRIEVE_IN = struct.Struct("<QQIIQQ")  # dummy1 offset size dummy2 dummy3 dummy4

DIRENT = struct.Struct("<QQII")  # ino off namelen type
DIRENTPLUS = struct.Struct(ENTRY_OUT.format + DIRENT.format[1:])

NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")  # parent namelen flags
NOTIFY_DELETE_OUT = struct.Struct("<QQII")  # parent child namelen padding
NOTIFY_STORE_OUT = struct.Struct("<QQII")  # nodeid offset size padding
NOTIFY_RETRIEVE_OUT = struct.Struct("<QQQII")  # notify_unique nodeid offset size padding

BACKING_MAP = struct.Struct("<iIQ")  # fd flags padding

_SIZES = {
    IN_HEADER: 40, OUT_HEADER: 16, URING_CMD_REQ: 24, URING_ENT_IN_OUT_FORMAT: 32,
    INIT_IN: 64, INIT_OUT: 64, ATTR: 88, ENTRY_OUT: 128,
    ATTR_OUT: 104, SETATTR_IN: 88, READ_IN: 40, WRITE_IN: 40, STATFS_OUT: 80, LK_IN: 48,
    STATX: 256, STATX_OUT: 288, DIRENTPLUS: 152, COPY_FILE_RANGE_IN: 56, OPEN_OUT: 16,
}
for _s, _n in _SIZES.items():
    assert _s.size == _n, (_s.format, _s.size, _n)
del _s, _n
