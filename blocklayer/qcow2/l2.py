"""L1/L2 entry bits and cluster classification (qcow2.rst "Cluster mapping")."""

from __future__ import annotations

import enum

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE


class ClusterType(enum.IntEnum):
    """What a standard (non-extended) L2 entry means for reads and writes."""

    UNALLOCATED = 0
    ZERO_PLAIN = 1
    ZERO_ALLOC = 2
    NORMAL = 3
    COMPRESSED = 4


def cluster_type(entry: int) -> ClusterType:
    """Classify an L2 entry (v2 zero flags are caught by the caller)."""
    if entry & OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    if entry & OFLAG_ZERO:
        return ClusterType.ZERO_ALLOC if entry & L2E_OFFSET_MASK else ClusterType.ZERO_PLAIN
    if entry & L2E_OFFSET_MASK:
        return ClusterType.NORMAL
    return ClusterType.UNALLOCATED


class CompressedLayout:
    """Decodes compressed-cluster descriptors for one cluster size."""

    __slots__ = ("offset_mask", "sector_mask", "shift")

    def __init__(self, cluster_bits: int) -> None:
        self.shift = 62 - (cluster_bits - 8)
        self.sector_mask = (1 << (cluster_bits - 8)) - 1
        self.offset_mask = (1 << self.shift) - 1

    def host_range(self, entry: int) -> tuple[int, int]:
        """(host offset, byte length) of the compressed data of an L2 entry."""
        offset = entry & self.offset_mask
        sectors = ((entry >> self.shift) & self.sector_mask) + 1
        return offset, sectors * 512 - (offset & 511)
