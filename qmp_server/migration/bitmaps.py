"""Dirty bitmaps carried in the migration stream (QEMU's ``dirty-bitmaps`` capability).

QEMU 7.2's migration/block-dirty-bitmap.c, for facts only: which bitmaps travel, under
which names, what the destination does with them, and the texts of its errors.

Source (:func:`collect`): without ``block-bitmap-mapping``, the root node of every named
BlockBackend is addressed by the backend's name, every other node by its node name; all
named bitmaps of those nodes travel. With a mapping, only the nodes and bitmaps it lists
travel, under their aliases (and a ``transform`` may override persistence). A node with
bitmaps but an auto-generated name, an unusable bitmap (busy, read-only, inconsistent) or
a name longer than 255 bytes fails the migration. The persistent bitmaps that travel are
marked ``skip_store``: the source's inactivation neither writes them to the image nor
drops them from memory (a shared image must not get them twice), and they stay on the
source; activation (``cont`` after a failed or finished migration) clears the mark.

Destination (:func:`apply`): each bitmap's node is found by backend or node name (or the
destination's own mapping); a missing node or unknown alias drops the bitmaps (reported,
the migration goes on, as in QEMU); a bitmap of that name already on the node fails the
migration. The new bitmap gets the source's granularity, persistence, enabled state and
bits. A shared image still holds the stale in_use copy of a persistent bitmap; activation
skips it because the node already has the bitmap (qcow2_load_dirty_bitmaps).

Wire payload of one ``B`` frame (see :mod:`.stream`): ``{"node": alias, "name": alias,
"granularity": int, "persistent": bool, "enabled": bool, "size": int, "bits": str}``,
``bits`` being the lowest bitmap level, zlib-compressed, base64.
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from blocklayer.dirtybitmap import (
    CHECK_DEFAULT,
    MAX_NAME_SIZE,
    BitmapError,
    DirtyBitmap,
    create,
    find,
)
from blocklayer.graph import BlockGraph
from blocklayer.node import BlockNode

#: (backend name, root node) of every named BlockBackend, in QEMU's order.
Backends = Callable[[], Sequence[tuple[str, BlockNode | None]]]

#: qemu_put_counted_string: names travel with a one-byte length.
_MAX_NAME = 255


#: sizeof(BlockDriverState.node_name) - 1.
_MAX_NODE_NAME = 31
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


def _alias_map_error(mapping: list[dict[str, Any]], name_to_alias: bool) -> str | None:
    """construct_alias_map's first complaint for one direction, or None."""
    nodes: set[str] = set()
    for item in mapping:
        node_name, alias = item["node-name"], item["alias"]
        if not _ID.match(alias):
            return f"The node alias '{alias}' is not well-formed"
        if len(alias.encode()) > _MAX_NAME:
            return f"The node alias '{alias}' is longer than {_MAX_NAME} bytes"
        if len(node_name.encode()) > _MAX_NODE_NAME:
            return f"The node name '{node_name}' is longer than {_MAX_NODE_NAME} bytes"
        key = node_name if name_to_alias else alias
        if key in nodes:
            return (f"The node name '{node_name}' is mapped twice" if name_to_alias
                    else f"The node alias '{alias}' is used twice")
        nodes.add(key)
        seen: set[str] = set()
        for bitmap in item.get("bitmaps", []):
            name, balias = bitmap["name"], bitmap["alias"]
            if len(balias.encode()) > _MAX_NAME:
                return f"The bitmap alias '{balias}' is longer than {_MAX_NAME} bytes"
            if len(name.encode()) > MAX_NAME_SIZE:
                return f"The bitmap name '{name}' is longer than {MAX_NAME_SIZE} bytes"
            bkey = name if name_to_alias else balias
            if bkey in seen:
                return (f"The bitmap '{node_name}'/'{name}' is mapped twice" if name_to_alias
                        else f"The bitmap alias '{alias}'/'{balias}' is used twice")
            seen.add(bkey)
    return None


def check_mapping(mapping: list[dict[str, Any]]) -> str | None:
    """check_dirty_bitmap_mig_alias_map: both directions must be unambiguous."""
    return _alias_map_error(mapping, True) or _alias_map_error(mapping, False)


class BitmapMigrationError(Exception):
    """The migration fails; the message is QEMU's text."""


@dataclass
class Outgoing:
    """What the source sends, and which bitmaps it must not store meanwhile."""

    frames: list[dict[str, Any]]
    bitmaps: list[DirtyBitmap]


def _source_aliases(mapping: list[dict[str, Any]] | None
                    ) -> dict[str, tuple[str, dict[str, dict[str, Any]]]] | None:
    if mapping is None:
        return None
    return {item["node-name"]: (item["alias"], {b["name"]: b for b in item.get("bitmaps", [])})
            for item in mapping}


def _node_bitmaps(node: BlockNode, name: str,
                  aliases: dict[str, tuple[str, dict[str, dict[str, Any]]]] | None,
                  out: Outgoing) -> None:
    """add_bitmaps_to_list."""
    named = [b for b in node.dirty_bitmaps if b.name]
    if not named:
        return
    if not name:
        raise BitmapMigrationError(f"Bitmap '{named[0].name}' in unnamed node can't be migrated")
    bitmap_aliases: dict[str, dict[str, Any]] | None = None
    if aliases is not None:
        entry = aliases.get(name)
        if entry is None:
            return  # nodes without an alias stay behind
        node_alias, bitmap_aliases = entry
    else:
        node_alias = name
    if node_alias.startswith("#"):
        raise BitmapMigrationError(f"Bitmap '{named[0].name}' in a node with auto-generated "
                                   f"name '{node_alias}' can't be migrated")
    for bitmap in named:
        try:
            bitmap.check(CHECK_DEFAULT)
        except BitmapError as exc:
            raise BitmapMigrationError(str(exc)) from None
        persistent = bitmap.persistent and not bitmap.skip_store
        if bitmap_aliases is not None:
            inner = bitmap_aliases.get(bitmap.name)
            if inner is None:
                continue
            alias = inner["alias"]
            transform = inner.get("transform") or {}
            if "persistent" in transform:
                persistent = bool(transform["persistent"])
        else:
            if len(bitmap.name.encode()) > _MAX_NAME:
                raise BitmapMigrationError(f"Cannot migrate bitmap '{bitmap.name}' on node "
                                           f"'{name}': Name is longer than {_MAX_NAME} bytes")
            alias = bitmap.name
        out.bitmaps.append(bitmap)
        out.frames.append({
            "node": node_alias, "name": alias, "granularity": bitmap.granularity,
            "persistent": persistent, "enabled": not bitmap.disabled, "size": bitmap.size,
            "bits": base64.b64encode(zlib.compress(bytes(bitmap.bits), 1)).decode("ascii"),
        })


def collect(graph: BlockGraph, backends: Sequence[tuple[str, BlockNode | None]],
            mapping: list[dict[str, Any]] | None) -> Outgoing:
    """init_dirty_bitmap_migration, then the bits (the caller holds the graph lock).

    Marks the persistent bitmaps that travel ``skip_store`` only once all succeeded.
    """
    out = Outgoing([], [])
    aliases = _source_aliases(mapping)
    handled: set[int] = set()
    if aliases is None:
        for name, node in backends:
            if name and node is not None:
                _node_bitmaps(node, name, None, out)
                handled.add(id(node))
    for node in list(graph.nodes.values()):
        if id(node) not in handled:
            _node_bitmaps(node, node.name, aliases, out)
    for bitmap in out.bitmaps:
        bitmap.skip_store = True
    return out


def release(bitmaps: Sequence[DirtyBitmap]) -> None:
    """The migration failed before the nodes were inactivated: store them again."""
    for bitmap in bitmaps:
        bitmap.skip_store = False


def _lookup(graph: BlockGraph, backends: Sequence[tuple[str, BlockNode | None]],
            name: str) -> BlockNode | None:
    for blk_name, node in backends:
        if blk_name == name and node is not None:
            return node
    return graph.find(name)


def apply(graph: BlockGraph, backends: Sequence[tuple[str, BlockNode | None]],
          mapping: list[dict[str, Any]] | None, frame: dict[str, Any],
          report: Callable[[str], None]) -> None:
    """dirty_bitmap_load for one bitmap (the caller holds the graph lock).

    Problems QEMU only reports (and then ignores the bitmaps) go to ``report``; those
    that fail the migration raise BitmapMigrationError.
    """
    try:
        node_alias = str(frame["node"])
        alias = str(frame["name"])
        granularity = int(frame["granularity"])
        persistent = bool(frame["persistent"])
        enabled = bool(frame["enabled"])
        bits = zlib.decompress(base64.b64decode(frame["bits"], validate=True))
    except (KeyError, TypeError, ValueError, binascii.Error, zlib.error):
        raise BitmapMigrationError("Migration stream corrupt: bad 'B' frame") from None
    name = alias
    node: BlockNode | None
    if mapping is not None:
        entry = next((m for m in mapping if m["alias"] == node_alias), None)
        if entry is None:
            report(f"Error: Unknown node alias '{node_alias}'")
            return
        node = graph.find(entry["node-name"])
        if node is None:
            report(f"Cannot find device='' nor node-name='{entry['node-name']}'")
            return
        inner = next((b for b in entry.get("bitmaps", []) if b["alias"] == alias), None)
        if inner is None:
            report(f"Error: Unknown bitmap alias '{alias}' on node '{node.name}' "
                   f"(alias '{node_alias}')")
            return
        name = inner["name"]
        transform = inner.get("transform") or {}
        if "persistent" in transform:
            persistent = bool(transform["persistent"])
    else:
        node = _lookup(graph, backends, node_alias)
        if node is None:
            report(f"Cannot find device='{node_alias}' nor node-name='{node_alias}'")
            return
    if find(node.dirty_bitmaps, name) is not None:
        raise BitmapMigrationError(f"Bitmap with the same name ('{name}') already exists "
                                   "on destination")
    if granularity < 512 or granularity & (granularity - 1):
        raise BitmapMigrationError("Migration stream corrupt: bad 'B' frame")
    length = node.getlength()
    try:
        source_size = int(frame.get("size", length))
        bitmap = create(node.dirty_bitmaps, name, granularity, source_size)
    except (BitmapError, TypeError, ValueError) as exc:
        raise BitmapMigrationError(str(exc)) from None
    bitmap.deserialize_part(0, bits)
    if source_size != length:
        # The node's size differs: keep only the bits within it (hbitmap_truncate).
        bitmap.truncate(length)
    bitmap.persistent = persistent
    bitmap.disabled = not enabled
    node.touch()
