"""Device commands: device_add, device_del, query-block (the disk frontends)."""

from __future__ import annotations

from functools import partial
from typing import Any

from ..dispatcher import CommandContext, CommandTable

table = CommandTable()


@table.command("device_add")
async def device_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Plug a disk frontend into the machine (qmp_device_add)."""
    await ctx.machine.block.run_light(partial(ctx.machine.devices.device_add, dict(args)))


@table.command("device_del")
async def device_del(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Unplug a device; the guest we stand in for acknowledges at once.

    QEMU replies first and sends DEVICE_DELETED when the guest has ejected the device
    (for a virtio-blk-pci: its virtio backend, then the device itself), hence the events
    after the reply.
    """
    machine = ctx.machine
    events = await machine.block.run_light(machine.devices.device_del, args["id"])

    def send() -> None:
        for data in events:
            machine.events.emit("DEVICE_DELETED", data)

    ctx.after_reply.append(send)


@table.command("query-block")
async def query_block(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Every named BlockBackend and every device's backend (qmp_query_block)."""
    return await ctx.machine.block.run_light(ctx.machine.devices.query_block)
