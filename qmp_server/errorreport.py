"""QEMU's error_report: one line on stderr, prefixed with the program's name.

Scripts (and QEMU's iotests filters) match on ``<argv[0] basename>: <message>``, so every
message the server prints for a user goes through here.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import os
import sys
from collections.abc import Iterator


def program_name() -> str:
    """The name errors start with: QEMU's is its argv[0] without the directory."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "qmp-server" if name in ("", "__main__.py", "-c") else name


class _MessageOptions:
    """``-msg timestamp=on,guest-name=on`` and the ``-name`` guest name (QEMU's globals
    message_with_timestamp, error_with_guestname and error_guest_name)."""

    timestamp = False
    guest_name = False
    name: str | None = None


def configure_messages(*, timestamp: bool | None = None, guest_name: bool | None = None,
                       name: str | None = None) -> None:
    """Apply ``-msg`` (or ``-name``, which names the guest) from now on, as QEMU's
    configure_msg does while it parses the command line: what was reported before stays
    as it was."""
    if timestamp is not None:
        _MessageOptions.timestamp = timestamp
    if guest_name is not None:
        _MessageOptions.guest_name = guest_name
    if name is not None:
        _MessageOptions.name = name


def _iso8601_now() -> str:
    # GLib's g_date_time_format_iso8601 on a UTC time, which QEMU's real_time_iso8601
    # uses: microseconds only when there are some, "Z" for UTC.
    now = datetime.datetime.now(datetime.UTC)
    text = now.strftime("%Y-%m-%dT%H:%M:%S")
    if now.microsecond:
        text += f".{now.microsecond:06d}"
    return text + "Z"


def message_prefix() -> str:
    """What QEMU's vreport prints before a message: the timestamp (``-msg timestamp=on``),
    the guest name (``-msg guest-name=on`` with ``-name``), then ``<program>: ``."""
    prefix = ""
    if _MessageOptions.timestamp:
        prefix = _iso8601_now() + " "
    if _MessageOptions.guest_name and _MessageOptions.name is not None:
        prefix += _MessageOptions.name + " "
    return prefix + program_name() + ": "


def error_report(message: str) -> None:
    """Print ``message`` on stderr as QEMU's error_report does."""
    sys.stderr.write(f"{message_prefix()}{message}\n")
    sys.stderr.flush()


def warn_report(message: str, hint: str = "") -> None:
    """Print a warning as QEMU's warn_report does (in the current :func:`location`),
    then ``hint`` as it is (QEMU's error_printf: no prefix, no timestamp)."""
    where = _LOCATION.get()
    located = f"{where}: " if where else ""
    sys.stderr.write(f"{message_prefix()}{located}warning: {message}\n{hint}")
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
        prefix = f"{message_prefix()}{where}: " if where else message_prefix()
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
