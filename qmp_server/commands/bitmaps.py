"""Dirty bitmap commands: block-dirty-bitmap-add/-remove/-clear/-enable/-disable/-merge
and x-debug-block-dirty-bitmap-sha256 (QEMU's block/monitor/bitmap-qmp-cmds.c).

A ``node`` argument names a node or a device's BlockBackend (bdrv_lookup_bs). Everything
runs under the graph lock; removing a persistent bitmap rewrites the image's bitmap
directory, so that one runs in the worker thread like other image writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blocklayer import bitmapops
from blocklayer.node import BlockNode

from ..dispatcher import CommandContext, CommandTable
from ..errors import QMPError
from .lookup import find_bs

if TYPE_CHECKING:
    from ..machine import Machine

table = CommandTable()


def _node(machine: Machine, name: str) -> BlockNode:
    """block_dirty_bitmap_lookup's node lookup and its text."""
    node = find_bs(machine, name, name)
    if node is None:
        raise QMPError(f"Node '{name}' not found")
    return node


@table.command("block-dirty-bitmap-add")
async def block_dirty_bitmap_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Create a bitmap (qmp_block_dirty_bitmap_add)."""
    machine = ctx.machine

    def apply() -> None:
        name = args["name"]
        if not name:
            raise QMPError("Bitmap name cannot be empty")
        node = find_bs(machine, args["node"], args["node"])
        if node is None:
            raise QMPError(f"Cannot find device='{args['node']}' nor node-name='{args['node']}'")
        bitmapops.add(node, name, args.get("granularity"), args.get("persistent", False),
                      args.get("disabled", False))

    await machine.block.run_light(apply)


@table.command("block-dirty-bitmap-remove")
async def block_dirty_bitmap_remove(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Delete a bitmap, from the image too if it is persistent."""
    machine = ctx.machine
    await machine.block.run(
        lambda: bitmapops.remove(_node(machine, args["node"]), args["name"]))


@table.command("block-dirty-bitmap-clear")
async def block_dirty_bitmap_clear(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Mark every bit clean."""
    machine = ctx.machine
    await machine.block.run_light(
        lambda: bitmapops.clear(_node(machine, args["node"]), args["name"]))


@table.command("block-dirty-bitmap-enable")
async def block_dirty_bitmap_enable(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Record writes again."""
    machine = ctx.machine
    await machine.block.run_light(
        lambda: bitmapops.set_enabled(_node(machine, args["node"]), args["name"], True))


@table.command("block-dirty-bitmap-disable")
async def block_dirty_bitmap_disable(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Stop recording writes."""
    machine = ctx.machine
    await machine.block.run_light(
        lambda: bitmapops.set_enabled(_node(machine, args["node"]), args["name"], False))


@table.command("block-dirty-bitmap-merge")
async def block_dirty_bitmap_merge(ctx: CommandContext, args: dict[str, Any]) -> None:
    """OR the sources into the target, all or nothing."""
    machine = ctx.machine

    def apply() -> None:
        node = _node(machine, args["node"])
        sources: list[str | tuple[BlockNode | None, str, str]] = []
        for item in args["bitmaps"]:
            if isinstance(item, str):
                sources.append(item)
            else:
                sources.append((find_bs(machine, item["node"], item["node"]), item["node"], item["name"]))
        bitmapops.merge(node, args["target"], sources)

    await machine.block.run_light(apply)


@table.command("x-debug-block-dirty-bitmap-sha256")
async def x_debug_block_dirty_bitmap_sha256(ctx: CommandContext,
                                            args: dict[str, Any]) -> dict[str, Any]:
    """The SHA-256 of the bitmap's data, as QEMU hashes it."""
    machine = ctx.machine
    digest = await machine.block.run_light(
        lambda: bitmapops.sha256(_node(machine, args["node"]), args["name"]))
    return {"sha256": digest}
