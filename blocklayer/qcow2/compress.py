"""Decompression of compressed clusters (QEMU writes raw deflate, window bits 12)."""

from __future__ import annotations

import errno
import zlib

from ..errors import BlockError
from .header import COMPRESSION_NAMES, COMPRESSION_ZLIB


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """Inflate one cluster; QEMU treats anything short of a full cluster as an I/O error."""
    if compression_type != COMPRESSION_ZLIB:
        name = COMPRESSION_NAMES.get(compression_type, str(compression_type))
        raise BlockError(f"Cannot read compressed cluster: compression type '{name}' "
                         "is not supported", errno.ENOTSUP)
    try:
        out = zlib.decompressobj(-12).decompress(data, cluster_size)
    except zlib.error as exc:
        raise BlockError(f"Could not decompress cluster: {exc}", errno.EIO) from exc
    if len(out) != cluster_size:
        raise BlockError("Could not decompress cluster: short output", errno.EIO)
    return out
