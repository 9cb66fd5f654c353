"""A node of the block graph and the edges that connect it to its parents and children."""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .dirtybitmap import DirtyBitmap, set_dirty
from .driver import BlockDriver, whole_sectors
from .errors import BlockError
from .perm import ALL, ChildRole

#: QEMU's BDRV_MAX_LENGTH: INT64_MAX aligned down to 1 GiB (bdrv_check_request's limit).
MAX_LENGTH = (2**63 - 1) & ~((1 << 30) - 1)

#: The size of QEMU's bs->filename (PATH_MAX): longer json: names are cut.
FILENAME_BUFFER = 4096


@dataclass(eq=False)
class Edge:
    """A use of ``child``: by a parent node (``file``/``backing``) or by an outside user.

    Outside users (``parent is None``) stand for what QEMU models as a BlockBackend, such
    as the temporary one HMP ``qemu-io`` attaches; ``user`` then names it in messages.
    """

    child: BlockNode
    name: str
    role: ChildRole
    perm: int = 0
    shared: int = ALL
    parent: BlockNode | None = None
    user: str = ""
    #: An outside user's part in (in)activation, QEMU's BdrvChildClass .activate and
    #: .inactivate (a BlockBackend, see backend.py): ``activate_hook`` re-takes the
    #: user's permissions once the node is active (raising BlockError on conflict),
    #: ``inactivate_hook`` drops them and returns False if the user cannot let go.
    activate_hook: Callable[[], None] | None = None
    inactivate_hook: Callable[[], bool] | None = None
    #: The user is a block job (QEMU's child_job, not a BlockBackend): it does not make
    #: the node "in use" (bdrv_has_blk) but the node is no root any more.
    job: bool = False
    #: What this edge asks of its child whatever its parent needs: a block job's filter
    #: sits between (commit_top_child_perm asks nothing and shares all), for as long as
    #: it is set. None: the usual rules.
    fixed_perm: tuple[int, int] | None = None

    def describe_parent(self) -> str:
        """How QEMU names the user of this edge in permission conflicts."""
        if self.parent is not None:
            return f"node '{self.parent.name}'"
        return self.user


@dataclass(eq=False)
class NodeOptions:
    """The generic (driver-independent) options a node was opened with."""

    read_only: bool = False
    auto_read_only: bool = False
    force_share: bool = False
    cache_direct: bool = False
    cache_no_flush: bool = False
    discard_unmap: bool = False
    detect_zeroes: str = "off"


@dataclass(eq=False)
class BlockNode:
    """One node: a driver instance, its flags, and its place in the graph.

    Implements :class:`blocklayer.driver.ChildIO` for its parents; every write path
    checks that the node may be written, so an inactive node never touches its file.
    """

    name: str
    driver: BlockDriver
    options: NodeOptions
    inactive: bool = False
    monitor_owned: bool = False
    implicit: bool = False
    children: list[Edge] = field(default_factory=list)
    parents: list[Edge] = field(default_factory=list)
    #: Bumped whenever anything a query could report may have changed (writes, flushes,
    #: activation, graph edits), so that adapters can cache what they derive from a node.
    generation: int = 0
    #: QEMU's write_gen/flushed_gen: a flush with nothing written since the last
    #: successful one is skipped (it would only cost an fdatasync).
    write_gen: int = 0
    flushed_gen: int = 0
    #: QEMU's bs->wr_highest_offset: the end of the furthest write, for query-blockstats.
    wr_highest_offset: int = 0
    #: Free for the QMP adapter's cache of this node's info (keyed by ``generation``).
    info_cache: dict[bool, tuple[object, str]] = field(default_factory=dict)
    #: QEMU's bs->dirty_bitmaps, newest first. Every successful write, write-zeroes and
    #: (performed) discard marks the enabled ones (bdrv_co_write_req_finish). A format
    #: driver that stores bitmaps in its image (qcow2) shares this very list: it loads
    #: into it on open/activation and stores from it on inactivation.
    dirty_bitmaps: list[DirtyBitmap] = field(default_factory=list)
    #: QEMU's op blockers set by block jobs (block_job_add_bdrv), newest first: the
    #: reason each one gives ("block device is in use by block job: stream").
    blockers: list[str] = field(default_factory=list)
    #: A block job's filter node sits above this one (active commit's mirror_top): in
    #: QEMU the node's BlockBackends are the filter's while it is there (bdrv_has_blk).
    under_job_filter: bool = False
    #: Called after each successful write or zero write with (offset, length, zero,
    #: may_unmap): a write-blocking mirror job's filter copying it to its target.
    write_hooks: list[Callable[[int, int, bool, bool], None]] = field(default_factory=list)
    #: Called with (offset, length) before a write, zero write or discard changes the
    #: range (a backup job's copy-before-write filter); an error fails the write.
    before_write_hooks: list[Callable[[int, int], None]] = field(default_factory=list)
    #: QEMU's bs->write_threshold_offset (block-set-write-threshold; 0: off) and who is
    #: told, with (node, amount exceeded, threshold), when a write passes it.
    write_threshold: int = 0
    write_threshold_listener: Callable[[BlockNode, int, int], None] | None = None
    #: QEMU's bs->options as far as file names need them (:meth:`refresh_filename`): the
    #: node's own options, flattened (``encrypt.key-secret``), valued as the user gave
    #: them (``-drive`` gives strings). Children's options are theirs.
    open_options: dict[str, Any] = field(default_factory=dict)
    #: QEMU's bs->backing_file (as the image header names it) and auto_backing_file: the
    #: same, or the backing node's file name when the backing node was opened from the
    #: header; the backing child is "overridden" when it differs (bdrv_backing_overridden).
    backing_file: str = ""
    auto_backing_file: str = ""
    #: QEMU's exact_filename, full_open_options and filename, as the last
    #: :meth:`refresh_filename` left them (the graph refreshes them on every change).
    exact_filename: str = ""
    full_open_options: dict[str, Any] = field(default_factory=dict)
    refreshed_filename: str = ""

    #: Bumped with every change to any node (and by the graph when nodes come and go):
    #: lets adapters reuse what they derived from the whole graph.
    changes: ClassVar[int] = 0

    def __post_init__(self) -> None:
        # The driver exists before the node and is opened after it (graph._open), so
        # this is where a driver that persists bitmaps (qcow2) gets the node's list.
        bind = getattr(self.driver, "bind_dirty_bitmaps", None)
        if callable(bind):
            bind(self.dirty_bitmaps, self.name)

    def touch(self) -> None:
        """Note that the node's observable state changed."""
        self.generation += 1
        BlockNode.changes += 1

    @property
    def node_name(self) -> str:
        """The node name (ChildIO)."""
        return self.name

    @property
    def drv_name(self) -> str:
        """The driver name, as ``drv`` of BlockDeviceInfo."""
        return self.driver.name

    @property
    def read_only(self) -> bool:
        return self.options.read_only

    @property
    def writable(self) -> bool:
        """QEMU's bdrv_is_writable: read-write and active."""
        return not self.options.read_only and not self.inactive

    def child(self, name: str) -> Edge | None:
        """The child edge called ``name`` (``file`` or ``backing``), if any."""
        for edge in self.children:
            if edge.name == name:
                return edge
        return None

    @property
    def filename(self) -> str:
        """QEMU's bs->filename (``file`` of BlockDeviceInfo): see :meth:`refresh_filename`."""
        return self.refreshed_filename

    @property
    def bottom_filename(self) -> str:
        """The exact file name at the bottom of the primary (``file``) chain, which relative
        backing file names resolve against (QEMU's bdrv_dirname); "" when it has none."""
        node = self
        while (edge := node.child("file")) is not None:
            node = edge.child
        return node.exact_filename

    def backing_overridden(self) -> bool:
        """QEMU's bdrv_backing_overridden: the backing node is not the one the image names
        (or the image names one and there is none). May say yes for the same image
        reached by another name, as QEMU's string comparison does."""
        edge = self.child("backing")
        if edge is not None:
            return self.auto_backing_file != edge.child.refreshed_filename
        return self.auto_backing_file != ""

    def refresh_filename(self, to_json: Callable[[Any], str]) -> None:
        """QEMU's bdrv_refresh_filename for this node, its children being fresh already.

        The full open options are ``driver``, ``filename`` and the driver's strong runtime
        options as the node was opened with them (append_strong_runtime_options), then every
        child's full open options under the child's name, the backing child's only when it
        overrides the image's own (``"backing": null`` when the image names one and the
        node has none). The exact file name is the driver's answer if it has one
        (null-co), else the primary child's when that is a protocol node, this driver is no
        filter and neither a strong option nor an overridden backing changes the data;
        protocol nodes without a callback keep the name they were opened with. The file
        name is the exact one, or ``json:`` and the full open options as ``to_json`` writes
        them, cut to QEMU's 4096-byte buffer with ``...`` at its end.
        """
        driver = self.driver
        if driver.ejected:
            return  # bdrv_refresh_filename: nothing without a driver, the old name stays
        overridden = self.backing_overridden()
        opts: dict[str, Any] = {}
        strong = False
        for key in ("driver", "filename", *driver.strong_runtime_opts):
            given = False
            if key.endswith("."):
                for name, value in self.open_options.items():
                    if name.startswith(key):
                        opts[name] = value
                        given = True
            elif key in self.open_options:
                opts[key] = self.open_options[key]
                given = True
            strong |= given and key not in ("driver", "filename")
        opts.setdefault("driver", driver.name)
        # bs->children holds the newest child first (bdrv_attach_child_noperm inserts at
        # the head): the insertion order decides the member order within a hash bucket.
        for edge in reversed(self.children):
            if edge.name == "backing" and not overridden:
                continue
            opts[edge.name] = edge.child.full_open_options
        if overridden and self.child("backing") is None:
            opts["backing"] = None
        self.full_open_options = opts
        exact = driver.refresh_filename(opts)
        if exact is None:
            primary = self.child("file")
            if primary is not None:
                exact = ""
                if (primary.child.exact_filename and primary.child.driver.protocol
                        and not strong and not overridden):
                    exact = primary.child.exact_filename
            else:
                exact = self.exact_filename
        self.exact_filename = exact
        if exact:
            self.refreshed_filename = exact
            return
        name = "json:" + to_json(opts)
        if len(name.encode("utf-8", "surrogateescape")) >= FILENAME_BUFFER:
            # QEMU writes it into its PATH_MAX buffer and marks the cut with "...".
            kept = name.encode("utf-8", "surrogateescape")[:FILENAME_BUFFER - 4]
            name = kept.decode("utf-8", "surrogateescape") + "..."
        self.refreshed_filename = name

    def cumulative_perms(self) -> tuple[int, int]:
        """Union of what all users need; intersection of what they let others do."""
        perm, shared = 0, ALL
        for edge in self.parents:
            perm |= edge.perm
            shared &= edge.shared
        return perm, shared

    def has_active_parent(self) -> bool:
        """Whether a parent node that is still active uses this node."""
        return any(e.parent is not None and not e.parent.inactive for e in self.parents)

    # ChildIO ------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.inactive:
            # QEMU asserts here; a violation is a server bug, so fail loudly but safely.
            raise BlockError(f"Node '{self.name}' is inactive and must not be written", errno.EPERM)
        if self.options.read_only:
            raise BlockError("Block node is read-only", errno.EPERM)

    def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``."""
        return self.driver.read(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``."""
        self._check_writable()
        for before in tuple(self.before_write_hooks):
            before(offset, len(data))
        self.check_write_threshold(offset, len(data))
        self.touch()
        self.write_gen += 1
        self.wr_highest_offset = max(self.wr_highest_offset, offset + len(data))
        if self.options.detect_zeroes != "off" and not any(data):
            self.driver.write_zeroes(offset, len(data),
                                     self.options.detect_zeroes == "unmap" and self.options.discard_unmap)
        else:
            self.driver.write(offset, data)
        if self.dirty_bitmaps:
            self._grow_bitmaps(offset + len(data))
            set_dirty(self.dirty_bitmaps, offset, len(data))
        for hook in tuple(self.write_hooks):
            hook(offset, len(data), False, False)

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Make the range read as zeroes."""
        self._check_writable()
        for before in tuple(self.before_write_hooks):
            before(offset, length)
        self.check_write_threshold(offset, length)
        self.touch()
        self.write_gen += 1
        self.wr_highest_offset = max(self.wr_highest_offset, offset + length)
        self.driver.write_zeroes(offset, length, may_unmap and self.options.discard_unmap)
        if self.dirty_bitmaps:
            self._grow_bitmaps(offset + length)
            set_dirty(self.dirty_bitmaps, offset, length)
        for hook in tuple(self.write_hooks):
            hook(offset, length, True, may_unmap)

    def _grow_bitmaps(self, end: int) -> None:
        # bdrv_co_write_req_finish: a write past the end (a format driver growing its
        # file) grows the node, and its bitmaps with it, in whole sectors, before the
        # new range is marked.
        size = whole_sectors(end)
        for bitmap in self.dirty_bitmaps:
            if bitmap.size < size:
                bitmap.truncate(size)

    def pdiscard(self, offset: int, length: int) -> None:
        """Discard; dropped unless the node was opened with ``discard=unmap``."""
        self._check_writable()
        self.touch()
        self.write_gen += 1
        if self.options.discard_unmap:
            for before in tuple(self.before_write_hooks):
                before(offset, length)
            # bdrv_co_pdiscard returns before bdrv_co_write_req_prepare without
            # discard=unmap, so only a performed discard passes the threshold check.
            self.check_write_threshold(offset, length)
            self.driver.discard(offset, length)
            # bdrv_co_pdiscard returns before its tracked request without discard=unmap,
            # so only a performed discard marks the bitmaps.
            if self.dirty_bitmaps:
                set_dirty(self.dirty_bitmaps, offset, length)

    def make_empty(self) -> None:
        """bdrv_make_empty: the node drops what it holds itself (its driver's ENOTSUP
        when it cannot); a write as far as flushing is concerned."""
        self._check_writable()
        self.touch()
        self.write_gen += 1
        self.driver.make_empty()

    def flush(self) -> None:
        """Flush caches and make the data durable; a no-op on nodes that cannot write."""
        if not self.writable or (self.options.cache_no_flush and self.driver.protocol):
            return
        current = self.write_gen
        if current == self.flushed_gen:
            return
        self.touch()
        self.driver.flush()
        self.flushed_gen = current

    def getlength(self) -> int:
        """Length in bytes."""
        return self.driver.getlength()

    def has_info(self) -> bool:
        """Whether QEMU's bdrv_get_info succeeds here (the driver says)."""
        return self.driver.has_info()

    def truncate(self, length: int) -> None:
        """QEMU's bdrv_co_truncate (preallocation off): resize the node, its dirty
        bitmaps with it (bdrv_dirty_bitmap_truncate in bdrv_co_write_req_finish).

        The checks come in QEMU's order with its texts; the caller holds the resize
        permission. Growing a node whose backing file is longer than the node was asks
        the driver to make the new area read as zeroes (BDRV_REQ_ZERO_WRITE), or the
        backing file's data would show through.
        """
        if self.driver.ejected:
            raise BlockError("No medium inserted", errno.ENOMEDIUM)
        if length < 0:
            raise BlockError("Image size cannot be negative", errno.EINVAL)
        if length > MAX_LENGTH:
            # bdrv_check_request(offset, 0)
            raise BlockError(f"offset({length}) exceeds maximum({MAX_LENGTH})", errno.EINVAL)
        old_length = self.getlength()
        if self.options.read_only:
            raise BlockError("Image is read-only", errno.EACCES)
        self._check_writable()
        zero_new = False
        backing = self.child("backing")
        if length > old_length and backing is not None:
            zero_new = backing.child.getlength() > old_length
        self.touch()
        self.write_gen += 1
        self.driver.truncate(length, zero_new)
        size = self.getlength()
        for bitmap in self.dirty_bitmaps:
            bitmap.truncate(size)

    def check_write_threshold(self, offset: int, length: int) -> None:
        """QEMU's bdrv_write_threshold_check_write (from bdrv_co_write_req_prepare): a
        request ending past the threshold reports it once, then the threshold is off."""
        threshold = self.write_threshold
        end = offset + length
        if threshold > 0 and end > threshold:
            self.write_threshold = 0
            if self.write_threshold_listener is not None:
                self.write_threshold_listener(self, end - threshold, threshold)
