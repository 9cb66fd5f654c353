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

A SCSI controller (virtio-scsi-pci) has no disk of its own: it is there to give scsi-hd
disks a bus (``ID.0``, or ``scsi.N`` when it has no id), with QEMU's target/LUN addressing
(hw/scsi/scsi-bus.c). Unplugging a disk from it needs no guest in QEMU either.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from blocklayer.backend import BlockBackend
from blocklayer.errors import BlockError
from blocklayer.graph import BackingOptions, probe_format
from blocklayer.node import BlockNode
from blocklayer.perm import ALL, CONSISTENT_READ, RESIZE, WRITE, WRITE_UNCHANGED
from blocklayer.protocols import protocol_options

from . import machinemodel as model
from .blockinfo import backend_info
from .blockservice import BlockService
from .driveopts import CACHE_MODES, nest, parse_qemu_opts
from .errorreport import HINT, error_report
from .errors import QMPError
from .keyval import parse_json_option, parse_keyval
from .objects import Objects
from .runstate import VM, RunState

T = TypeVar("T")
log = logging.getLogger(__name__)

#: qdev's aliases (qdev_alias_table) for the devices we model, on a PCI machine.
_DEVICE_ALIASES = {"virtio-blk": "virtio-blk-pci", "virtio-scsi": "virtio-scsi-pci"}
#: The protocol drivers we have: named as a -drive's format, they are its top node.
_PROTOCOL_DRIVERS = ("file", "null-co")

#: QEMU's BlockInterfaceType numbers, as "Can't hot-add drive to type N" prints them.
_IF_NUMBER = {"none": 0, "ide": 1, "scsi": 2, "floppy": 3, "pflash": 4, "mtd": 5, "sd": 6,
              "virtio": 7, "xen": 8}

#: The bus each modelled device plugs into (its DeviceClass bus_type), as QEMU names it
#: in "No 'X' bus found".
_BUS_TYPE = {"virtio-blk-pci": "PCI", "virtio-blk-device": "virtio-bus", "scsi-hd": "SCSI",
             "ide-hd": "IDE", "virtio-scsi-pci": "PCI", "virtio-scsi-device": "virtio-bus",
             "pcie-root-port": "PCI", "pci-bridge": "PCI", "pcie-pci-bridge": "PCI",
             "i82801b11-bridge": "PCI", "ich9-ahci": "PCI"}
#: Devices whose disk is a child object (the virtio transport's backend device).
_BACKEND_CHILD = {"virtio-blk-pci": ("virtio-backend", "virtio-blk-device")}
#: The virtio transports' child device (``virtio-backend`` in the QOM tree).
TRANSPORT_CHILD = {"virtio-blk-pci": "virtio-blk-device", "virtio-scsi-pci": "virtio-scsi-device"}
#: Controllers: devices without a disk that provide a bus of this type.
_CONTROLLERS = {"virtio-scsi-pci": "SCSI", "virtio-scsi-device": "SCSI", "pcie-root-port": "PCI",
                "pci-bridge": "PCI", "pcie-pci-bridge": "PCI", "i82801b11-bridge": "PCI",
                "ich9-ahci": "IDE"}
#: The name of an anonymous controller's bus (qbus_init_internal: the bus type in lower
#: case and a global counter per type): a root port's secondary bus is PCIe, a bridge's
#: conventional PCI.
_ANON_BUS_KIND = {"pcie-root-port": "pcie", "pci-bridge": "pci", "pcie-pci-bridge": "pci",
                  "i82801b11-bridge": "pci", "ich9-ahci": "ide"}
#: PCI bridges: their secondary bus takes the bridge's id as its name (pci_bridge_initfn).
_PCI_BRIDGES = frozenset({"pcie-root-port", "pci-bridge", "pcie-pci-bridge", "i82801b11-bridge"})
#: The AHCI ports of ich9-ahci (ICH_AHCI_NUM_PORTS), one IDE bus each.
_AHCI_PORTS = 6
#: The (non-)transitional virtio variants behave as their base device here (no guest
#: drives the legacy interface either way).
for _base in ("virtio-blk-pci", "virtio-scsi-pci"):
    for _kind in ("transitional", "non-transitional"):
        _variant = f"{_base}-{_kind}"
        _BUS_TYPE[_variant] = _BUS_TYPE[_base]
        TRANSPORT_CHILD[_variant] = TRANSPORT_CHILD[_base]
        if _base in _BACKEND_CHILD:
            _BACKEND_CHILD[_variant] = _BACKEND_CHILD[_base]
        if _base in _CONTROLLERS:
            _CONTROLLERS[_variant] = _CONTROLLERS[_base]
#: virtio-scsi's addressing limits (VIRTIO_SCSI_MAX_CHANNEL/TARGET/LUN).
_SCSI_MAX_CHANNEL, _SCSI_MAX_TARGET, _SCSI_MAX_LUN = 0, 255, 16383
#: scsi-id/lun's default (uint32 -1): the first free one.
_SCSI_ANY = 0xFFFFFFFF


def _signed(value: int) -> str:
    """A uint32 as QEMU's "%d" prints it."""
    return str(value - (1 << 32) if value >= 1 << 31 else value)
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


class _JsonScalar(str):
    """A ``json:`` filename's scalar as a QemuOpts string, remembering the JSON value:
    QEMU keeps that one in the node's options (its file name shows ``512``, not ``"512"``)."""

    value: Any

    def __new__(cls, text: str, value: Any) -> _JsonScalar:
        scalar = super().__new__(cls, text)
        scalar.value = value
        return scalar


def _as_spelled(tree: Any) -> Any:
    """The -drive options as QEMU holds them: strings, but a json: filename's JSON values."""
    if isinstance(tree, dict):
        return {key: _as_spelled(value) for key, value in tree.items()}
    return tree.value if isinstance(tree, _JsonScalar) else tree


def _json_filename(filename: str) -> dict[str, Any]:
    """parse_json_filename: the options of a ``json:{...}`` filename, dotted keys nested
    (qdict_flatten, then crumpled as -drive's own options), scalars as QemuOpts strings
    (:class:`_JsonScalar`)."""
    try:
        tree = json.loads(filename[len("json:"):])
    except ValueError as err:
        raise QMPError(f"Could not parse the JSON options: {err}") from err
    if not isinstance(tree, dict):
        raise QMPError("Invalid JSON object given")
    flat: dict[str, str] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                flatten(f"{prefix}{key}.", item)
        elif isinstance(value, bool):
            flat[prefix[:-1]] = _JsonScalar("on" if value else "off", value)
        else:
            flat[prefix[:-1]] = value if isinstance(value, str) else _JsonScalar(json.dumps(value), value)

    flatten("", tree)
    return nest(flat)


def _merged(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """``high`` over ``low``, nested dicts merged (qdict_join on flattened options)."""
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _id_wellformed(name: str) -> bool:
    # QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'.
    return (bool(name) and name[0].isascii() and name[0].isalpha()
            and all(c.isascii() and (c.isalnum() or c in "-._") for c in name))


def _scsi_property(props: dict[str, Any], name: str, default: int) -> int:
    """A SCSI address property (qdev uint32): a JSON number or a keyval string."""
    value = props.get(name)
    if value is None:
        return default
    if isinstance(value, str):
        # The keyval visitor: a number out of range is "uint32_t", anything else "integer".
        if re.fullmatch(r"[+-]?[0-9]+", value) is None:
            raise QMPError(f"Parameter '{name}' expects integer")
        value = int(value)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise QMPError(f"Parameter '{name}' expects integer")
    if not 0 <= value <= 0xFFFFFFFF:
        raise QMPError(f"Parameter '{name}' expects uint32_t")
    return value


def _pci_devfn(value: Any, driver: str) -> int:
    """The ``addr`` property (set_pci_devfn): ``SLOT[.FN]`` in hex, or the devfn as a
    number (-1: any); QEMU's texts otherwise."""
    if isinstance(value, str):
        # sscanf's %x: optional blanks, sign and 0x; the whole text must be used.
        number = r"\s*[+-]?(?:0[xX])?[0-9a-fA-F]+"
        match = re.fullmatch(f"({number})(?:\\.({number}))?", value)
        if match is not None:
            slot = int(match[1].replace(" ", ""), 16) % (1 << 32)
            function = int(match[2].replace(" ", ""), 16) % (1 << 32) if match[2] else 0
            if slot <= 31 and function <= 7:
                return slot << 3 | function
        raise QMPError(f"Property '{driver}.addr' doesn't take value '{value}'")
    if isinstance(value, bool) or not isinstance(value, int):
        raise QMPError("Parameter 'addr' expects int32")
    if not -1 <= value <= 255:
        raise QMPError("Parameter 'addr' expects a value between -1 and 255")
    return value


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


@dataclass(frozen=True)
class _BoardDevice:
    """A PCI function the board itself puts on its root bus (not a peripheral)."""

    driver: str
    devfn: int
    multifunction: bool = False
    id: None = None


def _board_devices(machine_type: str) -> tuple[_BoardDevice, ...]:
    """The root bus's built-in functions as QEMU 7.2 names them in its errors, with
    -nodefaults (libvirt's): i440fx's host bridge and PIIX3/4 in slot 1 (its USB
    function only with ``usb=on``, not modelled), q35's MCH and ICH9's LPC, SATA and SMBus
    in slot 31."""
    found = model.machine_type(machine_type)
    if found is None or found.name == model.NONE_MACHINE:
        return ()
    if "q35" in found.name:
        return (_BoardDevice("mch", 0x00), _BoardDevice("ICH9-LPC", 0xf8, True),
                _BoardDevice("ich9-ahci", 0xfa), _BoardDevice("ICH9-SMB", 0xfb))
    return (_BoardDevice("i440FX", 0x00), _BoardDevice("PIIX3", 0x08, True),
            _BoardDevice("piix3-ide", 0x09), _BoardDevice("PIIX4_PM", 0x0b))


@dataclass(eq=False)
class Device:
    """One realized disk frontend, or a controller that gives disks a bus."""

    driver: str
    id: str | None
    path: str
    #: None for a controller: it has no disk of its own.
    backend: BlockBackend | None
    #: The backend is the -drive's, deleted with the device (blockdev_auto_del).
    legacy_drive: bool
    hotpluggable: bool
    bus: str
    #: A controller's buses (``scsi0.0``; a bridge's is its id; ich9-ahci has six), which
    #: its disks name as their ``bus``.
    child_buses: tuple[str, ...] = ()
    #: Slot and function (``addr``) on its PCI bus, allocated and checked as QEMU does.
    devfn: int | None = None
    #: The PCI ``multifunction`` property: function 0 of a slot that has others.
    multifunction: bool = False
    #: A root port's ``hotplug`` property (its slot's hot-plug capability).
    slot_hotplug: bool = True
    #: A SCSI disk's (channel, target, LUN) on its bus.
    scsi_address: tuple[int, int, int] | None = None
    #: Added by device_add (qdev's ``hotplugged``), not by -device/-drive.
    hotplugged: bool = False
    #: ``share-rw`` as realized.
    share_rw: bool = False

    def qom_property(self, name: str) -> Any:
        """The value qom-get reads for ``name`` on the device (or its virtio backend, to
        which the transport aliases its disk properties); KeyError if not modelled."""
        if name == "realized":
            return True
        if name == "hotplugged":
            return self.hotplugged
        if name == "hotpluggable":
            return self.hotpluggable
        if self.backend is not None:
            if name == "drive":
                # qdev's get_drive: the backend's name, else its root node's.
                node = self.backend.node
                return self.backend.name or (node.name if node is not None else "")
            if name == "share-rw":
                return self.share_rw
        if self.devfn is not None and name == "addr":
            return self.devfn
        if self.scsi_address is not None and name in ("channel", "scsi-id", "lun"):
            return self.scsi_address[("channel", "scsi-id", "lun").index(name)]
        raise KeyError(name)

    @property
    def qdev(self) -> str:
        """QOM path of the object that uses the BlockBackend."""
        child = _BACKEND_CHILD.get(self.driver)
        return f"{self.path}/{child[0]}" if child else self.path


def _check_multifunction(used: Mapping[int, Device | _BoardDevice], devfn: int,
                         multifunction: bool) -> None:
    """pci_init_multifunction: a function other than 0 needs a multifunction function
    0 when there is one; a single-function function 0 needs the others empty."""
    slot, function = devfn >> 3, devfn & 7
    if function:
        first = used.get(devfn & ~7)
        if first is not None and not first.multifunction:
            raise QMPError(f"PCI: single function device can't be populated in function "
                           f"{slot:x}.{function:x}")
        return
    if multifunction:
        return
    other = next((fn for fn in range(1, 8) if devfn + fn in used), None)
    if other is not None:
        raise QMPError(f"PCI: {slot:x}.0 indicates single function, but {slot:x}.{other:x} "
                       "is already populated.")


class Devices:
    """The machine's disk frontends and named (``-drive``) BlockBackends."""

    def __init__(self, vm: VM, block: BlockService, machine_type: str,
                 blockdev_options: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.vm = vm
        self.block = block
        self.machine_type = machine_type
        #: A keyval tree of strings -> typed blockdev-add options (the schema's keyval
        #: visitor), for what -drive leaves to the block layer.
        self._blockdev_options = blockdev_options
        #: Where each -drive sits: name -> (interface, bus, unit).
        self._drive_units: dict[str, tuple[str, int, int]] = {}
        #: Named BlockBackends (``-drive id=``), in creation order.
        self.named: dict[str, BlockBackend] = {}
        #: Devices in creation order (QEMU lists backends in that order too).
        self.devices: list[Device] = []
        self._anon = 0
        #: The machine's -object/object-add objects, which iothread= links resolve in
        #: (the wiring, app.py, hands them over).
        self.objects: Objects | None = None
        #: -no-acpi / -machine acpi=off: an i440fx pci.0 without ACPI has no hot-plug.
        self.acpi = True
        #: qbus_init_internal's global counter per bus type, for buses of devices without
        #: an id ("scsi.0", "scsi.1", ...).
        self._anon_buses: dict[str, int] = {}
        #: Called with a -drive's root node when its device goes (blockdev_auto_del: the
        #: block jobs on it are cancelled; the wiring, machine.py, adds the listener).
        self.auto_del_listeners: list[Callable[[BlockNode], None]] = []

    @property
    def disks(self) -> list[Device]:
        """The devices that have a disk (not the controllers), in creation order."""
        return [d for d in self.devices if d.backend is not None]

    def _bus_map(self) -> dict[str, list[str]]:
        """Bus type -> bus names: the board's, then the controllers', newest first, as
        qbus_find_recursive meets them (bus_add_child puts new devices at the head)."""
        buses = {kind: list(names) for kind, names in _buses(self.machine_type).items()}
        for device in reversed(self.devices):
            for bus in device.child_buses:
                buses.setdefault(_CONTROLLERS[device.driver], []).append(bus)
        return buses

    # Queries ----------------------------------------------------------------------------

    def backends(self) -> list[tuple[BlockBackend, Device | None]]:
        """Backends query-block reports: named ones, then anonymous ones of devices."""
        by_backend = {id(d.backend): d for d in self.disks}
        result: list[tuple[BlockBackend, Device | None]] = [
            (blk, by_backend.get(id(blk))) for blk in self.named.values()]
        result += [(d.backend, d) for d in self.disks if d.backend is not None and not d.backend.name]
        return result

    def device_name(self, node: BlockNode) -> str:
        """bdrv_get_device_name: the name of a named BlockBackend whose root is ``node``
        ("" when only anonymous ones, or none, use it; parents other than BlockBackends
        have no name in QEMU's bdrv_get_parent_name)."""
        return next((name for name, blk in self.named.items() if blk.node is node), "")

    def query_block(self) -> list[dict[str, Any]]:
        """query-block's BlockInfo list (the caller holds the graph lock)."""
        # blk_get_attached_dev_id: the device's own id, else its QOM path (a virtio-blk-pci's
        # backend device has no id: its path).
        return [backend_info(blk, blk.dev_id or blk.dev) for blk, _ in self.backends()]

    def find(self, ident: str) -> Device | None:
        """A device by id or QOM path (find_device_state)."""
        for device in self.devices:
            if ident in (device.id, device.path):
                return device
        return None

    def find_bs(self, device: str | None, node_name: str | None) -> BlockNode | None:
        """bdrv_lookup_bs without an error: a named BlockBackend's node (None when it has
        no medium) first, then a node called ``node_name``, else None."""
        if device is not None:
            for blk, _ in self.backends():
                if blk.name and blk.name == device:
                    return blk.node
        return self.block.graph.find(node_name) if node_name is not None else None

    def lookup_bs(self, device: str | None, node_name: str | None) -> BlockNode:
        """bdrv_lookup_bs with QEMU's texts: a named BlockBackend's node, else a node."""
        if device is not None:
            for blk, _ in self.backends():
                if blk.name and blk.name == device:
                    if blk.node is None:
                        raise QMPError(f"Device '{device}' has no medium")
                    return blk.node
        node = self.find_bs(None, node_name)
        if node is None:
            raise QMPError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")
        return node

    def resolve(self, ident: str) -> tuple[Device, str] | None:
        """find_device_state as blk_by_qdev_id uses it: an id, else a QOM path, absolute
        or partial (its last components; ambiguous or none: not found), of a device or of
        a virtio transport's backend child. Returns the device and the path matched."""
        device = self.find(ident)
        if device is not None:
            return device, device.path
        candidates = [(d, d.path) for d in self.devices]
        candidates += [(d, f"{d.path}/virtio-backend") for d in self.devices
                       if d.driver in TRANSPORT_CHILD]
        if ident.startswith("/"):
            canonical = "/" + "/".join(part for part in ident.split("/") if part)
            return next(((d, p) for d, p in candidates if p == canonical), None)
        parts = [part for part in ident.split("/") if part]
        if not parts:
            return None
        matches = [(d, p) for d, p in candidates if p.split("/")[-len(parts):] == parts]
        return matches[0] if len(matches) == 1 else None

    def peripherals(self, anonymous: bool) -> dict[str, str]:
        """Children of /machine/peripheral(-anon): name -> QOM type."""
        prefix = "/machine/peripheral-anon/" if anonymous else "/machine/peripheral/"
        return {d.path[len(prefix):]: d.driver for d in self.devices if d.path.startswith(prefix)}

    # -drive -----------------------------------------------------------------------------

    def _inmigrate(self) -> bool:
        return self.vm.state is RunState.INMIGRATE

    def drive_new(self, opts: dict[str, str]) -> None:
        """``-drive`` (QemuOpts, flat): a named BlockBackend over a new node tree, plus the
        device ``if=`` asks for (drive_new, blockdev_init). The caller holds the lock."""
        opts = dict(opts)
        interface = opts.pop("if", self._default_interface())
        if interface not in _IF_NUMBER:
            raise QMPError(f"unsupported bus type '{interface}'")
        if interface not in ("none", "virtio", "ide"):
            raise QMPError(f"Drive interface '{interface}' is not supported by qmp-server")
        media = opts.pop("media", "disk")
        if media not in ("disk", "cdrom"):
            raise QMPError(f"'{media}' invalid media")
        if media == "cdrom":
            raise QMPError("media=cdrom is not supported by qmp-server")
        bus_id, unit_id = self._drive_address(interface, opts)
        name = opts.pop("id", None)
        if name is None:
            # drive_new's generated id: "ide0-hd1", "virtio0", "none0".
            name = (f"ide{bus_id}-hd{unit_id}" if interface == "ide"
                    else f"{interface}{unit_id}")
        elif not _id_wellformed(name):
            raise QMPError("Parameter 'id' expects an identifier\n"
                           "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
        if name in self.named:
            raise QMPError(f"Duplicate ID '{name}' for drive")
        tree = self._drive_block_options(opts)
        graph = self.block.graph
        blk = BlockBackend(graph, name, inmigrate=self._inmigrate)
        if tree is not None:
            # cache.writeback belongs to the BlockBackend, not to the nodes (blockdev_init).
            cache = tree.get("cache", {})
            blk.enable_write_cache = _bool_property(cache.pop("writeback", "on"), "cache.writeback")
            if not cache:
                tree.pop("cache", None)
        # blk_new_open: the backend reads consistently and lets everyone else do anything.
        blk.perm, blk.shared = CONSISTENT_READ, ALL
        if tree is not None:
            # bs->options of a -drive's nodes hold QemuOpts' strings (file names show them).
            node = _call(graph.open, self._typed_drive(tree), inactive=self._inmigrate(),
                         spelled=_as_spelled(tree))
            # drive_new's tree belongs to its BlockBackend, not to the monitor.
            node.monitor_owned = False
            try:
                _call(blk.insert, node)
            except QMPError:
                self._close_tree(node.name)
                raise
        self.named[name] = blk
        self._drive_units[name] = (interface, bus_id, unit_id)
        if interface == "virtio":
            self.device_add({"driver": "virtio-blk-pci", "drive": name}, hotplug=False)
        elif interface == "ide":
            self.device_add({"driver": "ide-hd", "drive": name, "bus": f"ide.{bus_id}",
                             "unit": str(unit_id)}, hotplug=False)

    def _typed_drive(self, tree: dict[str, Any]) -> dict[str, Any]:
        """The typed blockdev options of a -drive's node tree. Its ``backing.*`` options
        are for the backing file the image names (bdrv_open_backing_file), which the
        block layer completes from the header and then has typed here, level by level
        (:class:`BackingOptions`); ``backing=`` names a node, or none when empty."""
        backing = tree.get("backing")
        if backing == "":
            # bdrv_open_inherit still takes the old spelling of "no backing file".
            log.warning('Use of "backing": "" is deprecated; use "backing": null instead')
            typed = self._typed({key: value for key, value in tree.items() if key != "backing"})
            typed["backing"] = None
            return typed
        if not isinstance(backing, dict):
            return self._typed(tree)
        typed = self._typed({key: value for key, value in tree.items() if key != "backing"})
        typed["backing"] = BackingOptions(backing, self._typed_backing)
        return typed

    def _typed_backing(self, tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        # BackingOptions.open_options: what no driver of the backing node takes fails
        # there, with the block layer's prefix for the backing file.
        try:
            return self._typed_drive(tree), _as_spelled(tree)
        except QMPError as err:
            raise BlockError(err.desc, errno.EINVAL) from err

    def _typed(self, tree: dict[str, Any]) -> dict[str, Any]:
        # blockdev_init hands the rest to bdrv_open, which names what no driver took.
        try:
            return self._blockdev_options(tree)
        except QMPError as err:
            unexpected = re.fullmatch(r"Parameter '(.+)' is unexpected", err.desc)
            if unexpected is None:
                raise
            key = unexpected.group(1)
            if key.startswith("file."):
                raise QMPError(f"Block protocol 'file' doesn't support the option "
                               f"'{key[len('file.'):]}'") from None
            raise QMPError(f"Block format '{tree['driver']}' does not support the option "
                           f"'{key}'") from None

    def _drive_address(self, interface: str, opts: dict[str, str]) -> tuple[int, int]:
        # drive_new: bus/unit or index, else the first free unit; IDE has two units per
        # bus on i440fx, one per AHCI port on q35 (units_per_default_bus).
        max_devs = 0
        if interface == "ide":
            found = model.machine_type(self.machine_type)
            max_devs = 1 if found is not None and "q35" in found.name else 2
        try:
            bus_id = int(opts.pop("bus", "0"))
            unit_id = int(opts.pop("unit", "-1"))
            index = int(opts.pop("index", "-1"))
        except ValueError as err:
            raise QMPError("Parameter 'index' expects a number") from err
        if index != -1:
            if bus_id != 0 or unit_id != -1:
                raise QMPError("index cannot be used with bus and unit")
            bus_id, unit_id = (index // max_devs, index % max_devs) if max_devs else (0, index)
        taken = {(bus, unit) for kind, bus, unit in self._drive_units.values() if kind == interface}
        if unit_id == -1:
            unit_id = 0
            while (bus_id, unit_id) in taken:
                unit_id += 1
                if max_devs and unit_id >= max_devs:
                    unit_id -= max_devs
                    bus_id += 1
        if max_devs and unit_id >= max_devs:
            raise QMPError(f"unit {unit_id} too big (max is {max_devs - 1})")
        if (bus_id, unit_id) in taken:
            raise QMPError(f"drive with bus={bus_id}, unit={unit_id} (index={index}) exists")
        return bus_id, unit_id

    def _drive_block_options(self, opts: dict[str, str]) -> dict[str, Any] | None:
        """blockdev_init's block options (a keyval tree of strings) from what is left of a
        -drive; None for a drive without a medium."""
        read_only = _bool_property(opts.pop("read-only", opts.pop("readonly", "off")), "read-only")
        for action, is_read in (("werror", False), ("rerror", True)):
            value = opts.pop(action, None)
            # parse_block_error_action; the policy itself has no I/O errors to act on here.
            if value is not None and value not in (("ignore", "stop", "report") if is_read
                                                    else ("ignore", "enospc", "stop", "report")):
                raise QMPError(f"'{value}' invalid {'read' if is_read else 'write'} error action")
        for unsupported in ("copy-on-read", "snapshot"):
            if _bool_property(opts.pop(unsupported, "off"), unsupported):
                raise QMPError(f"{unsupported}=on is not supported by qmp-server")
        cache = opts.pop("cache", None)
        aio = opts.pop("aio", None)
        filename = opts.pop("file", None)
        fmt = opts.pop("format", None) or opts.pop("driver", None)
        tree = nest(opts)
        file_options = tree.pop("file", {})
        if filename is not None and filename.startswith("json:"):
            # bdrv_open_inherit: a json: filename's options, below those given directly;
            # blockdev_init's read-only and format always win.
            if file_options:
                tree["file"] = file_options
            tree = _merged(_json_filename(filename), tree)
            tree.pop("read-only", None)
            fmt = fmt or tree.pop("driver", None)
            tree.pop("driver", None)
            filename = tree.pop("filename", None)
            if filename is not None and fmt not in _PROTOCOL_DRIVERS:
                raise QMPError("Must specify either driver or file")
            file_options = tree.pop("file", {})
            if not isinstance(file_options, dict):
                raise QMPError("Must specify either driver or file")
        if filename is None and "driver" not in file_options and "filename" in file_options:
            # bdrv_fill_options: a filename given as an option is the file driver's, with
            # no protocol prefix parsed (bdrv_find_protocol without allow_protocol_prefix).
            file_options = {"driver": "file", **file_options}
        if filename is None and not file_options:
            if fmt in _PROTOCOL_DRIVERS and fmt != "file":
                # A protocol driver that needs no filename (null-co) is the drive's top.
                return {"driver": fmt, "read-only": "on" if read_only else "off", **tree}
            if fmt == "file":
                raise QMPError("The 'file' block driver requires a file name")
            if fmt is not None:
                # blockdev_init opens a format without its file: the driver wants one.
                raise QMPError('A block device must be specified for "file"')
            if tree:
                raise QMPError("Must specify either driver or file")
            return None  # an empty drive, as QEMU's [not inserted]
        if filename is not None:
            if fmt in _PROTOCOL_DRIVERS:
                # bdrv_fill_options: a protocol driver named as the format parses the
                # filename itself (file: strips its prefix, null-co takes only null-co://).
                if fmt == "file":
                    protocol = {"driver": fmt, "filename": filename.removeprefix("file:")}
                elif filename == "null-co://":
                    protocol = {"driver": fmt}
                else:
                    raise QMPError("The only allowed filename for this driver is 'null-co://'")
            else:
                protocol = _call(protocol_options, filename)
            file_options = {**protocol, **file_options}
            if file_options.get("driver") not in _PROTOCOL_DRIVERS and "file" not in file_options:
                # file.driver names a format (iotest 120): bdrv_open_inherit of that child
                # opens its own protocol child from the file name.
                file_options = {**{k: v for k, v in file_options.items() if k != "filename"},
                                "file": protocol}
            # bdrv_open_common of the protocol node refuses force-share on a writable
            # image before the file is opened and a format probed.
            if fmt is None and not read_only and _bool_property(tree.get("force-share", "off"),
                                                                 "force-share"):
                raise QMPError("force-share=on can only be used with read-only images")
        if aio is not None:
            file_options["aio"] = aio
        if fmt is None:
            if (filename is None and not isinstance(file_options.get("filename"), str)) or \
                    file_options.get("driver", "file") not in _PROTOCOL_DRIVERS:
                raise QMPError("Must specify either driver or file")
            file_options.setdefault("driver", "file")
            fmt = self._probe(file_options, warn=not read_only)
        if cache is not None:
            if cache not in CACHE_MODES:
                raise QMPError("invalid cache option")
            writeback, direct, no_flush = CACHE_MODES[cache]
            specific = tree.setdefault("cache", {})
            # Specific cache.* options take precedence over the mode (drive_new).
            specific.setdefault("writeback", "on" if writeback else "off")
            specific.setdefault("direct", "on" if direct else "off")
            specific.setdefault("no-flush", "on" if no_flush else "off")
        if fmt in _PROTOCOL_DRIVERS:
            # A protocol driver named as the format: the protocol node is the drive's top
            # (bdrv_open with driver=file and the filename), no format layer above it.
            file_options.pop("driver", None)
            return {"driver": fmt, **file_options, "read-only": "on" if read_only else "off",
                    **tree}
        return {"driver": fmt, "file": file_options, "read-only": "on" if read_only else "off",
                **tree}

    def _default_interface(self) -> str:
        # The machine class's block_default_type: IDE on the PC boards, none without a board.
        found = model.machine_type(self.machine_type)
        return "none" if found is None or found.name == "none" else "ide"

    def drive_add(self, text: str, warnings: list[tuple[str, str]] | None = None) -> None:
        """HMP ``drive_add``: a ``-drive`` at run time; only ``if=none`` can be hot-added
        (hmp_drive_add). QemuOpts' warnings go to ``warnings``. The caller holds the graph
        lock."""
        opts = parse_qemu_opts(text, warnings)
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
        self._drive_units.pop(name, None)
        if blk.dev is not None:
            blk.name = ""  # monitor_remove_blk: the device keeps an anonymous backend

    def commit_nodes(self, name: str) -> list[BlockNode]:
        """What HMP ``commit`` commits (hmp_commit): the node of the backend named
        ``name``, or every backend's node that has a backing node (``all``,
        blk_commit_all); QEMU's texts when there is no such backend or medium."""
        if name == "all":
            nodes = [blk.node for blk, _ in self.backends() if blk.node is not None]
            return [node for node in nodes if node.child("backing") is not None]
        blk = self.named.get(name)
        if blk is None:
            raise QMPError(f"Device '{name}' not found")
        if blk.node is None:
            raise QMPError(f"Device '{name}' has no medium")
        return [blk.node]

    @staticmethod
    def _probe(protocol: dict[str, Any], *, warn: bool) -> str:
        # bdrv_probe_all over the drivers we have: qcow2's magic, else raw, with QEMU's
        # warning for a writable image (raw_open). A null-co node reads zeroes: raw.
        filename = str(protocol.get("filename", "null-co://"))
        fmt = "raw"
        if protocol["driver"] == "file":
            try:
                fmt = probe_format(filename)
            except OSError as err:
                raise QMPError(f"Could not open '{filename}': {err.strerror}") from err
        if fmt != "raw" or not warn:
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
        # qdev_alias_table: the short names of the PCI variants.
        driver = _DEVICE_ALIASES.get(driver, driver)
        entry = model.QOM_TYPES.get(driver)
        if entry is None or not model.is_device(driver):
            raise QMPError(f"'{driver}' is not a valid device model name")
        if entry.abstract:
            raise QMPError("Parameter 'driver' expects a non-abstract device type")
        bus_map = self._bus_map()
        bus_type = _BUS_TYPE[driver]
        buses = bus_map.get(bus_type, [])
        bus_name = props.get("bus")
        if bus_name is not None:
            owner = next((kind for kind, names in bus_map.items() if bus_name in names), None)
            if owner is None:
                raise QMPError(f"Bus '{bus_name}' not found")
            if bus_name not in buses:
                raise QMPError(f"Device '{driver}' can't go on {owner} bus")
        elif not buses:
            raise QMPError(f"No '{bus_type}' bus found for device '{driver}'")
        elif bus_type in ("SCSI", "PCI"):
            # qbus_find_recursive meets the board's root bus first (PCI), the newest
            # controller's bus first (SCSI).
            bus_name = buses[0]
        else:
            # qbus_find_recursive picks the last IDE bus with a free unit for hotplug.
            bus_name = buses[-1] if hotplug else buses[0]
        hotpluggable = driver != "ide-hd" and self._bus_hotpluggable(bus_name)
        if hotplug and not hotpluggable:
            raise QMPError(f"Bus '{bus_name}' does not support hotplugging")
        dev_id = props.get("id")
        if dev_id is not None:
            if not isinstance(dev_id, str) or not _id_wellformed(dev_id):
                raise QMPError("Parameter 'id' expects an identifier")
            if self.find(dev_id) is not None or dev_id in ("type",):
                raise QMPError(f"Duplicate device ID '{dev_id}'")
            path = f"/machine/peripheral/{dev_id}"
        else:
            # qdev_set_id adds the new device as /machine/peripheral-anon/device[N] before
            # its properties are set or it is realized: a failure from here on has used N.
            path = f"/machine/peripheral-anon/device[{self._anon}]"
            self._anon += 1
        known = {prop["name"] for prop in model.DEVICE_PROPERTIES[driver]}
        for key in props:
            if key not in _GENERIC and key not in known:
                raise QMPError(f"Property '{driver}.{key}' not found")
        addr = -1
        if "addr" in props:
            value = props["addr"]
            if hotplug and isinstance(value, int) and not isinstance(value, bool):
                # QEMU 7.2's device_add passes its arguments through QemuOpts: a number
                # arrives as its decimal text, which set_pci_devfn reads as hex.
                value = str(value)
            addr = _pci_devfn(value, driver)
        if "iothread" in props:
            # Set before drive and share-rw: the first in QEMU's QDict order of properties.
            self._check_iothread(props["iothread"])
        multifunction = _bool_property(props.get("multifunction", False), "multifunction")
        if driver in _CONTROLLERS:
            slot_hotplug = _bool_property(props.get("hotplug", True), "hotplug")
            devfn = self._plug(bus_name, bus_type, addr, driver, hotplug, multifunction)
            device = Device(driver=driver, id=dev_id, path=path, backend=None, legacy_drive=False,
                            hotpluggable=hotpluggable, bus=bus_name, hotplugged=hotplug,
                            child_buses=self._controller_buses(driver, dev_id), devfn=devfn,
                            slot_hotplug=slot_hotplug, multifunction=multifunction)
            self.devices.append(device)
            return device
        share_rw = _bool_property(props.get("share-rw", False), "share-rw")
        write_cache = props.get("write-cache", "auto")
        if write_cache not in ("on", "off", "auto"):
            raise QMPError(f"Parameter 'write-cache' does not accept value '{write_cache}'")
        backend_type = _BACKEND_CHILD.get(driver, (None, driver))[1]
        scsi = (_scsi_property(props, "channel", 0), _scsi_property(props, "scsi-id", _SCSI_ANY),
                _scsi_property(props, "lun", _SCSI_ANY)) if bus_type == "SCSI" else None
        blk, legacy = self._set_drive(props.get("drive"), backend_type)
        device = Device(driver=driver, id=dev_id, path=path, backend=blk, legacy_drive=legacy,
                        hotpluggable=hotpluggable, bus=bus_name, hotplugged=hotplug,
                        share_rw=share_rw, multifunction=multifunction)
        try:
            device.devfn = self._plug(bus_name, bus_type, addr, driver, hotplug, multifunction)
            if scsi is not None:
                device.scsi_address = self._scsi_address(bus_name, *scsi)
            self._realize(device, share_rw, write_cache)
        except BaseException:
            if not legacy:
                _call(blk.remove)
            raise
        self.devices.append(device)
        return device

    def _controller_buses(self, driver: str, dev_id: str | None) -> tuple[str, ...]:
        """qbus_init_internal's names for a controller's buses: a PCI bridge's is its id
        (pci_bridge_initfn), others ``ID.N``; without an id, the bus type in lower case
        with a global counter (``scsi.0``, ``pci.0``, ``pcie.0``; the board's own IDE
        buses used the first ``ide.N``), used up even if realize fails. Checked against
        QEMU 7.2 (qom-list of the controller) in tests/test_pcie.py."""
        count = _AHCI_PORTS if driver == "ich9-ahci" else 1
        if dev_id is not None:
            if driver in _PCI_BRIDGES:
                return (dev_id,)
            return tuple(f"{dev_id}.{n}" for n in range(count))
        kind = _ANON_BUS_KIND.get(driver, _CONTROLLERS[driver].lower())
        board = len(_buses(self.machine_type).get("IDE", [])) if kind == "ide" else 0
        number = self._anon_buses.get(kind, board)
        self._anon_buses[kind] = number + count
        return tuple(f"{kind}.{n}" for n in range(number, number + count))

    def _bridge(self, bus: str) -> Device | None:
        """The root port or bridge whose secondary bus is ``bus``; None for the board's."""
        return next((d for d in self.devices if d.driver in _PCI_BRIDGES and bus in d.child_buses),
                    None)

    def _pre_plug(self, bus: str) -> None:
        """pcie_cap_slot_pre_plug_cb: a root port with ``hotplug=off`` takes no hot-plug."""
        bridge = self._bridge(bus)
        if bridge is not None and bridge.driver == "pcie-root-port" and not bridge.slot_hotplug:
            raise QMPError(f"Hot-plug failed: unsupported by the port device '{bridge.id}'")

    def _pci_functions(self, bus: str) -> dict[int, Device | _BoardDevice]:
        """What sits on a PCI bus, by devfn: the board's own functions on its root bus."""
        used: dict[int, Device | _BoardDevice] = {}
        if self._bridge(bus) is None:
            used = {d.devfn: d for d in _board_devices(self.machine_type)}
        used.update({d.devfn: d for d in self.devices if d.bus == bus and d.devfn is not None})
        return used

    def _plug(self, bus: str, bus_type: str, addr: int, driver: str, hotplug: bool,
              multifunction: bool) -> int | None:
        """Where a new device goes on ``bus``: the hot-plug handler's pre-plug check, then
        on a PCI bus its slot/function (None on other buses)."""
        if hotplug:
            self._pre_plug(bus)
        if bus_type != "PCI":
            return None
        used = self._pci_functions(bus)
        devfn = self._pci_devfn(bus, used, addr, driver, hotplug)
        _check_multifunction(used, devfn, multifunction)
        return devfn

    def _pci_devfn(self, bus: str, used: dict[int, Device | _BoardDevice], devfn: int, driver: str,
                   hotplug: bool) -> int:
        """do_pci_register_device's choice and checks of a slot/function among ``used``
        (a PCIe root port's bus takes 32 slots in QEMU 7.2, as any PCI bus)."""
        if devfn < 0:
            found = next((fn for fn in range(0, 256, 8) if fn not in used), None)
            if found is None:
                raise QMPError(f"PCI: no slot/function available for {driver}, all in use or reserved")
            return found
        holder = used.get(devfn)
        slot, function = devfn >> 3, devfn & 7
        if holder is not None:
            # The holder's id with %s: glibc's "(null)" when it has none.
            raise QMPError(f"PCI: slot {slot} function {function} not available for {driver}, in use "
                           f"by {holder.driver},id={holder.id if holder.id is not None else '(null)'}")
        # pci_get_function_0: behind a root port (an upstream port's bus) only devfn 0
        # counts, whatever the slot asked for; elsewhere the slot's function 0.
        bridge = self._bridge(bus)
        upstream = bridge is not None and bridge.driver == "pcie-root-port"
        first = used.get(0 if upstream else devfn & ~7)
        if hotplug and first is not None:
            raise QMPError(f"PCI: slot {(first.devfn or 0) >> 3} function 0 already occupied by "
                           f"{first.driver}, new func {driver} cannot be exposed to guest.")
        return devfn

    def _scsi_address(self, bus: str, channel: int, target: int, lun: int) -> tuple[int, int, int]:
        """scsi_bus_check_address, then scsi_qdev_realize's choice of a free target/LUN."""
        used = {d.scsi_address: d for d in self.devices if d.bus == bus and d.scsi_address}
        if channel > _SCSI_MAX_CHANNEL:
            raise QMPError(f"bad scsi channel id: {_signed(channel)}")
        if target != _SCSI_ANY and target > _SCSI_MAX_TARGET:
            raise QMPError(f"bad scsi device id: {_signed(target)}")
        if lun != _SCSI_ANY and lun > _SCSI_MAX_LUN:
            raise QMPError(f"bad scsi device lun: {_signed(lun)}")
        if target != _SCSI_ANY and lun != _SCSI_ANY:
            holder = used.get((channel, target, lun))
            if holder is not None:
                # QEMU prints the holder's id with %s: glibc's "(null)" when it has none.
                raise QMPError(f"lun already used by '{holder.id if holder.id is not None else '(null)'}'")
            return channel, target, lun
        if target == _SCSI_ANY:
            lun = 0 if lun == _SCSI_ANY else lun
            free = next((t for t in range(_SCSI_MAX_TARGET + 1) if (channel, t, lun) not in used), None)
            if free is None:
                raise QMPError("no free target")
            return channel, free, lun
        free = next((n for n in range(_SCSI_MAX_LUN + 1) if (channel, target, n) not in used), None)
        if free is None:
            raise QMPError("no free lun")
        return channel, target, free

    def _bus_hotpluggable(self, bus: str) -> bool:
        """qbus_is_hotpluggable: q35's PCIe root bus never is (devices go behind root
        ports); i440fx's pci.0 is through ACPI's hot-plug only. A root port's bus always
        has a hot-plug handler (its slot), a PCI bridge's its SHPC, the DMI-to-PCI bridge's
        (i82801b11-bridge) q35's ACPI PCI hot-plug, even with ``acpi=off`` (as measured
        with QEMU 7.2)."""
        if self._bridge(bus) is not None:
            return True
        if bus == "pcie.0":
            return False
        if bus == "pci.0":
            return self.acpi
        return True

    def _check_iothread(self, value: Any) -> None:
        """The ``iothread`` link: object_resolve_link's checks and texts. A (partial) QOM
        path: ``ID``, ``objects/ID`` or ``/objects/ID`` of an iothread object; "" is none."""
        if isinstance(value, bool):
            value = "on" if value else "off"
        path = str(value)
        if not path:
            return
        object_id = path
        for prefix in ("/objects/", "objects/"):
            if path.startswith(prefix):
                object_id = path[len(prefix):]
        found = (self.objects.find(object_id)
                 if self.objects is not None and object_id and "/" not in object_id else None)
        if found is not None and found.qom_type == "iothread":
            return
        # Anything else the QOM tree holds under that path is of the wrong type.
        containers = {"machine", "objects", "peripheral", "peripheral-anon", "unattached",
                      "/machine", "/objects", "/machine/peripheral", "/machine/peripheral-anon",
                      "/machine/unattached"}
        name = path.removeprefix("/machine/peripheral/")
        if found is not None or path in containers or self.find(name) is not None:
            raise QMPError("Invalid parameter type for 'iothread', expected: iothread")
        raise QMPError(f"Device '{path}' not found", "DeviceNotFound")

    def _set_drive(self, drive: Any, backend_type: str) -> tuple[BlockBackend, bool]:
        """set_drive_helper: a -drive's backend by name, else a new one over a node."""
        if drive is None:
            raise QMPError("drive property not set")
        if not isinstance(drive, str):
            raise QMPError("Parameter 'drive' expects a string")
        named = self.named.get(drive)
        if named is not None:
            if named.dev is not None or any(d.backend is named for d in self.disks):
                raise QMPError(f"Drive '{drive}' is already in use by another device")
            return named, True
        node = self.block.graph.find(drive)
        if node is None:
            raise QMPError(f"Property '{backend_type}.drive' can't find value '{drive}'")
        blk = BlockBackend(self.block.graph, inmigrate=self._inmigrate)
        _call(blk.insert, node)
        return blk, False

    def _realize(self, device: Device, share_rw: bool, write_cache: str = "auto") -> None:
        blk = device.backend
        assert blk is not None
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
        # The device's write-cache wins over the backend's cache mode unless auto
        # (blkconf_apply_backend_options).
        if write_cache != "auto":
            blk.enable_write_cache = write_cache == "on"

    # device_del -----------------------------------------------------------------------

    def device_del(self, ident: str) -> list[dict[str, Any]]:
        """qmp_device_del; returns the DEVICE_DELETED data to send, in QEMU's order."""
        device = self.find(ident)
        if device is None:
            raise QMPError(f"Device '{ident}' not found", "DeviceNotFound")
        if not device.hotpluggable:
            raise QMPError(f"Bus '{device.bus}' does not support hotplugging")
        # The guest acknowledges the unplug at once (there is none to wait for). A
        # controller's disks go first, newest first: bus_unparent unplugs a bus's children
        # (bus_add_child put each new one at the head) before the device holding the bus.
        return self._unplug_tree(device)

    def _unplug_tree(self, device: Device) -> list[dict[str, Any]]:
        """Unplug ``device`` after everything on its buses, depth first (bus_unparent)."""
        events: list[dict[str, Any]] = []
        for child in [d for d in reversed(self.devices) if d.bus in device.child_buses]:
            events += self._unplug_tree(child)
        return events + self._unplug(device)

    def _unplug(self, device: Device) -> list[dict[str, Any]]:
        """Remove one device and its backend; its DEVICE_DELETED data, child first."""
        self.devices.remove(device)
        blk = device.backend
        if blk is not None:
            _call(blk.detach_dev)
            if device.legacy_drive:
                # blockdev_auto_del: the jobs on the drive are cancelled, and its backend
                # (and its nodes) go with the device.
                if blk.node is not None:
                    for listener in self.auto_del_listeners:
                        listener(blk.node)
                del self.named[blk.name]
                self._drive_units.pop(blk.name, None)
                node = blk.node
                _call(blk.remove)
                if node is not None and not node.parents:
                    self._close_tree(node.name)
            else:
                _call(blk.remove)
        events: list[dict[str, Any]] = []
        if device.driver in TRANSPORT_CHILD:
            # The transport's virtio-backend child has no id: its path alone.
            events.append({"path": f"{device.path}/virtio-backend"})
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
        warnings: list[tuple[str, str]] = []
        opts = parse_qemu_opts(text, warnings)
        for message, hint in warnings:
            # warn_report under the option's location, then error_printf's hint.
            log.warning("%s", message)
            log.warning("%s\n", hint, extra={HINT: True})
        self.drive_new(opts)

    def cli_device(self, text: str) -> None:
        """One ``-device`` argument: JSON as libvirt sends it, or ``driver,key=value,...``."""
        if text.lstrip().startswith("{"):
            props = parse_json_option(text)
            if not isinstance(props, dict):
                raise QMPError("-device argument must be a JSON object")
        else:
            props = parse_keyval(text, "driver")
        self.device_add(props, hotplug=False)
