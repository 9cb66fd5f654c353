"""External snapshots: blockdev-snapshot and blockdev-snapshot-sync (QEMU's blockdev.c).

Both run under the graph lock in the worker thread: they flush the old top and may
create and write a new image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blocklayer import overlay as overlays
from blocklayer.node import BlockNode

from ..dispatcher import CommandContext, CommandTable
from ..errors import QMPError

if TYPE_CHECKING:
    from ..machine import Machine

table = CommandTable()


def _lookup(machine: Machine, device: str | None, node_name: str | None) -> BlockNode:
    """bdrv_lookup_bs(device, node_name): a named BlockBackend's node, else a node."""
    if device is not None:
        for blk, _ in machine.devices.backends():
            if blk.name and blk.name == device:
                if blk.node is None:
                    raise QMPError(f"Device '{device}' has no medium")
                return blk.node
    if node_name is not None:
        node = machine.block.graph.find(node_name)
        if node is not None:
            return node
    raise QMPError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")


@table.command("blockdev-snapshot")
async def blockdev_snapshot(ctx: CommandContext, args: dict[str, Any]) -> None:
    """The overlay (added with blockdev-add, backing null) goes on top of ``node``."""
    machine = ctx.machine

    def apply() -> None:
        old = _lookup(machine, args["node"], args["node"])
        overlays.prepare_old_top(machine.block.graph, old)
        new = _lookup(machine, args["overlay"], args["overlay"])
        overlays.check_overlay(new)
        overlays.attach(machine.block.graph, new, old)

    await machine.block.run(apply)


@table.command("blockdev-snapshot-sync")
async def blockdev_snapshot_sync(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Create the overlay image (unless mode=existing), open it, put it on top."""
    machine = ctx.machine
    node_name: str | None = args.get("node-name")
    request = overlays.SyncRequest(snapshot_file=args["snapshot-file"],
                                   node_name=args.get("snapshot-node-name"),
                                   format=args.get("format", "qcow2"),
                                   existing=args.get("mode", "absolute-paths") == "existing",
                                   by_node_name=node_name is not None)

    def apply() -> None:
        old = _lookup(machine, args.get("device"), node_name)
        overlays.blockdev_snapshot_sync(machine.block.graph, old, request)

    await machine.block.run(apply)
