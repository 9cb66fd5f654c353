"""Where the metadata is, so that no write lands on it (QEMU's metadata overlap checks).

QEMU (``qcow2_check_metadata_overlap``) knows these kinds of metadata, in this order; a
write that hits several is reported with the first. ``overlap-check=constant`` covers
the fixed structures, ``cached`` (the default) adds what the caches know (L2 tables,
refcount blocks, snapshot L1 tables), ``all`` also inactive L2 tables (which we do not
track: ``all`` behaves as ``cached``). The bitmap directory counts only while the
image's autoclear bit for bitmaps is set, as in QEMU.
"""

from __future__ import annotations

HEADER = 1 << 0
ACTIVE_L1 = 1 << 1
ACTIVE_L2 = 1 << 2
REFCOUNT_TABLE = 1 << 3
REFCOUNT_BLOCK = 1 << 4
SNAPSHOT_TABLE = 1 << 5
INACTIVE_L1 = 1 << 6
INACTIVE_L2 = 1 << 7  # not tracked (see above); kept so the bit numbers match QEMU's
BITMAP_DIRECTORY = 1 << 8

#: QEMU's metadata_ol_names, by bit.
NAMES = ("qcow2_header", "active L1 table", "active L2 table", "refcount table",
         "refcount block", "snapshot table", "inactive L1 table", "inactive L2 table",
         "bitmap directory")

CONSTANT = HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | BITMAP_DIRECTORY
CACHED = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK | INACTIVE_L1


def name_of(mask: int) -> str:
    """The name QEMU reports for a non-empty overlap mask (its lowest bit)."""
    return NAMES[(mask & -mask).bit_length() - 1]


class MetadataMap:
    """Byte ranges of the tables plus the single clusters of L2 tables and refblocks."""

    __slots__ = ("cluster_bits", "clusters", "ranges")

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self.ranges: list[tuple[int, int, int]] = []
        self.clusters: dict[int, int] = {}

    def add_range(self, offset: int, length: int, kind: int) -> None:
        """A table of ``length`` bytes at ``offset`` (nothing if empty)."""
        if length > 0:
            self.ranges.append((offset, offset + length, kind))

    def add_cluster(self, offset: int, kind: int) -> None:
        """A one-cluster table (L2 table, refcount block) at ``offset``."""
        cluster = offset >> self.cluster_bits
        self.clusters[cluster] = self.clusters.get(cluster, 0) | kind

    def hits(self, offset: int, length: int, check: int) -> int:
        """Mask of the kinds in ``check`` that the clusters of [offset, offset+length) hold."""
        if length <= 0:
            return 0
        # QEMU widens the range to whole clusters: metadata owns its clusters entirely.
        mask = (1 << self.cluster_bits) - 1
        end = (offset + length + mask) & ~mask
        offset &= ~mask
        found = 0
        for start, stop, kind in self.ranges:
            if kind & check and start < end and offset < stop:
                found |= kind
        if self.clusters and check & (ACTIVE_L2 | REFCOUNT_BLOCK):
            first = offset >> self.cluster_bits
            last = (end - 1) >> self.cluster_bits
            if last - first < len(self.clusters):
                for cluster in range(first, last + 1):
                    found |= self.clusters.get(cluster, 0) & check
            else:
                for cluster, kind in self.clusters.items():
                    if first <= cluster <= last:
                        found |= kind & check
        return found
