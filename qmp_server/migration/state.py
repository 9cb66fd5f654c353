"""Migration states and what query-migrate reports for them (QEMU 10.x)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import trio


class MigrationStatus(enum.StrEnum):
    """The MigrationStatus values this server goes through."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    DEVICE = "device"
    COMPLETED = "completed"
    FAILED = "failed"


#: QEMU's migration_is_running(): `migrate` and `migrate-set-capabilities` are refused.
RUNNING = frozenset({MigrationStatus.SETUP, MigrationStatus.ACTIVE, MigrationStatus.DEVICE,
                     MigrationStatus.CANCELLING})

PAGE_SIZE = 4096


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


@dataclass
class Outgoing:
    """The current (or last) outgoing migration."""

    status: MigrationStatus = MigrationStatus.NONE
    error: str | None = None
    #: time.monotonic() values; None until reached.
    started: float = 0.0
    active_at: float | None = None
    stopped_at: float | None = None
    finished_at: float | None = None
    bytes_before_stop: int = 0
    bytes_sent: int = 0
    scope: trio.CancelScope | None = field(default=None, repr=False)

    def ram(self, now: float) -> dict[str, Any]:
        """MigrationStats of a machine without guest RAM: only the stream bytes count."""
        end = self.finished_at if self.finished_at is not None else now
        elapsed = max(end - (self.active_at or self.started), 1e-6)
        done = self.status is MigrationStatus.COMPLETED
        return {
            "transferred": self.bytes_sent,
            "remaining": 0,
            "total": 0,
            "duplicate": 0,
            "normal": 0,
            "normal-bytes": 0,
            "dirty-pages-rate": 0,
            "mbps": round(self.bytes_sent * 8 / 1e6 / elapsed, 3),
            # QEMU syncs the (empty) dirty bitmap once when iterating starts, once at the end.
            "dirty-sync-count": 2 if done else 1,
            "postcopy-requests": 0,
            "page-size": PAGE_SIZE,
            "multifd-bytes": 0,
            "pages-per-second": 0,
            "precopy-bytes": self.bytes_before_stop,
            "downtime-bytes": self.bytes_sent - self.bytes_before_stop,
            "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": 0,
        }

    def info(self, now: float | None = None) -> dict[str, Any]:
        """The source's part of query-migrate (QEMU's fill_source_migration_info)."""
        now = time.monotonic() if now is None else now
        status = self.status
        info: dict[str, Any] = {}
        if status is MigrationStatus.NONE:
            return info
        info["status"] = str(status)
        if status in (MigrationStatus.ACTIVE, MigrationStatus.DEVICE, MigrationStatus.CANCELLING,
                      MigrationStatus.COMPLETED) and self.active_at is not None:
            info["setup-time"] = _ms(self.active_at - self.started)
            if status is MigrationStatus.COMPLETED:
                assert self.finished_at is not None and self.stopped_at is not None
                info["total-time"] = _ms(self.finished_at - self.started)
                info["downtime"] = _ms(self.finished_at - self.stopped_at)
            else:
                info["total-time"] = _ms(now - self.started)
                info["expected-downtime"] = 0
            info["ram"] = self.ram(now)
        if self.error is not None:
            info["error-desc"] = self.error
        return info


@dataclass
class Incoming:
    """The incoming migration of a machine started with ``-incoming``."""

    status: MigrationStatus = MigrationStatus.NONE
    error: str | None = None
    exit_on_error: bool = True
    #: QEMU accepts one migrate-incoming (or -incoming URI) per process.
    started: bool = False
    #: Where we listen(ed); reported until the incoming migration ends, as QEMU does.
    socket_addresses: list[dict[str, Any]] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        """The destination's part of query-migrate (QEMU's fill_destination_migration_info)."""
        info: dict[str, Any] = {}
        if self.socket_addresses:
            info["socket-address"] = list(self.socket_addresses)
        if self.status is not MigrationStatus.NONE:
            info["status"] = str(self.status)
        if self.error is not None:
            info["error-desc"] = self.error
        return info
