"""Descriptors passed with SCM_RIGHTS: getfd, closefd, add-fd, remove-fd, query-fdsets."""

from __future__ import annotations

from typing import Any

from ..dispatcher import CommandContext, CommandTable
from ..errors import QMPError
from ..fdsets import NO_FD, MonitorFds, current, fdsets_of

table = CommandTable()


def _monitor() -> MonitorFds:
    # Outside a QMP client (human-monitor-command's own monitor) nothing was received.
    monitor = current()
    if monitor is None:
        raise QMPError(NO_FD)
    return monitor


@table.command("getfd")
async def getfd(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Name the descriptor that came with the command (qmp_getfd)."""
    _monitor().getfd(args["fdname"])
    return {}


@table.command("closefd")
async def closefd(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Close a descriptor named with getfd (qmp_closefd)."""
    monitor = current()
    if monitor is None:
        raise QMPError(f"File descriptor named '{args['fdname']}' not found")
    monitor.closefd(args["fdname"])
    return {}


@table.command("add-fd")
async def add_fd(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Put the descriptor that came with the command into an fd set (qmp_add_fd)."""
    fd = _monitor().take_received()
    return fdsets_of(ctx.machine).add(fd, args.get("fdset-id"), args.get("opaque"))


@table.command("remove-fd")
async def remove_fd(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Remove a descriptor, or a whole set, from the fd sets (qmp_remove_fd)."""
    fdsets_of(ctx.machine).remove(args["fdset-id"], args.get("fd"), ctx.machine.vm.running)
    return {}


@table.command("query-fdsets")
async def query_fdsets(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """The fd sets and their descriptors (qmp_query_fdsets)."""
    return fdsets_of(ctx.machine).query()
