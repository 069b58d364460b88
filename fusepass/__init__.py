"""fusepass: FUSE filesystems in pure Python, with the kernel's passthrough data path."""

from .mount import MountError, MountOptions
from .ops import Attr, Changes, Context, DirListing, Entry, Opened, Operations, StatfsReply, StatxReply
from .session import Session, SessionError

__version__ = "0.1.0"

__all__ = [
    "Attr", "Changes", "Context", "DirListing", "Entry", "MountError", "MountOptions", "Opened",
    "Operations", "Session", "SessionError", "StatfsReply", "StatxReply", "__version__",
]
