"""The data part of a backup job (block/backup.c over block/block-copy.c): which clusters
of the source are still to be copied into the target, and copying them, either in the
background or just before a write overwrites them (copy-before-write), so that the
target ends up with the source as it was when the job started."""

from __future__ import annotations

from dataclasses import dataclass

from .blockjob import backing
from .blockstatus import block_status_above, is_allocated
from .dirtybitmap import DirtyBitmap
from .driver import BLOCK_ZERO
from .errors import BlockError
from .node import BlockNode

#: BLOCK_COPY_CLUSTER_SIZE_DEFAULT: the smallest unit a backup copies.
DEFAULT_CLUSTER = 64 << 10
#: BLOCK_COPY_MAX_BUFFER: the largest read-and-write request.
MAX_BUFFER = 1 << 20

NO_CLUSTER_SIZE_WARNING = (
    "The target block device doesn't provide information about the block size and it "
    "doesn't have a backing file. The default block size of 65536 bytes is used. If the "
    "actual block size of the target exceeds this default, the backup may be unusable")


def copy_cluster_size(target: BlockNode) -> tuple[int, bool]:
    """block_copy_calculate_cluster_size: (the cluster size, whether QEMU warns that the
    target does not say its own and has no backing file to fall back on)."""
    size = target.driver.image_info().get("cluster-size") if target.has_info() else None
    if isinstance(size, int) and size > 0:
        return max(DEFAULT_CLUSTER, size), False
    # bdrv_get_info: raw asks its file child, and a file says (nothing) where other
    # protocols (null-co) cannot.
    bottom = target
    while bottom.driver.name == "raw" and bottom.child("file") is not None:
        edge = bottom.child("file")
        assert edge is not None
        bottom = edge.child
    if bottom.driver.name == "file":
        return DEFAULT_CLUSTER, False
    return DEFAULT_CLUSTER, backing(target) is None


@dataclass(eq=False)
class CopyState:
    """BlockCopyState: what is left to copy (a bitmap of clusters) and where to."""

    source: BlockNode
    target: BlockNode
    bitmap: DirtyBitmap
    length: int
    #: The largest request (x-perf's max-chunk, else BLOCK_COPY_MAX_BUFFER).
    chunk: int = MAX_BUFFER

    @classmethod
    def create(cls, source: BlockNode, target: BlockNode, cluster: int) -> CopyState:
        """Every cluster of the source still to copy (block_copy_state_new + the job's
        backup_init_bcs_bitmap for ``full``)."""
        length = source.getlength()
        bitmap = DirtyBitmap("", cluster, length)
        bitmap.set_range(0, length)
        return cls(source, target, bitmap, length)

    def remaining(self) -> int:
        """The bytes still to copy (bdrv_get_dirty_count)."""
        return self.bitmap.count()

    def reset_unallocated(self) -> int:
        """sync ``top``: clusters the source itself does not hold are not copied
        (block_copy_reset_unallocated over the whole disk); the bytes dropped."""
        cluster = self.bitmap.granularity
        before = self.bitmap.count()
        offset = 0
        # Bounded: each step moves forward by at least one cluster.
        while offset < self.length:
            allocated, count = is_allocated(self.source, offset, self.length - offset)
            count = max(cluster, count - count % cluster)
            if not allocated:
                self.bitmap.reset_range(offset, count)
            offset += count
        return before - self.bitmap.count()

    def copy(self, offset: int, length: int) -> int:
        """block_copy over [offset, offset + length): the clusters still to copy there
        are cleared and copied as the source shows them now (zero writes for what reads
        as zeroes). Returns the bytes copied."""
        cluster = self.bitmap.granularity
        start = offset - offset % cluster
        end = min(self.length, -(-(offset + length) // cluster) * cluster)
        copied = 0
        position = start
        while position < end:
            if not self.bitmap.get(position):
                position += cluster
                continue
            run = cluster
            while position + run < end and run < self.chunk and self.bitmap.get(position + run):
                run += cluster
            status = block_status_above(self.source, position, min(run, self.length - position))
            count = status.pnum
            if count < cluster:
                count, zero = cluster, False
            else:
                count -= count % cluster if position + count < self.length else 0
                zero = bool(status.flags & BLOCK_ZERO)
            count = min(count, run, self.length - position)
            self.bitmap.reset_range(position, count)
            try:
                if zero:
                    self.target.pwrite_zeroes(position, count)
                else:
                    self.target.pwrite(position, self.source.pread(position, count))
            except BlockError:
                self.bitmap.set_range(position, count)  # still to copy
                raise
            copied += count
            position += count
        return copied
