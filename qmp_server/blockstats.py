"""query-blockstats and HMP ``info blockstats``: QEMU 7.2's block/qapi.c answers, built
from the BlockBackends' accounting (``blocklayer.backend.BlockAcctStats``) and the nodes.

Per BlockBackend (a named one or a device's): its device name, the device's QOM path,
its root node's name and statistics, and, nested as QEMU nests them, the node's data
child as ``parent`` and its backing child as ``backing``. With ``query-nodes`` every node,
in creation order, with its ``parent`` only. Nodes have no accounting of their own in
QEMU (zeroes, both ``account_*`` false) apart from ``wr_highest_offset``; the ``file``
driver adds its discard counters (kept at zero here: no discard reaches a file node
unless it was opened with ``discard=unmap``, and those are not counted).

Members are built in QAPI's declaration order and sent in the order QEMU's QDicts give
them (the encoder, ``protocol.encoding``, writes every object in that order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from blocklayer.backend import AcctType, BlockAcctStats, BlockBackend
from blocklayer.graph import BlockGraph
from blocklayer.node import BlockNode, Edge
from blocklayer.perm import ChildRole

__all__ = ["hmp_info_blockstats", "query_blockstats"]

_KINDS = (("rd", AcctType.READ), ("wr", AcctType.WRITE), ("flush", AcctType.FLUSH),
          ("unmap", AcctType.UNMAP))


def _device_stats(node: BlockNode | None, stats: BlockAcctStats | None) -> dict[str, Any]:
    """BlockDeviceStats: the backend's accounting (bdrv_query_blk_stats), else zeroes."""
    acct = stats if stats is not None else _ZERO
    read, write, flush, unmap = AcctType.READ, AcctType.WRITE, AcctType.FLUSH, AcctType.UNMAP
    out: dict[str, Any] = {
        "rd_bytes": acct.nr_bytes[read], "wr_bytes": acct.nr_bytes[write],
        "unmap_bytes": acct.nr_bytes[unmap],
        "rd_operations": acct.nr_ops[read], "wr_operations": acct.nr_ops[write],
        "flush_operations": acct.nr_ops[flush], "unmap_operations": acct.nr_ops[unmap],
        "rd_total_time_ns": acct.total_time_ns[read], "wr_total_time_ns": acct.total_time_ns[write],
        "flush_total_time_ns": acct.total_time_ns[flush],
        "unmap_total_time_ns": acct.total_time_ns[unmap],
        "wr_highest_offset": node.wr_highest_offset if node is not None else 0,
        "rd_merged": acct.merged[read], "wr_merged": acct.merged[write],
        "unmap_merged": acct.merged[unmap],
    }
    idle = acct.idle_time_ns() if stats is not None else None
    if idle is not None:
        out["idle_time_ns"] = idle
    for prefix, kind in _KINDS:
        out[f"failed_{prefix}_operations"] = acct.failed_ops[kind]
    for prefix, kind in _KINDS:
        out[f"invalid_{prefix}_operations"] = acct.invalid_ops[kind]
    # A node's BlockDeviceStats is zero-filled: both flags false.
    out["account_invalid"] = acct.account_invalid if stats is not None else False
    out["account_failed"] = acct.account_failed if stats is not None else False
    out["timed_stats"] = []
    return out


class _Zero(BlockAcctStats):
    """Counters that stay zero (a node's statistics)."""


_ZERO = _Zero()


def _data_child(node: BlockNode) -> Edge | None:
    """bdrv_query_bds_stats' ``parent``: the primary child if it holds data (or is
    filtered), else the one data child if there is exactly one."""
    primary = next((e for e in node.children if e.role & ChildRole.PRIMARY), None)
    if primary is not None and primary.role & (ChildRole.DATA | ChildRole.FILTERED):
        return primary
    data = [e for e in node.children if e.role & ChildRole.DATA]
    return data[0] if len(data) == 1 else None


def _filtered_or_cow(node: BlockNode) -> BlockNode | None:
    """bdrv_filter_or_cow_bs: a filter driver's child (none of ours is one: raw is not,
    whatever role its file has), else the backing (COW) child."""
    for edge in node.children:
        if edge.role & ChildRole.COW:
            return edge.child
    return None


def _node_stats(node: BlockNode | None, blk_level: bool) -> dict[str, Any]:
    """bdrv_query_bds_stats (without the backend's accounting)."""
    out: dict[str, Any] = {}
    if node is None:
        out["stats"] = _device_stats(None, None)
        return out
    if node.name:
        out["node-name"] = node.name
    out["stats"] = _device_stats(node, None)
    if node.driver.name == "file":
        # BlockStatsSpecificFile, driver first (the union's base).
        out["driver-specific"] = {"driver": "file", "discard-nb-ok": 0,
                                  "discard-nb-failed": 0, "discard-bytes-ok": 0}
    child = _data_child(node)
    if child is not None:
        out["parent"] = _node_stats(child.child, blk_level)
    below = _filtered_or_cow(node)
    if blk_level and below is not None:
        out["backing"] = _node_stats(below, blk_level)
    return out


def _ordered(entry: dict[str, Any]) -> dict[str, Any]:
    # BlockStats' members in the order the visitor inserts them (device, qdev, node-name,
    # stats, ...): the encoder writes QEMU's QDict order from it, and where two members
    # share a hash bucket the insertion order decides.
    order = ("device", "qdev", "node-name", "stats", "driver-specific", "parent", "backing")
    return {key: entry[key] for key in order if key in entry}


def query_blockstats(graph: BlockGraph, backends: Sequence[BlockBackend],
                     query_nodes: bool) -> list[dict[str, Any]]:
    """qmp_query_blockstats. ``backends`` in QEMU's order; those without a name or a
    device are left out."""
    if query_nodes:
        return [_ordered(_node_stats(node, False)) for node in list(graph.nodes.values())]
    result = []
    for blk in backends:
        if not blk.name and blk.dev is None:
            continue
        node = blk.node
        entry = _node_stats(node, True)
        entry["device"] = blk.name
        # blk_get_attached_dev_id: the device's id, else its QOM path.
        qdev = blk.dev_id or blk.dev
        if qdev:
            entry["qdev"] = qdev
        entry["stats"] = _device_stats(node, blk.stats)
        result.append(_ordered(entry))
    return result


def hmp_info_blockstats(stats: Sequence[dict[str, Any]]) -> str:
    """hmp_info_blockstats: one line per backend (an absent idle time prints as 0)."""
    lines = []
    for entry in stats:
        if "device" not in entry:
            continue
        s = entry["stats"]
        lines.append(
            f"{entry['device']}: rd_bytes={s['rd_bytes']} wr_bytes={s['wr_bytes']} "
            f"rd_operations={s['rd_operations']} wr_operations={s['wr_operations']} "
            f"flush_operations={s['flush_operations']} wr_total_time_ns={s['wr_total_time_ns']} "
            f"rd_total_time_ns={s['rd_total_time_ns']} "
            f"flush_total_time_ns={s['flush_total_time_ns']} rd_merged={s['rd_merged']} "
            f"wr_merged={s['wr_merged']} idle_time_ns={s.get('idle_time_ns', 0)}\n")
    return "".join(lines)
