"""Resizing nodes and watching their write thresholds: QEMU's qmp_block_resize
(blockdev.c) and block/write-threshold.c, for the QMP commands and HMP's block_resize.

``block_resize`` finds the node as bdrv_lookup_bs does (a named backend first, then a
node), refuses a node an op blocker guards (a backing node, a block job's node: QEMU's
``Device '...' is in use``, with ``(null)`` when only a node name was given), then
attaches a temporary anonymous user asking for the resize permission and sharing
everything (blk_new_with_bs(bs, BLK_PERM_RESIZE, BLK_PERM_ALL)), so that a parent or
another process that does not share resizing refuses with QEMU's text, and truncates
the node in a worker thread (it may write metadata and fsync).

The write threshold lives on the node (:meth:`blocklayer.node.BlockNode.check_write_threshold`);
passing it sends ``BLOCK_WRITE_THRESHOLD`` from whichever thread did the write.
"""

from __future__ import annotations

from typing import Any

import trio

from blocklayer.node import BlockNode
from blocklayer.perm import ALL, RESIZE

from .blockservice import BlockService
from .devices import Devices
from .errors import QMPError
from .runstate import VM


def _lookup(block: BlockService, devices: Devices, device: str | None,
            node_name: str | None) -> BlockNode:
    """bdrv_lookup_bs with QEMU's texts: a named backend's node, else a node."""
    if device is not None:
        for blk, _ in devices.backends():
            if blk.name and blk.name == device:
                if blk.node is None:
                    raise QMPError(f"Device '{device}' has no medium")
                return blk.node
    node = block.graph.find(node_name) if node_name is not None else None
    if node is None:
        raise QMPError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")
    return node


def _op_blocked(node: BlockNode) -> bool:
    """bdrv_op_is_blocked(bs, BLOCK_OP_TYPE_RESIZE): a block job's blocker, or the one
    bdrv_set_backing_hd puts on every backing node (resizing is not unblocked there)."""
    if getattr(node, "blockers", None):
        return True
    return any(edge.parent is not None and edge.name == "backing" for edge in node.parents)


async def block_resize(block: BlockService, devices: Devices, device: str | None,
                       node_name: str | None, size: int) -> None:
    """qmp_block_resize: checks in QEMU's order, then the resize in a worker thread."""

    def work() -> None:
        node = _lookup(block, devices, device, node_name)
        if size < 0:
            raise QMPError("Parameter 'size' expects a >0 size")
        if _op_blocked(node):
            raise QMPError(f"Device '{device if device is not None else '(null)'}' is in use")
        # blk_new_with_bs: an anonymous BlockBackend (named so in permission conflicts).
        edge = block.graph.add_user(node, "an unnamed block device", RESIZE, ALL)
        try:
            node.truncate(size)
        finally:
            block.graph.remove_user(edge)

    await block.run(work)


def set_write_threshold(block: BlockService, vm: VM, node_name: str, threshold: int) -> None:
    """qmp_block_set_write_threshold (the caller holds the graph lock): any node by its
    node name (bdrv_find_node: backends are no node names), the uint64 kept as is."""
    node = block.graph.find(node_name)
    if node is None:
        raise QMPError(f"Device '{node_name}' not found")
    node.write_threshold = threshold % (1 << 64)
    node.touch()

    def exceeded(node: BlockNode, amount: int, threshold: int) -> None:
        # Members in the order QEMU 7.2 sends them (its QDict's order, checked live).
        data: dict[str, Any] = {"node-name": node.name, "write-threshold": threshold,
                                "amount-exceeded": amount}
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            try:
                trio.from_thread.run_sync(vm.events.emit, "BLOCK_WRITE_THRESHOLD", data)
            except RuntimeError:
                pass  # no event loop any more (closing at exit): nobody to tell
            return
        vm.events.emit("BLOCK_WRITE_THRESHOLD", data)

    node.write_threshold_listener = exceeded

