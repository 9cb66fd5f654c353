"""HMP's migration commands, as QEMU 10.1 prints them (migration/migration-hmp-cmds.c).

``migrate [-d] uri``, ``migrate_cancel``, ``migrate_start_postcopy``, ``migrate_incoming uri``,
``migrate_set_capability name on|off``, ``migrate_set_parameter name value``,
``info migrate``, ``info migrate_capabilities``, ``info migrate_parameters``. Each is the QMP
command underneath; errors print as hmp_handle_error does (``Error: <desc>``).
"""

from __future__ import annotations

import errno
import math
from typing import Any

import trio

from ..errors import QMPError
from ..migration.service import MigrationService
from ..migration.state import MigrationStatus
from .args import HmpArgumentError, parse_arguments
from .sizes import INT64_MAX, SizeError, qemu_strtosz, qemu_strtosz_mib, qemu_strtou64

#: How often ``migrate`` without ``-d`` looks whether the migration ended (QEMU's
#: hmp_migrate_status_cb polls every second; less keeps an HMP client waiting less).
_POLL = 0.02
_STILL_RUNNING = frozenset({str(MigrationStatus.SETUP), str(MigrationStatus.ACTIVE),
                            str(MigrationStatus.DEVICE), str(MigrationStatus.CANCELLING)})
_SIZE_HINT = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
              "and exabytes, respectively.\n")
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


class MigrationCommands:
    """The HMP face of one machine's migration service."""

    def __init__(self, migration: MigrationService) -> None:
        self.migration = migration

    async def migrate(self, args: str) -> str:
        """``migrate [-d] uri``: without ``-d`` the monitor waits until it ends."""
        try:
            parsed = parse_arguments("migrate", "detach:-d,uri:s", args)
        except HmpArgumentError as err:
            return err.monitor_text
        try:
            await self.migration.migrate(str(parsed["uri"]))
        except QMPError as err:
            return f"Error: {err.desc}\n"
        if not parsed["detach"]:
            # hmp_migrate suspends the monitor until the migration is over; its error, if
            # any, goes to stderr (the source reports it there already).
            while self.migration.query().get("status") in _STILL_RUNNING:
                await trio.sleep(_POLL)
        return ""

    async def migrate_cancel(self, args: str) -> str:
        """``migrate_cancel``."""
        self.migration.cancel()
        return ""

    async def migrate_start_postcopy(self, args: str) -> str:
        """``migrate_start_postcopy``."""
        try:
            self.migration.start_postcopy()
        except QMPError as err:
            return f"Error: {err.desc}\n"
        return ""

    async def migrate_incoming(self, args: str) -> str:
        """``migrate_incoming uri``."""
        try:
            parsed = parse_arguments("migrate_incoming", "uri:s", args)
        except HmpArgumentError as err:
            return err.monitor_text
        try:
            await self.migration.migrate_incoming(str(parsed["uri"]), True)
        except QMPError as err:
            return f"Error: {err.desc}\n"
        return ""

    async def set_capability(self, args: str) -> str:
        """``migrate_set_capability name on|off``."""
        try:
            parsed = parse_arguments("migrate_set_capability", "capability:s,state:b", args)
        except HmpArgumentError as err:
            return err.monitor_text
        name = parsed["capability"]
        known = {cap["capability"] for cap in self.migration.query_capabilities()}
        if name not in known:
            return f"Error: invalid parameter value: {name}\n"
        try:
            self.migration.set_capabilities([{"capability": name, "state": parsed["state"]}])
        except QMPError as err:
            return f"Error: {err.desc}\n"
        return ""

    async def set_parameter(self, args: str) -> str:
        """``migrate_set_parameter name value``: the value read as hmp_migrate_set_parameter
        reads each parameter (QEMU's string input visitor for its QAPI type, MiB by
        default for the bandwidths), then QMP's checks on the result."""
        try:
            parsed = parse_arguments("migrate_set_parameter", "parameter:s,value:s", args)
        except HmpArgumentError as err:
            return err.monitor_text
        name, text = str(parsed["parameter"]), str(parsed["value"])
        current = self.migration.query_parameters()
        if name == "block-bitmap-mapping":
            return "Error: The block-bitmap-mapping parameter can only be set through QMP\n"
        if name not in current:
            return f"Error: invalid parameter value: {name}\n"
        try:
            value = parameter_value(name, text, current[name])
        except ParameterError as err:
            # hmp_handle_error: the error, then its hint if it has one.
            return f"Error: {err}\n{err.hint}"
        try:
            self.migration.set_parameters({name: value})
        except QMPError as err:
            return f"Error: {err.desc}\n"
        return ""

    async def info_migrate(self, args: list[str]) -> str:
        """``info migrate``: hmp_info_migrate's default view (without ``-a``)."""
        return format_info_migrate(self.migration.query())

    async def info_capabilities(self, args: list[str]) -> str:
        """``info migrate_capabilities``."""
        return "".join(f"{cap['capability']}: {'on' if cap['state'] else 'off'}\n"
                       for cap in self.migration.query_capabilities())


    async def info_parameters(self, args: list[str]) -> str:
        """``info migrate_parameters``."""
        return format_parameters(self.migration.query_parameters())


#: How hmp_migrate_set_parameter reads the integer parameters that are no byte sizes:
#: visit_type_uint8 / visit_type_uint32 (a C integer, then the type's range).
_UINT_TYPES = {"throttle-trigger-threshold": ("uint8_t", 0xFF),
               "cpu-throttle-initial": ("uint8_t", 0xFF),
               "cpu-throttle-increment": ("uint8_t", 0xFF),
               "max-cpu-throttle": ("uint8_t", 0xFF),
               "multifd-channels": ("uint8_t", 0xFF),
               "multifd-zlib-level": ("uint8_t", 0xFF),
               "multifd-qatzip-level": ("uint8_t", 0xFF),
               "multifd-zstd-level": ("uint8_t", 0xFF),
               "x-checkpoint-delay": ("uint32_t", 0xFFFF_FFFF)}
#: Read with qemu_strtosz_MiB: a number without a suffix counts MiB.
_MIB_SIZES = frozenset({"max-bandwidth", "avail-switchover-bandwidth"})
#: The enum parameters and their values (the schema's MultiFDCompression, MigMode and
#: ZeroPageDetection; tests/test_hmp_migration.py checks them against schema/).
ENUM_PARAMETERS: dict[str, tuple[str, ...]] = {
    "multifd-compression": ("none", "zlib", "zstd"),
    "mode": ("normal", "cpr-reboot", "cpr-transfer"),
    "zero-page-detection": ("none", "legacy", "multifd"),
}


class ParameterError(ValueError):
    """A value hmp_migrate_set_parameter refuses: its error text and error hint."""

    def __init__(self, text: str, hint: str = "") -> None:
        super().__init__(text)
        self.hint = hint


def _expects(name: str, what: str) -> ParameterError:
    return ParameterError(f"Parameter '{name}' expects {what}")


def parameter_value(name: str, text: str, current: object) -> Any:
    """One parameter's value from HMP text as QEMU 7.2's hmp_migrate_set_parameter reads
    it, with its error texts (raised as ParameterError; recorded from QEMU 7.2, whose texts
    10.x keeps): a string input visitor for the parameter's QAPI type."""
    if name in _MIB_SIZES:
        # qemu_strtosz_MiB with no end pointer, and at most INT64_MAX.
        parsed = qemu_strtosz_mib(text)
        if parsed is None or parsed[1] != len(text) or parsed[0] > INT64_MAX:
            raise ParameterError(f"Invalid size {text}")
        return parsed[0]
    if name in _UINT_TYPES:
        ctype, limit = _UINT_TYPES[name]
        number = qemu_strtou64(text)
        if number is None:
            raise _expects(name, "uint64")
        if number > limit:
            raise _expects(name, ctype)
        return number
    if name in ENUM_PARAMETERS:
        if text not in ENUM_PARAMETERS[name]:
            raise ParameterError(f"Parameter '{name}' does not accept value '{text}'")
        return text
    if isinstance(current, bool):
        if text not in _TRUE + _FALSE:
            raise _expects(name, "'on' or 'off'")
        return text in _TRUE
    if isinstance(current, int):
        # visit_type_size: parse_option_size's two texts (out of range, anything else).
        try:
            size = qemu_strtosz(text)
        except SizeError as err:
            if err.errno == errno.ERANGE:
                raise ParameterError(f"Value '{text}' is out of range for parameter '{name}'") from err
            raise ParameterError(f"Parameter '{name}' expects a non-negative number below 2^64",
                                 _SIZE_HINT) from err
        if name == "xbzrle-cache-size" and size > INT64_MAX:
            raise ParameterError(f"Invalid size {text}")
        return size
    if isinstance(current, str):
        return text
    raise ParameterError(f"invalid parameter value: {name}")


#: What hmp_info_migrate_parameters prints, in its order, with the unit after each value.
#: QEMU 7.2's lines for the parameters it has (compared live, tests/test_hmp_migration.py);
#: the later ones where QEMU 9.x/10.0 prints them, except that the last four come before
#: the ``block-bitmap-mapping`` tree here (7.2 ends with it; 10.x prints them after it).
#: The multifd compression levels are not printed, as in QEMU.
_PARAMETER_LINES: tuple[tuple[str, str], ...] = (
    ("announce-initial", " ms"), ("announce-max", " ms"), ("announce-rounds", ""),
    ("announce-step", " ms"), ("throttle-trigger-threshold", ""),
    ("cpu-throttle-initial", ""), ("cpu-throttle-increment", ""),
    ("cpu-throttle-tailslow", ""), ("max-cpu-throttle", ""), ("tls-creds", ""),
    ("tls-hostname", ""), ("max-bandwidth", " bytes/second"),
    ("avail-switchover-bandwidth", " bytes/second"), ("downtime-limit", " ms"),
    ("x-checkpoint-delay", " ms"), ("multifd-channels", ""), ("multifd-compression", ""),
    ("zero-page-detection", ""), ("xbzrle-cache-size", " bytes"),
    ("max-postcopy-bandwidth", ""), ("tls-authz", ""),
    ("x-vcpu-dirty-limit-period", " ms"), ("vcpu-dirty-limit", " MB/s"), ("mode", ""),
    ("direct-io", ""),
)


def format_parameters(params: dict[str, Any]) -> str:
    """``info migrate_parameters``: hmp_info_migrate_parameters' lines (the TLS strings
    quoted, booleans as on/off), then the ``block-bitmap-mapping`` tree when one is set."""
    lines: list[str] = []
    for name, unit in _PARAMETER_LINES:
        if name not in params:
            continue
        value = params[name]
        if isinstance(value, bool):
            text = "on" if value else "off"
        elif name.startswith("tls-"):
            text = f"'{value}'"
        else:
            text = f"{value}{unit}"
        lines.append(f"{name}: {text}")
    mapping = params.get("block-bitmap-mapping")
    if isinstance(mapping, list):
        lines.append("block-bitmap-mapping:")
        for node in mapping:
            lines.append(f"  '{node['node-name']}' -> '{node['alias']}'")
            lines.extend(f"    '{bitmap['name']}' -> '{bitmap['alias']}'"
                         for bitmap in node.get("bitmaps", []))
    return "".join(line + "\n" for line in lines)


def size_to_str(value: int) -> str:
    """QEMU's size_to_str: three significant digits and a binary prefix ("4 KiB")."""
    # frexp's exponent minus one is floor(log2(value * 1024 / 1000)): the correction
    # switches to the next prefix once the integer part reaches 1000.
    exponent = math.frexp(value / (1000.0 / 1024.0))[1]
    shift = int((exponent - 1) / 10) * 10  # C's division truncates toward zero
    prefix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][shift // 10]
    return f"{value / (1 << shift):0.3g} {prefix}B"


def _socket_uri(address: dict[str, Any]) -> str:
    # socket_uri(): how a SocketAddress reads in a URI.
    if address.get("type") == "unix":
        return f"unix:{address['path']}"
    return f"tcp:{address['host']}:{address['port']}"


def format_info_migrate(info: dict[str, Any]) -> str:
    """The text of hmp_info_migrate (QEMU 10.1) for a query-migrate result."""
    lines: list[str] = []
    status = info.get("status")
    if status is not None:
        line = f"Status: \t\t{status}"
        if status in ("failed", "postcopy-paused") and "error-desc" in info:
            line += f" ({info['error-desc']})"
        lines.append(line)
        if info.get("total-time"):
            line = f"Time (ms): \t\ttotal={info['total-time']}"
            for key, label in (("setup-time", "setup"), ("expected-downtime", "exp_down"),
                               ("downtime", "down")):
                if key in info:
                    line += f", {label}={info[key]}"
            lines.append(line)
    if "socket-address" in info:
        lines.append("Sockets: [")
        lines.extend(f"\t{_socket_uri(address)}" for address in info["socket-address"])
        lines.append("]")
    ram = info.get("ram")
    if ram is not None:
        lines.append("RAM info:")
        lines.append(f"  Throughput (Mbps): \t{ram['mbps']:0.2f}")
        lines.append(f"  Sizes: \t\tpagesize={size_to_str(ram['page-size'])}, "
                     f"total={size_to_str(ram['total'])}")
        lines.append(f"  Transfers: \t\ttransferred={size_to_str(ram['transferred'])}, "
                     f"remain={size_to_str(ram['remaining'])}")
        lines.append(f"    Channels: \t\tprecopy={size_to_str(ram['precopy-bytes'])}, "
                     f"multifd={size_to_str(ram['multifd-bytes'])}, "
                     f"postcopy={size_to_str(ram['postcopy-bytes'])}")
        lines.append(f"    Page Types: \tnormal={ram['normal']}, zero={ram['duplicate']}")
        line = f"  Page Rates (pps): \ttransfer={ram['pages-per-second']}"
        if ram["dirty-pages-rate"]:
            line += f", dirty={ram['dirty-pages-rate']}"
        lines.append(line)
        line = f"  Others: \t\tdirty_syncs={ram['dirty-sync-count']}"
        for key, label in (("postcopy-requests", "postcopy_req"), ("downtime-bytes", "downtime_bytes"),
                           ("dirty-sync-missed-zero-copy", "zerocopy_fallbacks")):
            if ram.get(key):
                line += f", {label}={ram[key]}"
        lines.append(line)
    return "".join(line + "\n" for line in lines)
