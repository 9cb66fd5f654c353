"""BlockDeviceInfo / ImageInfo for query-named-block-nodes, built from the graph.

Management tools poll this over thousands of nodes, so each node's entry is kept as
encoded JSON and rebuilt only when something it reports may have changed: the node's
generation (bumped by every write, flush, activation and graph edit) or, for files, what
fstat says (another process may grow the file while we are inactive).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from blocklayer.backend import BlockBackend
from blocklayer.bitmapops import query as query_bitmaps
from blocklayer.driver import whole_sectors
from blocklayer.graph import BlockGraph
from blocklayer.node import BlockNode

from .errors import QMPError
from .protocol.encoding import PreEncoded, encode_text


class _Collector:
    """Per-call memo of what several nodes' entries share."""

    def __init__(self, flat: bool) -> None:
        self.flat = flat
        self._actual: dict[int, int | None] = {}

    def actual_size(self, node: BlockNode) -> int | None:
        """Allocated bytes of the file at the bottom of ``node``'s primary chain."""
        key = id(node)
        if key not in self._actual:
            size = node.driver.image_info().get("actual-size") if node.driver.protocol else None
            if size is None and not node.driver.protocol:
                edge = node.child("file")
                size = self.actual_size(edge.child) if edge is not None else None
            self._actual[key] = None if size is None else int(size)
        return self._actual[key]

    def image(self, node: BlockNode) -> dict[str, Any]:
        """ImageInfo of ``node`` (``backing-image`` nested unless flat)."""
        driver = node.driver
        length = driver.getlength()
        if driver.protocol:
            length = whole_sectors(length)  # bdrv_getlength
        info: dict[str, Any] = {"virtual-size": length, "filename": node.filename, "format": driver.name}
        actual = self.actual_size(node)
        if actual is not None:
            info["actual-size"] = actual
        if driver.has_info():
            info["dirty-flag"] = False
        if not driver.protocol:
            info.update(driver.image_info())
        backing = node.child("backing")
        if backing is not None and not self.flat:
            info["backing-image"] = self.image(backing.child)
        return info

    def device(self, node: BlockNode) -> dict[str, Any]:
        """One BlockDeviceInfo (QEMU 10.1 members)."""
        if node.driver.ejected:  # bdrv_block_device_info refuses a node without a driver
            raise QMPError(f"Block device {node.name} is ejected")
        options = node.options
        depth = 0
        backing = node.child("backing")
        edge = backing
        while edge is not None:
            depth += 1
            edge = edge.child.child("backing")
        # Members in BlockDeviceInfo's declaration order, as bdrv_block_device_info's
        # visitor inserts them: the encoder writes QEMU's QDict order from it, and
        # backing_file and write_threshold share a hash bucket (the later one comes first).
        info: dict[str, Any] = {
            "file": node.filename,
            "node-name": node.name,
            "ro": options.read_only,
            "drv": node.driver.name,
        }
        if backing is not None:
            info["backing_file"] = backing.child.filename
        info |= {
            "backing_file_depth": depth,
            "active": not node.inactive,
            "encrypted": False,
            "detect_zeroes": options.detect_zeroes,
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "image": self.image(node),
            "cache": {"writeback": True, "direct": options.cache_direct, "no-flush": options.cache_no_flush},
            # bdrv_write_threshold_get: the uint64 as BlockDeviceInfo's int.
            "write_threshold": node.write_threshold - (1 << 64) if node.write_threshold >> 63
            else node.write_threshold,
        }
        if node.dirty_bitmaps:
            info["dirty-bitmaps"] = query_bitmaps(node)
        info["children"] = [{"child": e.name, "node-name": e.child.name} for e in node.children]
        return info


def block_infos(graph: BlockGraph, flat: bool) -> list[dict[str, Any]]:
    """query-named-block-nodes as Python objects: every node, newest first like QEMU."""
    collector = _Collector(flat)
    return [collector.device(node) for node in graph.iter_nodes()]


def _external_stamp(node: BlockNode) -> object:
    """What fstat says of a file another process may be changing, else None.

    While a node is active and writable we hold its write lock, so only our own writes
    (which bump its generation) change it; an inactive or read-only file may be grown by
    the process that holds it (the migration peer), so it is looked at on every call.
    """
    if not node.driver.protocol or (not node.inactive and not node.options.read_only):
        return None
    fd = getattr(node.driver, "fd", None)
    if not isinstance(fd, int) or fd < 0:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        return (None, None)
    return (st.st_size, st.st_blocks)


class _GraphCache:
    """The last full reply per ``flat`` value and what it was built from."""

    def __init__(self) -> None:
        self.results: dict[bool, tuple[object, PreEncoded]] = {}
        # Which nodes' files others may be changing; valid while no node changed.
        self.watch_changes = -1
        self.watch: list[BlockNode] = []


_caches: weakref.WeakKeyDictionary[BlockGraph, _GraphCache] = weakref.WeakKeyDictionary()


def block_infos_json(graph: BlockGraph, flat: bool) -> PreEncoded:
    """query-named-block-nodes as ready-to-send JSON.

    The whole reply is reused while no node changed (a global change counter) and no file
    that others may write looks different; otherwise only the entries of changed nodes
    are rebuilt. A steady-state call therefore costs a few fstat calls, not a walk over
    every node.
    """
    cache = _caches.setdefault(graph, _GraphCache())
    if cache.watch_changes != BlockNode.changes:
        cache.watch = [n for n in graph.iter_nodes() if _external_stamp(n) is not None]
        cache.watch_changes = BlockNode.changes
    key = (BlockNode.changes, tuple(_external_stamp(node) for node in cache.watch))
    previous = cache.results.get(flat)
    if previous is not None and previous[0] == key:
        return previous[1]
    nodes = list(graph.iter_nodes())
    external = [_external_stamp(node) for node in nodes]
    collector = _Collector(flat)
    outside = {id(node): stamp for node, stamp in zip(nodes, external, strict=True)}
    stamps: dict[int, object] = {}

    def stamp_of(node: BlockNode) -> object:
        # An entry reports its children's state too (a format node's actual-size is its
        # file's), so its stamp includes theirs.
        ident = id(node)
        if ident not in stamps:
            children = tuple(stamp_of(e.child) for e in node.children)
            stamps[ident] = (node.generation, outside.get(ident), children)
        return stamps[ident]

    parts = []
    for node in nodes:
        if node.driver.ejected:  # checked before the per-node cache: see _Collector.device
            raise QMPError(f"Block device {node.name} is ejected")
        stamp = stamp_of(node)
        cached = node.info_cache.get(flat)
        if cached is None or cached[0] != stamp:
            # Node info holds only integers, strings and booleans: no float pass needed.
            cached = (stamp, encode_text(collector.device(node), floats=False))
            node.info_cache[flat] = cached
        parts.append(cached[1])
    result = PreEncoded("[" + ", ".join(parts) + "]")
    cache.results[flat] = (key, result)
    return result


def backend_info(blk: BlockBackend, qdev: str | None) -> dict[str, Any]:
    """One BlockInfo of query-block (QEMU's bdrv_query_info), keys in QEMU 7.2's order.

    ``qdev`` is the QOM path of the device using the backend, if any. A backend without
    a device counts as removable (blk_dev_has_removable_media); the disk devices we model
    keep their I/O status, hence ``io-status``.
    """
    info: dict[str, Any] = {}
    if qdev is not None:
        info["io-status"] = "ok"
    info["device"] = blk.name
    info["locked"] = False
    info["removable"] = qdev is None
    node = blk.node
    if node is not None and not node.driver.ejected:  # bdrv_query_info: only with bs->drv
        inserted = info["inserted"] = _Collector(False).device(node)
        # bdrv_block_device_info: the cache mode's writeback is the backend's own setting.
        inserted["cache"] = {**inserted["cache"], "writeback": blk.enable_write_cache}
    if qdev is not None:
        info["qdev"] = qdev
    info["type"] = "unknown"
    return info
