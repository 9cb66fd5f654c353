"""Block status of a qcow2 image: what an L2 entry says about a guest range.

QEMU's qcow2_get_host_offset with count_contiguous_subclusters (block/qcow2-cluster.c)
and qcow2_detect_metadata_preallocation (block/qcow2-refcount.c), for images without
extended L2 entries (those are refused at open). Every loop is bounded by one L2 slice
or one refcount block, and every offset taken from the image is checked first.
"""

from __future__ import annotations

from .errors import Qcow2Corruption, c_hex
from .image import Qcow2Image
from .l2 import L2E_OFFSET_MASK, ClusterType, cluster_type

#: Types whose clusters are required to be contiguous in the file to form one run.
_MAPPED = (ClusterType.NORMAL, ClusterType.ZERO_ALLOC)


def host_offset(img: Qcow2Image, offset: int, length: int) -> tuple[ClusterType, int, int]:
    """(type, bytes, host offset) for the guest range at ``offset`` (qcow2_get_host_offset).

    ``bytes`` (> 0 for ``length`` > 0) is how much of the range has the type of its first
    cluster, with consecutive host clusters for NORMAL and ZERO_ALLOC, and never past the
    end of the L2 slice that maps ``offset``; compressed clusters come one at a time. The
    host offset is meaningful for NORMAL and ZERO_ALLOC only.
    """
    cb = img.cluster_bits
    in_cluster = offset & (img.cluster_size - 1)
    cluster = offset >> cb
    l2_index = cluster & img.l2_mask
    slice_index = l2_index & img.slice_mask
    needed = min(length + in_cluster, (img.slice_entries - slice_index) << cb)
    l1_index = cluster >> img.l2_bits
    l2_offset = img.l2_table_offset(l1_index)  # 0 past the L1 table; checks alignment
    if not l2_offset:
        return ClusterType.UNALLOCATED, needed - in_cluster, 0
    table = img.l2_slice(l1_index, l2_index - slice_index)
    assert table is not None
    entry = table[slice_index]
    kind = cluster_type(entry)
    where = f"(L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(slice_index)})"
    if img.version < 3 and kind in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC):
        raise Qcow2Corruption(f"Zero cluster entry found in pre-v3 image {where}")
    host = 0
    if kind in _MAPPED:
        host_cluster = entry & L2E_OFFSET_MASK
        if host_cluster & (img.cluster_size - 1):
            raise Qcow2Corruption(f"Cluster allocation offset {c_hex(host_cluster)} unaligned {where}")
        host = host_cluster + in_cluster
    if kind == ClusterType.COMPRESSED:
        return kind, min(needed, img.cluster_size) - in_cluster, entry
    # count_contiguous_subclusters: the same type, and for mapped clusters the next
    # host cluster each time; at most the clusters the request covers (within the slice).
    clusters = -(-needed >> cb)
    expected = entry & L2E_OFFSET_MASK
    count = 1
    while count < clusters:
        following = table[slice_index + count]
        if cluster_type(following) != kind:
            break
        if kind in _MAPPED:
            expected += img.cluster_size
            if following & L2E_OFFSET_MASK != expected:
                break
        count += 1
    return kind, min(needed, count << cb) - in_cluster, host


def detect_metadata_preallocation(img: Qcow2Image, file_length: int, allocated: int) -> bool:
    """qcow2_detect_metadata_preallocation: whether the image references clearly more
    clusters than its file really holds (``preallocation=metadata``), so that data
    clusters may be holes in the file and block status must ask the file.

    ``allocated`` is the bytes the file occupies. The count stops at the threshold, and
    refcount blocks that do not exist are skipped whole.
    """
    real_clusters = allocated // img.cluster_size
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = -(-file_length // img.cluster_size)
    refcounts = img.refcounts
    per_block = refcounts.block_mask + 1
    count = 0
    cluster = 0
    while cluster < end_cluster and count < threshold:
        block_index = cluster >> refcounts.block_bits
        block_end = min(end_cluster, (block_index + 1) * per_block)
        block_offset = refcounts.block_offset(block_index)
        if not block_offset:
            cluster = block_end
            continue
        block = refcounts.cache.get(block_offset).table
        while cluster < block_end and count < threshold:
            count += bool(block.get(cluster & refcounts.block_mask))
            cluster += 1
    return count >= threshold
