"""Migration commands (arguments are validated against the schema before a handler runs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..dispatcher import CommandContext, CommandTable

if TYPE_CHECKING:
    from ..machine import Machine

table = CommandTable()


@table.command("migrate")
async def migrate(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Start migrating to ``uri``; progress shows in query-migrate and MIGRATION events."""
    await ctx.machine.migration.migrate(args.get("uri"), bool(args.get("resume", False)))
    return {}


@table.command("migrate-incoming")
async def migrate_incoming(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Listen for the incoming migration of a machine started with ``-incoming defer``."""
    await ctx.machine.migration.migrate_incoming(args.get("uri"), bool(args.get("exit-on-error", True)))
    return {}


@table.command("migrate_cancel")
async def migrate_cancel(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Cancel the outgoing migration (no error when there is none)."""
    ctx.machine.migration.cancel()
    return {}


@table.command("migrate-start-postcopy")
async def migrate_start_postcopy(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Ask the outgoing migration to switch to postcopy (QEMU's checks; no RAM to copy)."""
    ctx.machine.migration.start_postcopy()
    return {}


@table.query("query-migrate")
def query_migrate(machine: Machine) -> dict[str, Any]:
    """State and statistics of the current or last migration; ``{}`` before any."""
    return machine.migration.query()


@table.command("migrate-set-capabilities")
async def migrate_set_capabilities(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Switch capabilities; only ``events`` changes behaviour, the others are recorded."""
    ctx.machine.migration.set_capabilities(args["capabilities"])
    return {}


@table.query("query-migrate-capabilities")
def query_migrate_capabilities(machine: Machine) -> list[dict[str, Any]]:
    """Every capability and its state, in QEMU's order."""
    return machine.migration.query_capabilities()


@table.command("migrate-set-parameters")
async def migrate_set_parameters(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Change parameters (checked as QEMU checks them; recorded, not acted upon)."""
    ctx.machine.migration.set_parameters(args)
    return {}


@table.query("query-migrate-parameters")
def query_migrate_parameters(machine: Machine) -> dict[str, Any]:
    """The current parameters."""
    return machine.migration.query_parameters()
