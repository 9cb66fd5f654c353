"""HMP ``nbd_server_start``, ``nbd_server_add``, ``nbd_server_remove``, ``nbd_server_stop``.

QEMU's hmp_nbd_server_* (block/monitor/block-hmp-cmds.c) call the QMP commands; so do
these, on the machine's NBD service (:mod:`..nbd.service`), with HMP's argument parsing
and its error printing (hmp_handle_error: ``Error: TEXT`` and the hints). Texts checked
against QEMU 7.2 in tests/test_nbd.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..devices import Devices
from ..errors import QMPError, with_hints
from ..fdsets import MonitorFds
from ..migration.uri import InetAddress, UnixAddress, parse_uri
from ..nbd.service import NbdService
from .args import HmpArgumentError, parse_arguments

#: QEMU's help lines (its params repeat the command's name).
HELP = {
    "nbd_server_start": "nbd_server_start nbd_server_start [-a] [-w] host:port -- serve block devices "
                        "on the given host and port",
    "nbd_server_add": "nbd_server_add nbd_server_add [-w] device [name] -- export a block device via "
                      "NBD",
    "nbd_server_remove": "nbd_server_remove nbd_server_remove [-f] name -- remove an export "
                         "previously exposed via NBD",
    "nbd_server_stop": "nbd_server_stop nbd_server_stop -- stop serving block devices using the NBD "
                       "protocol",
}


def socket_address(uri: str) -> dict[str, Any]:
    """QEMU's socket_parse: ``unix:PATH``, ``fd:NAME``, ``vsock:CID:PORT``, else
    ``[tcp:]HOST:PORT``, as the SocketAddressLegacy nbd-server-start takes."""
    if uri.startswith("fd:"):
        if uri == "fd:":
            raise QMPError("invalid file descriptor address")
        return {"type": "fd", "data": {"str": uri[len("fd:"):]}}
    if uri.startswith("vsock:"):
        cid, sep, port = uri[len("vsock:"):].partition(":")
        if not (sep and cid.isdigit() and port.isdigit()):
            raise QMPError(f"error parsing vsock address '{uri[len('vsock:'):]}'")
        return {"type": "vsock", "data": {"cid": cid, "port": port}}
    # The migration URI parser knows unix: and inet_parse, with the same texts.
    address = parse_uri(uri if uri.startswith(("unix:", "tcp:")) else "tcp:" + uri)
    if isinstance(address, UnixAddress):
        return {"type": "unix", "data": {"path": address.path}}
    assert isinstance(address, InetAddress)
    return {"type": "inet", "data": {"host": address.host, "port": address.port}}


class NbdCommands:
    """The HMP NBD commands over one machine's NBD service."""

    def __init__(self, nbd: NbdService, devices: Devices,
                 monitor_fds: Callable[[], MonitorFds | None]) -> None:
        self.nbd = nbd
        self.devices = devices
        #: The descriptors of the monitor running the command (fd:NAME addresses).
        self.monitor_fds = monitor_fds

    def _take_fd(self, name: str) -> int:
        # monitor_fd_param with the HMP monitor current: its named descriptors (none under
        # human-monitor-command), or a number.
        if not name[:1].isdigit():
            fds = self.monitor_fds()
            if fds is None:
                raise QMPError(f"File descriptor named '{name}' has not been found")
            return fds.take(name)
        if not name.isdigit() or int(name) > 0x7FFFFFFF:
            raise QMPError(f"Invalid file descriptor number '{name}'")
        return int(name)

    async def _add(self, device: str, name: str | None, writable: bool) -> None:
        # qmp_nbd_server_add: the export's id and name are the device's unless named; a
        # read-only node is exported read-only rather than refused; then blk_exp_add's
        # id checks and nbd_export_create's.
        node = self.devices.lookup_bs(device, device)
        export_id = device if name is None else name
        self.nbd.check_id(export_id)
        await self.nbd.add(export_id, node, name=export_id, description=None,
                           writable=writable and not node.read_only, bitmaps=[])

    async def start(self, args: str) -> str:
        """hmp_nbd_server_start: listen; with ``-a`` export every drive with a medium
        (writable with ``-w``), stopping the server again when one fails."""
        try:
            parsed = parse_arguments("nbd_server_start", "all:-a,writable:-w,uri:s", args)
        except HmpArgumentError as err:
            return err.monitor_text
        try:
            if parsed["writable"] and not parsed["all"]:
                raise QMPError("-w only valid together with -a")
            address = socket_address(str(parsed["uri"]))
            if self.nbd.running:
                raise QMPError("NBD server already running")
            await self.nbd.start(address, 0, self._take_fd)
            if parsed["all"]:
                # qmp_query_block's backends that have a medium, in its order.
                for entry in self.devices.query_block():
                    if "inserted" not in entry:
                        continue
                    try:
                        await self._add(entry["device"], None, bool(parsed["writable"]))
                    except QMPError:
                        await self.nbd.stop()
                        raise
        except QMPError as err:
            return f"Error: {with_hints(err)}\n"
        return ""

    async def add(self, args: str) -> str:
        """hmp_nbd_server_add: nbd-server-add with writable given either way."""
        try:
            parsed = parse_arguments("nbd_server_add", "writable:-w,device:B,name:s?", args)
        except HmpArgumentError as err:
            return err.monitor_text
        name = parsed.get("name")
        try:
            await self._add(str(parsed["device"]), None if name is None else str(name),
                            bool(parsed["writable"]))
        except QMPError as err:
            return f"Error: {with_hints(err)}\n"
        return ""

    async def remove(self, args: str) -> str:
        """hmp_nbd_server_remove: ``-f`` removes it even with clients connected."""
        try:
            parsed = parse_arguments("nbd_server_remove", "force:-f,name:s", args)
        except HmpArgumentError as err:
            return err.monitor_text
        try:
            await self.nbd.delete(str(parsed["name"]), hard=bool(parsed["force"]))
        except QMPError as err:
            return f"Error: {with_hints(err)}\n"
        return ""

    async def stop(self, args: str) -> str:
        """hmp_nbd_server_stop."""
        try:
            parse_arguments("nbd_server_stop", "", args)
        except HmpArgumentError as err:
            return err.monitor_text
        try:
            await self.nbd.stop()
        except QMPError as err:
            return f"Error: {with_hints(err)}\n"
        return ""
