"""fusepy and mfusepy programs on fusepass.

``fusepass.compat.fusepy`` provides the public API of fusepy 3.0.1 and
``fusepass.compat.mfusepy`` that of mfusepy 3.1.1, with their signatures and behaviour, served
through fusepass's session and path layer instead of libfuse. A program moves by changing
its import (``import fusepass.compat.fusepy as fuse``), or with no change at all through the
launcher, which makes ``import fuse``, ``import fusepy`` and ``import mfusepy`` resolve here::

    python -m fusepass.compat PROGRAM [ARGS...]
    python -m fusepass.compat -m MODULE [ARGS...]

A program that sets ``use_passthrough = True`` on its Operations class declares that the
``fh`` its ``open`` and ``create`` return is a descriptor of a real file holding the data
(as a loopback's ``os.open`` is): those files are passed through the kernel. Whatever fusepass
cannot do (``ioctl``, ``lock``, ``poll``, an unknown libfuse option...) fails at ``FUSE(...)``
with ``Unsupported``, whose message names it.
"""

from .bridge import Unsupported

__all__ = ["Unsupported"]
