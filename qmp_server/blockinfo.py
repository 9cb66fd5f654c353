"""BlockDeviceInfo / ImageInfo for query-named-block-nodes, built from the graph."""

from __future__ import annotations

from typing import Any

from blocklayer.node import BlockNode


def _round_sector(size: int) -> int:
    # QEMU keeps lengths in 512-byte sectors and reports them rounded up.
    return (size + 511) // 512 * 512


def _actual_size(node: BlockNode) -> int | None:
    while True:
        size = node.driver.image_info().get("actual-size")
        if size is not None:
            return int(size)
        edge = node.child("file")
        if edge is None:
            return None
        node = edge.child


def image_info(node: BlockNode, flat: bool) -> dict[str, Any]:
    """ImageInfo of ``node`` (with ``backing-image`` nested unless ``flat``)."""
    driver = node.driver
    length = driver.getlength()
    info: dict[str, Any] = {
        "virtual-size": _round_sector(length) if driver.protocol else length,
        "filename": node.filename,
        "format": driver.name,
    }
    actual = _actual_size(node)
    if actual is not None:
        info["actual-size"] = actual
    info["dirty-flag"] = False
    # A format's actual size is its file's, found above; the rest is the driver's to say.
    info.update((k, v) for k, v in driver.image_info().items() if k != "actual-size")
    backing = node.child("backing")
    if backing is not None and not flat:
        info["backing-image"] = image_info(backing.child, flat)
    return info


def backing_depth(node: BlockNode) -> int:
    """How many backing images stand below ``node``."""
    depth = 0
    edge = node.child("backing")
    while edge is not None:
        depth += 1
        edge = edge.child.child("backing")
    return depth


def block_device_info(node: BlockNode, flat: bool) -> dict[str, Any]:
    """One entry of query-named-block-nodes (QEMU 10.1 members)."""
    options = node.options
    info: dict[str, Any] = {
        "iops_rd": 0,
        "detect_zeroes": options.detect_zeroes,
        "image": image_info(node, flat),
        "iops_wr": 0,
        "ro": options.read_only,
        "node-name": node.name,
        "backing_file_depth": backing_depth(node),
        "drv": node.drv_name,
        "iops": 0,
        "bps_wr": 0,
        "write_threshold": 0,
        "encrypted": False,
        "bps": 0,
        "bps_rd": 0,
        "cache": {"no-flush": options.cache_no_flush, "direct": options.cache_direct, "writeback": True},
        "file": node.filename,
        "active": not node.inactive,
        "children": [{"child": edge.name, "node-name": edge.child.name} for edge in node.children],
    }
    backing = node.child("backing")
    if backing is not None:
        info["backing_file"] = backing.child.filename
    return info
