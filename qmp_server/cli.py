"""The command line: QEMU-compatible options, so scripts written for QEMU work unchanged."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from blocklayer.lockbytes import lock_byte

from .chardev import Chardev, ChardevError, Chardevs, parse_bool, split_options
from .driveopts import parse_qemu_opts
from .errorreport import configure_messages, location, program_name, warn_report
from .errors import QMPError
from .keyval import parse_keyval
from .machinemodel import (
    BRIDGE_HELP,
    DEFAULT_MACHINE,
    DEVICE_HELP,
    FORMATS,
    MACHINE_TYPES,
    NONE_MACHINE,
    MachineType,
    cpu_topology,
    machine_description,
    machine_type,
)
from .server import DEFAULT_POLL_MAX_NS
from .version import PACKAGE, version_string

DEFAULT_SOCKET = "qmp.sock"

# Options that take an argument, and flags that don't; accepted with one or two dashes.
_WITH_ARG = {
    "qmp", "qmp-pretty", "monitor", "mon", "chardev", "serial", "parallel", "name", "incoming", "pidfile",
    "machine", "M", "accel", "blockdev", "device", "drive", "display", "vga", "m", "smp", "cpu",
    "uuid", "rtc", "boot", "audiodev", "msg", "overcommit", "sandbox", "object", "qtest", "global",
    "poll-max-ns", "loadvm", "hda", "hdb", "hdc", "hdd", "set",
}
_FLAGS = {
    "S", "nodefaults", "nographic", "daemonize", "version", "help", "h", "no-user-config",
    "no-shutdown", "no-acpi", "no-hpet", "no-reboot", "enable-kvm", "preconfig",
}
#: Flags that set an option of the same meaning.
_FLAG_FIELDS = {"S": "start_paused", "daemonize": "daemonize", "no-shutdown": "no_shutdown",
                "nodefaults": "nodefaults", "nographic": "nographic", "no-reboot": "no_reboot",
                "preconfig": "preconfig"}
#: Machine properties of the types we advertise (libvirt sets these); values are not used.
_MACHINE_PROPERTIES = {"accel", "usb", "dump-guest-core", "memory-backend", "mem-merge", "vmport",
                       "smm", "kernel-irqchip", "graphics", "suppress-vmdesc", "hpet", "acpi",
                       "pic", "pit", "sata", "smbus", "i8042", "confidential-guest-support"}

HELP = """\
usage: {prog} [options]

A QMP monitor server that behaves like QEMU's for the VM run state, block devices
and migration. With no monitor option it listens on ./{socket}.

Monitors (QEMU's spelling; see docs/command-line.md):
  -qmp unix:PATH,server=on,wait=off   QMP on a UNIX socket (repeatable)
  -qmp tcp:HOST:PORT,server=on,wait=off  QMP on TCP (no authentication: keep it on
                        loopback; other addresses get a warning)
  -qmp stdio, -monitor stdio   QMP / HMP on standard input and output
  -chardev socket,id=ID,path=PATH|host=H,port=P|fd=N[,server=on,wait=off]
  -chardev stdio,id=ID | null,id=ID
  -mon chardev=ID[,mode=control|readline][,pretty=on]   a monitor on a chardev
  -qtest unix:path=PATH | chardev:ID   the qtest protocol (answers FAIL to what needs a guest)
Machine:
  -S                    start paused (prelaunch); 'cont' starts the VM
  -name NAME            VM name (query-name)
  -machine TYPE[,...]   pc, q35, pc-i440fx-X.Y, pc-q35-X.Y or none (-machine help)
  -accel tcg|qtest      the accelerator (there is no guest to accelerate; kvm is refused)
  -uuid UUID            the VM UUID (query-uuid)
  -no-shutdown          a guest power-off leaves the VM in 'shutdown' instead of exiting
  -no-reboot            system_reset shuts the VM down instead
  -msg timestamp=on     stderr messages start with the time (UTC), as QEMU's
  -smp N[,maxcpus=M,sockets=S,cores=C,threads=T]   the vCPUs (query-cpus-fast)
  -m, -cpu, -rtc, -boot, -overcommit, -sandbox, -vga, -global   checked as QEMU
                        checks them; nothing to act on (there is no guest)
  -audiodev, -serial, -no-acpi, -nodefaults, -no-user-config, -display, -nographic
                        accepted (no guest); -preconfig is refused
  -object qom-type=TYPE,id=ID,...   secret, memory-backend-*, iothread, throttle-group
Block devices and migration:
  -blockdev OPTIONS     add a block node (key=value,... or JSON), as blockdev-add
  -drive OPTIONS        a block backend with its nodes (legacy)
  -hda FILE ... -hdd FILE, or FILE alone   a hard disk image (-drive media=disk,index=N)
  -device DRIVER,...    a disk frontend, controller or PCI bridge (-device help)
  -set GROUP.ID.NAME=VALUE   set NAME on an earlier -device or -drive with that id
  -incoming defer|unix:PATH|tcp:HOST:PORT  wait for an incoming migration
  -loadvm TAG           start from internal snapshot TAG (as HMP loadvm)
Process:
  -daemonize            detach once the monitors are ready (then cwd is /)
  -pidfile PATH         write the process id to PATH, locked: a second server refuses it
  -poll-max-ns NS       (qmp-server only) after answering a client, poll its socket
                        up to NS ns for the next request (default {poll}; 0: off)
  -version, --version   print the version and exit
  -h, -help, --help     print this help and exit
"""


class UsageError(Exception):
    """A command-line error: printed as ``<program>: <message>``, exit status 1."""


class Options:
    """Parsed command line.

    A plain class rather than a dataclass: creating a dataclass compiles its generated
    methods, ~2 ms for this one at every start (issue 9 §5).
    """

    def __init__(self) -> None:
        self.chardevs = Chardevs()
        self.start_paused = False
        self.name: str | None = None
        self.incoming: str | None = None
        #: ``-loadvm TAG``: load this internal snapshot before the machine starts.
        self.loadvm: str | None = None
        self.blockdevs: list[str] = []
        #: ``-device`` and ``-drive`` arguments as typed (keyval, or JSON for -device), in order.
        #: (the option as given, for error messages; its text with what -set added).
        self.devices: list[tuple[str, str]] = []
        #: (where it was given, for error messages; its QemuOpts text): ``-drive``,
        #: ``-hda`` to ``-hdd`` and image files given as bare arguments.
        self.drives: list[tuple[str, str]] = []
        #: ``-m`` in bytes, and ``-machine memory-backend=``: the guest RAM's backend object.
        self.ram_size: int | None = None
        self.memory_backend: str | None = None
        #: ``-smp`` as typed (resolved against the machine type: machinemodel.cpu_topology).
        self.smp: str | None = None
        #: ``-object`` arguments as typed.
        self.objects: list[str] = []
        self.daemonize = False
        self.pidfile: str | None = None
        self.default_socket = False
        self.poll_max_ns = DEFAULT_POLL_MAX_NS
        #: QEMU's default machine when -machine names none: the i440fx PC of our version.
        self.machine_type = DEFAULT_MACHINE
        self.accel = "tcg"
        self.uuid: str | None = None
        self.no_shutdown = False
        #: ``-no-acpi`` / ``-machine acpi=off`` (the last one wins): an i440fx machine without
        #: ACPI has no PCI hot-plug.
        self.acpi = True
        #: ``-qtest``: the chardev the qtest protocol is served on.
        self.qtest: Chardev | None = None
        self.nodefaults = False
        self.nographic = False
        #: Whether any monitor option was given (-qmp, -monitor, -mon): no default socket then.
        self.monitor_options = False
        #: ``-no-reboot``: a reset request shuts the VM down instead (QEMU's reboot_action).
        self.no_reboot = False
        #: Guest options with nothing to act on, kept (as typed, with the option) for the
        #: checks QEMU makes once every option is read (:func:`_check_guest_options`).
        self.cpu: str | None = None
        self.vga: str | None = None
        self.rtc: dict[str, str] = {}
        self.boot: dict[str, Any] = {}
        self.sandbox: list[tuple[str, dict[str, str]]] = []
        self.preconfig = False


def _machine_help() -> str:
    lines = ["Supported machines are:"]
    groups: dict[str, list[MachineType]] = {}
    for machine in MACHINE_TYPES.values():
        groups.setdefault(machine.name.rpartition("-")[0] or machine.name, []).append(machine)
    for group in groups.values():
        # QEMU lists each family newest first, by name (so "2.9" before "2.12").
        for machine in sorted(group, key=lambda m: m.name, reverse=True):
            description = machine_description(machine)
            if machine.alias is not None:
                lines.append(f"{machine.alias:<20} {description} (alias of {machine.name})")
            flags = " (default)" if machine.is_default else ""
            flags += " (deprecated)" if machine.deprecated else ""
            lines.append(f"{machine.name:<20} {description}{flags}")
    return "\n".join(lines) + "\n"


def _device_help() -> str:
    # QEMU prints the categories in its DeviceCategory order, bridges before storage.
    lines = ["Controller/Bridge/Hub devices:"]
    lines += [BRIDGE_HELP[device] for device in sorted(BRIDGE_HELP)]
    lines += ["", "Storage devices:"]
    lines += [DEVICE_HELP[device] for device in sorted(DEVICE_HELP)]
    return "\n".join(lines) + "\n\n"


def _is_help(value: str) -> bool:
    first = split_options(value)[0]
    return first in ("help", "?") or "help" in split_options(value)[1:]


def _help_query(name: str, value: str) -> str | None:
    """The text of ``-machine help``, ``-device help``, ``-drive format=help``; None if not one."""
    if name in ("machine", "M") and _is_help(value.removeprefix("type=")):
        return _machine_help()
    if name == "device" and split_options(value)[0] in ("help", "?"):
        return _device_help()
    if name == "drive" and "format=help" in split_options(value):
        formats = " ".join(sorted(FORMATS))
        return f"Supported formats: {formats}\n"
    if name == "cpu" and value in ("help", "?"):
        from . import cpumodels  # start-up time: only -cpu pays for the table

        return cpumodels.HELP
    if name == "accel" and value in ("help", "?"):
        return "Accelerators supported in QEMU binary:\ntcg\nqtest\n"
    return None


def _machine(options: Options, option: str, value: str) -> None:
    parts = split_options(value)
    first = parts[0]
    properties = parts[1:]
    if "=" in first:
        properties = parts
        first = ""
    for item in properties:
        key, _, setting = item.partition("=")
        if key == "type":
            first = setting
        elif key == "accel":
            options.accel = _accelerator(option, setting)
        elif key == "memory-backend":
            options.memory_backend = setting
        elif key == "acpi":
            options.acpi = setting != "off"
        elif key not in _MACHINE_PROPERTIES:
            raise UsageError(f"{option}: Invalid parameter '{key}'")
    if first:
        found = machine_type(first)
        if found is None:
            raise UsageError("unsupported machine type\nUse -machine help to list supported machines")
        options.machine_type = found.name


def _accelerator(option: str, value: str) -> str:
    # QEMU tries each of "a:b:c" in turn; KVM is never available here (no guest to run).
    for name in value.split(":"):
        if name in ("tcg", "qtest"):
            return name
        if name not in ("kvm", "hax", "whpx", "hvf", "xen", "nvmm"):
            raise UsageError(f"{option}: invalid accelerator {name}")
    raise UsageError(f"{option}: failed to initialize {value.split(':')[-1]}: No such file or directory")


def _uuid(option: str, value: str) -> str:
    text = value.lower()
    digits = text.replace("-", "")
    shape = [len(part) for part in text.split("-")]
    if shape not in ([8, 4, 4, 4, 12], [32]) or any(c not in "0123456789abcdef" for c in digits):
        raise UsageError(f"{option}: failed to parse UUID string: wrong format")
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def _size(option: str, value: str) -> int:
    # -m: QEMU's qemu_strtosz (an optional k/M/G/T/P/E suffix; MiB without one), in bytes.
    number = value.split(",")[0].removeprefix("size=")
    suffix = number[-1:].upper()
    shift = 10 * ("KMGTPE".index(suffix) + 1) if suffix and suffix in "KMGTPE" else 20
    body = number[:-1] if suffix and suffix in "KMGTPE" else number
    try:
        return int(float(body) * (1 << shift))
    except ValueError:
        raise UsageError(f"{option}: Parameter 'size' expects a non-negative number below 2^64\n"
                         "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                         "and exabytes, respectively.") from None


def _qtest(options: Options, option: str, value: str) -> None:
    if value.startswith("chardev:"):
        options.qtest = Chardev(value[len("chardev:"):], "", option)  # resolved later
        return
    # The legacy form is a chardev of its own: unix:path=P or unix:P, as -qmp's.
    address = value.removeprefix("unix:").removeprefix("path=")
    if not value.startswith("unix:"):
        raise UsageError(f"{option}: '{value.partition(':')[0]}' is not a valid char driver")
    path, _, rest = address.partition(",")
    device = Chardev("qtest", "socket", option, path=path)
    for item in filter(None, rest.split(",")):
        key, _, setting = item.partition("=")
        if key in ("server", "wait"):
            setattr(device, key, parse_bool(setting or "on", key, option))
    options.qtest = device


def _qemu_opts(option: str, value: str, keys: dict[str, str], implied: str | None = None) -> dict[str, str]:
    """``value`` parsed as QEMU's QemuOpts (qemu_opts_parse_noisily) for an option list
    whose parameters are ``keys`` (name: ``"bool"`` or ``"string"``); the last value of a
    name counts. Checked item by item as opts_do_parse does, so the first bad one is the
    one reported: ``Invalid parameter 'x'``, ``Parameter 'x' expects 'on' or 'off'``. A
    bare ``name`` (``noname``) gets QEMU's deprecation warning and means ``name=on``
    (``off``). ``implied``: the name of a first item without ``=`` (QEMU's
    implied_opt_name)."""
    items = split_options(value)
    if items and items[-1] == "":
        items.pop()  # a trailing comma ends the list (opts_do_parse stops at the NUL)
    result: dict[str, str] = {}
    for index, item in enumerate(items):
        name, has_value, setting = item.partition("=")
        if not has_value:
            if index == 0 and implied is not None:
                name, setting = implied, item
            else:
                # get_opt_name_value: the short form, deprecated since QEMU 6.0.
                name, setting = (item[2:], "off") if item.startswith("no") else (item, "on")
                with location(option):
                    warn_report(f"short-form boolean option '{item}' deprecated",
                                f"Please use {name}={setting} instead\n")
        kind = keys.get(name)
        if kind is None:
            raise UsageError(f"{option}: Invalid parameter '{name}'")
        if kind == "bool":
            parse_bool(setting, name, option)
        result[name] = setting
    return result


_RTC_KEYS = {"base": "string", "clock": "string", "driftfix": "string"}
_NAME_KEYS = {"guest": "string", "process": "string", "debug-threads": "bool"}
_MSG_KEYS = {"timestamp": "bool", "guest-name": "bool"}
_OVERCOMMIT_KEYS = {"mem-lock": "bool", "cpu-pm": "bool"}
_SANDBOX_KEYS = {"enable": "bool", "obsolete": "string", "elevateprivileges": "string",
                 "spawn": "string", "resourcecontrol": "string"}
_GLOBAL_KEYS = {"driver": "string", "property": "string", "value": "string"}
#: parse_sandbox: the values each setting takes (checked only with the sandbox enabled).
_SANDBOX_VALUES = {"obsolete": ("allow", "deny"), "elevateprivileges": ("deny", "children", "allow"),
                   "spawn": ("deny", "allow"), "resourcecontrol": ("deny", "allow")}
#: qemu_global_option's sscanf("%63[^.=].%63[^=]%n") followed by '=': DRIVER.PROP=VALUE.
_GLOBAL_SHORT = re.compile(r"[^.=]{1,63}\.[^=]{1,63}=")
#: The BootConfiguration members (qapi/machine.json) in the order QEMU's visitor takes them.
_BOOT_MEMBERS = {"order": "string", "once": "string", "menu": "bool", "splash": "string",
                 "splash-time": "int", "reboot-timeout": "int", "strict": "bool"}
#: select_vgahw's x86 types that exist in this QEMU build (-vga help).
_VGA_TYPES = ("none", "std", "cirrus", "vmware", "qxl", "virtio")
#: configure_rtc_base_datetime's sscanf("%d-%d-%d"): three numbers, then anything.
_RTC_DATE = re.compile(r"\s*[-+]?\d+-\s*[-+]?\d+-\s*[-+]?\d+")


def _global(option: str, value: str) -> None:
    """``-global DRIVER.PROP=VALUE`` or ``-global driver=D,property=P,value=V`` (QEMU's
    qemu_global_option). Which drivers and properties exist is not checked (QEMU warns
    about unknown ones once the machine is built, without failing)."""
    if _GLOBAL_SHORT.match(value):
        return
    settings = _qemu_opts(option, value, _GLOBAL_KEYS)
    if not all(key in settings for key in _GLOBAL_KEYS):
        raise UsageError(f"{option}: options 'driver', 'property', and 'value' are required")


def _boot(options: Options, option: str, value: str) -> None:
    """``-boot``: keyval with ``order`` implied (machine_parse_property_opt); the members
    are checked later, with the machine (:func:`_check_boot`)."""
    try:
        options.boot.update(parse_keyval(value, "order"))
    except QMPError as err:
        raise UsageError(f"{option}: {err.desc}") from None


def _check_boot(boot: dict[str, Any]) -> None:
    # machine_set_boot: the BootConfiguration visitor (members in schema order, then
    # anything left is unexpected), then validate_bootdevices on order and once.
    for member, kind in _BOOT_MEMBERS.items():
        text = boot.get(member)
        if text is None:
            continue
        if not isinstance(text, str):
            raise UsageError(f"Parameter 'boot.{member}' expects {'a string' if kind == 'string' else kind}")
        if kind == "bool" and text not in ("on", "off", "yes", "no", "true", "false", "y", "n"):
            raise UsageError(f"Parameter 'boot.{member}' expects 'on' or 'off'")
        if kind == "int":
            try:
                int(text, 0)
            except ValueError:
                raise UsageError(f"Parameter 'boot.{member}' expects integer") from None
    for member in boot:
        if member not in _BOOT_MEMBERS:
            raise UsageError(f"Parameter 'boot.{member}' is unexpected")
    for member in ("order", "once"):
        seen: set[str] = set()
        for device in boot.get(member, ""):
            if not "a" <= device <= "p":
                raise UsageError(f"Invalid boot device '{device}'")
            if device in seen:
                raise UsageError(f"Boot device '{device}' was given twice")
            seen.add(device)


def _sockets_first_machine() -> MachineType:
    """A PC type that resolves ``-smp`` as QEMU 7.2's ``none`` does: missing sockets
    derived first (``-smp 1,cores=2`` gives 0 sockets, as the PC types before 6.2)."""
    for machine in MACHINE_TYPES.values():
        family, _, version = machine.name.rpartition("-")
        parts = version.split(".")
        if family == "pc-i440fx" and all(p.isdigit() for p in parts) and \
                tuple(int(p) for p in parts) < (6, 2):
            return machine
    return MACHINE_TYPES[DEFAULT_MACHINE]


def _check_smp_on_none(smp: str | None) -> None:
    """``-smp`` on the machine ``none``: QEMU resolves it as for any machine (the
    resolver's topology errors), then refuses more than the one vCPU ``none`` allows."""
    if smp is None:
        return
    counts = parse_keyval(smp, "cpus")
    for level in ("dies", "clusters"):
        # machine_parse_smp_config: levels the machine's topology does not have.
        if counts.get(level, "1") != "1":
            raise UsageError(f"{level} not supported by this machine's CPU topology")
    try:
        topology = cpu_topology(smp, _sockets_first_machine())
        max_cpus = topology.max_cpus
    except ValueError as err:
        if not str(err).startswith("Invalid SMP CPUs"):
            # The PC's texts name its dies; a machine without them does not.
            raise UsageError(str(err).replace(" * dies (1)", "")) from None
        # More than the PC allows, so more than one; QEMU names maxcpus (else cpus).
        max_cpus = int(counts.get("maxcpus") or counts.get("cpus") or "0", 0)
        if not max_cpus:  # only the topology given: its product
            max_cpus = 1
            for key in ("sockets", "dies", "clusters", "cores", "threads"):
                max_cpus *= int(counts.get(key) or "1", 0)
    if max_cpus > 1:
        raise UsageError(f"Invalid SMP CPUs {max_cpus}. The max CPUs supported by machine "
                         f"'{NONE_MACHINE}' is 1")


def _check_guest_options(options: Options) -> None:
    """What QEMU's qemu_init checks once every option is read, in its order: the
    option combinations (qemu_validate_options), -sandbox (the early options), -rtc
    (configure_rtc), -vga (the default devices), the machine's -boot and -smp, then
    -cpu."""
    if options.incoming is not None and options.loadvm is not None:
        raise UsageError("'incoming' and 'loadvm' options are mutually exclusive")
    if options.preconfig and options.loadvm is not None:
        raise UsageError("'preconfig' and 'loadvm' options are mutually exclusive")
    if options.preconfig and options.incoming not in (None, "defer"):
        raise UsageError("'preconfig' supports '-incoming defer' only")
    if options.preconfig:
        # QEMU's -preconfig stops before the machine is built, for x-exit-preconfig; we
        # have no machine construction to pause (docs/command-line.md).
        raise UsageError("-preconfig: not supported by qmp-server: there is no machine "
                         "initialization to pause; leave -preconfig out")
    for option, settings in options.sandbox:
        if parse_bool(settings.get("enable", "off"), "enable", option):
            for key, allowed in _SANDBOX_VALUES.items():
                if key in settings and settings[key] not in allowed:
                    raise UsageError(f"{option}: invalid argument for {key}")
    base = options.rtc.get("base")
    if base is not None and base not in ("utc", "localtime") and not _RTC_DATE.match(base):
        raise UsageError("invalid datetime format\nvalid formats: '2006-06-17T16:01:21' or '2006-06-17'")
    for key, allowed in (("clock", ("host", "rt", "vm")), ("driftfix", ("slew", "none"))):
        if options.rtc.get(key, allowed[0]) not in allowed:
            raise UsageError(f"invalid option value '{options.rtc[key]}'")
    if options.vga is not None and options.vga not in _VGA_TYPES:
        # qemu_create_default_devices, before the machine's properties are applied.
        if options.vga in ("tcx", "cg3"):
            # Sun framebuffers: known to select_vgahw, not built for x86.
            name = "TCX" if options.vga == "tcx" else "CG3"
            raise UsageError(f"type is NULL\n{program_name()}: {name} framebuffer not available")
        raise UsageError(f"unknown vga type: {options.vga}")
    _check_boot(options.boot)
    if options.machine_type == NONE_MACHINE:
        _check_smp_on_none(options.smp)
    if options.cpu is not None:
        _check_cpu(options.cpu, options.machine_type)


def _check_cpu(value: str, machine: str) -> None:
    """``-cpu MODEL[,features]``: QEMU's parse_cpu_option finds the model (features are
    not checked here); the machine ``none`` then fails to create its CPU with it (QEMU
    7.2's x86 CPUs need an APIC id only a PC board assigns); a PC refuses ``host``
    without KVM, which is never available here."""
    from . import cpumodels  # start-up time: only -cpu pays for the table

    model = value.split(",")[0]
    if model not in cpumodels.MODELS:
        raise UsageError(f"unable to find CPU model '{model}'")
    if machine == NONE_MACHINE:
        raise UsageError("apic-id property was not initialized properly")
    if model == "host":
        raise UsageError("CPU model 'host' requires KVM or HVF")


#: QEMU 7.2's option groups (vm_config_groups) other than those -set refuses outright.
_OPTION_GROUPS = frozenset({
    "drive", "chardev", "device", "netdev", "nic", "net", "rtc", "global", "mon", "trace",
    "option-rom", "accel", "memory", "add-fd", "tpmdev", "overcommit", "msg", "name", "numa",
    "icount", "semihosting-config", "fw_cfg", "action", "sandbox", "spice", "vnc",
})
_SET_SYNTAX = re.compile(r"([^.]{1,63})\.([^.]{1,63})\.([^=]{1,63})=")


def _set_option(options: Options, value: str) -> None:
    """``-set GROUP.ID.NAME=VALUE`` as QEMU's qemu_set_option: it adds NAME=VALUE to the
    ``-device`` or ``-drive`` with that id given before it (the last value of a name
    counts). Other groups' options are not kept as QemuOpts here: refused."""
    match = _SET_SYNTAX.match(value)
    if match is None:
        raise UsageError(f'can\'t parse: "{value}"')
    group, ident, name = match.groups()
    if group in ("object", "machine", "smp-opts", "boot-opts"):
        raise UsageError(f"-set is not supported with {group}")
    if group not in _OPTION_GROUPS:
        raise UsageError(f"There is no option group '{group}'")
    setting = f",{name}={value[match.end():].replace(',', ',,')}"
    if group == "device":
        for index, (where, text) in enumerate(options.devices):
            # A JSON -device is not a QemuOpts one: -set does not see it.
            if not text.lstrip().startswith("{") and _opts_id(text, device=True) == ident:
                options.devices[index] = (where, text + setting)
                return
    elif group == "drive":
        for index, (where, text) in enumerate(options.drives):
            if _opts_id(text, device=False) == ident:
                options.drives[index] = (where, text + setting)
                return
    else:
        raise UsageError(f"-set {group}: not supported by qmp-server (only device and drive)")
    raise UsageError(f'there is no {group} "{ident}" defined')


def _opts_id(text: str, *, device: bool) -> str | None:
    """The ``id`` of a ``-device`` (its first element the driver) or ``-drive`` text."""
    try:
        found = parse_keyval(text, "driver") if device else parse_qemu_opts(text)
    except QMPError:
        return None  # the option's own error comes when it is used
    ident = found.get("id")
    return ident if isinstance(ident, str) else None


def _hd_drive(index: int, image: str) -> str:
    """``-hdX FILE`` as the ``-drive`` QEMU's drive_add makes of it: a disk at ``index``
    on the machine's default interface (a comma in the file name doubled, as QemuOpts
    reads it)."""
    return f"media=disk,index={index},file={image.replace(',', ',,')}"


def parse_args(argv: list[str]) -> Options:
    """Parse QEMU-style options; raise UsageError with QEMU's text where QEMU fails."""
    options = Options()
    chardevs = options.chardevs
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-"):
            # QEMU's second option pass: a bare argument is the first hard disk's image.
            options.drives.append((arg, _hd_drive(0, arg)))
            i += 1
            continue
        if arg == "-":
            raise UsageError(f"{arg}: invalid option")
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if name in _FLAGS:
            i += 1
            if name in ("help", "h"):
                sys.stdout.write(HELP.format(prog=program_name(), socket=DEFAULT_SOCKET,
                                             poll=DEFAULT_POLL_MAX_NS))
                raise SystemExit(0)
            if name == "version":
                print(f"QEMU emulator version {version_string()} ({PACKAGE})\n"
                      "qmp-server: a QMP server that stands in for QEMU, without a guest")
                raise SystemExit(0)
            if name in _FLAG_FIELDS:
                setattr(options, _FLAG_FIELDS[name], True)
            elif name == "no-acpi":
                # QEMU 7.2 turns it into the machine property acpi=off.
                options.acpi = False
            elif name == "enable-kvm":
                raise UsageError("-enable-kvm: failed to initialize kvm: No such file or directory")
            continue
        if name not in _WITH_ARG:
            raise UsageError(f"{arg}: invalid option")
        if i + 1 >= len(argv):
            raise UsageError(f"{arg}: requires an argument")
        value = argv[i + 1]
        option = f"{arg} {value}"
        i += 2
        text = _help_query(name, value)
        if text is not None:
            sys.stdout.write(text)
            raise SystemExit(0)
        try:
            _apply(options, chardevs, name, option, value)
        except ChardevError as err:
            raise UsageError(str(err)) from None
    try:
        chardevs.resolve()
        if options.qtest is not None and not options.qtest.backend:
            found = chardevs.devices.get(options.qtest.id)
            if found is None:
                raise UsageError(f'{options.qtest.option}: chardev "{options.qtest.id}" not found')
            options.qtest = found
        if options.nographic and not options.nodefaults and not options.monitor_options:
            # QEMU's -nographic without -nodefaults: the monitor (multiplexed with the
            # serial port, which we do not have) on standard input and output.
            chardevs.parse_legacy("stdio", control=False)
            options.monitor_options = True
    except ChardevError as err:
        raise UsageError(str(err)) from None
    try:
        _check_guest_options(options)
    except ChardevError as err:
        raise UsageError(str(err)) from None
    if options.vga not in (None, "none") and options.machine_type == NONE_MACHINE:
        warn_report("A -vga option was passed but this machine type does not use that option; "
                    "No VGA device has been created")
    if not options.monitor_options:
        chardevs.parse_legacy(f"unix:{DEFAULT_SOCKET},server=on,wait=off", control=True)
        options.default_socket = True
    return options


def _apply(options: Options, chardevs: Chardevs, name: str, option: str, value: str) -> None:
    """One option with its argument (``option`` is both, as QEMU quotes it in errors)."""
    if name in ("qmp", "qmp-pretty"):
        chardevs.parse_legacy(value + (",pretty=on" if name == "qmp-pretty" else ""), control=True)
        options.monitor_options = True
    elif name == "monitor":
        chardevs.parse_legacy(value, control=False)
        options.monitor_options = True
    elif name == "mon":
        chardevs.parse_mon(value)
        options.monitor_options = True
    elif name == "chardev":
        chardevs.parse_chardev(value)
    elif name == "serial":
        if value not in ("none", "null") and not value.startswith("chardev:"):
            raise UsageError(f"{option}: there is no guest serial port here; only none, null "
                             "or chardev:ID are accepted")
    elif name == "name":
        # QEMU: the first element is the implied 'guest' key.
        settings = _qemu_opts(option, value, _NAME_KEYS, implied="guest")
        if "guest" in settings:
            options.name = settings["guest"]
            configure_messages(name=options.name)  # -msg guest-name=on names it
    elif name == "msg":
        # configure_msg at once: what is reported from now on has the prefixes.
        settings = _qemu_opts(option, value, _MSG_KEYS)
        configure_messages(timestamp=parse_bool(settings.get("timestamp", "off"), "timestamp", option),
                           guest_name=parse_bool(settings.get("guest-name", "off"), "guest-name", option))
    elif name == "rtc":
        options.rtc.update(_qemu_opts(option, value, _RTC_KEYS))
    elif name == "overcommit":
        _qemu_opts(option, value, _OVERCOMMIT_KEYS)
    elif name == "sandbox":
        options.sandbox.append((option, _qemu_opts(option, value, _SANDBOX_KEYS, implied="enable")))
    elif name == "global":
        _global(option, value)
    elif name == "boot":
        _boot(options, option, value)
    elif name == "cpu":
        options.cpu = value
    elif name == "vga":
        options.vga = value
    elif name == "incoming":
        options.incoming = value
    elif name == "loadvm":
        options.loadvm = value
    elif name == "pidfile":
        options.pidfile = value
    elif name in ("machine", "M"):
        _machine(options, option, value)
    elif name == "accel":
        options.accel = _accelerator(option, split_options(value)[0].removeprefix("accel="))
    elif name == "uuid":
        options.uuid = _uuid(option, value)
    elif name == "m":
        options.ram_size = _size(option, value) or None  # -m 0: the default size
    elif name == "blockdev":
        options.blockdevs.append(value)
    elif name == "device":
        options.devices.append((option, value))
    elif name == "drive":
        options.drives.append((option, value))
    elif name == "set":
        try:
            _set_option(options, value)
        except UsageError as err:
            raise UsageError(f"{option}: {err}") from None
    elif name in ("hda", "hdb", "hdc", "hdd"):
        options.drives.append((option, _hd_drive(ord(name[2]) - ord("a"), value)))
    elif name == "smp":
        try:
            parse_keyval(value, "cpus")  # machine_parse_property_opt: the syntax, at once
        except QMPError as err:
            raise UsageError(f"{option}: {err.desc}") from None
        options.smp = value
    elif name == "object":
        options.objects.append(value)
    elif name == "qtest":
        _qtest(options, option, value)
    elif name == "poll-max-ns":
        # isdigit() alone admits "²" and other digits int() refuses.
        if not (value.isascii() and value.isdigit()) or int(value) > 1_000_000_000:
            raise UsageError(f"{option}: expected nanoseconds from 0 to 1000000000")
        options.poll_max_ns = int(value)
    # -audiodev, -parallel and -display: accepted, there is nothing to act on. The other
    # options for a guest (-cpu, -rtc, -boot, -sandbox, -vga, -global, -overcommit) are
    # checked as QEMU checks them, and otherwise have nothing to act on either.


class PidFileError(Exception):
    """The pidfile could not be created, locked or written (QEMU's texts)."""


class PidFile:
    """A ``-pidfile`` created and held as QEMU's ``qemu_write_pidfile`` does.

    The file is created mode 0600 and locked for as long as the process lives, so a second
    server (or QEMU, whose lockf() lock conflicts with ours) given the same path refuses
    to start. It is removed at exit only while it is still ours: another process may have
    replaced it since (same path, another inode).
    """

    def __init__(self, path: str, fd: int) -> None:
        # Absolute, as QEMU keeps its realpath: -daemonize changes to / before the exit.
        self.path = os.path.realpath(path)
        self.fd = fd

    @classmethod
    def create(cls, path: str) -> PidFile:
        """Create, lock and fill ``path``; raise :class:`PidFileError` with QEMU's text."""
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise PidFileError(f"Could not create '{path}': {os.strerror(exc.errno or 0)}") from exc
            try:
                if cls._lock_and_write(path, fd):
                    return cls(path, fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    @staticmethod
    def _lock_and_write(path: str, fd: int) -> bool:
        """False when ``path`` no longer names the file we locked (its owner removed it)."""
        try:
            # An OFD lock, unlike lockf(), survives this process closing some other
            # descriptor of the same file; the kernel still makes it conflict with QEMU's.
            lock_byte(fd, 0, exclusive=True)
        except OSError as exc:
            raise PidFileError(f"Cannot lock pid file: {os.strerror(exc.errno or 0)}") from exc
        opened = os.fstat(fd)
        try:
            named = os.stat(path)
        except OSError:
            return False
        if (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
            return False
        try:
            os.ftruncate(fd, 0)
        except OSError as exc:
            raise PidFileError(f"Failed to truncate pid file: {os.strerror(exc.errno or 0)}") from exc
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            raise PidFileError(f"Failed to write pid file: {os.strerror(exc.errno or 0)}") from exc
        return True

    def remove(self) -> None:
        """Delete the file if the path still names the one we hold locked, then let go."""
        if self.fd < 0:
            return
        try:
            named = os.stat(self.path)
            held = os.fstat(self.fd)
            if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                os.unlink(self.path)
        except OSError:
            pass  # already gone, or not ours to touch
        os.close(self.fd)
        self.fd = -1
