"""Commands about the machine itself: target, machine types, QOM, CPUs, power.

What they describe is in :mod:`qmp_server.machinemodel`; the live parts (the machine
type chosen, the UUID, the monitors) come from the MachineConfig.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any

from .. import machinemodel as model
from ..devices import TRANSPORT_CHILD
from ..dispatcher import CommandContext, CommandTable
from ..errors import QMPError
from ..objects import IdleThread, UserObject
from ..runstate import RunState

if TYPE_CHECKING:
    from ..machine import Machine

table = CommandTable()


class DeviceNotFound(QMPError):
    """QEMU's ERROR_CLASS_DEVICE_NOT_FOUND."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc, "DeviceNotFound")


def _machine_type(machine: Machine) -> model.MachineType:
    found = model.machine_type(machine.config.machine_type)
    if found is None:
        # The command line checks the name; a bad one here is a bug, not user error.
        raise AssertionError(f"unknown machine type {machine.config.machine_type!r}")
    return found


@table.query("query-target")
def query_target(machine: Machine) -> dict[str, str]:
    """The emulated architecture."""
    return {"arch": model.TARGET_ARCH}


@table.query("query-kvm")
def query_kvm(machine: Machine) -> dict[str, bool]:
    """KVM is neither used nor usable: the server runs no guest code (qmp_query_kvm)."""
    return {"enabled": False, "present": False}


@table.query("query-uuid")
def query_uuid(machine: Machine) -> dict[str, str]:
    """The VM's UUID (``-uuid``; all zeros by default, as QEMU)."""
    return {"UUID": machine.config.uuid}


@table.query("query-machines")
def query_machines(machine: Machine) -> list[dict[str, Any]]:
    """Every machine type the command line accepts (QEMU's qmp_query_machines), in the
    order QEMU 10.1 lists them."""
    return [entry.info() for entry in model.MACHINES_LISTED]


def _topology(machine: Machine) -> model.CpuTopology:
    # Checked at start-up (app.py), so it resolves here.
    return model.cpu_topology(machine.config.smp, _machine_type(machine))


#: Each machine's vCPU threads, made on first use: idle, but with ids of their own.
_vcpu_threads: weakref.WeakKeyDictionary[Machine, list[IdleThread]] = weakref.WeakKeyDictionary()


def _stop_all(threads: list[IdleThread]) -> None:
    for thread in threads:
        thread.stop()


def _vcpu_thread_ids(machine: Machine) -> list[int]:
    threads = _vcpu_threads.get(machine)
    if threads is None:
        threads = _vcpu_threads[machine] = [IdleThread(f"CPU {index}/TCG")
                                            for index in range(_topology(machine).cpus)]
        # Machines made and dropped in one process (tests) do not leave threads behind.
        weakref.finalize(machine, _stop_all, threads)
    return [thread.native_id for thread in threads]


@table.query("query-cpus-fast")
def query_cpus_fast(machine: Machine) -> list[dict[str, Any]]:
    """The vCPUs ``-smp`` gives the machine (none on ``-machine none``).

    No guest code runs: each vCPU's thread is an idle one (objects.IdleThread), so that a
    management tool can pin it and read its CPU time (libvirt ignores a vCPU whose thread
    id is the process's own).
    """
    topology = _topology(machine)
    thread_ids = _vcpu_thread_ids(machine)
    return [{"thread-id": thread_ids[index], "props": topology.props(index),
             "qom-path": topology.qom_path(index), "cpu-index": index, "target": model.TARGET_ARCH}
            for index in range(topology.cpus)]


@table.command("query-hotpluggable-cpus")
async def query_hotpluggable_cpus(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """The CPU slots up to ``maxcpus``, newest first as QEMU lists them; present ones have a path."""
    if not _machine_type(ctx.machine).hotpluggable_cpus:
        # qmp_query_hotpluggable_cpus for a machine without possible_cpu_arch_ids.
        raise QMPError("The feature 'query-hotpluggable-cpus' is not enabled")
    topology = _topology(ctx.machine)
    slots: list[dict[str, Any]] = []
    for index in reversed(range(topology.max_cpus)):
        slot: dict[str, Any] = {"props": topology.props(index), "vcpus-count": 1}
        if index < topology.cpus:
            slot["qom-path"] = topology.qom_path(index)
        slot["type"] = model.VCPU_TYPE
        slots.append(slot)
    return slots


@table.query("query-iothreads")
def query_iothreads(machine: Machine) -> list[dict[str, Any]]:
    """The ``-object iothread`` / object-add iothreads (block I/O runs in the main loop)."""
    return [obj.iothread_info() for obj in machine.objects.iothreads()]


@table.command("object-add")
async def object_add(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Create a user-creatable object (arguments already checked against ObjectOptions)."""
    ctx.machine.objects.add(args)
    return {}


@table.command("object-del")
async def object_del(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Remove a user-created object."""
    ctx.machine.objects.delete(args["id"])
    return {}


@table.query("query-cpu-definitions")
def query_cpu_definitions(machine: Machine) -> list[dict[str, Any]]:
    """No CPU model is modelled (there is no vCPU), so none is listed."""
    return []


@table.query("query-tpm-models")
def query_tpm_models(machine: Machine) -> list[str]:
    """No TPM frontend is modelled."""
    return []


@table.query("query-tpm-types")
def query_tpm_types(machine: Machine) -> list[str]:
    """No TPM backend is modelled."""
    return []


@table.command("query-command-line-options")
async def query_command_line_options(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """The option groups of the options the command line accepts (QEMU's QemuOptsList)."""
    wanted: str | None = args.get("option")
    if wanted is not None and wanted not in model.COMMAND_LINE_OPTIONS:
        raise QMPError(f"invalid option name: {wanted}")
    return [{"option": option,
             "parameters": [{"name": name, "type": kind} for name, kind in parameters]}
            for option, parameters in model.COMMAND_LINE_OPTIONS.items()
            if wanted is None or option == wanted]


@table.command("query-sev-capabilities")
async def query_sev_capabilities(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """SEV needs KVM, which is never used here: QEMU 7.2's text under TCG."""
    raise QMPError("KVM not enabled")


@table.command("query-sgx-capabilities")
async def query_sgx_capabilities(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """SGX needs KVM, which is never used here: QEMU 7.2's text under TCG."""
    raise QMPError("SGX is not enabled in KVM")


@table.query("query-chardev")
def query_chardev(machine: Machine) -> list[dict[str, Any]]:
    """The character devices: each -chardev, and one per -qmp/-monitor (compat_monitor<n>).

    QEMU's filename is that of a connected socket (``unix:PATH,server=on``) while a
    client is attached and ``disconnected:...`` otherwise; the asking client is attached
    to one of them, and we report them all as connected (qemu_chr_socket_address).
    """
    return [{"frontend-open": True, "filename": filename, "label": label}
            for label, filename, _ in machine.config.chardevs]


@table.command("qom-list-types")
async def qom_list_types(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """The QOM classes we model, filtered as qmp_qom_list_types does."""
    implements: str | None = args.get("implements")
    abstract: bool = args.get("abstract", False)
    result: list[dict[str, Any]] = []
    for entry in model.QOM_TYPES.values():
        if entry.abstract and not abstract:
            continue
        if implements is not None and not model.implements(entry.name, implements):
            continue
        info: dict[str, Any] = {"name": entry.name}
        if entry.abstract:
            info["abstract"] = True
        if entry.parent is not None:
            info["parent"] = entry.parent
        result.append(info)
    return result


def _class(typename: str) -> model.QOMType:
    entry = model.QOM_TYPES.get(typename)
    if entry is None:
        raise DeviceNotFound(f"Class '{typename}' not found")
    return entry


@table.command("qom-list-properties")
async def qom_list_properties(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """The properties of a QOM class: those we model for it."""
    entry = _class(args["typename"])
    if model.is_device(entry.name):
        # An object's properties carry no default-value (qmp_qom_list_properties).
        device = [{key: value for key, value in prop.items() if key != "default-value"}
                  for prop in model.DEVICE_PROPERTIES.get(entry.name, [])]
        return [*model.DEVICE_BASE_PROPERTIES, *device]
    return list(model.OBJECT_PROPERTIES.get(entry.name, [{"name": "type", "type": "string"}]))


@table.command("device-list-properties")
async def device_list_properties(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """The properties ``device_add`` takes for a device type (qmp_device_list_properties)."""
    typename: str = args["typename"]
    entry = model.QOM_TYPES.get(typename)
    if entry is None:
        raise DeviceNotFound(f"Device '{typename}' not found")
    if entry.abstract or not model.is_device(typename):
        raise QMPError("Parameter 'typename' expects a non-abstract device type")
    return list(model.DEVICE_PROPERTIES[typename])


# The QOM composition tree: path -> (type, children by name).  Built on each request from
# the configuration, which is all it depends on.
def _tree(machine: Machine) -> dict[str, tuple[str, dict[str, str]]]:
    tree: dict[str, tuple[str, dict[str, str]]] = {
        "/": ("container", {"objects": "container", "machine": _machine_type(machine).qom_type,
                            "chardevs": "container"}),
        "/objects": ("container", {}),
        "/machine": (_machine_type(machine).qom_type,
                     {"peripheral-anon": "container", "peripheral": "container",
                      "unattached": "container"}),
        "/machine/peripheral-anon": ("container", machine.devices.peripherals(anonymous=True)),
        "/machine/peripheral": ("container", machine.devices.peripherals(anonymous=False)),
        "/machine/unattached": ("container", {}),
        "/chardevs": ("container", {label: kind for label, _, kind in machine.config.chardevs}),
    }
    for label, _, kind in machine.config.chardevs:
        tree[f"/chardevs/{label}"] = (kind, {})
    topology = _topology(machine)
    for index in range(topology.cpus):
        path = topology.qom_path(index)
        tree["/machine/unattached"][1][path.rpartition("/")[2]] = model.VCPU_TYPE
        tree[path] = (model.VCPU_TYPE, {})
    for obj in machine.objects:
        tree["/objects"][1][obj.id] = obj.qom_type
        tree[f"/objects/{obj.id}"] = (obj.qom_type, {})
    for device in machine.devices.devices:
        # A virtio transport holds its disk as a child object (virtio-backend).
        child = TRANSPORT_CHILD.get(device.driver)
        children = {"virtio-backend": child} if child else {}
        tree[device.path] = (device.driver, children)
        for name, kind in children.items():
            tree[f"{device.path}/{name}"] = (kind, {})
    return tree


def _resolve(tree: dict[str, tuple[str, dict[str, str]]], path: str) -> str:
    """object_resolve_path: an absolute path, or a partial one matching exactly one object."""
    if path.startswith("/"):
        canonical = "/" + "/".join(part for part in path.split("/") if part)
        if canonical in tree:
            return canonical
        raise DeviceNotFound(f"Device '{path}' not found")
    parts = [part for part in path.split("/") if part]
    matches = [candidate for candidate in tree
               if candidate.split("/")[1:][-len(parts):] == parts or not parts]
    if len(matches) > 1:
        raise QMPError(f"Path '{path}' is ambiguous")
    if not matches:
        raise DeviceNotFound(f"Device '{path}' not found")
    return matches[0]


def _child_path(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


@table.command("qom-list")
async def qom_list(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, str]]:
    """The properties of the object at ``path``: its type and its children."""
    tree = _tree(ctx.machine)
    path = _resolve(tree, args["path"])
    _, children = tree[path]
    user_object = _user_object(ctx.machine, path)
    if user_object is not None:
        return user_object.property_types()
    return [{"name": "type", "type": "string"},
            *({"name": name, "type": f"child<{kind}>"} for name, kind in children.items())]


def _user_object(machine: Machine, path: str) -> UserObject | None:
    """The -object/object-add object at canonical ``path``, if it is one."""
    parent, _, name = path.rpartition("/")
    return machine.objects.find(name) if parent == "/objects" else None


@table.command("qom-get")
async def qom_get(ctx: CommandContext, args: dict[str, Any]) -> Any:
    """A property of the object at ``path``: ``type``, or a child's canonical path."""
    tree = _tree(ctx.machine)
    path = _resolve(tree, args["path"])
    kind, children = tree[path]
    name: str = args["property"]
    if name == "type":
        return kind
    if name in children:
        return _child_path(path, name)
    user_object = _user_object(ctx.machine, path)
    if user_object is not None:
        with contextlib.suppress(KeyError):
            return user_object.get(name)
    found = ctx.machine.devices.resolve(path)
    if found is not None:
        with contextlib.suppress(KeyError):
            return found[0].qom_property(name)
    raise QMPError(f"Property '{kind}.{name}' not found")


@table.command("system_reset")
async def system_reset(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Reset the machine: RESET; a VM that is not running comes back in prelaunch.

    With ``-no-reboot`` a shutdown instead: SHUTDOWN, then the exit after the reply (or,
    with ``-no-shutdown``, run state ``shutdown``). QEMU's main loop handles the request
    before the reply goes out, so the events come first (VM.reset_request).
    """
    vm = ctx.machine.vm
    if await vm.reset_request("host-qmp-system-reset"):
        ctx.after_reply.append(lambda: vm.request_exit(0))


@table.command("system_powerdown")
async def system_powerdown(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Press the power button: POWERDOWN; a running guest then powers itself off.

    There is no guest OS; the one we stand in for honours the ACPI request at once, as a
    guest does that has nothing to save: SHUTDOWN (guest-shutdown), then, as QEMU does
    for a guest power-off, exit after the reply, or with ``-no-shutdown`` stop in run
    state ``shutdown`` (main_loop_should_exit).  A paused guest cannot react: only
    POWERDOWN.  Events precede the reply, as with QEMU's main loop.
    """
    machine = ctx.machine
    machine.events.emit("POWERDOWN")
    if machine.vm.state is not RunState.RUNNING:
        return
    vm = machine.vm
    if await vm.shutdown("guest-shutdown", guest=True):
        ctx.after_reply.append(lambda: vm.request_exit(0))
