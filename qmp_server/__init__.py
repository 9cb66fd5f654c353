"""qmp-server: a QMP monitor server that stands in for QEMU's block layer and VM run state."""

__version__ = "0.1.0"

# The QEMU release whose QMP semantics this server follows; reported in the greeting.
QEMU_VERSION = (10, 1, 0)
