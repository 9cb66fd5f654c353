"""The VM run state: QEMU's states, its transition whitelist, and stop/cont (QEMU 10.x)."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Protocol

import trio

from .errors import QMPError
from .events import EventBus

log = logging.getLogger(__name__)


class RunState(enum.StrEnum):
    """QEMU's RunState enum (qapi/run-state.json)."""

    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"


def _edges(source: RunState, *targets: RunState) -> set[tuple[RunState, RunState]]:
    return {(source, target) for target in targets}


S = RunState
# QEMU's whitelist (system/runstate.c); anything else is a bug in the caller.
TRANSITIONS: frozenset[tuple[RunState, RunState]] = frozenset(
    _edges(S.PRELAUNCH, S.INMIGRATE, S.RUNNING, S.FINISH_MIGRATE)
    | _edges(S.DEBUG, S.RUNNING, S.FINISH_MIGRATE, S.PRELAUNCH, S.SUSPENDED)
    | _edges(
        S.INMIGRATE, S.INTERNAL_ERROR, S.IO_ERROR, S.PAUSED, S.RUNNING, S.SHUTDOWN, S.SUSPENDED,
        S.WATCHDOG, S.GUEST_PANICKED, S.FINISH_MIGRATE, S.PRELAUNCH, S.POSTMIGRATE, S.COLO,
    )
    | _edges(S.INTERNAL_ERROR, S.PAUSED, S.FINISH_MIGRATE, S.PRELAUNCH)
    | _edges(S.IO_ERROR, S.RUNNING, S.FINISH_MIGRATE, S.PRELAUNCH)
    | _edges(S.PAUSED, S.RUNNING, S.FINISH_MIGRATE, S.POSTMIGRATE, S.PRELAUNCH, S.COLO)
    | _edges(S.POSTMIGRATE, S.RUNNING, S.FINISH_MIGRATE, S.PRELAUNCH)
    | _edges(
        S.FINISH_MIGRATE, S.RUNNING, S.PAUSED, S.POSTMIGRATE, S.PRELAUNCH, S.COLO,
        S.INTERNAL_ERROR, S.IO_ERROR, S.SHUTDOWN, S.SUSPENDED, S.WATCHDOG, S.GUEST_PANICKED,
    )
    | _edges(S.RESTORE_VM, S.RUNNING, S.PRELAUNCH)
    | _edges(S.COLO, S.RUNNING, S.PRELAUNCH, S.SHUTDOWN)
    | _edges(
        S.RUNNING, S.DEBUG, S.INTERNAL_ERROR, S.IO_ERROR, S.PAUSED, S.FINISH_MIGRATE,
        S.RESTORE_VM, S.SAVE_VM, S.SHUTDOWN, S.WATCHDOG, S.GUEST_PANICKED, S.COLO, S.SUSPENDED,
    )
    | _edges(S.SAVE_VM, S.RUNNING)
    | _edges(S.SHUTDOWN, S.PAUSED, S.FINISH_MIGRATE, S.PRELAUNCH, S.COLO)
    | _edges(S.SUSPENDED, S.RUNNING, S.FINISH_MIGRATE, S.PRELAUNCH, S.COLO, S.PAUSED)
    | _edges(S.WATCHDOG, S.RUNNING, S.FINISH_MIGRATE, S.PRELAUNCH, S.COLO)
    | _edges(S.GUEST_PANICKED, S.RUNNING, S.FINISH_MIGRATE, S.PRELAUNCH)
)
del S

LIVE_STATES = frozenset({RunState.RUNNING, RunState.SUSPENDED})


class InvalidTransition(AssertionError):
    """A transition QEMU would abort() on: always a bug in the server, never user error."""


class BlockHooks(Protocol):
    """What the run state needs from the block layer."""

    async def drain_and_flush_all(self) -> None:
        """Finish in-flight I/O and flush every node (``stop`` and migration)."""
        ...

    async def activate_all(self) -> None:
        """Activate every node; raises QMPError (e.g. a lock conflict) on failure."""
        ...


class VM:
    """The virtual machine's run state, as ``query-status``, ``stop`` and ``cont`` see it."""

    def __init__(self, events: EventBus, *, start_paused: bool = False, incoming: bool = False,
                 no_shutdown: bool = False, no_reboot: bool = False) -> None:
        self.events = events
        #: ``-no-shutdown``: a shutdown request (but ``quit`` or a signal) stops the VM
        #: instead of ending the process.
        self.no_shutdown = no_shutdown
        #: ``-no-reboot``: a reset request is a shutdown request instead.
        self.no_reboot = no_reboot
        #: Set when the process should end (``quit``, a signal, a guest power-off, a
        #: failed ``-incoming``); the server stops serving and exits with ``exit_code``.
        self.exit_requested = trio.Event()
        self.exit_code = 0
        # QEMU: autostart is cleared by -S and by `stop` during inmigrate, set by `cont`.
        self.autostart = not start_paused
        self.state = RunState.PRELAUNCH
        self.block: BlockHooks | None = None
        #: Called after every state change (QEMU's vm change state handlers).
        self.state_listeners: list[Callable[[], None]] = []
        if incoming:
            self.set_state(RunState.INMIGRATE)

    @property
    def running(self) -> bool:
        """``running`` of query-status: true only in state ``running``."""
        return self.state is RunState.RUNNING

    @property
    def live(self) -> bool:
        """Whether the guest is executing (running or suspended)."""
        return self.state in LIVE_STATES

    def set_state(self, new: RunState) -> None:
        """Change state; raises InvalidTransition for a transition QEMU forbids."""
        if new is self.state:
            return
        if (self.state, new) not in TRANSITIONS:
            raise InvalidTransition(f"invalid runstate transition: '{self.state}' -> '{new}'")
        self.state = new
        for listener in self.state_listeners:
            listener()

    def start_after_launch(self) -> None:
        """Machine creation done: run now unless -S or -incoming holds us back."""
        if self.state is RunState.PRELAUNCH and self.autostart:
            self.vm_start()

    async def vm_stop(self, new_state: RunState) -> bool:
        """QEMU's vm_stop: pause if live (STOP event), then always drain and flush.

        Returns whether the VM was live before.
        """
        was_live = self.live
        if was_live:
            self.set_state(new_state)
            self.events.emit("STOP")
        if self.block is not None:
            try:
                await self.block.drain_and_flush_all()
            except QMPError as err:
                # QEMU ignores the flush result in qmp_stop; keep a trace for debugging.
                log.warning("flush on stop failed: %s", err.desc)
        return was_live

    def vm_start(self) -> None:
        """QEMU's vm_start: RESUME and ``running`` unless already running."""
        if self.state is RunState.RUNNING:
            return
        self.set_state(RunState.RUNNING)
        self.events.emit("RESUME")

    def request_exit(self, code: int = 0) -> None:
        """Ask the server to stop serving and exit with ``code``."""
        self.exit_code = code
        self.exit_requested.set()

    async def shutdown(self, reason: str, *, guest: bool = False) -> bool:
        """A shutdown request, as QEMU's main_loop_should_exit handles it.

        SHUTDOWN is emitted at once. ``quit`` and a signal always end the process:
        qmp_quit and qemu_system_killed force the power-off action. Any other request (a
        guest power-off, a reset with ``-no-reboot``) with ``-no-shutdown`` stops the VM
        in ``shutdown`` instead. Returns whether the caller should now request the exit
        (QMP ``quit`` does it after its reply).
        """
        self.events.emit("SHUTDOWN", {"guest": guest, "reason": reason})
        if self.no_shutdown and reason not in ("host-qmp-quit", "host-signal"):
            await self.vm_stop(RunState.SHUTDOWN)
            return False
        return True

    async def reset_request(self, reason: str) -> bool:
        """A reset request (``system_reset``), as QEMU's qemu_system_reset_request and
        main_loop_should_exit handle it: RESET, after which any state but running,
        inmigrate and finish-migrate becomes prelaunch (so a shut down VM can ``cont``).
        With ``-no-reboot`` (reboot_action shutdown) it is a shutdown request instead
        (:meth:`shutdown`). Returns whether the caller should request the exit after
        its reply.
        """
        guest = reason.startswith("guest-")
        if self.no_reboot:
            return await self.shutdown(reason, guest=guest)
        self.events.emit("RESET", {"guest": guest, "reason": reason})
        if self.state not in (RunState.RUNNING, RunState.INMIGRATE, RunState.FINISH_MIGRATE):
            self.set_state(RunState.PRELAUNCH)
        return False

    async def stop(self) -> None:
        """The ``stop`` command."""
        if self.state is RunState.INMIGRATE:
            self.autostart = False
            return
        await self.vm_stop(RunState.PAUSED)

    async def cont(self) -> None:
        """The ``cont`` command (QEMU 10.x: allowed during inmigrate)."""
        if self.state in (RunState.INTERNAL_ERROR, RunState.SHUTDOWN):
            raise QMPError("Resetting the Virtual Machine is required")
        if self.state is RunState.SUSPENDED:
            return
        if self.state is RunState.FINISH_MIGRATE:
            raise QMPError("Migration is not finalized yet")
        if self.state is RunState.INMIGRATE:
            self.autostart = True
            return
        # After a completed outgoing migration the images are inactive: activation takes
        # the locks back, or fails (destination running) and the VM stays where it is.
        if self.block is not None:
            await self.block.activate_all()
        self.vm_start()
