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
