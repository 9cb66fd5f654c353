"""QEMU's bdrv_lookup_bs for the command tables: the node a command's ``device``/
``node-name`` argument means (the machine's :meth:`Devices.lookup_bs`, which HMP uses too)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blocklayer.node import BlockNode

if TYPE_CHECKING:
    from ..machine import Machine


def find_bs(machine: Machine, device: str | None, node_name: str | None) -> BlockNode | None:
    """bdrv_lookup_bs without an error (:meth:`Devices.find_bs`)."""
    return machine.devices.find_bs(device, node_name)


def lookup_bs(machine: Machine, device: str | None, node_name: str | None) -> BlockNode:
    """bdrv_lookup_bs with QEMU's texts (:meth:`Devices.lookup_bs`)."""
    return machine.devices.lookup_bs(device, node_name)
