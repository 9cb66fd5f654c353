"""External snapshots (QEMU's blockdev.c external_snapshot_prepare/commit).

``blockdev-snapshot`` puts an overlay the monitor already added on top of a node;
``blockdev-snapshot-sync`` first creates the overlay image (as ``qemu-img create -b``
would: a qcow2 whose backing file is the old top's filename and format) and opens it.
In both, the old top becomes the overlay's backing node, every user of the old top uses
the overlay instead, and the old top is reopened read-only.

Runs under the graph lock (in a worker thread: it flushes and writes a new image).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from .create import create_overlay_image
from .errors import BlockError
from .graph import BlockGraph
from .node import BlockNode
from .perm import CONSISTENT_READ

#: Formats whose images may have a backing file, among ours (BlockDriver.supports_backing).
_BACKING_FORMATS = frozenset({"qcow2"})


def prepare_old_top(graph: BlockGraph, old: BlockNode) -> None:
    """The checks on the node being snapshotted, then its flush (in QEMU's order)."""
    if old.driver.ejected:
        raise BlockError(f"Device '{old.name}' has no medium")
    graph.check_not_backing(old)
    if not old.options.read_only:
        try:
            old.flush()
        except BlockError as err:
            raise BlockError("Input/output error", err.errno or errno.EIO) from err


def check_overlay(overlay: BlockNode) -> None:
    """external_snapshot_prepare's checks on the overlay, with QEMU's texts."""
    perm, _ = overlay.cumulative_perms()
    if perm & CONSISTENT_READ:
        raise BlockError("The overlay is already in use")
    if overlay.child("backing") is not None:
        raise BlockError("The overlay already has a backing image")
    if not overlay.driver.supports_backing:
        raise BlockError("The overlay does not support backing images")


def attach(graph: BlockGraph, overlay: BlockNode, old: BlockNode) -> None:
    """bdrv_append, then external_snapshot_commit's read-only reopen of the old top."""
    graph.append_overlay(overlay, old)
    try:
        graph.set_read_only(old)
    except BlockError:
        pass  # bdrv_reopen_set_read_only(..., NULL): QEMU ignores a failure too


def blockdev_snapshot(graph: BlockGraph, node: BlockNode, overlay: BlockNode) -> None:
    """``blockdev-snapshot``: ``overlay`` goes on top of ``node``."""
    prepare_old_top(graph, node)
    check_overlay(overlay)
    attach(graph, overlay, node)


@dataclass(frozen=True)
class SyncRequest:
    """``blockdev-snapshot-sync``'s arguments once the old top was found."""

    snapshot_file: str
    #: The overlay's node name (None: generated, allowed only with ``device``).
    node_name: str | None
    format: str
    #: ``mode``: True for ``existing`` (the file must already be an image).
    existing: bool
    #: The old top was named by ``node-name`` (then ``snapshot-node-name`` is required).
    by_node_name: bool


def blockdev_snapshot_sync(graph: BlockGraph, old: BlockNode, request: SyncRequest) -> None:
    """``blockdev-snapshot-sync`` once the old top is known (the caller checked names)."""
    prepare_old_top(graph, old)
    if request.by_node_name and request.node_name is None:
        raise BlockError("New overlay node-name missing")
    if request.node_name is not None and graph.find(request.node_name) is not None:
        raise BlockError("New overlay node-name already in use")
    fmt = request.format
    if fmt not in graph.drivers or graph.drivers[fmt]().protocol:
        raise BlockError(f"Unknown file format '{fmt}'")
    if not request.existing:
        if fmt not in _BACKING_FORMATS:
            raise BlockError(f"Backing file not supported for file format '{fmt}'")
        # bdrv_img_create(file, fmt, old->filename, old's format, size)
        create_overlay_image(request.snapshot_file, old.getlength(), old.filename, old.drv_name)
    elif not os.path.exists(request.snapshot_file):
        raise BlockError(f"Could not open '{request.snapshot_file}': {os.strerror(errno.ENOENT)}",
                         errno.ENOENT)
    # bdrv_open(file, NULL, {node-name, driver}, old's flags | BDRV_O_NO_BACKING)
    options: dict[str, object] = {"driver": fmt,
                                  "file": {"driver": "file", "filename": request.snapshot_file},
                                  "read-only": old.options.read_only,
                                  "cache": {"direct": old.options.cache_direct,
                                            "no-flush": old.options.cache_no_flush}}
    if fmt in _BACKING_FORMATS:
        options["backing"] = None
    if request.node_name is not None:
        options["node-name"] = request.node_name
    overlay = graph.open(options, inactive=old.inactive)
    # Not the monitor's: the overlay lives as long as something uses it (QEMU drops its
    # last reference at the end of the transaction, so with no user it closes again).
    overlay.monitor_owned = False
    try:
        check_overlay(overlay)
        attach(graph, overlay, old)
    finally:
        graph.release(overlay)
