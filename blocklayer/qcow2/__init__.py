"""qcow2 format driver: a pure-Python implementation of QEMU's qcow2 block driver.

Modules, one job each:

* ``driver``    -- :class:`Qcow2Driver`, the BlockDriver contract (lifecycle, info)
* ``image``     -- per-open state: header, L1, caches; open/flush/inactivate/L2 allocation
* ``datapath``  -- guest read/write/write-zeroes/discard over the L2 mapping
* ``refcount``  -- refcounts: first-fit allocation, refblock allocation, reftable growth
* ``cache``     -- write-back LRU metadata caches with QEMU's dependency rules
* ``tables``    -- host-order arrays for on-disk tables; refcount block codecs (all widths)
* ``header``    -- cluster 0: parsing, validation (QEMU's messages), rewriting
* ``l2``        -- L1/L2 entry bits, cluster types, compressed descriptors
* ``compress``  -- decompression of compressed clusters (zlib; zstd via ``zstandard``)
* ``repair``    -- dirty-image repair: refcount rebuild from the L1/L2 walk
* ``bitmaps``   -- persistent dirty bitmaps: the bitmap directory, tables, load and store
* ``snapshot``  -- the internal snapshot table (as far as refcounting needs it)
* ``options``   -- node options and cache sizing
* ``tracked``   -- ChildIO wrapper that tracks the file length
"""

from .driver import Qcow2Driver

__all__ = ["Qcow2Driver"]
