"""Disk frontends: ``-device``/``device_add``/``device_del`` and legacy ``-drive``.

A frontend is a device model (virtio-blk-pci, virtio-blk-device, scsi-hd, ide-hd) whose
only observable part without a guest is its BlockBackend: a user of one node with QEMU's
permissions (hw/block/block.c blkconf_apply_backend_options), named in permission errors,
``query-block`` and ``info block`` by its QOM path. Everything here follows QEMU 7.2
(softmmu/qdev-monitor.c qdev_device_add, hw/core/qdev-properties-system.c set_drive,
blockdev.c drive_new), checked against it in tests/test_frontends.py.

There is no guest to acknowledge a PCI unplug: the guest we stand in for ejects at once,
so ``device_del`` completes right after its reply (DEVICE_DELETED follows), where QEMU
without a guest would wait forever.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from blocklayer.backend import BlockBackend
from blocklayer.errors import BlockError
from blocklayer.graph import probe_format
from blocklayer.perm import ALL, CONSISTENT_READ, RESIZE, WRITE, WRITE_UNCHANGED

from . import machinemodel as model
from .blockinfo import backend_info
from .blockservice import BlockService
from .errorreport import error_report
from .errors import QMPError
from .keyval import parse_json_option, parse_keyval
from .runstate import VM, RunState

T = TypeVar("T")

#: QEMU's BlockInterfaceType numbers, as "Can't hot-add drive to type N" prints them.
_IF_NUMBER = {"none": 0, "ide": 1, "scsi": 2, "floppy": 3, "pflash": 4, "mtd": 5, "sd": 6,
              "virtio": 7, "xen": 8}

#: The bus each modelled device plugs into (its DeviceClass bus_type), as QEMU names it
#: in "No 'X' bus found".
_BUS_TYPE = {"virtio-blk-pci": "PCI", "virtio-blk-device": "virtio-bus", "scsi-hd": "SCSI",
             "ide-hd": "IDE"}
#: Devices whose disk is a child object (the virtio transport's backend device).
_BACKEND_CHILD = {"virtio-blk-pci": ("virtio-backend", "virtio-blk-device")}
#: Properties every device takes besides its own (qdev_device_add consumes them).
_GENERIC = frozenset({"driver", "id", "bus"})


def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(...)`` with the block layer's errors (QEMU's texts) as QMP errors.

    Everything in this module runs with the graph lock held by the caller.
    """
    try:
        return fn(*args, **kwargs)
    except BlockError as err:
        raise QMPError(err.message) from err


def _id_wellformed(name: str) -> bool:
    # QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'.
    return (bool(name) and name[0].isascii() and name[0].isalpha()
            and all(c.isascii() and (c.isalnum() or c in "-._") for c in name))


def _bool_property(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise QMPError(f"Parameter '{name}' expects 'on' or 'off'")


def _buses(machine_type: str) -> dict[str, list[str]]:
    """Bus type -> bus names of a machine (QEMU 7.2's pc/q35 boards, without -nodefaults' extras)."""
    found = model.machine_type(machine_type)
    if found is None or found.name == model.NONE_MACHINE:
        return {}
    if "q35" in found.name:
        return {"PCI": ["pcie.0"], "IDE": [f"ide.{n}" for n in range(6)]}
    return {"PCI": ["pci.0"], "IDE": ["ide.0", "ide.1"]}


@dataclass(eq=False)
class Device:
    """One realized disk frontend."""

    driver: str
    id: str | None
    path: str
    backend: BlockBackend
    #: The backend is the -drive's, deleted with the device (blockdev_auto_del).
    legacy_drive: bool
    hotpluggable: bool
    bus: str

    @property
    def qdev(self) -> str:
        """QOM path of the object that uses the BlockBackend."""
        child = _BACKEND_CHILD.get(self.driver)
        return f"{self.path}/{child[0]}" if child else self.path


class Devices:
    """The machine's disk frontends and named (``-drive``) BlockBackends."""

    def __init__(self, vm: VM, block: BlockService, machine_type: str) -> None:
        self.vm = vm
        self.block = block
        self.machine_type = machine_type
        #: Named BlockBackends (``-drive id=``), in creation order.
        self.named: dict[str, BlockBackend] = {}
        #: Devices in creation order (QEMU lists backends in that order too).
        self.devices: list[Device] = []
        self._anon = 0

    # Queries ----------------------------------------------------------------------------

    def backends(self) -> list[tuple[BlockBackend, Device | None]]:
        """Backends query-block reports: named ones, then anonymous ones of devices."""
        by_backend = {id(d.backend): d for d in self.devices}
        result: list[tuple[BlockBackend, Device | None]] = [
            (blk, by_backend.get(id(blk))) for blk in self.named.values()]
        result += [(d.backend, d) for d in self.devices if not d.backend.name]
        return result

    def query_block(self) -> list[dict[str, Any]]:
        """query-block's BlockInfo list (the caller holds the graph lock)."""
        return [backend_info(blk, device.qdev if device is not None else None)
                for blk, device in self.backends()]

    def find(self, ident: str) -> Device | None:
        """A device by id or QOM path (find_device_state)."""
        for device in self.devices:
            if ident in (device.id, device.path):
                return device
        return None

    def peripherals(self, anonymous: bool) -> dict[str, str]:
        """Children of /machine/peripheral(-anon): name -> QOM type."""
        prefix = "/machine/peripheral-anon/" if anonymous else "/machine/peripheral/"
        return {d.path[len(prefix):]: d.driver for d in self.devices if d.path.startswith(prefix)}

    # -drive -----------------------------------------------------------------------------

    def _inmigrate(self) -> bool:
        return self.vm.state is RunState.INMIGRATE

    def drive_new(self, opts: dict[str, Any]) -> None:
        """``-drive``: a named BlockBackend over a new node tree (drive_new, blockdev_init)."""
        interface = opts.pop("if", self._default_interface())
        if interface not in ("none", "virtio"):
            raise QMPError(f"Drive interface '{interface}' is not supported by qmp-server")
        name = opts.pop("id", None)
        if name is None:
            index = sum(1 for n in self.named if n.startswith(interface))
            name = f"{interface}{index}"
        elif not _id_wellformed(name):
            raise QMPError("Parameter 'id' expects an identifier\n"
                           "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
        if name in self.named:
            raise QMPError(f"Duplicate ID '{name}' for drive")
        read_only = _bool_property(opts.pop("readonly", "off"), "read-only")
        filename = opts.pop("file", None)
        fmt = opts.pop("format", None)
        if filename is None:
            raise QMPError('A block device must be specified for "file"')
        if fmt is None:
            fmt = self._probe(filename)
        spec: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": filename},
                                "read-only": read_only}
        cache = opts.pop("cache", None)
        if isinstance(cache, dict):
            spec["cache"] = {key: _bool_property(value, f"cache.{key}") for key, value in cache.items()}
        for key in ("node-name", "discard", "detect-zeroes"):
            if key in opts:
                spec[key] = opts.pop(key)
        if opts:
            raise QMPError(f"Block format '{fmt}' does not support the option '{next(iter(opts))}'")
        graph = self.block.graph
        node = _call(graph.open, spec, inactive=self._inmigrate())
        # drive_new's tree belongs to its BlockBackend, not to the monitor.
        node.monitor_owned = False
        blk = BlockBackend(graph, name, inmigrate=self._inmigrate)
        # blk_new_open: the backend reads consistently and lets everyone else do anything.
        blk.perm, blk.shared = CONSISTENT_READ, ALL
        try:
            _call(blk.insert, node)
        except QMPError:
            self._close_tree(node.name)
            raise
        self.named[name] = blk
        if interface == "virtio":
            self.device_add({"driver": "virtio-blk-pci", "drive": name}, hotplug=False)

    def _default_interface(self) -> str:
        # The machine class's block_default_type: IDE on the PC boards, none without a board.
        found = model.machine_type(self.machine_type)
        return "none" if found is None or found.name == "none" else "ide"

    def drive_add(self, text: str) -> None:
        """HMP ``drive_add``: a ``-drive`` at run time; only ``if=none`` can be hot-added
        (hmp_drive_add). The caller holds the graph lock."""
        opts = parse_keyval(text)
        interface = opts.get("if", self._default_interface())
        if interface != "none":
            # QEMU creates the drive, then refuses its type (BlockInterfaceType's number).
            raise QMPError(f"Can't hot-add drive to type {_IF_NUMBER.get(interface, 1)}")
        self.drive_new(opts)

    def drive_del(self, name: str) -> None:
        """HMP ``drive_del`` (hmp_drive_del): the medium goes at once; a backend still
        attached to a device loses its name and stays, empty, until the device goes.
        The caller holds the graph lock."""
        blk = self.named.get(name)
        if blk is None:
            raise QMPError(f"Device '{name}' not found")
        node = blk.node
        if node is not None:
            _call(blk.remove)
            if not node.parents:
                self._close_tree(node.name)
        del self.named[name]
        if blk.dev is not None:
            blk.name = ""  # monitor_remove_blk: the device keeps an anonymous backend

    @staticmethod
    def _probe(filename: str) -> str:
        # bdrv_probe_all over the drivers we have: qcow2's magic, else raw with QEMU's warning.
        try:
            fmt = probe_format(filename)
        except OSError as err:
            raise QMPError(f"Could not open '{filename}': {err.strerror}") from err
        if fmt != "raw":
            return fmt
        sys.stderr.write(
            f"WARNING: Image format was not specified for '{filename}' and probing guessed raw.\n"
            "         Automatically detecting the format is dangerous for raw images, write "
            "operations on block 0 will be restricted.\n"
            "         Specify the 'raw' format explicitly to remove the restrictions.\n")
        sys.stderr.flush()
        return "raw"

    def _close_tree(self, node_name: str) -> None:
        graph = self.block.graph
        node = graph.find(node_name)
        if node is not None:
            # graph.delete closes only monitor-owned trees; this one is ours to close.
            node.monitor_owned = True
            _call(graph.delete, node_name)

    # device_add -----------------------------------------------------------------------

    def device_add(self, props: dict[str, Any], *, hotplug: bool = True) -> Device:
        """qdev_device_add for the disk devices, with QEMU's checks in QEMU's order."""
        driver = props.get("driver")
        if not isinstance(driver, str):
            raise QMPError("Parameter 'driver' is missing")
        entry = model.QOM_TYPES.get(driver)
        if entry is None or not model.is_device(driver):
            raise QMPError(f"'{driver}' is not a valid device model name")
        if entry.abstract:
            raise QMPError("Parameter 'driver' expects a non-abstract device type")
        buses = _buses(self.machine_type).get(_BUS_TYPE[driver], [])
        bus_name = props.get("bus")
        if bus_name is not None:
            all_buses = [b for names in _buses(self.machine_type).values() for b in names]
            if bus_name not in all_buses:
                raise QMPError(f"Bus '{bus_name}' not found")
            if bus_name not in buses:
                raise QMPError(f"Device '{driver}' can't go on {bus_name.split('.')[0].upper()} bus")
        elif not buses:
            raise QMPError(f"No '{_BUS_TYPE[driver]}' bus found for device '{driver}'")
        else:
            # qbus_find_recursive picks the last IDE bus with a free unit for hotplug.
            bus_name = buses[-1] if hotplug else buses[0]
        hotpluggable = driver != "ide-hd"
        if hotplug and not hotpluggable:
            raise QMPError(f"Bus '{bus_name}' does not support hotplugging")
        dev_id = props.get("id")
        if dev_id is not None:
            if not isinstance(dev_id, str) or not _id_wellformed(dev_id):
                raise QMPError("Parameter 'id' expects an identifier")
            if self.find(dev_id) is not None or dev_id in ("type",):
                raise QMPError(f"Duplicate device ID '{dev_id}'")
        known = {prop["name"] for prop in model.DEVICE_PROPERTIES[driver]}
        for key in props:
            if key not in _GENERIC and key not in known:
                raise QMPError(f"Property '{driver}.{key}' not found")
        share_rw = _bool_property(props.get("share-rw", False), "share-rw")
        if dev_id is not None:
            path = f"/machine/peripheral/{dev_id}"
        else:
            path = f"/machine/peripheral-anon/device[{self._anon}]"
        backend_type = _BACKEND_CHILD.get(driver, (None, driver))[1]
        blk, legacy = self._set_drive(props.get("drive"), backend_type)
        device = Device(driver=driver, id=dev_id, path=path, backend=blk, legacy_drive=legacy,
                        hotpluggable=hotpluggable, bus=bus_name)
        try:
            self._realize(device, share_rw)
        except BaseException:
            if not legacy:
                _call(blk.remove)
            raise
        if dev_id is None:
            self._anon += 1
        self.devices.append(device)
        return device

    def _set_drive(self, drive: Any, backend_type: str) -> tuple[BlockBackend, bool]:
        """set_drive_helper: a -drive's backend by name, else a new one over a node."""
        if drive is None:
            raise QMPError("drive property not set")
        if not isinstance(drive, str):
            raise QMPError("Parameter 'drive' expects a string")
        named = self.named.get(drive)
        if named is not None:
            if named.dev is not None or any(d.backend is named for d in self.devices):
                raise QMPError(f"Drive '{drive}' is already in use by another device")
            return named, True
        node = self.block.graph.find(drive)
        if node is None:
            raise QMPError(f"Property '{backend_type}.drive' can't find value '{drive}'")
        blk = BlockBackend(self.block.graph, inmigrate=self._inmigrate)
        _call(blk.insert, node)
        return blk, False

    def _realize(self, device: Device, share_rw: bool) -> None:
        blk = device.backend
        node = blk.node
        assert node is not None
        # blk_attach_dev first (it names the backend in errors), then
        # blkconf_apply_backend_options: read-only nodes get a read-only device.
        # The virtio transport's backend device has no id of its own: named by its path.
        own_id = None if device.driver in _BACKEND_CHILD else device.id
        _call(blk.attach_dev, device.qdev, own_id)
        perm = CONSISTENT_READ if node.read_only else CONSISTENT_READ | WRITE
        shared = CONSISTENT_READ | WRITE_UNCHANGED | RESIZE | (WRITE if share_rw else 0)
        try:
            _call(blk.set_perm, perm, shared)
        except QMPError:
            _call(blk.detach_dev)
            raise

    # device_del -----------------------------------------------------------------------

    def device_del(self, ident: str) -> list[dict[str, Any]]:
        """qmp_device_del; returns the DEVICE_DELETED data to send, in QEMU's order."""
        device = self.find(ident)
        if device is None:
            raise QMPError(f"Device '{ident}' not found", "DeviceNotFound")
        if not device.hotpluggable:
            raise QMPError(f"Bus '{device.bus}' does not support hotplugging")
        # The guest acknowledges the unplug at once (there is none to wait for).
        self.devices.remove(device)
        blk = device.backend
        _call(blk.detach_dev)
        if device.legacy_drive:
            # blockdev_auto_del: a -drive's backend (and its nodes) go with the device.
            del self.named[blk.name]
            node = blk.node
            _call(blk.remove)
            if node is not None and not node.parents:
                self._close_tree(node.name)
        else:
            _call(blk.remove)
        events: list[dict[str, Any]] = []
        if device.qdev != device.path:
            events.append({"path": device.qdev})
        data: dict[str, Any] = {}
        if device.id is not None:
            data["device"] = device.id
        data["path"] = device.path
        events.append(data)
        return events

    def vm_state_changed(self) -> None:
        """The run state changed: backends waiting for the end of migration tighten."""
        for blk, _ in self.backends():
            try:
                self.block.locked(blk.vm_state_changed)
            except QMPError as err:
                # QEMU reports this and carries on (blk_vm_state_changed).
                error_report(err.desc)

    # Command line ---------------------------------------------------------------------

    def cli_drive(self, text: str) -> None:
        """One ``-drive`` argument (QemuOpts syntax); the caller holds the graph lock."""
        self.drive_new(parse_keyval(text))

    def cli_device(self, text: str) -> None:
        """One ``-device`` argument: JSON as libvirt sends it, or ``driver,key=value,...``."""
        if text.lstrip().startswith("{"):
            props = parse_json_option(text)
            if not isinstance(props, dict):
                raise QMPError("-device argument must be a JSON object")
        else:
            props = parse_keyval(text, "driver")
        self.device_add(props, hotplug=False)
