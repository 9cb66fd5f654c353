"""QEMU's bdrv_lookup_bs: the node a command's ``device``/``node-name`` argument means."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blocklayer.node import BlockNode

from ..errors import QMPError

if TYPE_CHECKING:
    from ..machine import Machine


def find_bs(machine: Machine, device: str | None, node_name: str | None) -> BlockNode | None:
    """bdrv_lookup_bs without an error: a named BlockBackend's node (None when it has no
    medium) first, then a node called ``node_name``, else None."""
    if device is not None:
        for blk, _ in machine.devices.backends():
            if blk.name and blk.name == device:
                return blk.node
    return machine.block.graph.find(node_name) if node_name is not None else None


def lookup_bs(machine: Machine, device: str | None, node_name: str | None) -> BlockNode:
    """bdrv_lookup_bs with QEMU's texts: a named BlockBackend's node, else a node."""
    if device is not None:
        for blk, _ in machine.devices.backends():
            if blk.name and blk.name == device:
                if blk.node is None:
                    raise QMPError(f"Device '{device}' has no medium")
                return blk.node
    node = find_bs(machine, None, node_name)
    if node is None:
        raise QMPError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")
    return node
