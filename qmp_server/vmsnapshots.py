"""Internal snapshots of the whole VM (savevm/loadvm/delvm and the snapshot-* jobs).

QEMU's migration/savevm.c (save_snapshot, load_snapshot, delete_snapshot) over
block/snapshot.c's bdrv_all_* functions: every node that takes part (the root of each
BlockBackend and each monitor-owned node nobody uses, writable and inserted; or the
nodes named in ``devices``) gets the snapshot, and a node that cannot take one fails
the whole operation. The VM state we have is the run state and the virtual clock; there
is no guest RAM or device state, so the VM state written is what QEMU 7.2 saves for a
guest-less machine (vm_state_stream), which QEMU loads back. See
docs/internal-snapshots.md for what differs from QEMU.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from blocklayer.backend import BlockBackend
from blocklayer.errors import BlockError
from blocklayer.node import BlockNode

from .blockservice import BlockService
from .errors import QMPError
from .runstate import VM, RunState


class SnapshotInfo(Protocol):
    """What a format driver's snapshot list gives (blocklayer.qcow2.snapshot.Snapshot)."""

    id_str: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int


class SnapshotDriver(Protocol):
    """A format driver with internal snapshots (QEMU's bdrv_snapshot_* callbacks)."""

    def snapshot_list(self) -> list[Any]: ...

    def snapshot_create(self, name: str, *, date_sec: int, date_nsec: int, vm_clock_nsec: int,
                        icount: int, vm_state_size: int = 0) -> Any: ...

    def save_vmstate(self, data: bytes) -> None: ...

    def snapshot_goto(self, id_or_name: str) -> None: ...

    def snapshot_delete(self, snapshot_id: str | None, name: str | None) -> None: ...


#: -1ULL: no record/replay, hence no instruction count.
NO_ICOUNT = (1 << 64) - 1

#: What QEMU 7.2 appends after the stream's end (QEMU_VM_VMDESCRIPTION): the JSON
#: description of the device sections below, as it writes it for these two.
_VMDESC = (b'{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": '
           b'"timer", "version": 2, "fields": [{"name": "cpu_ticks_offset", "type": "int64", '
           b'"size": 8}, {"name": "unused", "type": "unused_buffer", "size": 8}, {"name": '
           b'"cpu_clock_offset", "type": "int64", "size": 8}]}, {"name": "globalstate", '
           b'"instance_id": 0, "vmsd_name": "globalstate", "version": 1, "fields": [{"name": '
           b'"size", "type": "uint32", "size": 4}, {"name": "runstate", "type": "buffer", '
           b'"size": 100}]}]}')


def _section_header(kind: int, section_id: int, idstr: bytes = b"", version: int = 0) -> bytes:
    # QEMU_VM_SECTION_START/FULL carry the id string, instance 0 and version; PART/END
    # only the section id.
    head = bytes([kind]) + struct.pack(">I", section_id)
    if idstr:
        head += bytes([len(idstr)]) + idstr + struct.pack(">II", 0, version)
    return head


def _footer(section_id: int) -> bytes:
    return b"~" + struct.pack(">I", section_id)  # QEMU_VM_SECTION_FOOTER


def vm_state_stream(machine: str, runstate: str, clock_ns: int) -> bytes:
    """The VM state QEMU 7.2 saves for a guest-less machine (qemu_savevm_state).

    File magic and version 3, the configuration section (machine type), the ``ram``
    section's setup/iteration/completion with no RAM blocks, ``timer`` (the virtual
    clock: cpu_clock_offset holds it while the VM is stopped; cpu_ticks_offset, a host
    tick count, gets the same value here), ``globalstate`` (the run state when the save
    began), QEMU_VM_EOF and the JSON description. QEMU loads it back (``loadvm``).
    """
    eos = struct.pack(">Q", 0x10)  # RAM_SAVE_FLAG_EOS
    name = machine.encode()
    state = runstate.encode()[:99]
    out = [b"QEVM", struct.pack(">I", 3),
           bytes([7]) + struct.pack(">I", len(name)) + name,  # QEMU_VM_CONFIGURATION
           _section_header(1, 2, b"ram", 4), struct.pack(">Q", 0x4), eos, _footer(2),
           _section_header(2, 2), eos, _footer(2),
           _section_header(3, 2), eos, _footer(2),
           _section_header(4, 0, b"timer", 2), struct.pack(">qQq", clock_ns, 0, clock_ns),
           _footer(0),
           _section_header(4, 4, b"globalstate", 1), struct.pack(">I", len(state) + 1),
           state + bytes(100 - len(state)), _footer(4),
           b"\x00",  # QEMU_VM_EOF
           bytes([6]) + struct.pack(">I", len(_VMDESC)) + _VMDESC]
    return b"".join(out)


class VirtualClock:
    """QEMU_CLOCK_VIRTUAL: nanoseconds the VM has been running (stops while paused).

    loadvm sets it back to the snapshot's value, as loading the timer state does.
    With ``-accel qtest`` it does not advance by itself (QEMU's qtest accelerator moves
    the virtual clock only on the qtest protocol's clock_step/clock_set): ``advances``
    is then False, as QEMU's iotests expect (VM CLOCK 00:00:00.000).
    """

    def __init__(self, vm: VM) -> None:
        self._vm = vm
        self._base = 0
        self._since: float | None = None
        self.advances = True
        vm.state_listeners.append(self._changed)
        self._changed()

    def _changed(self) -> None:
        running = self._vm.running
        if running and self._since is None:
            self._since = time.monotonic()
        elif not running and self._since is not None:
            if self.advances:
                self._base += int((time.monotonic() - self._since) * 1e9)
            self._since = None

    def now_ns(self) -> int:
        """The clock's value now."""
        if self._since is None or not self.advances:
            return self._base
        return self._base + int((time.monotonic() - self._since) * 1e9)

    def set_ns(self, value: int) -> None:
        """Jump to ``value`` (a loaded snapshot's clock)."""
        self._base = value
        if self._since is not None:
            self._since = time.monotonic()


@dataclass
class _Member:
    """One node of bdrv_first/bdrv_next's walk."""

    node: BlockNode
    #: bdrv_get_device_name: the first BlockBackend's name ("" if anonymous or none).
    device: str
    has_blk: bool

    @property
    def device_or_node(self) -> str:
        """bdrv_get_device_or_node_name."""
        return self.device or self.node.name


def _snapshot_driver(node: BlockNode) -> tuple[BlockNode, SnapshotDriver] | None:
    """The node whose driver takes the snapshot: this one, or down the ``file`` child of a
    driver without snapshots (bdrv_snapshot_fallback; raw over qcow2 works, file does not)."""
    for _ in range(64):  # a chain of filters, bounded
        if hasattr(node.driver, "snapshot_create"):
            driver: SnapshotDriver = node.driver  # type: ignore[assignment]
            return node, driver
        child = node.child("file")
        if child is None:
            return None
        node = child.child
    return None


def _changed(node: BlockNode) -> None:
    """The node's image changed outside a guest write: its query answers are stale and
    its next flush must write back the driver's caches (BlockNode.flush skips a node
    whose write generation did not move; QEMU's bdrv_co_flush writes qcow2's caches
    back whatever the generation)."""
    node.touch()
    node.write_gen += 1


def _inserted(node: BlockNode) -> bool:
    return not getattr(node.driver, "ejected", False)


def _can_snapshot(node: BlockNode) -> bool:
    """bdrv_can_snapshot: inserted, writable, and a driver with snapshots (or a fallback).

    Writable is bdrv_is_writable, read-write *and active*, as in the QEMU 7.2 installed
    (Debian's build carries the 7.2.9 stable release's change to bdrv_can_snapshot): a
    node that is inactive (a destination before its migration completes, a source after
    it) cannot take, load or delete a snapshot, and since bdrv_all_snapshots_includes_bs
    still counts it (it only checks read-only), the operation fails with "Device '…' is
    writable but does not support snapshots" (compared with QEMU live).
    """
    for _ in range(64):
        if not _inserted(node) or not node.writable:
            return False
        if hasattr(node.driver, "snapshot_create"):
            return True
        child = node.child("file")
        if child is None:
            return False
        node = child.child
    return False


class VmStateSaves(Protocol):
    """The migration state a savevm goes through (MigrationService)."""

    def begin_vm_state_save(self) -> None:
        """Start of qemu_savevm_state (QMPError if a migration runs)."""

    def end_vm_state_save(self, ok: bool) -> None:
        """End of qemu_savevm_state: completed, or failed."""


class InternalSnapshots:
    """savevm/loadvm/delvm for HMP, the snapshot-* jobs and -loadvm."""

    def __init__(self, vm: VM, block: BlockService,
                 backends: Callable[[], list[tuple[BlockBackend, Any]]],
                 machine_type: str = "none") -> None:
        self.vm = vm
        self.block = block
        self._backends = backends
        #: The configuration section's machine name (QEMU checks it on load).
        self.machine_type = machine_type
        self.clock = VirtualClock(vm)
        #: The machine's migration state, which a savevm moves (None: nobody to tell).
        self.migration: VmStateSaves | None = None

    # bdrv_first / bdrv_all_* (the caller holds the graph lock) ---------------------

    def _walk(self) -> list[_Member]:
        """bdrv_next's order: BlockBackend roots, then monitor-owned nodes without one."""
        members: list[_Member] = []
        seen: set[int] = set()
        blk_nodes: dict[int, str] = {}
        for blk, _device in self._backends():
            node = blk.node
            if node is None:
                continue
            blk_nodes.setdefault(id(node), blk.name)
            if id(node) not in seen:
                seen.add(id(node))
                members.append(_Member(node, blk.name, True))
        for node in self.block.graph.nodes.values():
            if node.monitor_owned and id(node) not in blk_nodes:
                members.append(_Member(node, "", False))
        return members

    def _member_of(self, node: BlockNode) -> _Member:
        for blk, _device in self._backends():
            if blk.node is node:
                return _Member(node, blk.name, True)
        return _Member(node, "", False)

    def _devices(self, devices: list[str] | None) -> list[_Member]:
        """bdrv_all_get_snapshot_devices: the named nodes (by node name), or the walk."""
        if devices is None:
            return self._walk()
        if not devices:
            raise QMPError("At least one device is required for snapshot")
        members = []
        for name in devices:
            node = self.block.graph.find(name)
            if node is None:
                raise QMPError(f"No block device node '{name}'")
            members.append(self._member_of(node))
        return members

    @staticmethod
    def _includes(member: _Member) -> bool:
        # bdrv_all_snapshots_includes_bs: in use by a BlockBackend, or by nobody at all.
        node = member.node
        if not _inserted(node) or node.read_only:
            return False
        return member.has_blk or not node.parents

    def _selected(self, devices: list[str] | None) -> list[_Member]:
        return [m for m in self._devices(devices) if devices is not None or self._includes(m)]

    def can_snapshot(self, devices: list[str] | None) -> None:
        """bdrv_all_can_snapshot, with its text."""
        for member in self._selected(devices):
            if not _can_snapshot(member.node):
                raise QMPError(f"Device '{member.device_or_node}' is writable but does not "
                               f"support snapshots")

    def find_vmstate_node(self, vmstate: str | None, devices: list[str] | None) -> _Member:
        """bdrv_all_find_vmstate_bs: the first capable node (or the one named)."""
        for member in self._devices(devices):
            found = (devices is not None or self._includes(member)) and _can_snapshot(member.node)
            if vmstate is not None:
                if vmstate == member.node.name:
                    if found:
                        return member
                    raise QMPError(f"vmstate block device '{vmstate}' does not support snapshots")
            elif found:
                return member
        if vmstate is not None:
            raise QMPError(f"vmstate block device '{vmstate}' does not exist")
        raise QMPError("no block device can store vmstate for snapshot")

    @staticmethod
    def _list(node: BlockNode) -> list[Any]:
        target = _snapshot_driver(node)
        if target is None:
            return []
        try:
            return target[1].snapshot_list()
        except BlockError:
            return []

    def _find(self, node: BlockNode, name: str) -> Any | None:
        """bdrv_snapshot_find: by name only."""
        return next((sn for sn in self._list(node) if sn.name == name), None)

    def has_snapshot(self, name: str, devices: list[str] | None) -> bool:
        """bdrv_all_has_snapshot."""
        return all(self._find(m.node, name) is not None for m in self._selected(devices))

    def delete_all(self, name: str, devices: list[str] | None) -> None:
        """bdrv_all_delete_snapshot: nodes without the snapshot are skipped."""
        for member in self._selected(devices):
            sn = self._find(member.node, name)
            if sn is None:
                continue
            target = _snapshot_driver(member.node)
            try:
                if target is None:
                    raise BlockError("Block driver does not support snapshots", errno.ENOTSUP)
                try:
                    target[1].snapshot_delete(sn.id_str, sn.name)
                finally:
                    _changed(target[0])
            except BlockError as err:
                raise QMPError(f"Could not delete snapshot '{name}' on "
                               f"'{member.device_or_node}': {err.message}") from err

    def goto_all(self, name: str, devices: list[str] | None) -> None:
        """bdrv_all_goto_snapshot, with bdrv_snapshot_goto's checks and texts."""
        for member in self._selected(devices):
            try:
                self._goto(member.node, name)
            except QMPError as err:
                raise QMPError(f"Could not load snapshot '{name}' on "
                               f"'{member.device_or_node}': {err.desc}") from err

    @staticmethod
    def _goto(node: BlockNode, name: str) -> None:
        for _ in range(64):
            if node.dirty_bitmaps:
                raise QMPError("Device has active dirty bitmaps")
            if hasattr(node.driver, "snapshot_goto"):
                try:
                    node.driver.snapshot_goto(name)
                except BlockError as err:
                    code = err.errno or errno.EIO
                    raise QMPError(f"Failed to load snapshot: {os.strerror(code)}") from err
                finally:
                    _changed(node)
                return
            child = node.child("file")
            if child is None:
                break
            node = child.child
        raise QMPError("Block driver does not support snapshots")

    @staticmethod
    def write_vm_state(vm_node: BlockNode, vm_state: bytes) -> None:
        """save_snapshot's qemu_savevm_state into ``vm_node``'s VM state area."""
        vm_target = _snapshot_driver(vm_node)
        if vm_target is None:
            raise QMPError("Could not open VM state file")
        try:
            vm_target[1].save_vmstate(vm_state)
        except BlockError as err:
            raise QMPError(err.message) from err
        finally:
            _changed(vm_target[0])

    def create_all(self, name: str, date_sec: int, date_nsec: int, clock: int,
                   vm_node: BlockNode, vm_state: bytes, devices: list[str] | None) -> None:
        """save_snapshot's bdrv_all_create_snapshot, after the VM state was written (each
        node's own id; the VM state size on ``vm_node`` only, 0 on the others)."""
        for member in self._selected(devices):
            target = _snapshot_driver(member.node)
            size = len(vm_state) if member.node is vm_node else 0
            try:
                if target is None:
                    raise BlockError("not supported", errno.ENOTSUP)
                try:
                    target[1].snapshot_create(name, date_sec=date_sec, date_nsec=date_nsec,
                                              vm_clock_nsec=clock, icount=NO_ICOUNT,
                                              vm_state_size=size)
                finally:
                    _changed(target[0])
            except BlockError as err:
                raise QMPError(f"Could not create snapshot '{name}' on "
                               f"'{member.device_or_node}'") from err

    # The VM-level operations ------------------------------------------------------------

    async def save(self, name: str | None, overwrite: bool, vmstate: str | None,
                   devices: list[str] | None) -> None:
        """save_snapshot: the VM is stopped (save-vm) while the nodes take the snapshot,
        and resumed afterwards if it was running, whatever the outcome."""
        run = self.block.run
        await run(self.can_snapshot, devices)
        if name is not None:
            if overwrite:
                await run(self.delete_all, name, devices)
            elif await run(self.has_snapshot, name, devices):
                raise QMPError(f"Snapshot '{name}' already exists in one or more devices")
        vm_member = await run(self.find_vmstate_node, vmstate, devices)
        was_running = self.vm.running
        # global_state_store: the run state as it was before the stop.
        runstate = self.vm.state.value
        await self.vm.vm_stop(RunState.SAVE_VM)
        try:
            now = time.time()
            date_sec = int(now)
            date_nsec = int((now - date_sec) * 1_000_000) * 1000
            tag = name if name is not None else time.strftime("vm-%Y%m%d%H%M%S",
                                                             time.localtime(date_sec))
            # QEMUSnapshotInfo.name is char[256]: pstrcpy keeps 255 bytes of the tag (the
            # checks above used all of it, as in QEMU).
            tag = tag.encode("utf-8", "surrogateescape")[:255].decode("utf-8", "surrogateescape")
            clock = self.clock.now_ns()
            stream = vm_state_stream(self.machine_type, runstate, clock)
            # qemu_savevm_state is a migration into the VM state area: refused while a
            # migration runs, and query-migrate shows it afterwards (QEMU 7.2 live).
            migration = self.migration
            if migration is not None:
                migration.begin_vm_state_save()
            try:
                await run(self.write_vm_state, vm_member.node, stream)
            except QMPError:
                if migration is not None:
                    migration.end_vm_state_save(False)
                raise
            if migration is not None:
                migration.end_vm_state_save(True)
            try:
                await run(self.create_all, tag, date_sec, date_nsec, clock, vm_member.node,
                          stream, devices)
            except QMPError:
                try:
                    await run(self.delete_all, tag, devices)
                except QMPError:
                    pass
                raise
        finally:
            if was_running:
                self.vm.vm_start()

    def _load(self, name: str, vmstate: str | None, devices: list[str] | None) -> bool:
        """load_snapshot's block part; False when it fails without a message (as QEMU)."""
        self.can_snapshot(devices)
        if not self.has_snapshot(name, devices):
            raise QMPError(f"Snapshot '{name}' does not exist in one or more devices")
        member = self.find_vmstate_node(vmstate, devices)
        sn = self._find(member.node, name)
        if sn is None:
            return False
        if sn.vm_state_size == 0:
            # Don't even try to load empty VM states (QEMU's text, two spaces included).
            raise QMPError("This is a disk-only snapshot. Revert to it  offline using qemu-img")
        self.goto_all(name, devices)
        # The VM state itself is not read: its device state is nobody's here; the timer
        # section's clock is the snapshot's vm_clock_nsec.
        self.clock.set_ns(sn.vm_clock_nsec)
        return True

    async def load(self, name: str, vmstate: str | None, devices: list[str] | None) -> bool:
        """load_snapshot (the caller stops the VM first, as hmp_loadvm does)."""
        return await self.block.run(self._load, name, vmstate, devices)

    def load_at_startup(self, name: str) -> None:
        """-loadvm: load_snapshot before the machine starts (raises QMPError)."""
        self.block.locked(self._load, name, None, None)

    async def delete(self, name: str, devices: list[str] | None) -> None:
        """delete_snapshot."""
        await self.block.run(self._delete, name, devices)

    def _delete(self, name: str, devices: list[str] | None) -> None:
        self.can_snapshot(devices)
        self.delete_all(name, devices)

    def info_lists(self) -> str | tuple[list[Any], list[tuple[str, list[Any]]]]:
        """hmp_info_snapshots' data: an error text, or the snapshots present on every node
        (by the vmstate node's list) and each node's others, by device name."""
        try:
            vm_member = self.find_vmstate_node(None, None)
        except QMPError as err:
            return err.desc
        names = self._list(vm_member.node)
        images: list[tuple[str, list[Any]]] = []
        for member in self._walk():
            if _can_snapshot(member.node):
                snaps = self._list(member.node)
                if snaps:
                    images.append((member.device, list(snaps)))
        everywhere: list[Any] = []
        if images:
            for sn in names:
                if self.has_snapshot(sn.name, None):
                    everywhere.append(sn)
                    for _image, snaps in images:
                        snaps[:] = [s for s in snaps if s.name != sn.name]
        return everywhere, images


__all__ = ["NO_ICOUNT", "InternalSnapshots", "SnapshotInfo", "VirtualClock", "VmStateSaves",
           "vm_state_stream"]
