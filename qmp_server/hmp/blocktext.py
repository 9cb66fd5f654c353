"""HMP ``info block``'s text: QEMU 7.2's hmp_info_block, print_block_info and, for
``-v``, bdrv_image_info_dump (block/monitor/block-hmp-cmds.c, block/qapi.c).

The input is what ``query-block`` and ``query-named-block-nodes`` answer; the text is
built from it as QEMU builds it from the same QAPI objects.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ..protocol.qdict import qemu_ordered
from ..vmsnapshots import NO_ICOUNT
from .migration import size_to_str
from .snapshots import snapshot_row


def info_block_text(backends: list[dict[str, Any]], nodes: list[dict[str, Any]] | None,
                    device: str | None, *, nodes_only: bool, verbose: bool) -> str:
    """hmp_info_block: the backends (unless ``-n``) matching ``device``; if none was
    printed and a device or ``-n`` was given, the nodes matching it. ``nodes`` is only
    needed then (the caller may pass None otherwise)."""
    out: list[str] = []
    printed = False
    if not nodes_only:
        for index, backend in enumerate(backends):
            if device is not None and device != backend["device"]:
                continue
            if index:
                out.append("\n")  # QEMU separates by position, not by what it printed
            out.append(print_block_info(backend, backend.get("inserted"), verbose))
            printed = True
    if (device is None and not nodes_only) or printed:
        return "".join(out)
    for index, node in enumerate(nodes or []):
        if device is not None and device != node["node-name"]:
            continue
        if index:
            out.append("\n")
        out.append(print_block_info(None, node, verbose))
    return "".join(out)


def print_block_info(info: dict[str, Any] | None, inserted: dict[str, Any] | None,
                     verbose: bool) -> str:
    """print_block_info: one backend (``info``, with its medium ``inserted``) or one node
    (``info`` None)."""
    text: str
    if info is not None and info["device"]:
        text = info["device"]
        if inserted is not None and "node-name" in inserted:
            text += f" ({inserted['node-name']})"
    elif inserted is not None and "node-name" in inserted:
        text = inserted["node-name"]
    else:
        text = info["qdev"] if info is not None and "qdev" in info else "<anonymous>"
    if inserted is not None:
        flags = (", read-only" if inserted["ro"] else "") + (", encrypted" if inserted["encrypted"] else "")
        text += f": {inserted['file']} ({inserted['drv']}{flags})"
        # QEMU 10.x marks inactive nodes (blockdev-set-active, migration).
        if not inserted.get("active", True):
            text += " [inactive]"
        text += "\n"
    else:
        text += ": [not inserted]\n"
    if info is not None:
        if "qdev" in info:
            text += f"    Attached to:      {info['qdev']}\n"
        if info.get("io-status", "ok") != "ok":
            text += f"    I/O status:       {info['io-status']}\n"
        if info["removable"]:
            text += (f"    Removable device: {'' if info['locked'] else 'not '}locked, "
                     f"tray {'open' if info.get('tray_open') else 'closed'}\n")
    if inserted is None:
        return text
    cache = inserted["cache"]
    text += ("    Cache mode:       " + ("writeback" if cache["writeback"] else "writethrough")
             + (", direct" if cache["direct"] else "") + (", ignore flushes" if cache["no-flush"] else "")
             + "\n")
    if "backing_file" in inserted:
        text += (f"    Backing file:     {inserted['backing_file']} "
                 f"(chain depth: {inserted['backing_file_depth']})\n")
    if inserted.get("detect_zeroes", "off") != "off":
        text += f"    Detect zeroes:    {inserted['detect_zeroes']}\n"
    if verbose:
        text += "\nImages:\n"
        image: dict[str, Any] | None = inserted["image"]
        while image is not None:
            text += image_info_dump(image)
            image = image.get("backing-image")
    return text


def image_info_dump(info: dict[str, Any]) -> str:
    """bdrv_image_info_dump: one ImageInfo as ``qemu-img info`` prints it."""
    disk = size_to_str(info["actual-size"]) if "actual-size" in info else "unavailable"
    text = (f"image: {info['filename']}\nfile format: {info['format']}\n"
            f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)\n"
            f"disk size: {disk}\n")
    if info.get("encrypted"):
        text += "encrypted: yes\n"
    if "cluster-size" in info:
        text += f"cluster_size: {info['cluster-size']}\n"
    if info.get("dirty-flag"):
        text += "cleanly shut down: no\n"
    if "backing-filename" in info:
        text += f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            text += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            text += f" (actual path: {full})"
        text += "\n"
        if "backing-filename-format" in info:
            text += f"backing file format: {info['backing-filename-format']}\n"
    if "snapshots" in info:
        text += "Snapshot list:\n" + snapshot_row(None) + "\n"
        for sn in info["snapshots"]:
            row = SimpleNamespace(
                id_str=sn["id"], name=sn["name"], vm_state_size=sn["vm-state-size"],
                date_sec=sn["date-sec"],
                vm_clock_nsec=sn["vm-clock-sec"] * 1_000_000_000 + sn["vm-clock-nsec"],
                icount=sn.get("icount", NO_ICOUNT))
            text += snapshot_row(row) + "\n"
    if "format-specific" in info:
        text += "Format specific information:\n"
        text += _dump(1, qemu_ordered(info["format-specific"]["data"]))
    return text


def _dump(indent: int, value: Any) -> str:
    """dump_qobject over a QDict or QList (keys' dashes as spaces), QEMU's iteration order."""
    out = ""
    items = value.items() if isinstance(value, dict) else ((f"[{i}]", v) for i, v in enumerate(value))
    for key, item in items:
        composite = isinstance(item, dict | list)
        label = key.replace("-", " ") if isinstance(value, dict) else key
        out += f"{' ' * (indent * 4)}{label}:{chr(10) if composite else ' '}"
        if composite:
            out += _dump(indent + 1, item)
        else:
            out += _scalar(item) + "\n"
    return out


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value}"
