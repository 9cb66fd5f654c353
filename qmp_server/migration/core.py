"""What the service and both halves of a migration share.

The parts of the machine a migration acts on (run state, block service), the options,
the status of each direction with its MIGRATION events, and the test delays. The
service (:mod:`.service`) adds the QMP commands and starts :mod:`.source` and
:mod:`.destination`, which only see this.
"""

from __future__ import annotations

from ..blockservice import BlockService
from ..runstate import VM
from . import testhook
from .bitmaps import Backends
from .options import MigrationOptions
from .state import Incoming, MigrationStatus, Outgoing


class MigrationCore:
    """The migration state of one machine."""

    def __init__(self, vm: VM, block: BlockService, options: MigrationOptions) -> None:
        self.vm = vm
        self.block = block
        self.options = options
        self.outgoing = Outgoing()
        self.incoming = Incoming()
        #: Named BlockBackends with their root nodes (set by the wiring; dirty-bitmaps).
        self.backends: Backends = lambda: []
        try:
            self.delays = testhook.Delays.from_environment()
            self.delay_error: str | None = None
        except ValueError as err:
            self.delays = testhook.Delays()
            self.delay_error = str(err)

    def _event(self, status: MigrationStatus) -> None:
        # QEMU's migrate_generate_event: only with the 'events' capability.
        if self.options.events:
            self.vm.events.emit("MIGRATION", {"status": str(status)})

    def set_outgoing_status(self, status: MigrationStatus) -> None:
        """Move the outgoing migration to ``status`` (MIGRATION event if enabled)."""
        self.outgoing.status = status
        self._event(status)

    def set_incoming_status(self, status: MigrationStatus) -> None:
        """Move the incoming migration to ``status`` (MIGRATION event if enabled)."""
        self.incoming.status = status
        self._event(status)
