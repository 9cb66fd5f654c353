"""HMP ``savevm``, ``loadvm``, ``delvm`` and ``info snapshots`` (QEMU's texts and layout).

hmp_savevm / hmp_loadvm / hmp_delvm (monitor/hmp-cmds.c) and hmp_info_snapshots
(block/monitor/block-hmp-cmds.c) with bdrv_snapshot_dump's columns; the work is the
internal-snapshot service's (qmp_server/vmsnapshots.py).
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import QMPError
from ..runstate import VM, RunState
from ..vmsnapshots import NO_ICOUNT, InternalSnapshots
from .args import HmpArgumentError, parse_arguments
from .migration import size_to_str

HELP = {
    "savevm": "savevm tag -- save a VM snapshot. If no tag is provided, a new snapshot is created",
    "loadvm": "loadvm tag -- restore a VM snapshot from its tag",
    "delvm": "delvm tag -- delete a VM snapshot from its tag",
}
INFO_HELP = "info snapshots  -- show the currently saved VM snapshots"


def _clock_text(nsec: int) -> str:
    secs = nsec // 1_000_000_000
    return (f"{secs // 3600:02d}:{(secs // 60) % 60:02d}:{secs % 60:02d}."
            f"{(nsec // 1_000_000) % 1000:03d}")


def snapshot_row(sn: Any | None, id_str: str | None = None) -> str:
    """bdrv_snapshot_dump: the header (``sn`` None) or one snapshot, without line end."""
    if sn is None:
        return f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.date_sec))
    # icount is printed as a signed 64-bit number, and not at all when it is -1.
    icount = "" if sn.icount == NO_ICOUNT else str(sn.icount - ((sn.icount >> 63) << 64))
    ident = sn.id_str if id_str is None else id_str
    return (f"{ident:<9} {sn.name:<16} {size_to_str(sn.vm_state_size):>8}{date:>20}"
            f"{_clock_text(sn.vm_clock_nsec):>13}{icount:>11}")


class SnapshotCommands:
    """The HMP commands over one machine's internal-snapshot service."""

    def __init__(self, vm: VM, snapshots: InternalSnapshots) -> None:
        self.vm = vm
        self.snapshots = snapshots

    async def savevm(self, args: str) -> str:
        """hmp_savevm: overwrite=true (an existing tag is replaced); no tag: vm-DATE."""
        name: str | None = None
        if args.strip():
            try:
                name = str(parse_arguments("savevm", "name:s", args)["name"])
            except HmpArgumentError as err:
                return err.monitor_text
        try:
            await self.snapshots.save(name, True, None, None)
        except QMPError as err:
            return f"Error: {err.desc}\n"
        return ""

    async def loadvm(self, args: str) -> str:
        """hmp_loadvm: stop (restore-vm), load, resume only if it was running and loaded."""
        try:
            name = str(parse_arguments("loadvm", "name:s", args)["name"])
        except HmpArgumentError as err:
            return err.monitor_text
        was_running = self.vm.running
        await self.vm.vm_stop(RunState.RESTORE_VM)
        try:
            loaded = await self.snapshots.load(name, None, None)
        except QMPError as err:
            return f"Error: {err.desc}\n"
        if loaded and was_running:
            self.vm.vm_start()
        return ""

    async def delvm(self, args: str) -> str:
        """hmp_delvm: a tag no node has is no error."""
        try:
            name = str(parse_arguments("delvm", "name:s", args)["name"])
        except HmpArgumentError as err:
            return err.monitor_text
        try:
            await self.snapshots.delete(name, None)
        except QMPError as err:
            return f"Error: {err.desc}\n"
        return ""

    async def info_snapshots(self, args: list[str]) -> str:
        """hmp_info_snapshots: the snapshots on every node, then each node's partial ones."""
        if args:
            return HmpArgumentError("snapshots: extraneous characters at the end of line",
                                    "info snapshots").monitor_text
        lists = await self.snapshots.block.run_light(self.snapshots.info_lists)
        if isinstance(lists, str):
            return lists + "\n"  # error_report_err: no "Error: " prefix
        everywhere, images = lists
        if not images:
            return "There is no snapshot available.\n"
        out = ["List of snapshots present on all disks:\n"]
        if everywhere:
            out.append(snapshot_row(None) + "\n")
            # The ID is not the same on every image, so it is shown as "--".
            out.extend(snapshot_row(sn, "--") + "\n" for sn in everywhere)
        else:
            out.append("None\n")
        for image, snaps in images:
            if snaps:
                out.append(f"\nList of partial (non-loadable) snapshots on '{image}':\n")
                out.append(snapshot_row(None) + "\n")
                out.extend(snapshot_row(sn) + "\n" for sn in snaps)
        return "".join(out)


__all__ = ["HELP", "INFO_HELP", "SnapshotCommands", "snapshot_row"]
