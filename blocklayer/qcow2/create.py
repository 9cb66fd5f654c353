"""Creating a qcow2 image as QEMU's ``blockdev-create`` does (block/qcow2.c, qcow2_co_create).

QEMU writes a minimal image (header, a one-cluster refcount table, one empty refcount
block), opens it, allocates the first three clusters for those, rewrites the full header,
grows the L1 table to the virtual size (qcow2_co_truncate -> qcow2_grow_l1_table, exact
size) and stores the backing file name. We take the same steps with our own image code,
so the allocator (QEMU's free-cluster search, refcount-block growth) decides where the L1
table goes exactly as QEMU's does, and the bytes come out the same.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..driver import ChildIO
from ..errors import BlockError
from . import header as H
from .image import open_image

_COMPRESSION_TYPES = {"zlib": H.COMPRESSION_ZLIB, "zstd": H.COMPRESSION_ZSTD}
DEFAULT_CLUSTER_SIZE = 65536
# QCOW_MAX_L1_SIZE / L1E_SIZE, and INT_MAX / L1E_SIZE (qcow2_grow_l1_table's limits).
_MAX_L1_ENTRIES = min(H.MAX_L1_BYTES // 8, (2**31 - 1) // 8)


@dataclass(frozen=True)
class Qcow2CreateSpec:
    """Validated ``blockdev-create`` options of a qcow2 image."""

    size: int
    version: int
    cluster_bits: int
    refcount_order: int
    lazy_refcounts: bool
    compression_type: int
    backing_file: str | None
    backing_format: str | None


def _invalid(message: str) -> BlockError:
    return BlockError(message, errno.EINVAL)


def validate(options: Mapping[str, Any]) -> Qcow2CreateSpec:
    """QEMU's checks of qcow2_co_create, in its order and with its texts.

    ``options`` are BlockdevCreateOptionsQcow2 members (after ``file`` was opened).
    """
    size = options["size"] % (1 << 64)  # QAPI 'size' wraps negative numbers
    if size % 512:
        raise _invalid("Image size must be a multiple of 512 bytes")
    version = 2 if options.get("version") == "v2" else 3
    cluster_size = options.get("cluster-size", DEFAULT_CLUSTER_SIZE) % (1 << 64)
    cluster_bits = (cluster_size & -cluster_size).bit_length() - 1 if cluster_size else 0
    if not (H.MIN_CLUSTER_BITS <= cluster_bits <= H.MAX_CLUSTER_BITS) or cluster_size != 1 << cluster_bits:
        raise _invalid(f"Cluster size must be a power of two between {1 << H.MIN_CLUSTER_BITS} and "
                       f"{1 << (H.MAX_CLUSTER_BITS - 10)}k")
    backing_file = options.get("backing-file")
    backing_format = options.get("backing-fmt")
    if backing_format is not None and backing_file is None:
        raise _invalid("Backing format cannot be used without backing file")
    lazy = bool(options.get("lazy-refcounts", False))
    if version < 3 and lazy:
        raise _invalid("Lazy refcounts only supported with compatibility level 1.1 and above "
                       "(use version=v3 or greater)")
    bits = options.get("refcount-bits", 16)
    if bits > 64 or bits <= 0 or bits & (bits - 1):
        raise _invalid("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and bits != 16:
        raise _invalid("Different refcount widths than 16 bits require compatibility level 1.1 or "
                       "above (use version=v3 or greater)")
    compression = _COMPRESSION_TYPES[options.get("compression-type", "zlib")]
    if compression != H.COMPRESSION_ZLIB and version < 3:
        raise _invalid("Non-zlib compression type is only supported with compatibility level 1.1 "
                       "and above (use version=v3 or greater)")
    prealloc = options.get("preallocation", "off")
    if prealloc != "off":
        # QEMU implements metadata/falloc/full preallocation; we do not (documented).
        raise BlockError(f"Could not resize image: Unsupported preallocation mode '{prealloc}'",
                         errno.ENOTSUP)
    return Qcow2CreateSpec(size=size, version=version, cluster_bits=cluster_bits,
                           refcount_order=bits.bit_length() - 1, lazy_refcounts=lazy,
                           compression_type=compression, backing_file=backing_file,
                           backing_format=backing_format)


def _minimal_header(spec: Qcow2CreateSpec) -> H.Header:
    cs = 1 << spec.cluster_bits
    hdr = H.Header(version=spec.version, backing_file_offset=0, backing_file_size=0,
                   cluster_bits=spec.cluster_bits, size=0, crypt_method=H.CRYPT_NONE, l1_size=0,
                   l1_table_offset=0, refcount_table_offset=cs, refcount_table_clusters=1,
                   nb_snapshots=0, snapshots_offset=0, refcount_order=spec.refcount_order,
                   compression_type=spec.compression_type)
    if spec.lazy_refcounts:
        hdr.compatible_features |= H.COMPAT_LAZY_REFCOUNTS
    if spec.compression_type != H.COMPRESSION_ZLIB:
        hdr.incompatible_features |= H.INCOMPAT_COMPRESSION
    return hdr


def create(file: ChildIO, spec: Qcow2CreateSpec) -> None:
    """Write the image described by ``spec`` onto ``file`` (which the caller may write)."""
    cs = 1 << spec.cluster_bits
    hdr = _minimal_header(spec)
    try:
        file.pwrite(0, H.serialize_header(hdr))
    except BlockError as err:
        raise BlockError(f"Could not write qcow2 header: {_strerror(err)}", err.errno) from err
    # A refcount table whose first entry points at the (empty) refcount block after it.
    table = struct.pack(">Q", 2 * cs) + bytes(2 * cs - 8)
    try:
        file.pwrite(cs, table)
    except BlockError as err:
        raise BlockError(f"Could not write refcount table: {_strerror(err)}", err.errno) from err

    img = open_image(file, {}, read_only=False, inactive=False)
    try:
        first = img.refcounts.alloc(3)
        if first != 0:
            raise BlockError("Huh, first cluster in empty image is already in use?", errno.EIO)
        img.update_header()
        # qcow2_co_truncate, preallocation off: an L1 table of exactly the needed size.
        l2_coverage = cs * (cs // 8)
        l1_size = -(-spec.size // l2_coverage)
        if l1_size > _MAX_L1_ENTRIES:
            raise BlockError("Could not resize image: Failed to grow the L1 table: File too large",
                             errno.EFBIG)
        if l1_size:
            l1_bytes = l1_size * 8
            offset = img.refcounts.alloc(-(-l1_bytes // cs))
            img.refcounts.cache.write()
            img.file.flush()
            img.file.pwrite(offset, bytes(l1_bytes))
            img.file.flush()
            img.hdr.l1_size = l1_size
            img.hdr.l1_table_offset = offset
        img.hdr.size = spec.size
        if spec.backing_file is not None:
            # bdrv_change_backing_file -> qcow2_change_backing_file
            if len(spec.backing_file.encode()) > H.MAX_BACKING_NAME:
                raise BlockError(f"Could not assign backing file '{spec.backing_file}' with format "
                                 f"'{spec.backing_format or '(null)'}': Invalid argument", errno.EINVAL)
            img.hdr.backing_file = spec.backing_file
            img.hdr.backing_format = spec.backing_format
        img.update_header()
    finally:
        # blk_unref closes the image, which writes its caches back even after a failure
        # (a failed resize leaves the header and refcount clusters accounted for).
        try:
            img.refcounts.cache.write()
            img.file.flush()
        finally:
            img.drop()


def _strerror(err: BlockError) -> str:
    return os.strerror(err.errno) if err.errno else err.message
