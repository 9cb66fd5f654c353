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
from collections.abc import Callable
from dataclasses import dataclass

from .create import create_overlay_image
from .errors import BlockError
from .graph import BlockGraph
from .node import BlockNode, Edge
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
    #: Gets the ``Formatting ...`` line bdrv_img_create prints on stdout before it
    #: creates the overlay (the block layer prints nothing itself).
    announce: Callable[[str], None] | None = None


class SnapshotAction:
    """One external snapshot as a transaction action (QEMU's ExternalSnapshotState):
    :meth:`prepare` does everything that can fail, up to and including bdrv_append;
    then either :meth:`commit` (the old top goes read-only) or :meth:`abort` (the graph
    as before); :meth:`clean` always last.

    Other kinds of action (bitmaps, backups) use it for their own steps: what to take
    back on abort (``undo``, run newest first) and what to do on commit (``later``)."""

    def __init__(self, graph: BlockGraph) -> None:
        self.graph = graph
        self.undo: list[Callable[[], None]] = []
        self.later: list[Callable[[], None]] = []
        self.old: BlockNode | None = None
        self.overlay: BlockNode | None = None
        #: The overlay was opened by this action (snapshot-sync): ours to let go of.
        self.opened = False
        self.moved: list[Edge] | None = None

    def _append(self) -> None:
        assert self.old is not None and self.overlay is not None
        check_overlay(self.overlay)
        if self.old.inactive and not self.overlay.inactive:
            # QEMU 10.0's external_snapshot_action: an active overlay on an inactive
            # node is inactivated first (bdrv_inactivate), which keeps a snapshot taken
            # while the images are inactive (after a migration to a file) working
            # without giving an inactive node an active parent. Not undone on abort.
            self.graph.inactivate(self.overlay)
        self.moved = self.graph.append_overlay(self.overlay, self.old)

    def prepare_snapshot(self, old: BlockNode, find_overlay: Callable[[], BlockNode]) -> None:
        """``blockdev-snapshot``: ``find_overlay`` looks the overlay up (after the old
        top's checks, as in QEMU)."""
        prepare_old_top(self.graph, old)
        self.old = old
        self.overlay = find_overlay()
        self._append()

    def prepare_sync(self, old: BlockNode, request: SyncRequest) -> None:
        """``blockdev-snapshot-sync``: create (unless existing) and open the overlay."""
        graph = self.graph
        prepare_old_top(graph, old)
        self.old = old
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
            create_overlay_image(request.snapshot_file, old.getlength(), old.filename, old.drv_name,
                                 request.announce)
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
        self.overlay = graph.open(options, inactive=old.inactive)
        # Not the monitor's: the overlay lives as long as something uses it (QEMU drops
        # its reference in .clean, so with no user it closes again).
        self.overlay.monitor_owned = False
        self.opened = True
        self._append()

    def commit(self) -> None:
        """external_snapshot_commit: the old top is reopened read-only."""
        for step in self.later:
            step()
        if self.old is None:
            return
        try:
            self.graph.set_read_only(self.old)
        except BlockError:
            pass  # bdrv_reopen_set_read_only(..., NULL): QEMU ignores a failure too

    def abort(self) -> None:
        """external_snapshot_abort: undo bdrv_append if it happened."""
        for step in reversed(self.undo):
            step()
        self.undo.clear()
        if self.moved is not None and self.overlay is not None and self.old is not None:
            self.graph.remove_overlay(self.overlay, self.old, self.moved)
            self.moved = None

    def clean(self) -> None:
        """external_snapshot_clean: drop the overlay this action opened, unless used."""
        if self.opened and self.overlay is not None:
            self.graph.release(self.overlay)


def blockdev_snapshot(graph: BlockGraph, node: BlockNode, overlay: BlockNode) -> None:
    """``blockdev-snapshot`` as a transaction of one action."""
    run_actions([lambda action: action.prepare_snapshot(node, lambda: overlay)], graph)


def blockdev_snapshot_sync(graph: BlockGraph, old: BlockNode, request: SyncRequest) -> None:
    """``blockdev-snapshot-sync`` as a transaction of one action."""
    run_actions([lambda action: action.prepare_sync(old, request)], graph)


Prepare = Callable[[SnapshotAction], None]


def run_actions(prepares: list[Prepare], graph: BlockGraph) -> None:
    """qmp_transaction: prepare every action in order; on the first failure abort the
    prepared ones in reverse order; else commit them all; clean them all either way."""
    actions: list[SnapshotAction] = []
    try:
        try:
            for prepare in prepares:
                action = SnapshotAction(graph)
                actions.append(action)
                prepare(action)
        except BaseException:
            for action in reversed(actions):
                action.abort()
            raise
        for action in actions:
            action.commit()
    finally:
        for action in actions:
            action.clean()
