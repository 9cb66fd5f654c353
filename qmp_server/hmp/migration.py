"""HMP's migration commands, as QEMU 10.1 prints them (migration/migration-hmp-cmds.c).

``migrate [-d] uri``, ``migrate_cancel``, ``migrate_start_postcopy``, ``migrate_incoming uri``,
``migrate_set_capability name on|off``, ``migrate_set_parameter name value``,
``info migrate``, ``info migrate_capabilities``. Each is the QMP command underneath;
errors print as hmp_handle_error does (``Error: <desc>``).
"""

from __future__ import annotations

import math
from typing import Any

import trio

from ..errors import QMPError
from ..migration.service import MigrationService
from ..migration.state import MigrationStatus
from .args import HmpArgumentError, parse_arguments
from .sizes import SizeError, qemu_strtosz

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
        """``migrate_set_parameter name value``: the value read as its type reads a string
        (QEMU's string input visitor: sizes with suffixes, on/off, plain strings)."""
        try:
            parsed = parse_arguments("migrate_set_parameter", "parameter:s,value:s", args)
        except HmpArgumentError as err:
            return err.monitor_text
        name, text = str(parsed["parameter"]), str(parsed["value"])
        current = self.migration.query_parameters()
        if name not in current:
            return f"Error: invalid parameter value: {name}\n"
        value: Any
        if isinstance(current[name], bool):
            if text not in _TRUE + _FALSE:
                return f"Error: Parameter '{name}' expects 'on' or 'off'\n"
            value = text in _TRUE
        elif isinstance(current[name], int):
            try:
                value = qemu_strtosz(text)
            except SizeError:
                return (f"Error: Parameter '{name}' expects a non-negative number below 2^64\n"
                        + _SIZE_HINT)
        elif isinstance(current[name], str):
            value = text
        else:
            return f"Error: invalid parameter value: {name}\n"
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


#: Units hmp_info_migrate_parameters prints after some values (QEMU 7.2's layout).
_UNITS = {"announce-initial": " ms", "announce-max": " ms", "announce-step": " ms",
          "downtime-limit": " ms", "x-checkpoint-delay": " ms",
          "max-bandwidth": " bytes/second", "xbzrle-cache-size": " bytes"}


def format_parameters(params: dict[str, Any]) -> str:
    """``info migrate_parameters``: one ``name: value`` line per parameter, then the
    ``block-bitmap-mapping`` tree when one is set (QEMU's layout for it)."""
    lines: list[str] = []
    for name, value in params.items():
        if name == "block-bitmap-mapping":
            continue
        if isinstance(value, bool):
            text = "on" if value else "off"
        elif isinstance(value, str):
            text = f"'{value}'" if name.startswith("tls-") else value
        elif isinstance(value, (int, float)):
            text = f"{value}{_UNITS.get(name, '')}"
        else:
            continue
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
