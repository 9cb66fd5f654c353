"""Runtime options of a qcow2 node (QMP ``BlockdevOptionsQcow2``) and cache sizing.

Defaults and error texts are QEMU's (``qcow2_update_options_prepare`` and
``read_cache_sizes`` in block/qcow2.c).
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BlockError

DEFAULT_L2_CACHE_MAX = 32 << 20  # Linux default
MIN_L2_CACHE_ENTRIES = 2
MIN_REFCOUNT_CACHE_ENTRIES = 4
DEFAULT_CACHE_CLEAN_INTERVAL = 600
OVERLAP_TEMPLATES = ("none", "constant", "cached", "all")


@dataclass(frozen=True)
class Qcow2Options:
    """The options that change driver behaviour, with QEMU's defaults applied."""

    lazy_refcounts: bool | None
    pass_discard_request: bool
    pass_discard_snapshot: bool
    pass_discard_other: bool
    discard_no_unref: bool
    overlap_check: str
    cache_clean_interval: int
    cache_size: int | None
    l2_cache_size: int | None
    l2_cache_entry_size: int | None
    refcount_cache_size: int | None


def _err(message: str) -> BlockError:
    return BlockError(message, errno.EINVAL)


def _bool(options: Mapping[str, Any], key: str, default: bool) -> bool:
    value = options.get(key)
    return default if value is None else bool(value)


def _size(options: Mapping[str, Any], key: str) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or value < 0:
        raise _err(f"Parameter '{key}' expects a non-negative number below 2^64")
    return value


def parse_options(options: Mapping[str, Any]) -> Qcow2Options:
    """Validate the node's qcow2 options; ``encrypt``/``data-file`` are checked later."""
    overlap = options.get("overlap-check")
    template = "cached"
    if isinstance(overlap, str):
        template = overlap
    elif isinstance(overlap, Mapping) and overlap.get("template") is not None:
        template = str(overlap["template"])
    if template not in OVERLAP_TEMPLATES:
        raise _err(f"Unsupported value '{template}' for qcow2 option 'overlap-check'. "
                   "Allowed are any of the following: none, constant, cached, all")
    interval = options.get("cache-clean-interval")
    if interval is None:
        interval = DEFAULT_CACHE_CLEAN_INTERVAL
    if not isinstance(interval, int) or interval < 0 or interval > 0xFFFFFFFF:
        raise _err("Cache clean interval too big")
    lazy = options.get("lazy-refcounts")
    return Qcow2Options(
        lazy_refcounts=None if lazy is None else bool(lazy),
        # The graph only calls discard() when the node has discard=unmap, which is
        # exactly when QEMU's default for pass-discard-request is on.
        pass_discard_request=_bool(options, "pass-discard-request", True),
        pass_discard_snapshot=_bool(options, "pass-discard-snapshot", True),
        pass_discard_other=_bool(options, "pass-discard-other", False),
        discard_no_unref=_bool(options, "discard-no-unref", False),
        overlap_check=template,
        cache_clean_interval=interval,
        cache_size=_size(options, "cache-size"),
        l2_cache_size=_size(options, "l2-cache-size"),
        l2_cache_entry_size=_size(options, "l2-cache-entry-size"),
        refcount_cache_size=_size(options, "refcount-cache-size"),
    )


@dataclass(frozen=True)
class CacheSizes:
    """Entry counts and L2 entry (slice) size in bytes."""

    l2_entries: int
    l2_entry_size: int
    refcount_entries: int


def cache_sizes(opts: Qcow2Options, cluster_size: int, virtual_size: int) -> CacheSizes:
    """QEMU's cache sizing: L2 up to 32 MiB but no more than covers the disk."""
    min_refcount = MIN_REFCOUNT_CACHE_ENTRIES * cluster_size
    max_l2_entries = -(-virtual_size // cluster_size)
    max_l2_cache = -(-(max_l2_entries * 8) // cluster_size) * cluster_size
    l2_max_setting = DEFAULT_L2_CACHE_MAX if opts.l2_cache_size is None else opts.l2_cache_size
    refcount = opts.refcount_cache_size or 0
    entry_size = cluster_size if opts.l2_cache_entry_size is None else opts.l2_cache_entry_size
    l2 = min(max_l2_cache, l2_max_setting)
    combined = opts.cache_size
    if combined is not None:
        if opts.l2_cache_size is not None and opts.refcount_cache_size is not None:
            raise _err("cache-size, l2-cache-size and refcount-cache-size may not be set "
                       "at the same time")
        if opts.l2_cache_size is not None and l2_max_setting > combined:
            raise _err("l2-cache-size may not exceed cache-size")
        if refcount > combined:
            raise _err("refcount-cache-size may not exceed cache-size")
        if opts.l2_cache_size is not None:
            refcount = combined - l2
        elif opts.refcount_cache_size is not None:
            l2 = combined - refcount
        elif combined >= max_l2_cache + min_refcount:
            l2 = max_l2_cache
            refcount = combined - l2
        else:
            refcount = min(combined, min_refcount)
            l2 = combined - refcount
    if l2 < max_l2_cache and opts.l2_cache_entry_size is None:
        entry_size = min(cluster_size, 4096)
    if entry_size < 512 or entry_size > cluster_size or entry_size & (entry_size - 1):
        raise _err("L2 cache entry size must be a power of two between 512 and the "
                   f"cluster size ({cluster_size})")
    l2_count = max(l2 // entry_size, MIN_L2_CACHE_ENTRIES)
    if l2_count > 0x7FFFFFFF:
        raise _err("L2 cache size too big")
    refcount_count = max(refcount // cluster_size, MIN_REFCOUNT_CACHE_ENTRIES)
    if refcount_count > 0x7FFFFFFF:
        raise _err("Refcount cache size too big")
    return CacheSizes(l2_count, entry_size, refcount_count)
