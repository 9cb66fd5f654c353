"""Decompression of compressed clusters.

zlib: QEMU writes raw deflate (window bits 12). zstd (compression type 1): QEMU writes
one or more zstd frames and stops at a full cluster (qcow2_zstd_decompress); the bytes
after them up to the sector boundary are padding. The ``zstandard`` package is imported
the first time a zstd cluster is read, so images without one never need it.
"""

from __future__ import annotations

import errno
import io
import zlib
from types import ModuleType

from ..errors import BlockError
from .header import COMPRESSION_NAMES, COMPRESSION_ZLIB, COMPRESSION_ZSTD

_zstd: ModuleType | None = None


def _zstandard() -> ModuleType:
    global _zstd
    if _zstd is None:
        try:
            import zstandard
        except ImportError as exc:  # an install without the dependency
            raise BlockError("Cannot read compressed cluster: compression type 'zstd' needs "
                             "the zstandard package", errno.ENOTSUP) from exc
        _zstd = zstandard
    return _zstd


def _zstd_decompress(data: bytes, cluster_size: int) -> bytes:
    module = _zstandard()
    try:
        # Output is bounded by the read size: a frame claiming more than a cluster
        # cannot make us allocate more (QEMU's fixed-size output buffer).
        reader = module.ZstdDecompressor().stream_reader(io.BytesIO(data),
                                                         read_across_frames=True)
        with reader:
            out: bytes = reader.read(cluster_size)
    except module.ZstdError as exc:
        raise BlockError(f"Could not decompress cluster: {exc}", errno.EIO) from exc
    if len(out) != cluster_size:
        raise BlockError("Could not decompress cluster: short output", errno.EIO)
    return out


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """Decompress one cluster; QEMU treats anything short of a full cluster as an I/O error."""
    if compression_type == COMPRESSION_ZSTD:
        return _zstd_decompress(data, cluster_size)
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
