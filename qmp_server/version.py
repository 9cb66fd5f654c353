"""The one place the server's version facts are spelled out.

QEMU reports its version in the QMP greeting, ``query-version``, HMP ``info version``,
the HMP banner and ``-version``; all of them come from here.
"""

from __future__ import annotations

from typing import Any

from . import QEMU_VERSION, __version__

#: The ``package`` string of QEMU's VersionInfo: it names us, not a QEMU build.
PACKAGE = f"qmp-server {__version__}"


def version_info() -> dict[str, Any]:
    """QEMU's VersionInfo, members in the schema's order (the encoder writes QEMU's)."""
    major, minor, micro = QEMU_VERSION
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": PACKAGE}


def version_string() -> str:
    """``MAJOR.MINOR.MICRO`` of the QEMU release we follow."""
    return ".".join(str(part) for part in QEMU_VERSION)
