"""The block layer as the QMP commands and the run state see it.

Graph work is serialised by one lock. Anything that may fsync or move guest data (flush,
inactivation, activation, deletion, qemu-io) runs in a worker thread, so a slow disk never
stalls the event loop and other clients keep being served. Operations that only read a
few KiB of metadata (blockdev-add, queries) run inline when the lock is free: a thread
hop costs more than the work (about 140 us against 150 us for opening a qcow2 node, as
measured by bench/bench_block.py). Block errors become QMP GenericErrors with the block
layer's (QEMU's) text.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from blocklayer.driver import BlockDriver
from blocklayer.drivers.file import FdOpener, FileDriver
from blocklayer.errors import BlockError
from blocklayer.graph import BlockGraph, default_drivers
from blocklayer.node import BlockNode, Edge
from blocklayer.perm import ALL

from .blockinfo import block_infos, block_infos_json
from .errors import QMPError
from .protocol.encoding import PreEncoded, encode_text
from .runstate import VM, RunState

if TYPE_CHECKING:
    from blocklayer.qcow2.errors import CorruptionReport

T = TypeVar("T")


class BlockService:
    """Owns the block graph of one machine."""

    def __init__(self, vm: VM, graph: BlockGraph | None = None, opener: FdOpener | None = None) -> None:
        """``opener`` opens ``/dev/fdset/N`` file names (the machine's fd sets)."""
        self.vm = vm
        if graph is None:
            drivers = default_drivers(self._image_corrupted)
            if opener is not None:
                drivers["file"] = lambda: FileDriver(opener)
            graph = BlockGraph(drivers)
        self.graph = graph
        # json: file names are written as QEMU's qobject_to_json writes the options.
        self.graph.filename_json = encode_text
        self._lock = threading.Lock()
        #: bdrv_get_device_name: the name of a node's BlockBackend ("" for none or an
        #: anonymous one). The devices know the backends; machine.py wires them in.
        self.device_name: Callable[[BlockNode], str] = lambda node: ""
        self.graph.device_name = lambda node: self.device_name(node)

    def _image_corrupted(self, driver: BlockDriver, report: CorruptionReport) -> None:
        """QEMU's qcow2_signal_corruption, our half: the stderr line and the event.

        Called under the graph lock, in a worker thread or in the event loop's thread.
        """
        sys.stderr.write(report.stderr_line)
        sys.stderr.flush()
        node = next((n for n in self.graph.nodes.values() if n.driver is driver), None)
        # Keys in the order QEMU 7.2 writes them; "device" is the corrupt node's
        # BlockBackend (qcow2_signal_corruption: bdrv_get_device_name(bs)), "none0" for
        # an unnamed -drive if=none.
        device = self.device_name(node) if node is not None else ""
        data: dict[str, Any] = {"device": device, "msg": report.msg}
        if report.offset >= 0:
            data["offset"] = report.offset
        if node is not None:
            data["node-name"] = node.name
        data["fatal"] = report.fatal
        if report.size >= 0:
            data["size"] = report.size
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            try:
                trio.from_thread.run_sync(self.vm.events.emit, "BLOCK_IMAGE_CORRUPTED", data)
            except RuntimeError:
                pass  # no event loop any more (closing at exit): nobody to tell
            return
        self.vm.events.emit("BLOCK_IMAGE_CORRUPTED", data)

    @staticmethod
    def _call(fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` with block errors turned into QMP errors (caller holds the lock)."""
        try:
            return fn(*args)
        except BlockError as err:
            raise QMPError(err.message) from err

    def locked(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` under the graph lock in the current thread, mapping errors."""
        with self._lock:
            return self._call(fn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` under the graph lock in a worker thread."""
        return await trio.to_thread.run_sync(self.locked, fn, *args)

    async def run_light(self, fn: Callable[..., T], *args: Any) -> T:
        """Run metadata-only work inline if the lock is free, else wait in a thread."""
        if not self._lock.acquire(blocking=False):
            return await self.run(fn, *args)
        try:
            return self._call(fn, *args)
        finally:
            self._lock.release()

    # Commands -----------------------------------------------------------------------

    def _blockdev_add(self, options: dict[str, Any]) -> None:
        # qmp_blockdev_add; the caller holds the lock. Nodes created during inmigrate
        # open inactive (bdrv_open with BDRV_O_INACTIVE, as QEMU's -incoming does).
        if "node-name" not in options:
            raise QMPError("'node-name' must be specified for the root node")
        self.graph.open(options, inactive=self.vm.state is RunState.INMIGRATE)

    async def blockdev_add(self, options: dict[str, Any]) -> None:
        """The ``blockdev-add`` command."""
        await self.run_light(self._blockdev_add, options)

    def blockdev_add_at_startup(self, options: dict[str, Any]) -> None:
        """``-blockdev``: the same as the command, before the event loop runs."""
        self.locked(self._blockdev_add, options)

    async def blockdev_del(self, node_name: str) -> None:
        """blockdev-del."""
        await self.run(self.graph.delete, node_name)

    async def set_active(self, node_name: str | None, active: bool) -> None:
        """blockdev-set-active."""

        def apply() -> None:
            if node_name is None:
                if active:
                    self.graph.activate_all()
                    return
                try:
                    self.graph.inactivate_all()
                except BlockError as err:
                    raise BlockError(f"Failed to inactivate all nodes: {err.message}") from err
                return
            node = self.graph.lookup(node_name)
            if active:
                self.graph.activate(node)
            else:
                self.graph.inactivate(node)

        await self.run(apply)

    async def invalidate_cache(self, node_name: str | None) -> None:
        """x-blockdev-invalidate-cache: re-read cached metadata (inactive nodes: skipped)."""

        def apply() -> None:
            nodes = self.graph.top_nodes() if node_name is None else [self.graph.lookup(node_name)]
            for node in nodes:
                self.graph.invalidate_cache(node)

        await self.run(apply)

    async def query_named_block_nodes(self, flat: bool) -> list[dict[str, Any]]:
        """query-named-block-nodes as Python objects (for HMP), newest node first."""
        return await self.run_light(block_infos, self.graph, flat)

    async def query_named_block_nodes_json(self, flat: bool) -> PreEncoded:
        """query-named-block-nodes as encoded JSON, for the QMP reply."""
        return await self.run_light(block_infos_json, self.graph, flat)

    async def lend_node(self, name: str, user: str, fn: Callable[[BlockGraph, Edge], T]) -> T | None:
        """Run ``fn(graph, edge)`` in a worker thread with a temporary user of node ``name``.

        The user (named ``user`` in permission errors) holds no permission and shares
        all, as the BlockBackend QEMU's HMP ``qemu-io`` creates; ``fn`` may raise its
        permissions through the graph. Returns None when there is no node ``name``.
        """

        def work() -> T | None:
            with self._lock:
                node = self.graph.find(name)
                if node is None:
                    return None
                edge = self.graph.add_user(node, user, 0, ALL)
                try:
                    return fn(self.graph, edge)
                finally:
                    self.graph.remove_user(edge)

        return await trio.to_thread.run_sync(work)

    # Run-state hooks (runstate.BlockHooks) ------------------------------------------------

    async def drain_and_flush_all(self) -> None:
        """Flush every node (there is no in-flight guest I/O to drain)."""
        await self.run(self.graph.flush_all)

    async def activate_all(self) -> None:
        """Activate every node (``cont``, incoming migration)."""
        await self.run(self.graph.activate_all)

    async def inactivate_all(self) -> None:
        """Flush and inactivate every node (outgoing migration)."""
        await self.run(self.graph.inactivate_all)

    def close_all(self) -> None:
        """Close every node at exit (synchronously: the event loop is gone)."""
        self.locked(self.graph.close_all)
