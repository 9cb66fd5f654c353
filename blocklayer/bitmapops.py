"""Dirty bitmap operations on a node, as QEMU's monitor commands do them.

block/monitor/bitmap-qmp-cmds.c and block/dirty-bitmap.c, in their order and with their
texts; the node is already found (the QMP layer also knows device names). A format
driver that stores bitmaps in its image offers ``can_store_new_dirty_bitmap``,
``remove_persistent_dirty_bitmap`` and ``default_bitmap_granularity`` (qcow2 does); any
other driver keeps bitmaps in memory only, as QEMU's drivers without those callbacks.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from .dirtybitmap import (
    CHECK_ALLOW_RO,
    CHECK_BUSY,
    CHECK_DEFAULT,
    CHECK_RO,
    BitmapError,
    DirtyBitmap,
    create,
    find,
)
from .errors import BlockError
from .node import BlockNode

#: bdrv_get_default_bitmap_granularity for a node without clusters.
DEFAULT_GRANULARITY = 65536


def _error(exc: BitmapError) -> BlockError:
    return BlockError(str(exc), errno.EINVAL)


def lookup(node: BlockNode, name: str) -> DirtyBitmap:
    """block_dirty_bitmap_lookup once the node is found."""
    bitmap = find(node.dirty_bitmaps, name)
    if bitmap is None:
        raise BlockError(f"Dirty bitmap '{name}' not found", errno.ENOENT)
    return bitmap


def default_granularity(node: BlockNode) -> int:
    """bdrv_get_default_bitmap_granularity: the cluster size within [4 KiB, 64 KiB]."""
    fn = getattr(node.driver, "default_bitmap_granularity", None)
    if callable(fn):
        value = fn()
        if isinstance(value, int) and value > 0:
            return int(min(65536, max(4096, value)))
    return DEFAULT_GRANULARITY


def add(node: BlockNode, name: str, granularity: int | None, persistent: bool,
        disabled: bool) -> DirtyBitmap:
    """qmp_block_dirty_bitmap_add after the node lookup."""
    if granularity is not None:
        if granularity < 512 or granularity & (granularity - 1):
            raise BlockError("Granularity must be power of 2 and at least 512", errno.EINVAL)
    else:
        granularity = default_granularity(node)
    if persistent:
        can_store = getattr(node.driver, "can_store_new_dirty_bitmap", None)
        if not callable(can_store):
            raise BlockError(f"Can't store persistent bitmaps to {node.name}: "
                             f"{os.strerror(errno.ENOTSUP)}", errno.ENOTSUP)
        can_store(name, granularity, node.name)
    try:
        bitmap = create(node.dirty_bitmaps, name, granularity, node.getlength())
    except BitmapError as exc:
        raise _error(exc) from exc
    bitmap.disabled = disabled
    bitmap.persistent = persistent
    node.touch()
    return bitmap


def check_removable(node: BlockNode, name: str) -> DirtyBitmap:
    """block_dirty_bitmap_remove's checks: the bitmap exists, is not busy nor read-only."""
    bitmap = lookup(node, name)
    try:
        bitmap.check(CHECK_BUSY | CHECK_RO)
    except BitmapError as exc:
        raise _error(exc) from exc
    return bitmap


def remove(node: BlockNode, name: str) -> None:
    """block_dirty_bitmap_remove with release: from the image at once if persistent."""
    bitmap = check_removable(node, name)
    if bitmap.persistent:
        drop = getattr(node.driver, "remove_persistent_dirty_bitmap", None)
        if callable(drop):
            drop(name)
    node.dirty_bitmaps.remove(bitmap)
    node.touch()


def clear(node: BlockNode, name: str) -> None:
    """qmp_block_dirty_bitmap_clear."""
    bitmap = lookup(node, name)
    try:
        bitmap.check(CHECK_DEFAULT)
    except BitmapError as exc:
        raise _error(exc) from exc
    bitmap.clear()
    node.touch()


def set_enabled(node: BlockNode, name: str, enabled: bool) -> None:
    """qmp_block_dirty_bitmap_enable / _disable (allowed on read-only bitmaps)."""
    bitmap = lookup(node, name)
    try:
        bitmap.check(CHECK_ALLOW_RO)
    except BitmapError as exc:
        raise _error(exc) from exc
    bitmap.disabled = not enabled
    node.touch()


def merge(node: BlockNode, target: str,
          sources: Sequence[str | tuple[BlockNode | None, str, str]]) -> None:
    """block_dirty_bitmap_merge: all sources or nothing.

    A source is a bitmap name on ``node`` or (node or None when not found, node name,
    bitmap name); sources are looked up one by one as they are merged, as QEMU does, so
    the first bad one is the error, and the target is restored from its backup.
    """
    dst = lookup(node, target)
    backup: bytes | None = None
    try:
        for source in sources:
            if isinstance(source, str):
                src = find(node.dirty_bitmaps, source)
                if src is None:
                    raise BlockError(f"Dirty bitmap '{source}' not found", errno.ENOENT)
            else:
                src_node, src_node_name, src_name = source
                if src_node is None:
                    raise BlockError(f"Node '{src_node_name}' not found", errno.ENODEV)
                src = lookup(src_node, src_name)
            try:
                dst.check(CHECK_DEFAULT)
                src.check(CHECK_ALLOW_RO)
            except BitmapError as exc:
                raise _error(exc) from exc
            if src.size != dst.size:
                raise BlockError(f"Bitmaps are of different sizes (destination size is "
                                 f"{dst.size}, source size is {src.size}) and can't be merged",
                                 errno.EINVAL)
            if backup is None:
                backup = bytes(dst.bits)
            dst.merge_from(src)
    except BlockError:
        if backup is not None:
            dst.bits[:] = backup
        raise
    node.touch()


def sha256(node: BlockNode, name: str) -> str:
    """x-debug-block-dirty-bitmap-sha256."""
    return lookup(node, name).sha256()


def query(node: BlockNode) -> list[dict[str, object]]:
    """bdrv_query_dirty_bitmaps: BlockDirtyInfo, newest first, members in QEMU 7.2's order."""
    out: list[dict[str, object]] = []
    for bitmap in node.dirty_bitmaps:
        # A block job's own bitmap (active commit's) has no name, and no member for it.
        info: dict[str, object] = {"name": bitmap.name, "recording": bitmap.recording,
                                   "persistent": bitmap.persistent and not bitmap.skip_store,
                                   "busy": bitmap.busy,
                                   "granularity": bitmap.granularity, "count": bitmap.count()}
        if bitmap.inconsistent:
            info["inconsistent"] = True
        if not bitmap.name:
            del info["name"]
        out.append(info)
    return out

