"""QEMU's error_report: one line on stderr, prefixed with the program's name.

Scripts (and QEMU's iotests filters) match on ``<argv[0] basename>: <message>``, so every
message the server prints for a user goes through here.
"""

from __future__ import annotations

import os
import sys


def program_name() -> str:
    """The name errors start with: QEMU's is its argv[0] without the directory."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "qmp-server" if name in ("", "__main__.py", "-c") else name


def error_report(message: str) -> None:
    """Print ``message`` on stderr as QEMU's error_report does."""
    sys.stderr.write(f"{program_name()}: {message}\n")
    sys.stderr.flush()
