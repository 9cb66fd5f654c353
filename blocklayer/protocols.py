"""Protocol filenames (``null-co://``, ``file:PATH``), as QEMU's bdrv_find_protocol and
its drivers' bdrv_parse_filename resolve them into a protocol node's options."""

from __future__ import annotations

import errno
from typing import Any

from .errors import BlockError

#: Protocol prefixes QEMU 7.2 knows (its drivers' protocol_name) and the driver each names;
#: those we do not model are refused as an unsupported driver, not an unknown protocol.
_QEMU_PROTOCOLS = {
    "file": "file", "host_device": "host_device", "host_cdrom": "host_cdrom",
    "null-co": "null-co", "null-aio": "null-aio", "nbd": "nbd", "nbd+tcp": "nbd",
    "nbd+unix": "nbd", "http": "http", "https": "https", "ftp": "ftp", "ftps": "ftps",
    "iscsi": "iscsi", "iser": "iscsi", "rbd": "rbd", "ssh": "ssh", "nfs": "nfs",
    "gluster": "gluster", "gluster+tcp": "gluster", "gluster+unix": "gluster",
    "gluster+rdma": "gluster", "blkdebug": "blkdebug", "blkverify": "blkverify",
    "fat": "vvfat", "nvme": "nvme",
}


def path_has_protocol(path: str) -> bool:
    """QEMU's path_has_protocol: a ``:`` comes before any ``/``."""
    for char in path:
        if char in ":/":
            return char == ":"
    return False


def protocol_options(filename: str) -> dict[str, Any]:
    """The protocol node's options for a filename, as bdrv_fill_options finds them with
    bdrv_find_protocol and the driver's bdrv_parse_filename: a plain path or ``file:PATH``
    is the ``file`` driver, ``null-co://`` the ``null-co`` driver. Errors as QEMU's."""
    if not path_has_protocol(filename):
        return {"driver": "file", "filename": filename}
    prefix = filename[:filename.index(":")]
    driver = _QEMU_PROTOCOLS.get(prefix[:31])  # the protocol name buffer holds 31 chars
    if driver is None:
        raise BlockError(f"Unknown protocol '{prefix[:31]}'", errno.ENOENT)
    if driver == "file":
        return {"driver": "file", "filename": filename[len("file:"):]}
    if driver == "null-co":
        if filename != "null-co://":
            raise BlockError("The only allowed filename for this driver is 'null-co://'", errno.EINVAL)
        return {"driver": "null-co"}
    raise BlockError(f"Driver '{driver}' is not supported by qmp-server", errno.ENOTSUP)
