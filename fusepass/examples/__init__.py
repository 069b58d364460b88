"""Runnable example filesystems: ``python -m fusepass.examples.NAME MOUNTPOINT``."""
