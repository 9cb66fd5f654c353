"""Commands of the monitor itself and of the VM run state."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..dispatcher import CommandContext, CommandTable
from ..errors import QMPError
from ..introspect import schema_info
from ..protocol.encoding import PreEncoded, encode_text
from ..schema import Schema
from ..version import version_info

if TYPE_CHECKING:
    from ..machine import Machine

table = CommandTable()


@table.command("qmp_capabilities")
async def qmp_capabilities(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Leave capabilities negotiation; ``enable: ["oob"]`` turns on out-of-band execution.

    The session decides (QEMU's qmp_qmp_capabilities: an error once negotiation is over);
    this is its entry point with the arguments checked against the schema.
    """
    ctx.session.negotiate(args.get("enable", []))


@table.query("query-version")
def query_version(machine: Machine) -> dict[str, Any]:
    """The QEMU version whose semantics we follow; ``package`` names us."""
    return version_info()


# The two large answers never change while the process runs: encoded once per schema.
_ENCODED: weakref.WeakKeyDictionary[Schema, dict[str, PreEncoded]] = weakref.WeakKeyDictionary()


def _encoded_once(schema: Schema, command: str, build: Callable[[], Any]) -> PreEncoded:
    answers = _ENCODED.setdefault(schema, {})
    answer = answers.get(command)
    if answer is None:
        answer = answers[command] = PreEncoded(encode_text(build()))
    return answer


@table.query("query-commands")
def query_commands(machine: Machine) -> PreEncoded:
    """Every command available after negotiation."""
    schema = machine.schema
    return _encoded_once(schema, "query-commands", lambda: [{"name": name} for name in schema.commands])


@table.query("query-qmp-schema")
def query_qmp_schema(machine: Machine) -> PreEncoded:
    """Introspection in QEMU's SchemaInfo format, generated from schema/."""
    schema = machine.schema
    return _encoded_once(schema, "query-qmp-schema", lambda: schema_info(schema))


@table.query("query-name")
def query_name(machine: Machine) -> dict[str, str]:
    """The ``-name`` given on the command line, if any."""
    name = machine.name
    return {} if name is None else {"name": name}


@table.query("query-status")
def query_status(machine: Machine) -> dict[str, Any]:
    """Run state, QEMU 10.x form (no ``singlestep``)."""
    vm = machine.vm
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
    vm = ctx.machine.vm
    if await vm.shutdown("host-qmp-quit"):
        ctx.after_reply.append(lambda: vm.request_exit(0))


@table.command("human-monitor-command")
async def human_monitor_command(ctx: CommandContext, args: dict[str, Any]) -> str:
    """Run an HMP command line and return its text output."""
    if "cpu-index" in args and args["cpu-index"] != 0:
        # No guest CPUs exist; QEMU's text for an invalid CPU index.
        raise QMPError("Invalid CPU index")
    return await ctx.machine.hmp.execute(args["command-line"])
