"""blockdev-reopen (QEMU's bdrv_reopen_multiple over qmp_blockdev_reopen's queue): nodes
get a complete new set of options, all of them or none.

What changes here is ``read-only`` (and ``auto-read-only``, accepted): what libvirt
reopens nodes for (a backing node made writable to merge its dirty bitmaps, then
read-only again). Every other option must stay as the node was opened with it, and the
``file`` and ``backing`` children must name the current ones; QEMU can change more
(cache and discard modes, qcow2's options, the children), which is refused here with a
message that says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import BlockError
from .graph import BlockGraph, flatten_options
from .node import BlockNode

#: Options bdrv_reopen_prepare takes whatever their value (handled or only for open).
_FREE = frozenset({"node-name", "driver", "read-only", "auto-read-only", "file", "backing"})


def _check(node: BlockNode, options: Mapping[str, Any]) -> None:
    """bdrv_reopen_prepare's checks for one node, as far as they apply here."""
    if options["driver"] != node.drv_name:
        raise BlockError("Cannot change the option 'driver'")
    for child_name in ("file", "backing"):
        edge = node.child(child_name)
        if child_name not in options:
            if child_name == "backing" and edge is not None:
                raise BlockError(f"backing is missing for '{node.name}'")
            continue
        wanted = options[child_name]
        current = edge.child.name if edge is not None else None
        if wanted != current:
            raise BlockError(f"qmp-server: blockdev-reopen cannot change the '{child_name}' "
                             f"child of '{node.name}' (only 'read-only' changes here)")
    new = {k: v for k, v in flatten_options(options).items() if k.split(".")[0] not in _FREE}
    old = {k: v for k, v in node.open_options.items() if k.split(".")[0] not in _FREE}
    for key in sorted(new.keys() | old.keys()):
        if new.get(key) != old.get(key):
            raise BlockError(f"qmp-server: blockdev-reopen cannot change the option '{key}' "
                             f"of '{node.name}' (only 'read-only' changes here)")


def reopen(graph: BlockGraph, requests: Sequence[Mapping[str, Any]]) -> None:
    """qmp_blockdev_reopen: every node is checked first, then each changes; a failure
    puts back the ones changed before it."""
    plan: list[tuple[BlockNode, bool]] = []
    for options in requests:
        name = options.get("node-name")
        if name is None:
            raise BlockError("node-name not specified")
        node = graph.find(name)
        if node is None:
            raise BlockError(f"Failed to find node with node-name='{name}'")
        _check(node, options)
        plan.append((node, bool(options.get("read-only", False))))
    done: list[tuple[BlockNode, bool]] = []
    try:
        # One transaction as in QEMU: nodes made writable first (a file child listed
        # after its format node too), then those made read-only, then the permissions.
        for node, read_only in sorted(plan, key=lambda item: item[1]):
            if read_only == node.read_only:
                continue
            if read_only:
                graph.set_read_only(node)
            else:
                graph.reopen_read_write(node)
            done.append((node, not read_only))
        # A writable format node writes its file child: a read-only one it did not
        # open itself refuses (bdrv_reopen_multiple's permission update).
        graph.refresh_perms([node for node, _ in plan])
    except BlockError:
        for node, was_read_only in reversed(done):
            try:
                if was_read_only:
                    graph.set_read_only(node)
                else:
                    graph.reopen_read_write(node)
            except BlockError:
                pass  # best effort, as bdrv_reopen_multiple's abort
        raise
