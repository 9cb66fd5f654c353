"""qcow2 format driver: a pure-Python implementation of QEMU's qcow2 block driver."""

from .driver import Qcow2Driver

__all__ = ["Qcow2Driver"]
