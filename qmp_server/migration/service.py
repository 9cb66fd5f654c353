"""Live migration between two servers over shared storage (interface; see issue 4)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ..machine import Machine


class MigrationService:
    """Outgoing and incoming migration of one machine."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def check_incoming_uri(self) -> None:
        """Validate ``-incoming`` at start-up; raise QMPError with the message to print."""

    async def start_incoming(self, nursery: trio.Nursery) -> None:
        """Start listening when ``-incoming`` named a URI (not ``defer``)."""
