"""What the machine is made of, as QOM and QMP describe it: data only, no behaviour.

The server stands in for QEMU's x86_64 system emulator without a guest: it has a
machine object, QMP monitors (socket chardevs) and block devices, but no guest CPU,
memory or bus.  Everything here is checked against a live QEMU 7.2 in
tests/test_machine_commands.py; the machine types are QEMU 10.1's, the release we report,
and are checked against its recorded query-machines as well.  What is not listed here is
not modelled, and the commands answer for it exactly as a QEMU that lacks it would
(``Class 'x' not found``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

#: query-target's ``arch``.
TARGET_ARCH = "x86_64"

#: The machine type of QEMU's ``-machine none``: what the server is without a guest.
NONE_MACHINE = "none"

def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@dataclass(frozen=True)
class MachineType:
    """One entry of query-machines (QEMU's MachineInfo)."""

    name: str
    cpu_max: int
    hotpluggable_cpus: bool
    numa_mem_supported: bool
    deprecated: bool
    default_ram_id: str
    default_cpu_type: str | None = None
    #: Whether the type has ACPI (MachineInfo's ``acpi``, since QEMU 8.0: the machine
    #: class has an ``acpi`` property). A type property: ``-machine acpi=off`` leaves it.
    acpi: bool = True
    alias: str | None = None
    is_default: bool = False

    @property
    def qom_type(self) -> str:
        """The QOM class name, as qom-list-types and ``/machine``'s ``type`` say."""
        return f"{self.name}-machine"

    @property
    def family(self) -> str | None:
        """``pc-i440fx`` or ``pc-q35`` for a versioned PC type; None for ``none``."""
        family, _, version = self.name.rpartition("-")
        return family if family and version[:1].isdigit() else None

    @property
    def version(self) -> tuple[int, ...]:
        """The QEMU release a versioned type keeps compatible with, e.g. (10, 1)."""
        return _version_key(self.name.rpartition("-")[2])

    def info(self) -> dict[str, Any]:
        """query-machines' MachineInfo for this type."""
        info: dict[str, Any] = {
            "name": self.name, "hotpluggable-cpus": self.hotpluggable_cpus,
            "numa-mem-supported": self.numa_mem_supported, "cpu-max": self.cpu_max,
            "deprecated": self.deprecated, "default-ram-id": self.default_ram_id,
            "acpi": self.acpi,
        }
        if self.alias is not None:
            info["alias"] = self.alias
        if self.is_default:
            info["is-default"] = True
        if self.default_cpu_type is not None:
            info["default-cpu-type"] = self.default_cpu_type
        return info


def _pc(name: str, cpu_max: int, *, numa: bool = False, deprecated: bool = False) -> MachineType:
    """A versioned i440fx or q35 PC: what all of them share, and the columns that differ."""
    return MachineType(name, cpu_max, hotpluggable_cpus=True, numa_mem_supported=numa,
                       deprecated=deprecated, default_ram_id="pc.ram",
                       default_cpu_type="qemu64-x86_64-cpu")


# QEMU 10.1's machine types of the families we model, as its query-machines answers, in
# the order it lists them (its class table's). The source is libvirt's recorded probe of
# QEMU 10.1.0, tests/qemucapabilitiesdata/caps_10.1.0_x86_64.replies in libvirt's
# repository, copied to tests/data/query-machines-10.1.json. What the rows show, from
# hw/i386/pc_piix.c and pc_q35.c of that release: the types before 4.2 are gone, those
# before 7.2 are deprecated, only 5.0 and older keep numa-mem-supported, and q35 raised
# its CPU limit from 288 to 1024 in 8.1 and to 4096 in 9.0 (i440fx stays at 255). Left
# out, as before: isapc, microvm and x-remote (no board of theirs is modelled).
_MACHINE_TABLE: tuple[MachineType, ...] = (
    _pc("pc-q35-5.2", 288, deprecated=True),
    _pc("pc-i440fx-6.2", 255, deprecated=True),
    _pc("pc-q35-4.2", 288, numa=True, deprecated=True),
    _pc("pc-i440fx-5.2", 255, deprecated=True),
    _pc("pc-i440fx-4.2", 255, numa=True, deprecated=True),
    _pc("pc-q35-9.1", 4096),
    _pc("pc-q35-7.1", 288, deprecated=True),
    _pc("pc-q35-8.1", 1024),
    MachineType(NONE_MACHINE, cpu_max=1, hotpluggable_cpus=False, numa_mem_supported=False,
                deprecated=False, default_ram_id="ram", acpi=False),
    _pc("pc-i440fx-8.1", 255),
    _pc("pc-q35-6.1", 288, deprecated=True),
    _pc("pc-i440fx-9.1", 255),
    _pc("pc-q35-10.0", 4096),
    _pc("pc-i440fx-7.1", 255, deprecated=True),
    _pc("pc-q35-5.1", 288, deprecated=True),
    _pc("pc-i440fx-10.1", 255),
    _pc("pc-i440fx-6.1", 255, deprecated=True),
    _pc("pc-i440fx-5.1", 255, deprecated=True),
    _pc("pc-q35-9.0", 4096),
    _pc("pc-q35-7.0", 288, deprecated=True),
    _pc("pc-q35-8.0", 288),
    _pc("pc-i440fx-8.0", 255),
    _pc("pc-q35-6.0", 288, deprecated=True),
    _pc("pc-i440fx-9.0", 255),
    _pc("pc-i440fx-7.0", 255, deprecated=True),
    _pc("pc-q35-5.0", 288, numa=True, deprecated=True),
    _pc("pc-i440fx-10.0", 255),
    _pc("pc-q35-9.2", 4096),
    _pc("pc-q35-7.2", 288),
    _pc("pc-i440fx-6.0", 255, deprecated=True),
    _pc("pc-q35-8.2", 1024),
    _pc("pc-i440fx-8.2", 255),
    _pc("pc-i440fx-5.0", 255, numa=True, deprecated=True),
    _pc("pc-q35-6.2", 288, deprecated=True),
    _pc("pc-i440fx-9.2", 255),
    _pc("pc-q35-10.1", 4096),
    _pc("pc-i440fx-7.2", 255),
)

#: The alias each family's newest type carries (pc_i440fx_machine_options and
#: pc_q35_machine_options of the newest version set it); i440fx is QEMU's default.
_FAMILY_ALIASES = {"pc-i440fx": "pc", "pc-q35": "q35"}
_DEFAULT_FAMILY = "pc-i440fx"


def _with_aliases(table: tuple[MachineType, ...]) -> tuple[MachineType, ...]:
    """The table, each family's newest type with its alias (and the default flag)."""
    newest = {family: max((m for m in table if m.family == family), key=lambda m: m.version)
              for family in _FAMILY_ALIASES}
    return tuple(replace(m, alias=_FAMILY_ALIASES[m.family], is_default=m.family == _DEFAULT_FAMILY)
                 if m.family is not None and newest[m.family] is m else m for m in table)


def _help_order(machine: MachineType) -> tuple[bool, str, list[int]]:
    """QEMU's machine_class_cmp as a sort key: families alphabetically (``pc_piix`` before
    ``pc_q35``, as ``pc-i440fx`` before ``pc-q35``), each newest first by class name
    (strcmp, so ``9.2`` before ``10.1``), then the types without a family by name."""
    name = [ord(char) for char in machine.qom_type]
    if machine.family is None:
        return True, "", name
    return False, machine.family, [-code for code in name] + [1]


#: Every machine type, in the order query-machines lists them (the table's).
MACHINES_LISTED: tuple[MachineType, ...] = _with_aliases(_MACHINE_TABLE)

#: Every machine type by name, in the order ``-machine help`` lists them.
MACHINE_TYPES: dict[str, MachineType] = {
    machine.name: machine for machine in sorted(MACHINES_LISTED, key=_help_order)}

#: The machine type QEMU picks without -machine (the one flagged is-default).
DEFAULT_MACHINE = next(m.name for m in MACHINE_TYPES.values() if m.is_default)


def machine_type(name: str) -> MachineType | None:
    """The machine type called ``name`` or aliased so (``pc``, ``q35``); None if unknown."""
    found = MACHINE_TYPES.get(name)
    if found is not None:
        return found
    for machine in MACHINE_TYPES.values():
        if machine.alias == name:
            return machine
    return None


@dataclass(frozen=True)
class QOMType:
    """A QOM class: its parent, whether it is abstract, the interfaces it adds."""

    name: str
    parent: str | None
    abstract: bool = False
    interfaces: tuple[str, ...] = ()


def _types(*entries: QOMType) -> dict[str, QOMType]:
    return {entry.name: entry for entry in entries}


#: What a virtio PCI device that can sit on PCI or PCIe implements.
_PCIE_AND_PCI = ("pci-express-device", "conventional-pci-device")

# The classes of everything we model, with their ancestors and interfaces as QEMU 7.2
# registers them (``accel`` is a concrete class there, hence not abstract here).
QOM_TYPES: dict[str, QOMType] = _types(
    QOMType("object", None, abstract=True),
    QOMType("interface", None, abstract=True),
    *(QOMType(name, "interface", abstract=True) for name in (
        "resettable", "vmstate-if", "hotplug-handler", "nmi", "pci-express-device",
        "conventional-pci-device",
    )),
    QOMType("container", "object"),
    QOMType("chardev", "object", abstract=True),
    QOMType("chardev-socket", "chardev"),
    QOMType("accel", "object"),
    QOMType("tcg-accel", "accel"),
    QOMType("machine", "object", abstract=True),
    QOMType("x86-machine", "machine", abstract=True, interfaces=("nmi",)),
    QOMType("generic-pc-machine", "x86-machine", abstract=True, interfaces=("hotplug-handler",)),
    *(QOMType(m.qom_type, "machine" if m.name == NONE_MACHINE else "generic-pc-machine")
      for m in MACHINE_TYPES.values()),
    QOMType("device", "object", abstract=True, interfaces=("vmstate-if", "resettable")),
    QOMType("pci-device", "device", abstract=True),
    QOMType("virtio-pci", "pci-device", abstract=True),
    QOMType("virtio-blk-pci-base", "virtio-pci", abstract=True),
    QOMType("virtio-blk-pci", "virtio-blk-pci-base", interfaces=_PCIE_AND_PCI),
    # The (non-)transitional variants: the same device, with or without the legacy
    # virtio interface (libvirt's probe reads their presence as "virtio-pci-non-
    # transitional", and only then puts virtio devices on PCIe root ports of a q35).
    # A transitional device is a conventional PCI device only (virtio_pci_types_register).
    QOMType("virtio-blk-pci-transitional", "virtio-blk-pci-base",
            interfaces=("conventional-pci-device",)),
    QOMType("virtio-blk-pci-non-transitional", "virtio-blk-pci-base", interfaces=_PCIE_AND_PCI),
    QOMType("virtio-device", "device", abstract=True),
    QOMType("virtio-blk-device", "virtio-device"),
    QOMType("virtio-scsi-pci-base", "virtio-pci", abstract=True),
    QOMType("virtio-scsi-pci", "virtio-scsi-pci-base", interfaces=_PCIE_AND_PCI),
    QOMType("virtio-scsi-pci-transitional", "virtio-scsi-pci-base",
            interfaces=("conventional-pci-device",)),
    QOMType("virtio-scsi-pci-non-transitional", "virtio-scsi-pci-base", interfaces=_PCIE_AND_PCI),
    QOMType("virtio-scsi-common", "virtio-device", abstract=True),
    QOMType("virtio-scsi-device", "virtio-scsi-common"),
    QOMType("scsi-device", "device", abstract=True),
    QOMType("scsi-disk-base", "scsi-device", abstract=True),
    QOMType("scsi-hd", "scsi-disk-base"),
    QOMType("ide-device", "device", abstract=True),
    QOMType("ide-hd", "ide-device"),
    # q35's PCIe topology and its SATA controller, as libvirt builds a q35 domain from
    # them (QEMU 7.2's hw/pci-bridge, hw/ide/ich.c): the root port's slot is a hot-plug
    # handler (pcie-slot), the PCI bridges' SHPC one.
    QOMType("base-pci-bridge", "pci-device", abstract=True),
    QOMType("pcie-port", "base-pci-bridge", abstract=True),
    QOMType("pcie-slot", "pcie-port", abstract=True, interfaces=("hotplug-handler",)),
    QOMType("pcie-root-port-base", "pcie-slot", abstract=True, interfaces=("pci-express-device",)),
    QOMType("pcie-root-port", "pcie-root-port-base"),
    QOMType("pci-bridge", "base-pci-bridge",
            interfaces=("hotplug-handler", "conventional-pci-device")),
    QOMType("pcie-pci-bridge", "base-pci-bridge",
            interfaces=("hotplug-handler", "pci-express-device")),
    QOMType("i82801b11-bridge", "base-pci-bridge", interfaces=("conventional-pci-device",)),
    QOMType("ich9-ahci", "pci-device", interfaces=("conventional-pci-device",)),
    QOMType("user-creatable", "interface", abstract=True),
    QOMType("memory-backend", "object", abstract=True, interfaces=("user-creatable",)),
    QOMType("memory-backend-ram", "memory-backend"),
    QOMType("memory-backend-file", "memory-backend"),
    QOMType("memory-backend-memfd", "memory-backend"),
    QOMType("event-loop-base", "object", abstract=True, interfaces=("user-creatable",)),
    QOMType("iothread", "event-loop-base"),
    QOMType("secret_common", "object", abstract=True, interfaces=("user-creatable",)),
    QOMType("secret", "secret_common"),
    QOMType("throttle-group", "object", interfaces=("user-creatable",)),
)


def ancestors(name: str) -> list[str]:
    """``name`` and its parents up to ``object`` (or ``interface``)."""
    chain: list[str] = []
    current: str | None = name
    while current is not None:
        chain.append(current)
        current = QOM_TYPES[current].parent
    return chain


def implements(name: str, target: str) -> bool:
    """Whether class ``name`` casts to ``target``, as object_class_dynamic_cast decides.

    A parent matches; otherwise exactly one of the interfaces the class and its parents
    declare must be ``target`` or derive from it: QEMU treats several as ambiguous and
    fails the cast (so a device, which has two, does not "implement" ``interface``).
    """
    chain = ancestors(name)
    if target in chain:
        return True
    declared = [interface for cls in chain for interface in QOM_TYPES[cls].interfaces]
    return sum(target in ancestors(interface) for interface in declared) == 1


def is_device(name: str) -> bool:
    """Whether QOM class ``name`` is a device (derives from ``device``)."""
    return name in QOM_TYPES and "device" in ancestors(name)


# Properties every device has (qdev's device class), as qom-list-properties lists them.
DEVICE_BASE_PROPERTIES: list[dict[str, Any]] = [
    {"name": "type", "type": "string"},
    {"name": "parent_bus", "type": "link<bus>"},
    {"name": "realized", "type": "bool"},
    {"name": "hotplugged", "type": "bool"},
    {"name": "hotpluggable", "type": "bool"},
]

# device-list-properties of the block devices, as QEMU 7.2 answers it, limited to the
# properties that concern the disk and its backend: the virtio transport, PCI and
# guest-visible tuning knobs we do not model are left out, so a client probing for them
# concludes they are absent.
# Descriptions QEMU attaches to recurring property kinds.
_ON_OFF = "on/off"
_ON_OFF_AUTO = "on/off/auto"
_ERROR_POLICY = "Error handling policy, report/ignore/enospc/stop/auto"
_BLOCK_SIZE = "A power of two between 512 B and 2 MiB"
_DRIVE = "Node name or ID of a block device to use as a backend"


def _prop(name: str, type_: str, default: Any = None, description: str | None = None) -> dict[str, Any]:
    """One ObjectPropertyInfo; ``default`` None means QEMU reports no default."""
    prop: dict[str, Any] = {"name": name, "type": type_}
    if description is not None:
        prop["description"] = description
    if default is not None:
        prop["default-value"] = default
    return prop


# Each of those properties, defined once; a device names its own in the order QEMU's
# device-list-properties lists them.
_BLOCK_DEVICE_PROPERTIES: dict[str, dict[str, Any]] = {prop["name"]: prop for prop in (
    _prop("account-failed", "OnOffAuto", "auto", _ON_OFF_AUTO),
    _prop("account-invalid", "OnOffAuto", "auto", _ON_OFF_AUTO),
    _prop("addr", "int32", -1, "Slot and optional function number, example: 06.0 or 06"),
    _prop("backend_defaults", "OnOffAuto", "auto", _ON_OFF_AUTO),
    _prop("bios-chs-trans", "BiosAtaTranslation", "auto",
          "Logical CHS translation algorithm, auto/none/lba/large/rechs"),
    _prop("bootindex", "int32"),
    _prop("channel", "uint32", 0),
    _prop("config-wce", "bool", True, _ON_OFF),
    _prop("cyls", "uint32", 0),
    _prop("device_id", "str"),
    _prop("discard", "bool", True, _ON_OFF),
    _prop("discard_granularity", "size", 4294967295),
    _prop("dpofua", "bool", False, _ON_OFF),
    _prop("drive", "str", None, _DRIVE),
    _prop("heads", "uint32", 0),
    _prop("iothread", "link<iothread>"),
    _prop("lcyls", "uint32", 0),
    _prop("lheads", "uint32", 0),
    _prop("logical_block_size", "size", 0, _BLOCK_SIZE),
    _prop("lsecs", "uint32", 0),
    _prop("lun", "uint32", 4294967295),
    _prop("max-discard-sectors", "uint32", 4194303),
    _prop("max-write-zeroes-sectors", "uint32", 4194303),
    _prop("max_io_size", "uint64", 2147483647),
    _prop("max_unmap_size", "uint64", 1073741824),
    _prop("min_io_size", "size", 0),
    _prop("model", "str"),
    _prop("num-queues", "uint16", 65535),
    _prop("opt_io_size", "size", 0),
    _prop("physical_block_size", "size", 0, _BLOCK_SIZE),
    _prop("port_index", "uint16", 0),
    _prop("port_wwn", "uint64", 0),
    _prop("product", "str"),
    _prop("queue-size", "uint16", 256),
    _prop("removable", "bool", False, _ON_OFF),
    _prop("report-discard-granularity", "bool", True),
    _prop("rerror", "BlockdevOnError", "auto", _ERROR_POLICY),
    _prop("rotation_rate", "uint16", 0),
    _prop("scsi-id", "uint32", 4294967295),
    _prop("secs", "uint32", 0),
    _prop("serial", "str"),
    _prop("share-rw", "bool", False),
    _prop("unit", "uint32", 4294967295),
    _prop("vendor", "str"),
    _prop("ver", "str"),
    _prop("werror", "BlockdevOnError", "auto", _ERROR_POLICY),
    _prop("write-cache", "OnOffAuto", "auto", _ON_OFF_AUTO),
    _prop("write-zeroes", "bool", True, _ON_OFF),
    _prop("wwn", "uint64", 0),
    # Every PCI device's (hw/pci/pci.c pci_props), then the bridges' and root ports'.
    _prop("failover_pair_id", "str"),
    _prop("romfile", "str"),
    _prop("romsize", "uint32", 4294967295),
    _prop("x-pcie-lnksta-dllla", "bool", True, _ON_OFF),
    _prop("rombar", "uint32", 1),
    _prop("x-pcie-extcap-init", "bool", True, _ON_OFF),
    _prop("acpi-index", "uint32", 0),
    _prop("multifunction", "bool", False, _ON_OFF),
    _prop("ahci[0]", "child<memory-region>"),
    _prop("ahci-idp[0]", "child<memory-region>"),
    _prop("chassis_nr", "uint8", 0),
    _prop("bus-reserve", "uint32", 4294967295),
    _prop("mem-reserve", "size", 18446744073709551615),
    _prop("pref64-reserve", "size", 18446744073709551615),
    _prop("pref32-reserve", "size", 18446744073709551615),
    _prop("io-reserve", "size", 18446744073709551615),
    _prop("msi", "OnOffAuto", "auto", _ON_OFF_AUTO),
    _prop("shpc", "bool", True, _ON_OFF),
    _prop("port", "uint8", 0),
    _prop("aer_log_max", "uint16", 8),
    _prop("hotplug", "bool", True),
    _prop("x-native-hotplug", "bool", True),
    _prop("slot", "uint16", 0),
    _prop("chassis", "uint8", 0),
    _prop("power_controller_present", "bool", True, _ON_OFF),
    _prop("disable-acs", "bool", False),
    _prop("x-width", "PCIELinkWidth", "32", "1/2/4/8/12/16/32"),
    _prop("x-migrate-msix", "bool", True),
    _prop("x-speed", "PCIELinkSpeed", "16", "2_5/5/8/16"),
    # virtio-scsi's queues (hw/scsi/virtio-scsi.c virtio_scsi_properties).
    _prop("num_queues", "uint32", 4294967295),
    _prop("virtqueue_size", "uint32", 256),
    _prop("max_sectors", "uint32", 65535),
    _prop("cmd_per_lun", "uint32", 128),
)}


def _props(names: str) -> list[dict[str, Any]]:
    """The properties ``names`` (space-separated), in that order."""
    return [_BLOCK_DEVICE_PROPERTIES[name] for name in names.split()]


#: The properties every PCI device lists first (pci_props), in QEMU's order.
_PCI_COMMON = ("failover_pair_id romfile addr romsize x-pcie-lnksta-dllla rombar x-pcie-extcap-init "
               "acpi-index multifunction")

_VIRTIO_PCI = {
    "virtio-blk-pci":
        "addr share-rw lcyls queue-size lsecs heads account-invalid iothread lheads num-queues cyls "
        "secs min_io_size bootindex config-wce drive werror report-discard-granularity rerror "
        "write-cache physical_block_size opt_io_size logical_block_size max-discard-sectors discard "
        "discard_granularity write-zeroes max-write-zeroes-sectors account-failed backend_defaults "
        "serial",
    # The SCSI controller: its PCI address, iothread and queues; no disk of its own.
    "virtio-scsi-pci": "addr num_queues max_sectors iothread virtqueue_size cmd_per_lun",
}

DEVICE_PROPERTIES: dict[str, list[dict[str, Any]]] = {
    "virtio-blk-pci": _props(_VIRTIO_PCI["virtio-blk-pci"]),
    "virtio-blk-device": _props(
        "share-rw lcyls queue-size lsecs serial account-invalid iothread lheads num-queues cyls "
        "secs heads min_io_size config-wce drive werror report-discard-granularity rerror "
        "write-cache physical_block_size opt_io_size logical_block_size max-discard-sectors discard "
        "discard_granularity write-zeroes max-write-zeroes-sectors account-failed backend_defaults "
        "bootindex"
    ),
    "scsi-hd": _props(
        "scsi-id lun channel lheads lcyls share-rw account-invalid lsecs secs removable ver "
        "max_unmap_size cyls serial min_io_size product rotation_rate heads dpofua drive werror wwn "
        "vendor rerror write-cache physical_block_size max_io_size opt_io_size logical_block_size "
        "discard_granularity port_wwn port_index account-failed device_id backend_defaults "
        "bootindex"
    ),
    "virtio-scsi-pci": _props(_VIRTIO_PCI["virtio-scsi-pci"]),
    "virtio-scsi-device": _props("num_queues max_sectors iothread virtqueue_size cmd_per_lun"),
    "ide-hd": _props(
        "unit lsecs account-invalid model lheads rotation_rate drive serial logical_block_size ver "
        "share-rw write-cache heads wwn discard_granularity backend_defaults cyls lcyls opt_io_size "
        "rerror bios-chs-trans min_io_size account-failed physical_block_size secs werror bootindex"
    ),
    # The PCI(e) controllers, with all their properties as QEMU 7.2 lists them (libvirt
    # probes pcie-root-port's ``hotplug``).
    "pcie-root-port": _props(
        f"{_PCI_COMMON} port aer_log_max hotplug x-native-hotplug slot chassis "
        "power_controller_present disable-acs mem-reserve pref64-reserve bus-reserve x-width "
        "x-migrate-msix io-reserve x-speed pref32-reserve"
    ),
    "pci-bridge": _props(
        f"{_PCI_COMMON} chassis_nr bus-reserve mem-reserve pref64-reserve io-reserve msi "
        "pref32-reserve shpc"
    ),
    "pcie-pci-bridge": _props(f"{_PCI_COMMON} msi"),
    # The (non-)transitional virtio variants list what their base does, but for the
    # legacy switches (disable-legacy, disable-modern), which are not listed here anyway.
    **{f"{base}-{kind}": _props(_VIRTIO_PCI[base]) for base in _VIRTIO_PCI
       for kind in ("transitional", "non-transitional")},
    "i82801b11-bridge": _props(_PCI_COMMON),
    "ich9-ahci": _props(f"{_PCI_COMMON} ahci[0] ahci-idp[0]"),
}


# ---------------------------------------------------------------- user-creatable objects
# -object / object-add types we create (they hold no guest state here: a memory backend
# allocates nothing). Their qom-list-properties answers, as QEMU 7.2 gives them: libvirt's
# probe reads the memory backends' (libvirtd 9.0 crashes when the class is missing).
_MEMORY_BACKEND_PROPERTIES: list[dict[str, Any]] = [
    {"name": "type", "type": "string"},
    {"name": "share", "description": "Mark the memory as private to QEMU or shared", "type": "bool"},
    {"name": "size", "description": "Size of the memory region (ex: 500M)", "type": "int"},
    {"name": "dump", "description": "Set to 'off' to exclude from core dump", "type": "bool"},
    {"name": "prealloc-threads", "description": "Number of CPU threads to use for prealloc", "type": "int"},
    {"name": "x-use-canonical-path-for-ramblock-id", "type": "bool"},
    {"name": "policy", "description": "Set the NUMA policy", "type": "HostMemPolicy"},
    {"name": "prealloc-context", "description": "Context to use for creating CPU threads for preallocation",
     "type": "link<thread-context>"},
    {"name": "prealloc", "description": "Preallocate memory", "type": "bool"},
    {"name": "reserve", "description": "Reserve swap space (or huge pages) if applicable", "type": "bool"},
    {"name": "host-nodes", "description": "Binds memory to the list of NUMA host nodes", "type": "int"},
    {"name": "merge", "description": "Mark memory as mergeable", "type": "bool"},
]
OBJECT_PROPERTIES: dict[str, list[dict[str, Any]]] = {
    "memory-backend-ram": _MEMORY_BACKEND_PROPERTIES,
    "memory-backend-file": [*_MEMORY_BACKEND_PROPERTIES, *[
    {"name": "readonly", "type": "bool"},
    {"name": "align", "type": "int"},
    {"name": "pmem", "type": "bool"},
    {"name": "mem-path", "type": "string"},
    {"name": "discard-data", "type": "bool"},
]],
    "memory-backend-memfd": [*_MEMORY_BACKEND_PROPERTIES, *[
    {"name": "hugetlb", "description": "Use huge pages", "type": "bool"},
    {"name": "seal", "description": "Seal growing & shrinking", "type": "bool"},
    {"name": "hugetlbsize", "description": "Huge pages size (ex: 2M, 1G)", "type": "int"},
]],
    "iothread": [
    {"name": "type", "type": "string"},
    {"name": "thread-pool-min", "type": "int"},
    {"name": "aio-max-batch", "type": "int"},
    {"name": "thread-pool-max", "type": "int"},
    {"name": "poll-max-ns", "type": "int"},
    {"name": "poll-grow", "type": "int"},
    {"name": "poll-shrink", "type": "int"},
],
    "secret": [
    {"name": "type", "type": "string"},
    {"name": "iv", "type": "string"},
    {"name": "keyid", "type": "string"},
    {"name": "loaded", "type": "bool"},
    {"name": "format", "type": "QCryptoSecretFormat"},
    {"name": "file", "type": "string"},
    {"name": "data", "type": "string"},
],
    "throttle-group": [{"name": "type", "type": "string"}, *(
        {"name": name, "type": "ThrottleLimits" if name == "limits" else "int"} for name in (
            "x-bps-write-max-length", "x-iops-total-max-length", "x-iops-size", "limits", "x-bps-total",
            "x-iops-read-max-length", "x-bps-write", "x-iops-write-max-length", "x-bps-read-max",
            "x-iops-read-max", "x-bps-total-max", "x-bps-read-max-length", "x-iops-read", "x-bps-read",
            "x-bps-write-max", "x-iops-total-max", "x-iops-total", "x-iops-write", "x-bps-total-max-length",
            "x-iops-write-max"))],
}

#: ``-machine help`` descriptions (QEMU's MachineClass desc).
_MACHINE_DESCRIPTIONS = {"i440fx": "Standard PC (i440FX + PIIX, 1996)",
                         "q35": "Standard PC (Q35 + ICH9, 2009)"}


def machine_description(machine: MachineType) -> str:
    """The description ``-machine help`` prints for ``machine``."""
    if machine.name == NONE_MACHINE:
        return "empty machine"
    return _MACHINE_DESCRIPTIONS[machine.name.split("-")[1]]


#: ``-device help`` lines of the devices we model, as QEMU 7.2 prints them.
DEVICE_HELP: dict[str, str] = {
    "ich9-ahci": 'name "ich9-ahci", bus PCI, alias "ahci"',
    "ide-hd": 'name "ide-hd", bus IDE, desc "virtual IDE disk"',
    "scsi-hd": 'name "scsi-hd", bus SCSI, desc "virtual SCSI disk"',
    "virtio-blk-device": 'name "virtio-blk-device", bus virtio-bus',
    "virtio-blk-pci": 'name "virtio-blk-pci", bus PCI, alias "virtio-blk"',
    "virtio-scsi-device": 'name "virtio-scsi-device", bus virtio-bus',
    "virtio-scsi-pci": 'name "virtio-scsi-pci", bus PCI, alias "virtio-scsi"',
    **{f"{base}-{kind}": f'name "{base}-{kind}", bus PCI'
       for base in ("virtio-blk-pci", "virtio-scsi-pci") for kind in ("transitional", "non-transitional")},
}

#: ``-device help`` lines of the bridges and root ports we model (QEMU's
#: "Controller/Bridge/Hub devices" category), as QEMU 7.2 prints them.
BRIDGE_HELP: dict[str, str] = {
    "i82801b11-bridge": 'name "i82801b11-bridge", bus PCI',
    "pci-bridge": 'name "pci-bridge", bus PCI, desc "Standard PCI Bridge"',
    "pcie-pci-bridge": 'name "pcie-pci-bridge", bus PCI',
    "pcie-root-port": 'name "pcie-root-port", bus PCI, desc "PCI Express Root Port"',
}

#: The block drivers (``-drive format=help``), as blocklayer's graph registers them.
FORMATS: tuple[str, ...] = ("file", "null-co", "qcow2", "raw")


# query-command-line-options: QEMU 7.2's option groups (QemuOptsList) for the options the
# command line accepts, in QEMU's order, with their parameters' names and types (QEMU's
# help texts left out). -machine lists only the properties it accepts here. Options we
# refuse (-spice, -vnc, -netdev, -fsdev, ...) are absent, so a client does not plan to use them.
COMMAND_LINE_OPTIONS: dict[str, list[tuple[str, str]]] = {
    "machine": [("suppress-vmdesc", "boolean"), ("usb", "boolean"), ("mem-merge", "boolean"),
                ("dump-guest-core", "boolean"), ("accel", "string"), ("type", "string")],
    "sandbox": [("resourcecontrol", "string"), ("spawn", "string"), ("elevateprivileges", "string"),
        ("obsolete", "string"), ("enable", "boolean")],
    "name": [("debug-threads", "boolean"), ("process", "string"), ("guest", "string")],
    "msg": [("guest-name", "boolean"), ("timestamp", "boolean")],
    "overcommit": [("cpu-pm", "boolean"), ("mem-lock", "boolean")],
    "object": [],
    "boot-opts": [("strict", "boolean"), ("reboot-timeout", "number"), ("splash-time", "number"),
        ("splash", "string"), ("menu", "boolean"), ("once", "string"), ("order", "string")],
    "smp-opts": [("maxcpus", "number"), ("threads", "number"), ("cores", "number"), ("clusters", "number"),
        ("dies", "number"), ("sockets", "number"), ("cpus", "number")],
    "memory": [("maxmem", "size"), ("slots", "number"), ("size", "size")],
    "accel": [],
    "mon": [("pretty", "boolean"), ("chardev", "string"), ("mode", "string")],
    "global": [("value", "string"), ("property", "string"), ("driver", "string")],
    "rtc": [("driftfix", "string"), ("clock", "string"), ("base", "string")],
    "device": [],
    "chardev": [("abstract", "boolean"), ("tight", "boolean"), ("clipboard", "boolean"),
        ("mouse", "boolean"), ("logappend", "boolean"), ("logfile", "string"), ("append", "boolean"),
        ("chardev", "string"), ("size", "size"), ("debug", "number"), ("name", "string"),
        ("signal", "boolean"), ("mux", "boolean"), ("rows", "number"), ("cols", "number"),
        ("height", "number"), ("width", "number"), ("websocket", "boolean"), ("tls-authz", "string"),
        ("tls-creds", "string"), ("tn3270", "boolean"), ("telnet", "boolean"), ("reconnect", "number"),
        ("nodelay", "boolean"), ("delay", "boolean"), ("server", "boolean"), ("wait", "boolean"),
        ("ipv6", "boolean"), ("ipv4", "boolean"), ("to", "number"), ("localport", "string"),
        ("localaddr", "string"), ("fd", "string"), ("port", "string"), ("host", "string"),
        ("path", "string"), ("backend", "string")],
    "drive": [("copy-on-read", "boolean"), ("werror", "string"), ("rerror", "string"),
        ("read-only", "boolean"), ("file", "string"), ("if", "string"), ("media", "string"),
        ("index", "number"), ("unit", "number"), ("bus", "number"), ("stats-account-failed", "boolean"),
        ("stats-account-invalid", "boolean"), ("detect-zeroes", "string"), ("throttling.group", "string"),
        ("throttling.iops-size", "number"), ("throttling.bps-write-max-length", "number"),
        ("throttling.bps-read-max-length", "number"), ("throttling.bps-total-max-length", "number"),
        ("throttling.iops-write-max-length", "number"), ("throttling.iops-read-max-length", "number"),
        ("throttling.iops-total-max-length", "number"), ("throttling.bps-write-max", "number"),
        ("throttling.bps-read-max", "number"), ("throttling.bps-total-max", "number"),
        ("throttling.iops-write-max", "number"), ("throttling.iops-read-max", "number"),
        ("throttling.iops-total-max", "number"), ("throttling.bps-write", "number"),
        ("throttling.bps-read", "number"), ("throttling.bps-total", "number"),
        ("throttling.iops-write", "number"), ("throttling.iops-read", "number"),
        ("throttling.iops-total", "number"), ("werror", "string"), ("format", "string"),
        ("cache.writeback", "boolean"), ("aio", "string"), ("snapshot", "boolean"),
        ("force-share", "boolean"), ("discard", "string"), ("auto-read-only", "boolean"),
        ("cache.no-flush", "boolean"), ("cache.direct", "boolean"), ("driver", "string"),
        ("node-name", "string")],
}


# ---------------------------------------------------------------- vCPUs
# No vCPU runs, but a machine has them: libvirt checks that query-cpus-fast lists as many
# as the domain has (it refuses to start the domain otherwise) and matches them with
# query-hotpluggable-cpus by QOM path.

#: The QOM type of the vCPUs of the PC machines (their default CPU model).
VCPU_TYPE = "qemu64-x86_64-cpu"

_SMP_KEYS = ("cpus", "sockets", "dies", "clusters", "cores", "threads", "maxcpus")


@dataclass(frozen=True)
class CpuTopology:
    """``-smp`` as QEMU 7.2's machine_parse_smp_config resolves it."""

    cpus: int = 1
    max_cpus: int = 1
    sockets: int = 1
    dies: int = 1
    cores: int = 1
    threads: int = 1

    def props(self, index: int) -> dict[str, int]:
        """CpuInstanceProperties of vCPU ``index`` (x86's topology IDs), in QEMU's order."""
        props = {"core-id": index // self.threads % self.cores, "thread-id": index % self.threads}
        if self.dies > 1:
            props["die-id"] = index // (self.threads * self.cores) % self.dies
        props["socket-id"] = index // (self.threads * self.cores * self.dies)
        return props

    @staticmethod
    def qom_path(index: int) -> str:
        """Where vCPU ``index`` lives: QEMU creates one object between the first two."""
        return f"/machine/unattached/device[{index if index == 0 else index + 1}]"


def cpu_topology(smp: str | None, machine: MachineType) -> CpuTopology:
    """Resolve ``-smp`` for ``machine``; ValueError with QEMU's text when it is invalid.

    Missing counts are derived as QEMU 7.2 derives them: machine types from 6.2 on prefer
    cores over sockets. The machine ``none`` has no vCPU at all.
    """
    if machine.name == NONE_MACHINE:
        return CpuTopology(cpus=0, max_cpus=0)
    given = dict.fromkeys(_SMP_KEYS, 0)
    for index, item in enumerate(filter(None, (smp or "").split(","))):
        key, has_value, text = item.partition("=")
        if not has_value:
            if index > 0:
                raise ValueError(f"Parameter 'smp.{item}' is unexpected")
            key, text = "cpus", item
        if key not in given:
            raise ValueError(f"Parameter 'smp.{key}' is unexpected")
        try:
            given[key] = int(text, 0)
        except ValueError:
            raise ValueError(f"Parameter 'smp.{key}' expects integer") from None
    cpus, max_cpus = given["cpus"], given["maxcpus"]
    sockets, dies, clusters, cores, threads = (given[key] for key in _SMP_KEYS[1:6])
    dies, clusters, threads = dies or 1, clusters or 1, threads or 1
    if cpus == 0 and max_cpus == 0:
        sockets, cores = sockets or 1, cores or 1
    else:
        max_cpus = max_cpus or cpus
        if machine.version < (6, 2):
            cores = cores or 1
            sockets = sockets or max_cpus // (dies * clusters * cores * threads)
        else:
            sockets = sockets or 1
            cores = cores or max_cpus // (sockets * dies * clusters * threads)
    total = sockets * dies * clusters * cores * threads
    max_cpus = max_cpus or total
    cpus = cpus or max_cpus
    shape = f"sockets ({sockets}) * dies ({dies}) * cores ({cores}) * threads ({threads})"
    if total != max_cpus:
        raise ValueError(f"Invalid CPU topology: product of the hierarchy must match maxcpus: "
                         f"{shape} != maxcpus ({max_cpus})")
    if max_cpus < cpus:
        raise ValueError(f"Invalid CPU topology: maxcpus must be equal to or greater than smp: "
                         f"{shape} == maxcpus ({max_cpus}) < smp_cpus ({cpus})")
    # machine_parse_smp_config checks maxcpus, not cpus, against the type's limit (checked
    # live: "-smp 2,maxcpus=300" on pc names 300).
    if max_cpus > machine.cpu_max:
        raise ValueError(f"Invalid SMP CPUs {max_cpus}. The max CPUs supported by machine "
                         f"'{machine.name}' is {machine.cpu_max}")
    return CpuTopology(cpus, max_cpus, sockets, dies, cores, threads)
