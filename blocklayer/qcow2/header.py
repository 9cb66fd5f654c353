"""The qcow2 header (cluster 0): parsing, validation and rewriting.

Field layout and limits follow docs/interop/qcow2.rst; the error texts are QEMU's
(block/qcow2.c, ``qcow2_do_open``) so that QMP clients see the same messages.
"""

from __future__ import annotations

import errno
import functools
import logging
import struct
from dataclasses import dataclass, field

from ..errors import BlockError

MAGIC = 0x514649FB
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
# sizeof(QCowHeader) in QEMU: what it writes as header_length for v3 images.
V3_HEADER_LENGTH = 112

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
# Bits QEMU knows; anything else is "Unknown incompatible feature".
INCOMPAT_KNOWN = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
SNAPSHOT_HEADER_SIZE = 40
MAX_BACKING_NAME = 1023
BACKING_FORMAT_MAX = 16  # sizeof(bs->backing_format)

FEATURE_INCOMPAT = 0
FEATURE_COMPAT = 1
FEATURE_AUTOCLEAR = 2

# The feature-name table QEMU 7.2 writes (type, bit, name), in its order.
FEATURE_TABLE: tuple[tuple[int, int, str], ...] = (
    (FEATURE_INCOMPAT, 0, "dirty bit"),
    (FEATURE_INCOMPAT, 1, "corrupt bit"),
    (FEATURE_INCOMPAT, 2, "external data file"),
    (FEATURE_INCOMPAT, 3, "compression type"),
    (FEATURE_INCOMPAT, 4, "extended L2 entries"),
    (FEATURE_COMPAT, 0, "lazy refcounts"),
    (FEATURE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_AUTOCLEAR, 1, "raw external data"),
)

MAX_BITMAPS = 65535  # QCOW2_MAX_BITMAPS
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
BITMAPS_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, offset

log = logging.getLogger(__name__)

_V2 = struct.Struct(">IIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
_EXT = struct.Struct(">II")
_FEATURE = struct.Struct(">BB46s")


def _invalid(message: str, err: int = errno.EINVAL) -> BlockError:
    return BlockError(message, err)


@dataclass
class Header:
    """Everything cluster 0 says, in host order."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    unknown_fields: bytes = b""
    backing_file: str | None = None
    backing_format: str | None = None
    feature_table: list[tuple[int, int, str]] = field(default_factory=list)
    bitmaps_ext: bytes | None = None
    data_file: str | None = None
    crypto_ext: bytes | None = None
    unknown_extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        """Width of one refcount entry in bits."""
        return 1 << self.refcount_order


class NeedMoreHeader(Exception):
    """Cluster 0 continues past the bytes read so far; read ``length`` bytes and retry."""

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length


def parse_header(buf: bytes) -> Header:
    """Parse and validate cluster 0 (or its first part).

    Raises :class:`NeedMoreHeader` when ``buf`` is too short to hold the extensions or
    the backing file name, and :class:`BlockError` with QEMU's message for an image QEMU
    would refuse on the grounds of its header alone.
    """
    if len(buf) < V2_HEADER_LENGTH:
        buf = buf + bytes(V2_HEADER_LENGTH - len(buf))
    (magic, version, backing_off, backing_size, cluster_bits, size, crypt, l1_size, l1_off,
     rt_off, rt_clusters, nb_snap, snap_off) = _V2.unpack_from(buf, 0)
    if magic != MAGIC:
        raise _invalid("Image is not in qcow2 format")
    if version < 2 or version > 3:
        raise _invalid(f"Unsupported qcow2 version {version}", errno.ENOTSUP)
    if cluster_bits < MIN_CLUSTER_BITS or cluster_bits > MAX_CLUSTER_BITS:
        raise _invalid(f"Unsupported cluster size: 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    hdr = Header(version, backing_off, backing_size, cluster_bits, size, crypt, l1_size, l1_off,
                 rt_off, rt_clusters, nb_snap, snap_off)
    if version == 3:
        if len(buf) < V3_HEADER_LENGTH:
            raise NeedMoreHeader(min(cluster_size, 4096))
        (hdr.incompatible_features, hdr.compatible_features, hdr.autoclear_features,
         hdr.refcount_order, hdr.header_length) = _V3.unpack_from(buf, V2_HEADER_LENGTH)
        if hdr.header_length < V3_MIN_HEADER_LENGTH:
            raise _invalid("qcow2 header too short")
    if hdr.header_length > cluster_size:
        raise _invalid("qcow2 header exceeds cluster size")
    ext_end = backing_off if backing_off else cluster_size
    needed = max(hdr.header_length, V3_HEADER_LENGTH if version == 3 else 0)
    if backing_off:
        needed = max(needed, backing_off + min(backing_size, MAX_BACKING_NAME + 1))
    if len(buf) < min(needed, cluster_size):
        raise NeedMoreHeader(cluster_size)
    if hdr.header_length > V3_HEADER_LENGTH:
        hdr.unknown_fields = bytes(buf[V3_HEADER_LENGTH:hdr.header_length])
    if backing_off > cluster_size:
        raise _invalid("Invalid backing file offset")
    if version == 3 and hdr.header_length > 104:
        hdr.compression_type = buf[104]
    _validate_compression(hdr)
    if hdr.incompatible_features & ~INCOMPAT_KNOWN:
        try:
            _parse_extensions(hdr, buf, ext_end, cluster_size)
        except (BlockError, NeedMoreHeader):
            hdr.feature_table = []
        raise unsupported_features(hdr, hdr.incompatible_features & ~INCOMPAT_KNOWN)
    _parse_extensions(hdr, buf, ext_end, cluster_size)
    if backing_off:
        if backing_size > min(MAX_BACKING_NAME, cluster_size - backing_off):
            raise _invalid("Backing file name too long")
        hdr.backing_file = bytes(buf[backing_off:backing_off + backing_size]).decode(
            "utf-8", "surrogateescape")
    return hdr


def _validate_compression(hdr: Header) -> None:
    if hdr.compression_type not in COMPRESSION_NAMES:
        raise _invalid(f"qcow2: unknown compression type: {hdr.compression_type}", errno.ENOTSUP)
    has_bit = bool(hdr.incompatible_features & INCOMPAT_COMPRESSION)
    if hdr.compression_type == COMPRESSION_ZLIB and has_bit:
        raise _invalid("qcow2: Compression type incompatible feature bit must not be set")
    if hdr.compression_type != COMPRESSION_ZLIB and not has_bit:
        raise _invalid("qcow2: Compression type incompatible feature bit must be set")


def unsupported_features(hdr: Header, mask: int) -> BlockError:
    """QEMU's "Unsupported qcow2 feature(s)" error, naming bits from the image's table.

    Bits the image does not name but QEMU does (external data file, extended L2) are
    named from QEMU's own table, since we refuse features QEMU knows.
    """
    names: list[str] = []
    table = list(hdr.feature_table) + [f for f in FEATURE_TABLE if f[0] == FEATURE_INCOMPAT]
    for ftype, bit, name in table:
        if ftype == FEATURE_INCOMPAT and bit < 64 and mask & (1 << bit):
            names.append(name[:46])
            mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return BlockError("Unsupported qcow2 feature(s): " + ", ".join(names), errno.ENOTSUP)


@functools.lru_cache(maxsize=8)
def _feature_table(data: bytes) -> tuple[tuple[int, int, str], ...]:
    # Nearly every image carries the very table QEMU writes: decode it once.
    return tuple((ftype, bit, name.split(b"\0", 1)[0].decode("utf-8", "replace"))
                 for ftype, bit, name in _FEATURE.iter_unpack(data))


def _parse_extensions(hdr: Header, buf: bytes, ext_end: int, cluster_size: int) -> None:
    offset = hdr.header_length
    while offset < ext_end:
        if offset + 8 > len(buf):
            raise NeedMoreHeader(cluster_size)
        magic, length = _EXT.unpack_from(buf, offset)
        offset += 8
        if offset > ext_end or length > ext_end - offset:
            raise _invalid("Header extension too large")
        if offset + length > len(buf):
            raise NeedMoreHeader(cluster_size)
        data = bytes(buf[offset:offset + length])
        if magic == EXT_END:
            return
        if magic == EXT_BACKING_FORMAT:
            if length >= BACKING_FORMAT_MAX:
                raise _invalid(f"ERROR: ext_backing_format: len={length} too large "
                               f"(>={BACKING_FORMAT_MAX})")
            hdr.backing_format = data.decode("utf-8", "surrogateescape")
        elif magic == EXT_FEATURE_TABLE:
            hdr.feature_table.extend(_feature_table(data[:length - length % 48]))
        elif magic == EXT_BITMAPS:
            hdr.bitmaps_ext = data
        elif magic == EXT_DATA_FILE:
            hdr.data_file = data.decode("utf-8", "surrogateescape")
        elif magic == EXT_CRYPTO:
            hdr.crypto_ext = data
        else:
            hdr.unknown_extensions.append((magic, data))
        offset += (length + 7) & ~7


def validate_tables(hdr: Header) -> None:
    """The table checks QEMU runs after the feature bits (sizes, alignment, L1 coverage)."""
    cs = hdr.cluster_size
    if hdr.refcount_table_clusters == 0:
        raise _invalid("Image does not contain a reference count table")
    _validate_table(cs, hdr.refcount_table_offset, hdr.refcount_table_clusters, cs,
                    MAX_REFTABLE_BYTES, "Reference count table")
    _validate_table(cs, hdr.snapshots_offset, hdr.nb_snapshots, SNAPSHOT_HEADER_SIZE,
                    SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS, "Snapshot table")
    _validate_table(cs, hdr.l1_table_offset, hdr.l1_size, 8, MAX_L1_BYTES, "Active L1 table")
    l2_span = cs * (cs // 8)
    needed = -(-hdr.size // l2_span)
    if needed > 0x7FFFFFFF:
        raise _invalid("Image is too big", errno.EFBIG)
    if hdr.l1_size < needed:
        raise _invalid("L1 table is too small")


def _validate_table(cs: int, offset: int, entries: int, entry_len: int, max_bytes: int,
                    name: str) -> None:
    if entries > max_bytes // entry_len:
        raise _invalid(f"{name} too large", errno.EFBIG)
    if (1 << 63) - 1 - entries * entry_len < offset or offset % cs:
        raise _invalid(f"{name} offset invalid")


def _ext(magic: int, data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return _EXT.pack(magic, len(data)) + data + bytes(pad)


def serialize_header(hdr: Header) -> bytes:
    """Cluster 0 as QEMU's ``qcow2_update_header`` lays it out.

    Order: header, unknown header fields, backing format, feature table (v3, clusters
    over 4 KiB), bitmaps, unknown extensions, end marker, backing file name. Updates
    ``header_length`` and ``backing_file_offset`` in ``hdr`` to match.
    """
    cs = hdr.cluster_size
    if hdr.version >= 3:
        hdr.header_length = V3_HEADER_LENGTH + len(hdr.unknown_fields)
    else:
        hdr.header_length = V2_HEADER_LENGTH
    parts: list[bytes] = []
    exts: list[bytes] = []
    if hdr.backing_format:
        exts.append(_ext(EXT_BACKING_FORMAT, hdr.backing_format.encode("utf-8", "surrogateescape")))
    if hdr.version >= 3 and cs > 4096:
        table = b"".join(_FEATURE.pack(t, b, n.encode()) for t, b, n in FEATURE_TABLE)
        exts.append(_ext(EXT_FEATURE_TABLE, table))
    if hdr.bitmaps_ext is not None:
        exts.append(_ext(EXT_BITMAPS, hdr.bitmaps_ext))
    for magic, data in hdr.unknown_extensions:
        exts.append(_ext(magic, data))
    exts.append(_ext(EXT_END, b""))
    ext_blob = b"".join(exts)
    name = (hdr.backing_file or "").encode("utf-8", "surrogateescape")
    name_off = hdr.header_length + len(ext_blob)
    hdr.backing_file_offset = name_off if hdr.backing_file else 0
    hdr.backing_file_size = len(name) if hdr.backing_file else 0
    parts.append(_V2.pack(MAGIC, hdr.version, hdr.backing_file_offset, hdr.backing_file_size,
                          hdr.cluster_bits, hdr.size, hdr.crypt_method, hdr.l1_size,
                          hdr.l1_table_offset, hdr.refcount_table_offset,
                          hdr.refcount_table_clusters, hdr.nb_snapshots, hdr.snapshots_offset))
    if hdr.version >= 3:
        parts.append(_V3.pack(hdr.incompatible_features, hdr.compatible_features,
                              hdr.autoclear_features, hdr.refcount_order, hdr.header_length))
        parts.append(bytes([hdr.compression_type]) + bytes(7))
        parts.append(hdr.unknown_fields)
    parts.append(ext_blob)
    parts.append(name)
    blob = b"".join(parts)
    if len(blob) > cs:
        raise BlockError("Could not update qcow2 header: no space in cluster 0", errno.ENOSPC)
    return blob + bytes(cs - len(blob))


@dataclass(frozen=True)
class BitmapsExtension:
    """The bitmaps extension once validated: where the bitmap directory is."""

    nb_bitmaps: int
    directory_size: int
    directory_offset: int


def bitmaps_extension(hdr: Header) -> BitmapsExtension | None:
    """Validate the bitmaps extension as qcow2_read_extensions does, with its texts.

    None when there is none, or when it is stale: autoclear bit 0 is clear because a
    program that knows no bitmaps wrote the image. QEMU then warns, ignores the bitmaps
    and (when writable) drops the extension; ``hdr.bitmaps_ext`` tells the caller which.
    """
    data = hdr.bitmaps_ext
    if data is None:
        return None
    if len(data) != BITMAPS_EXT.size:
        raise _invalid("bitmaps_ext: Invalid extension length")
    if not hdr.autoclear_features & AUTOCLEAR_BITMAPS:
        if hdr.version < 3:
            log.warning("This qcow2 v2 image contains bitmaps, but they may have been "
                        "modified by a program without persistent bitmap support; so now "
                        "they must all be considered inconsistent")
        else:
            log.warning("a program lacking bitmap support modified this file, so all "
                        "bitmaps are now considered inconsistent")
        # error_printf after the warning: a continuation, printed bare (see the handler
        # the program installs; "qemu_hint" is its marker).
        log.warning("Some clusters may be leaked, run 'qemu-img check -r' on the image "
                    "file to fix.", extra={"qemu_hint": True})
        return None
    nb_bitmaps, reserved, dir_size, dir_offset = BITMAPS_EXT.unpack(data)
    if reserved:
        raise _invalid("bitmaps_ext: Reserved field is not zero")
    if nb_bitmaps > MAX_BITMAPS:
        raise _invalid(f"bitmaps_ext: Image has {nb_bitmaps} bitmaps, exceeding the QEMU "
                       f"supported maximum of {MAX_BITMAPS}")
    if nb_bitmaps == 0:
        raise _invalid("found bitmaps extension with zero bitmaps")
    if dir_offset & (hdr.cluster_size - 1):
        raise _invalid("bitmaps_ext: invalid bitmap directory offset")
    if dir_size > MAX_BITMAP_DIRECTORY_SIZE:
        raise _invalid(f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum "
                       f"supported size ({MAX_BITMAP_DIRECTORY_SIZE})")
    return BitmapsExtension(nb_bitmaps, dir_size, dir_offset)
