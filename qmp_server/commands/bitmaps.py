"""Dirty bitmap commands: block-dirty-bitmap-add/-remove/-clear/-enable/-disable/-merge
and x-debug-block-dirty-bitmap-sha256 (QEMU's block/monitor/bitmap-qmp-cmds.c).

A ``node`` argument names a node or a device's BlockBackend (bdrv_lookup_bs). Everything
runs under the graph lock; removing a persistent bitmap rewrites the image's bitmap
directory, so that one runs in the worker thread like other image writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from blocklayer import bitmapops
from blocklayer.dirtybitmap import DirtyBitmap
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


#: A bitmap change made, and how to take it back (a transaction that fails later).
Undo = Callable[[], None]


def _restore(node: BlockNode, bitmap: DirtyBitmap) -> Undo:
    bits, disabled = bytes(bitmap.bits), bitmap.disabled

    def undo() -> None:
        bitmap.bits[:] = bits
        bitmap.disabled = disabled
        node.touch()

    return undo


def apply_add(machine: Machine, args: dict[str, Any]) -> Undo:
    """qmp_block_dirty_bitmap_add; the undo removes the new bitmap (the transaction
    action's abort). Under the graph lock."""
    name = args["name"]
    if not name:
        raise QMPError("Bitmap name cannot be empty")
    node = find_bs(machine, args["node"], args["node"])
    if node is None:
        raise QMPError(f"Cannot find device='{args['node']}' nor node-name='{args['node']}'")
    bitmap = bitmapops.add(node, name, args.get("granularity"), args.get("persistent", False),
                           args.get("disabled", False))

    def undo() -> None:
        if bitmap in node.dirty_bitmaps:
            node.dirty_bitmaps.remove(bitmap)
            node.touch()

    return undo


def check_remove(machine: Machine, args: dict[str, Any]) -> Callable[[], None]:
    """block_dirty_bitmap_remove's checks; returns the removal itself, which a
    transaction makes at commit (it rewrites the image's bitmap directory)."""
    node = _node(machine, args["node"])
    bitmapops.check_removable(node, args["name"])
    return lambda: bitmapops.remove(node, args["name"])


def apply_clear(machine: Machine, args: dict[str, Any]) -> Undo:
    """qmp_block_dirty_bitmap_clear, undoable."""
    node = _node(machine, args["node"])
    undo = _restore(node, bitmapops.lookup(node, args["name"]))
    bitmapops.clear(node, args["name"])
    return undo


def apply_enable(machine: Machine, args: dict[str, Any], enabled: bool) -> Undo:
    """qmp_block_dirty_bitmap_enable / _disable, undoable."""
    node = _node(machine, args["node"])
    undo = _restore(node, bitmapops.lookup(node, args["name"]))
    bitmapops.set_enabled(node, args["name"], enabled)
    return undo


def apply_merge(machine: Machine, args: dict[str, Any]) -> Undo:
    """block_dirty_bitmap_merge, undoable."""
    node = _node(machine, args["node"])
    sources: list[str | tuple[BlockNode | None, str, str]] = []
    for item in args["bitmaps"]:
        if isinstance(item, str):
            sources.append(item)
        else:
            sources.append((find_bs(machine, item["node"], item["node"]), item["node"], item["name"]))
    undo = _restore(node, bitmapops.lookup(node, args["target"]))
    bitmapops.merge(node, args["target"], sources)
    return undo


@table.command("block-dirty-bitmap-add")
async def block_dirty_bitmap_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Create a bitmap (qmp_block_dirty_bitmap_add)."""
    await ctx.machine.block.run_light(apply_add, ctx.machine, args)


@table.command("block-dirty-bitmap-remove")
async def block_dirty_bitmap_remove(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Delete a bitmap, from the image too if it is persistent."""
    machine = ctx.machine
    await machine.block.run(
        lambda: bitmapops.remove(_node(machine, args["node"]), args["name"]))


@table.command("block-dirty-bitmap-clear")
async def block_dirty_bitmap_clear(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Mark every bit clean."""
    await ctx.machine.block.run_light(apply_clear, ctx.machine, args)


@table.command("block-dirty-bitmap-enable")
async def block_dirty_bitmap_enable(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Record writes again."""
    await ctx.machine.block.run_light(apply_enable, ctx.machine, args, True)


@table.command("block-dirty-bitmap-disable")
async def block_dirty_bitmap_disable(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Stop recording writes."""
    await ctx.machine.block.run_light(apply_enable, ctx.machine, args, False)


@table.command("block-dirty-bitmap-merge")
async def block_dirty_bitmap_merge(ctx: CommandContext, args: dict[str, Any]) -> None:
    """OR the sources into the target, all or nothing."""
    await ctx.machine.block.run_light(apply_merge, ctx.machine, args)


@table.command("x-debug-block-dirty-bitmap-sha256")
async def x_debug_block_dirty_bitmap_sha256(ctx: CommandContext,
                                            args: dict[str, Any]) -> dict[str, Any]:
    """The SHA-256 of the bitmap's data, as QEMU hashes it."""
    machine = ctx.machine
    digest = await machine.block.run_light(
        lambda: bitmapops.sha256(_node(machine, args["node"]), args["name"]))
    return {"sha256": digest}
