"""A test hook that stretches chosen migration phases, so tests can act inside them.

Set ``QMP_SERVER_TEST_MIGRATION_DELAY`` to ``PHASE=SECONDS[,PHASE=SECONDS...]`` in the
environment of a server process; unset (the default) means no delay anywhere. Phases:

``connect``
    source, status ``setup``, before connecting to the destination
``active``
    source, status ``active``, destination accepted the configuration, VM still running
``device``
    source, status ``device``: VM stopped and flushed, nodes still active
``inactivated``
    source, status ``device``: nodes inactive, end marker not yet sent
``incoming-end``
    destination, status ``active``: end marker received, nodes not yet activated
``incoming-ack``
    destination, status ``active``: activated and started (or paused), MIGRATION
    ``completed`` and the acknowledgement not yet sent

A delay is an ordinary Trio sleep inside the migration task: ``migrate_cancel`` interrupts
it, and the source watches the stream meanwhile, so a destination that dies during a
delay is noticed at once (as QEMU notices it while it is still sending RAM).
"""

from __future__ import annotations

import os

import trio

ENV = "QMP_SERVER_TEST_MIGRATION_DELAY"
PHASES = frozenset({"connect", "active", "device", "inactivated", "incoming-end", "incoming-ack"})


def parse(text: str) -> dict[str, float]:
    """Parse the variable's value; ValueError names what is wrong."""
    delays: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        phase, sep, seconds = item.partition("=")
        if not sep or phase not in PHASES:
            raise ValueError(f"{ENV}: expected PHASE=SECONDS with PHASE one of "
                             f"{', '.join(sorted(PHASES))}, got '{item}'")
        delays[phase] = float(seconds)
        if delays[phase] < 0:
            raise ValueError(f"{ENV}: negative delay for '{phase}'")
    return delays


class Delays:
    """The configured delays of one process."""

    def __init__(self, delays: dict[str, float] | None = None) -> None:
        self.delays = delays or {}

    @classmethod
    def from_environment(cls) -> Delays:
        """Read ``QMP_SERVER_TEST_MIGRATION_DELAY`` (ValueError if malformed)."""
        text = os.environ.get(ENV)
        return cls(parse(text) if text else None)

    def __contains__(self, phase: str) -> bool:
        return bool(self.delays.get(phase))

    async def pause(self, phase: str) -> None:
        """Sleep for the phase's delay, if any (cancellable)."""
        seconds = self.delays.get(phase)
        if seconds:
            await trio.sleep(seconds)
