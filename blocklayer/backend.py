"""BlockBackends: the named or anonymous users of a node that devices and ``-drive`` own.

QEMU's block/block-backend.c: a BlockBackend asks its root node for permissions through
one edge (its "root" child). What sets it apart from other users is how it takes part in
migration: a backend that belongs to a device or has a name may be inactivated with its
node (it then asks for nothing and shares everything, blk_root_inactivate) and asks for
its permissions again when the node is activated (blk_root_activate), so the write lock
moves between the two processes together with the node.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from .errors import BlockError
from .graph import BlockGraph
from .node import BlockNode, Edge
from .perm import ALL, WRITE, WRITE_UNCHANGED


class AcctType(enum.IntEnum):
    """QEMU's BlockAcctType: what a guest request was."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    UNMAP = 3


class BlockAcctStats:
    """QEMU's BlockAcctStats (block/accounting.c): what the guest asked of a backend.

    Only requests the caller accounts are counted (QEMU's device models and qemu-io's
    ``aio_*`` commands do; plain reads and writes of qemu-io do not). Times are
    CLOCK_MONOTONIC nanoseconds, as QEMU's realtime clock.
    """

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.clock = clock
        kinds = len(AcctType)
        self.nr_bytes = [0] * kinds
        self.nr_ops = [0] * kinds
        self.failed_ops = [0] * kinds
        self.invalid_ops = [0] * kinds
        self.merged = [0] * kinds
        self.total_time_ns = [0] * kinds
        #: 0 until the first accounted request (then idle_time_ns is reported).
        self.last_access_time_ns = 0
        self.account_invalid = True
        self.account_failed = True

    def start(self) -> int:
        """block_acct_start: the request's start time, for :meth:`done`."""
        return self.clock()

    def done(self, kind: AcctType, nbytes: int, started: int, *, failed: bool = False) -> None:
        """block_acct_done / block_acct_failed: one request completed."""
        now = self.clock()
        if failed:
            self.failed_ops[kind] += 1
        else:
            self.nr_bytes[kind] += nbytes
            self.nr_ops[kind] += 1
        if not failed or self.account_failed:
            self.total_time_ns[kind] += now - started
            self.last_access_time_ns = now

    def invalid(self, kind: AcctType) -> None:
        """block_acct_invalid: a request refused before it was submitted."""
        self.invalid_ops[kind] += 1
        if self.account_invalid:
            self.last_access_time_ns = self.clock()

    def idle_time_ns(self) -> int | None:
        """Nanoseconds since the last accounted request, None before the first."""
        if self.last_access_time_ns <= 0:
            return None
        return self.clock() - self.last_access_time_ns


class BlockBackend:
    """One BlockBackend: ``name`` ("" when anonymous), its root node and its permissions."""

    def __init__(self, graph: BlockGraph, name: str = "", *,
                 inmigrate: Callable[[], bool] = lambda: False) -> None:
        self.graph = graph
        self.name = name
        #: QEMU's blk->perm / blk->shared_perm: what the user wants, kept while disabled.
        self.perm = 0
        self.shared = ALL
        #: blk->disable_perm: the node is inactive (or migration is incoming), so the
        #: backend asks for nothing and shares everything until activation.
        self.disable_perm = False
        #: The shared permissions are tightened only once the VM leaves ``inmigrate``
        #: (blk_vm_state_changed).
        self.deferred_shared = False
        #: QOM path of the attached device model (blk->dev), e.g.
        #: ``/machine/peripheral/vd0/virtio-backend``.
        self.dev: str | None = None
        #: The device's id, when it has one (blk_get_attached_dev_id).
        self.dev_id: str | None = None
        self.edge: Edge | None = None
        #: blk->enable_write_cache: what the guest is told about the disk's write cache
        #: (-drive cache.writeback, a device's write-cache property).
        self.enable_write_cache = True
        self._inmigrate = inmigrate
        #: blk->force_allow_inactivate: a user that writes but lets its node be
        #: inactivated anyway (an ``allow-inactive`` export).
        self.force_allow_inactivate = False
        #: blk->stats: the I/O accounting query-blockstats reports.
        self.stats = BlockAcctStats()

    @property
    def node(self) -> BlockNode | None:
        """The root node, or None when no medium is inserted."""
        return self.edge.child if self.edge is not None else None

    def can_inactivate(self) -> bool:
        """blk_can_inactivate: devices' and monitor-named backends follow their node, and
        so does an anonymous one that does not write (a read-only NBD export); one that
        writes (a writable export) keeps the node active unless it was told to allow
        inactivation (blk_set_force_allow_inactivate)."""
        return (self.dev is not None or bool(self.name) or not self.perm & (WRITE | WRITE_UNCHANGED)
                or self.force_allow_inactivate)

    def describe(self) -> str:
        """blk_root_get_parent_desc: how permission errors name this backend."""
        if self.name:
            return f"block device '{self.name}'"
        dev_id = self.dev_id or self.dev
        if dev_id:
            return f"block device '{dev_id}'"
        return "a block device"

    def insert(self, node: BlockNode) -> None:
        """blk_insert_bs: attach to ``node``; on an inactive node ask for nothing yet."""
        if node.inactive and self.can_inactivate():
            self.disable_perm = True
        perm, shared = (0, ALL) if self.disable_perm else (self.perm, self.shared)
        edge = self.graph.add_user(node, self.describe(), perm, shared)
        edge.activate_hook = self._activate
        edge.inactivate_hook = self._inactivate
        self.edge = edge

    def remove(self) -> None:
        """blk_remove_bs: give the node and the permissions back."""
        if self.edge is not None:
            edge, self.edge = self.edge, None
            self.graph.remove_user(edge)

    def set_perm(self, perm: int, shared: int) -> None:
        """blk_set_perm: on conflict (QEMU's text) nothing changes."""
        if self.edge is not None and not self.disable_perm:
            self.graph.set_user_perm(self.edge, perm, shared)
        self.perm, self.shared = perm, shared

    def attach_dev(self, path: str, dev_id: str | None) -> None:
        """blk_attach_dev: a device model now uses this backend."""
        self.dev, self.dev_id = path, dev_id
        if self.edge is not None:
            self.edge.user = self.describe()
        if self._inmigrate():
            # The source still writes: take the device's permissions only on activation.
            self.disable_perm = True
            if self.edge is not None:
                self.graph.set_user_perm(self.edge, 0, ALL)

    def detach_dev(self) -> None:
        """blk_detach_dev: the device is gone; what it asked for is released."""
        self.dev = self.dev_id = None
        self.deferred_shared = False
        self.set_perm(0, ALL)
        if self.edge is not None:
            self.edge.user = self.describe()

    def _activate(self) -> None:
        # blk_root_activate: ask again for what the user wants, but share everything
        # while migration is still incoming.
        if not self.disable_perm or self.edge is None:
            return
        self.disable_perm = False
        try:
            self.graph.set_user_perm(self.edge, self.perm, ALL)
        except BlockError:
            self.disable_perm = True
            raise
        if self._inmigrate():
            self.deferred_shared = True
            return
        self._tighten()

    def vm_state_changed(self) -> None:
        """blk_vm_state_changed: the VM left ``inmigrate``; stop sharing what we do not."""
        if self.deferred_shared and not self._inmigrate():
            self.deferred_shared = False
            self._tighten()

    def _tighten(self) -> None:
        assert self.edge is not None
        try:
            self.graph.set_user_perm(self.edge, self.perm, self.shared)
        except BlockError:
            self.disable_perm = True
            raise

    def _inactivate(self) -> bool:
        # blk_root_inactivate; False means "cannot" (QEMU: -EPERM).
        if self.disable_perm:
            return True
        if not self.can_inactivate():
            return False
        self.disable_perm = True
        self.deferred_shared = False
        if self.edge is not None:
            # No refresh here: the node is about to drop its permissions as a whole.
            self.edge.perm, self.edge.shared = 0, ALL
        return True
