"""QMP errors: what a command handler raises to answer with an ``error`` object."""

from __future__ import annotations

from typing import Any


class QMPError(Exception):
    """An error reply: ``{"error": {"class": error_class, "desc": desc}}``.

    ``error_class`` is one of QEMU's QapiErrorClass names (GenericError, CommandNotFound,
    DeviceNotActive, DeviceNotFound, KVMMissingCap).
    """

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def to_wire(self) -> dict[str, Any]:
        """The ``error`` member of a QMP reply."""
        return {"class": self.error_class, "desc": self.desc}


class CommandNotFound(QMPError):
    """QEMU's CommandNotFound class."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc, "CommandNotFound")


def with_hints(error: QMPError) -> str:
    """``desc`` and the hint lines QEMU prints after it on the command line and in HMP
    (error_append_hint: "Is another process using the image [PATH]?"), which QMP replies
    leave out. Hints travel as exception notes on the error or on what caused it."""
    lines = [error.desc]
    cause: BaseException | None = error
    seen = 0
    while cause is not None and seen < 8:  # a cause chain is short; bound it anyway
        lines.extend(getattr(cause, "__notes__", []))
        cause = cause.__cause__
        seen += 1
    return "\n".join(lines)
