"""The block configuration a migration source expects its destination to have.

QEMU does not check this (a mismatch shows up later as guest data corruption or a failed
device load); we do, before anything is handed over, so that a management tool that
started the destination with the wrong ``-blockdev`` gets a clean failure on both sides.

The check refuses only what cannot be right, and never what QEMU migrates correctly:
node names need not match across the two sides (QEMU matches nothing by node name; a
management tool may name nodes differently on each side, and bitmaps then travel by
``block-bitmap-mapping``, iotest 300). So a node named on both sides must open the same
image with the same driver and virtual size; a node of the source that the destination
does not name is refused only when it opens an image file that no node of the
destination opens (the disk would be left behind); nodes only the destination has are
its own business.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from blocklayer.graph import BlockGraph
from blocklayer.node import BlockNode

PREFIX = "Block configuration mismatch: "


@dataclass(frozen=True)
class NodeDescription:
    """What must match for one user-named node."""

    node_name: str
    driver: str
    filename: str
    #: None where the size is not part of the contract: a protocol node over an image
    #: file grows while the source allocates clusters, so only format sizes are compared.
    virtual_size: int | None

    def to_wire(self) -> dict[str, Any]:
        """The ``C`` frame entry."""
        return {"node-name": self.node_name, "driver": self.driver, "filename": self.filename,
                "virtual-size": self.virtual_size}

    @classmethod
    def from_wire(cls, item: Any) -> NodeDescription:
        """Parse a ``C`` frame entry; ValueError if it is malformed."""
        if not isinstance(item, dict):
            raise ValueError("node entry is not an object")
        name, driver, filename = item.get("node-name"), item.get("driver"), item.get("filename")
        size = item.get("virtual-size")
        if not (isinstance(name, str) and isinstance(driver, str) and isinstance(filename, str)):
            raise ValueError("node entry lacks node-name, driver or filename")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
            raise ValueError("bad virtual-size")
        return cls(name, driver, filename, size)


def _describe(node: BlockNode) -> NodeDescription:
    # The image file itself, not the node's file name: that one is json:{...} as soon as
    # an option changes the data, and may spell the same image differently on each side.
    filename = node.bottom_filename
    # Both sides may name the image by different relative or symlinked paths.
    if filename and os.path.exists(filename):
        filename = os.path.realpath(filename)
    size: int | None = None
    if not (node.driver.protocol and filename):
        size = node.getlength()
    return NodeDescription(node.name, node.drv_name, filename, size)


def describe(graph: BlockGraph) -> list[NodeDescription]:
    """Every node with a user-given name, in creation order (run under the graph lock)."""
    return [_describe(node) for node in graph.nodes.values() if not node.implicit]


def _is_image_file(filename: str) -> bool:
    return os.path.isabs(filename)


def compare(source: list[NodeDescription], local: list[NodeDescription]) -> str | None:
    """The first difference between the source's and our configuration, or None."""
    ours = {n.node_name: n for n in local}
    files = {n.filename for n in local if n.filename}
    for want in source:
        have = ours.get(want.node_name)
        name = want.node_name
        if have is None:
            # Another name here is fine as long as the image is still opened (only an
            # image file can be compared: "null-co://" or a URL proves nothing).
            if want.filename not in files and _is_image_file(want.filename):
                return (f"{PREFIX}node '{name}' of the source opens '{want.filename}', "
                        "which no node of the destination opens")
            continue
        if have.driver != want.driver:
            return (f"{PREFIX}node '{name}' uses driver '{want.driver}' on the source "
                    f"but '{have.driver}' on the destination")
        # Only an image file can be compared: a null-co node is "null-co://" or, with
        # options, "" (no exact file name), and proves nothing either way (iotest 300
        # adds null-co nodes with read-zeroes=off on one side only).
        if have.filename != want.filename and (_is_image_file(have.filename)
                                               or _is_image_file(want.filename)):
            return (f"{PREFIX}node '{name}' opens '{want.filename}' on the source "
                    f"but '{have.filename}' on the destination")
        if want.virtual_size is not None and have.virtual_size is not None \
                and have.virtual_size != want.virtual_size:
            return (f"{PREFIX}node '{name}' has virtual size {want.virtual_size} on the source "
                    f"but {have.virtual_size} on the destination")
    return None
