"""Commands of the monitor itself and of the VM run state."""

from __future__ import annotations

from typing import Any

from .. import QEMU_VERSION, __version__
from ..dispatcher import CommandContext, CommandTable
from ..errors import CommandNotFound, QMPError
from ..session import Mode

table = CommandTable()


@table.command("qmp_capabilities")
async def qmp_capabilities(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Leave capabilities negotiation; ``enable: ["oob"]`` turns on out-of-band execution."""
    if ctx.session.mode is Mode.COMMAND:
        raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
    enable: list[str] = args.get("enable", [])
    ctx.session.negotiated(enable)


@table.command("query-version")
async def query_version(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """The QEMU version whose semantics we follow; ``package`` names us."""
    major, minor, micro = QEMU_VERSION
    return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": f"qmp-server {__version__}"}


@table.command("query-commands")
async def query_commands(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, str]]:
    """Every command available after negotiation."""
    return [{"name": name} for name in ctx.machine.schema.commands]


@table.command("query-qmp-schema")
async def query_qmp_schema(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Introspection in QEMU's SchemaInfo format, generated from schema/."""
    return ctx.machine.schema.introspect()


@table.command("query-name")
async def query_name(ctx: CommandContext, args: dict[str, Any]) -> dict[str, str]:
    """The ``-name`` given on the command line, if any."""
    name = ctx.machine.name
    return {} if name is None else {"name": name}


@table.command("query-status")
async def query_status(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Run state, QEMU 10.x form (no ``singlestep``)."""
    vm = ctx.machine.vm
    return {"status": str(vm.state), "running": vm.running}


@table.command("stop")
async def stop(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Pause the VM; always drains and flushes the block devices."""
    await ctx.machine.vm.stop()


@table.command("cont")
async def cont(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Resume the VM, activating every block node first."""
    await ctx.machine.vm.cont()


@table.command("quit")
async def quit_(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Shut down: SHUTDOWN event, the reply, then exit."""
    ctx.machine.events.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    ctx.after_reply.append(lambda: ctx.machine.request_exit(0))


@table.command("human-monitor-command")
async def human_monitor_command(ctx: CommandContext, args: dict[str, Any]) -> str:
    """Run an HMP command line and return its text output."""
    if "cpu-index" in args and args["cpu-index"] != 0:
        # No guest CPUs exist; QEMU's text for an invalid CPU index.
        raise QMPError("Invalid CPU index")
    return await ctx.machine.hmp.execute(args["command-line"])
