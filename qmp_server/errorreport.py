"""QEMU's error_report: one line on stderr, prefixed with the program's name.

Scripts (and QEMU's iotests filters) match on ``<argv[0] basename>: <message>``, so every
message the server prints for a user goes through here.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
from collections.abc import Iterator


def program_name() -> str:
    """The name errors start with: QEMU's is its argv[0] without the directory."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "qmp-server" if name in ("", "__main__.py", "-c") else name


def error_report(message: str) -> None:
    """Print ``message`` on stderr as QEMU's error_report does."""
    sys.stderr.write(f"{program_name()}: {message}\n")
    sys.stderr.flush()


def info_print(line: str) -> None:
    """A line QEMU prints on stdout with printf (bdrv_img_create's ``Formatting ...``),
    flushed at once as QEMU flushes it."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


#: The command-line option being processed (QEMU's Location, loc_set_cmdline): messages
#: reported meanwhile name it, "<program>: -blockdev TEXT: warning: ...".
_LOCATION: contextvars.ContextVar[str | None] = contextvars.ContextVar("location", default=None)


@contextlib.contextmanager
def location(option: str) -> Iterator[None]:
    """Report messages as coming from ``option`` (e.g. ``-blockdev TEXT``) meanwhile."""
    token = _LOCATION.set(option)
    try:
        yield
    finally:
        _LOCATION.reset(token)


#: A log record with this attribute true continues the previous message, as QEMU's
#: error_printf after a warn_report: printed as it is, no prefix, no added newline.
HINT = "qemu_hint"


class _QemuStyle(logging.Formatter):
    """Log records as QEMU's error_report/warn_report print them."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if getattr(record, HINT, False):
            return message
        where = _LOCATION.get()
        prefix = f"{program_name()}: {where}: " if where else f"{program_name()}: "
        if record.levelno < logging.ERROR:
            # warn_report (and info_report, which QEMU prints the same way)
            return f"{prefix}warning: {message}"
        return f"{prefix}{message}"


class _QemuHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def emit(self, record: logging.LogRecord) -> None:
        # A hint ends where QEMU's error_printf ends it: without a newline.
        self.terminator = "" if getattr(record, HINT, False) else "\n"
        super().emit(record)


def report_log_records() -> None:
    """Send the block layer's warnings and errors (it logs QEMU's texts, knowing nothing
    of the program) to stderr in QEMU's format: ``<program>: warning: <text>``."""
    handler = _QemuHandler(sys.stderr)
    handler.setFormatter(_QemuStyle())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
