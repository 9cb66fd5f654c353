"""Block device commands."""

from __future__ import annotations

from typing import Any

from blocklayer.reopen import reopen

from .. import blockresize, blockstats
from ..dispatcher import CommandContext, CommandTable
from ..protocol.encoding import PreEncoded

table = CommandTable()


@table.command("blockdev-add")
async def blockdev_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Open a node tree; during ``inmigrate`` every new node opens inactive."""
    await ctx.machine.block.blockdev_add(args)


@table.command("blockdev-del")
async def blockdev_del(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Close a monitor-owned node that nothing else uses."""
    await ctx.machine.block.blockdev_del(args["node-name"])


@table.command("blockdev-reopen")
async def blockdev_reopen(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Give nodes a complete new set of options, all or none (only ``read-only`` may
    differ here; docs/block-layer.md)."""
    block = ctx.machine.block
    await block.run(reopen, block.graph, args["options"])


@table.command("blockdev-set-active")
async def blockdev_set_active(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Activate (take locks, re-read metadata) or inactivate (flush, release) nodes."""
    await ctx.machine.block.set_active(args.get("node-name"), args["active"])


@table.command("x-blockdev-invalidate-cache")
async def x_blockdev_invalidate_cache(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Drop and re-read cached metadata of one node (and its children) or of all nodes."""
    await ctx.machine.block.invalidate_cache(args.get("node-name"))


@table.command("x-blockdev-inactivate")
async def x_blockdev_inactivate(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Flush and inactivate one node or all nodes."""
    await ctx.machine.block.set_active(args.get("node-name"), False)


@table.command("query-named-block-nodes")
async def query_named_block_nodes(ctx: CommandContext, args: dict[str, Any]) -> PreEncoded:
    """Every node, newest first (sent as cached, pre-encoded JSON)."""
    return await ctx.machine.block.query_named_block_nodes_json(args.get("flat", False))



@table.command("query-blockstats")
async def query_blockstats(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """I/O statistics per BlockBackend, or per node with ``query-nodes``."""
    machine = ctx.machine
    return await machine.block.run_light(lambda: blockstats.query_blockstats(
        machine.block.graph, [blk for blk, _ in machine.devices.backends()],
        args.get("query-nodes", False)))


@table.command("block_resize")
async def block_resize(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Resize a node (qmp_block_resize; see :mod:`..blockresize`)."""
    machine = ctx.machine
    await blockresize.block_resize(machine.block, machine.devices, args.get("device"),
                                   args.get("node-name"), args["size"])


@table.command("block-set-write-threshold")
async def block_set_write_threshold(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Watch a node for writes past an offset (qmp_block_set_write_threshold)."""
    machine = ctx.machine
    await machine.block.run_light(blockresize.set_write_threshold, machine.block, machine.vm,
                                  args["node-name"], args["write-threshold"])
